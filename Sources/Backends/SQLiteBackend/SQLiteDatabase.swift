import CSQLite
import Saga

/// An SQLite database file as a saga ``SQLDatabase``.
///
/// Every connection runs in WAL mode with `synchronous=FULL` by default (a committed
/// transaction survives power loss), a busy timeout, foreign keys on and extended result codes.
/// The marker table is created on first open.
public final class SQLiteDatabase: SQLDatabase {
    public enum JournalMode: String, Sendable { case wal = "WAL", delete = "DELETE", truncate = "TRUNCATE" }
    public enum Synchronous: String, Sendable { case full = "FULL", normal = "NORMAL", extra = "EXTRA" }

    public struct Configuration: Sendable {
        public var journalMode: JournalMode = .wal
        public var synchronous: Synchronous = .full
        public var busyTimeout: Duration = .seconds(5)
        public var foreignKeys = true
        /// The SQLite VFS to open connections with (nil: the default). See ``SQLiteFaults``.
        public var vfs: String?
        /// The marker table's name: letters, digits and underscores.
        public var markerTable = "saga_markers"
        public init() {}
    }

    public let path: String
    public let configuration: Configuration
    /// Write transactions of this database's connections queue here (see ``WriterGate``).
    let gate = WriterGate()

    /// Opens (creating if needed) the database and its marker table; throws ``SQLiteError``
    /// naming the file if it cannot be opened or is not a database.
    public init(path: String, configuration: Configuration = Configuration()) throws {
        guard MarkerTable.isValidName(configuration.markerTable) else {
            throw SQLiteUsageError(description: "invalid marker table name \"\(configuration.markerTable)\": use letters, digits and underscores")
        }
        self.path = path
        self.configuration = configuration
        let conn = try SQLiteConnection(path: path, configuration: configuration)
        defer { conn.close() }
        try conn.ensureMarkerTable()
    }

    public func connect() throws -> any SQLConnection { try openConnection() }

    /// A connection of the concrete type, for work outside sagas (schema set-up, reads).
    public func openConnection() throws -> SQLiteConnection {
        try SQLiteConnection(path: path, configuration: configuration, gate: gate)
    }
}
