import CSQLite
import Foundation
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
        /// The SQLite VFS to open connections with (nil: the default). The testing product registers a fault-injecting one (`SQLiteFaults` in `SagaFaultKit`).
        public var vfs: String?
        /// The marker table's name: letters, digits and underscores.
        public var markerTable = "saga_markers"
        /// Prepared statements kept per connection (least recently used ones are finalized).
        public var statementCacheSize = 64
        public init() {}

        /// What is wrong with the values, if anything.
        var problem: String? {
            if !MarkerTable.isValidName(markerTable) {
                return "invalid marker table name \"\(markerTable)\": use letters, digits and underscores"
            }
            // synchronous=NORMAL skips the fsync at COMMIT in WAL mode: a power loss can take
            // back a COMMIT that was acknowledged, and recovery would then undo a saga its
            // caller was told had committed.
            if synchronous == .normal {
                return "synchronous NORMAL can lose an acknowledged COMMIT at power loss; use FULL or EXTRA"
            }
            if statementCacheSize < 1 || statementCacheSize > 100_000 {
                return "statementCacheSize must be between 1 and 100000, not \(statementCacheSize)"
            }
            if busyTimeout < .zero || busyTimeout > .milliseconds(Int32.max) {
                return "busyTimeout must be between 0 and \(Int32.max) ms (SQLite takes a 32-bit count), not \(busyTimeout)"
            }
            return nil
        }

        /// The busy timeout in SQLite's unit, once ``problem`` is nil.
        var busyTimeoutMilliseconds: Int32 {
            Int32(busyTimeout.components.seconds * 1000 + busyTimeout.components.attoseconds / 1_000_000_000_000_000)
        }
    }

    public let path: String
    public let configuration: Configuration
    public var markerTable: String { configuration.markerTable }
    /// `INSERT OR IGNORE`; no locking read is needed (the writer holds the whole database);
    /// `SQLITE_CONSTRAINT_NOTNULL`; a duplicate key is `SQLITE_CONSTRAINT_PRIMARYKEY`.
    public var dialect: SQLDialect {
        // SQLite refuses a value over SQLITE_MAX_LENGTH (10^9 bytes unless built otherwise).
        SQLDialect(insertIgnore: "INSERT OR IGNORE", lockingRead: "", maxStatementBytes: 1_000_000_000,
                   isNotNullViolation: { ($0 as? SQLiteError)?.extendedCode == SQLITE_CONSTRAINT | (5 << 8) },
                   isDuplicateKey: { ($0 as? SQLiteError)?.extendedCode == SQLITE_CONSTRAINT | (6 << 8) })
    }
    /// Write transactions of this database's connections queue here (see ``WriterGate``).
    let gate = WriterGate()

    /// Opens (creating if needed) the database and its marker table; throws ``SQLiteError``
    /// naming the file if it cannot be opened or is not a database.
    public init(path: String, configuration: Configuration = Configuration()) throws {
        if let problem = configuration.problem { throw SQLiteUsageError(description: "\(path): \(problem)") }
        self.path = path
        self.configuration = configuration
        let conn = try SQLiteConnection(path: path, configuration: configuration)
        defer { conn.close() }
        try conn.ensureMarkerTable()
    }

    public func connect() throws -> any SQLConnection { try openConnection() }

    /// Closes `failed` (so that SQLite recovers what it left in the WAL or journal) and opens
    /// a new connection that keeps `failed`'s place at the writer gate: a writer queued behind
    /// the saga may be waiting for one of its keys, so the fence must not queue behind it.
    public func connect(replacing failed: any SQLConnection) throws -> any SQLConnection {
        guard let old = failed as? SQLiteConnection else {
            failed.close()
            return try connect()
        }
        let successor: SQLiteConnection
        do {
            successor = try SQLiteConnection(path: path, configuration: configuration, gate: gate)
        } catch {
            old.close()
            throw error
        }
        old.handGate(to: successor)
        old.close()
        return successor
    }

    /// An exclusive `flock` on `<path>-saga-<table>-<instance>.lock` beside the database
    /// file, held while the coordinator runs (also across processes; a dead process holds
    /// nothing). nil if another holder has it.
    public func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? {
        let lockPath = "\(path)-saga-\(configuration.markerTable)-\(instance.rawValue).lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw SQLiteUsageError(description: "cannot open the instance lock file \(lockPath): \(String(cString: strerror(errno)))")
        }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let busy = errno == EWOULDBLOCK
            let reason = String(cString: strerror(errno))
            close(fd)
            if busy { return nil }
            throw SQLiteUsageError(description: "cannot lock \(lockPath): \(reason)")
        }
        return FileLockHold(fd: fd)
    }

    /// A read-only connection to the existing database at `path`, opened without creating the
    /// file or the marker table and without setting any pragma that writes: what a tool that
    /// inspects a stopped node uses (the `saga` tool's `status`).
    package static func openReadOnly(path: String, configuration: Configuration = Configuration()) throws -> SQLiteConnection {
        if let problem = configuration.problem { throw SQLiteUsageError(description: "\(path): \(problem)") }
        return try SQLiteConnection(path: path, configuration: configuration, readOnly: true)
    }

    /// A connection of the concrete type, for work outside sagas (schema set-up, reads).
    public func openConnection() throws -> SQLiteConnection {
        try SQLiteConnection(path: path, configuration: configuration, gate: gate)
    }
}

/// An open file descriptor with an exclusive `flock`; closing it lets go.
final class FileLockHold: InstanceHold, @unchecked Sendable {
    private let lock = NSLock()
    private var fd: Int32

    init(fd: Int32) { self.fd = fd }

    func release() {
        let held = lock.withLock { () -> Int32 in
            defer { fd = -1 }
            return fd
        }
        if held >= 0 { close(held) }
    }

    deinit { release() }
}
