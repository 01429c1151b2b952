import Saga

/// A MySQL or MariaDB database (InnoDB) as a saga ``SQLDatabase``.
///
/// Opening connects once, so that a bad URL, a wrong password or a missing database fail here,
/// with a message that says which, and creates the marker table if it is missing.
public final class MySQLDatabase: SQLDatabase {
    public struct Configuration: Sendable {
        public var connectTimeout: Duration = .seconds(5)
        /// How long a reply may take; longer than `innodb_lock_wait_timeout` (50 s by
        /// default), since a fencing insert may wait that long for the old transaction.
        public var readTimeout: Duration = .seconds(120)
        /// The marker table's name: letters, digits and underscores.
        public var markerTable = "saga_markers"
        public init() {}
    }

    public let url: MySQLURL
    public let configuration: Configuration

    public convenience init(url: String, configuration: Configuration = Configuration()) throws {
        try self.init(url: try MySQLURL(url), configuration: configuration)
    }

    public init(url: MySQLURL, configuration: Configuration = Configuration()) throws {
        guard MarkerTable.isValidName(configuration.markerTable) else {
            throw MySQLUsageError(description: "invalid marker table name \"\(configuration.markerTable)\": use letters, digits and underscores")
        }
        self.url = url
        self.configuration = configuration
        let conn = try MySQLConnection(url: url, configuration: configuration)
        defer { conn.close() }
        try conn.ensureMarkerTable()
    }

    public func connect() throws -> any SQLConnection { try openConnection() }

    /// A connection of the concrete type, for work outside sagas.
    public func openConnection() throws -> MySQLConnection {
        try MySQLConnection(url: url, configuration: configuration)
    }
}
