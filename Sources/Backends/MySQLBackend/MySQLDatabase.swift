import Foundation
import Saga

/// A MySQL or MariaDB database (InnoDB) as a saga ``SQLDatabase``.
///
/// Opening connects once, so that a bad URL, a wrong password or a missing database fail here,
/// with a message that says which, and creates the marker table if it is missing.
public final class MySQLDatabase: SQLDatabase {
    /// The isolation level every connection's transactions run at, set at connect rather than
    /// taken from the server's default. The protocol needs none in particular (its reads of
    /// marker rows are locking reads); the body's SQL sees the one chosen here.
    public enum Isolation: String, Sendable {
        case repeatableRead = "REPEATABLE READ"
        case readCommitted = "READ COMMITTED"
        case serializable = "SERIALIZABLE"
    }

    public struct Configuration: Sendable {
        public var connectTimeout: Duration = .seconds(5)
        /// How long a reply may take; longer than `innodb_lock_wait_timeout` (50 s by
        /// default), since a fencing insert may wait that long for the old transaction.
        public var readTimeout: Duration = .seconds(120)
        /// The marker table's name: letters, digits and underscores.
        public var markerTable = "saga_markers"
        /// The isolation level of saga transactions (InnoDB's default, REPEATABLE READ, unless
        /// set otherwise), pinned on every connection.
        public var isolation: Isolation = .repeatableRead
        /// Prepared statements kept per connection (least recently used ones are closed); the
        /// server counts them against `max_prepared_stmt_count` for all its clients.
        public var statementCacheSize = 64
        public init() {}

        /// The client library takes whole seconds, as a 32-bit count.
        static let timeoutRange: ClosedRange<Duration> = .seconds(1) ... .seconds(24 * 3600)

        /// What is wrong with the values, if anything.
        var problem: String? {
            if !MarkerTable.isValidName(markerTable) {
                return "invalid marker table name \"\(markerTable)\": use letters, digits and underscores"
            }
            if statementCacheSize < 1 || statementCacheSize > 16_382 {
                return "statementCacheSize must be between 1 and 16382 (the server's max_prepared_stmt_count default), not \(statementCacheSize)"
            }
            for (name, value) in [("connectTimeout", connectTimeout), ("readTimeout", readTimeout)]
            where !Self.timeoutRange.contains(value) || value.components.attoseconds != 0 {
                return "\(name) must be between 1 s and 24 h in whole seconds, not \(value)"
            }
            return nil
        }
    }

    public let url: MySQLURL
    public let configuration: Configuration
    public var markerTable: String { configuration.markerTable }
    /// `INSERT IGNORE`, `LOCK IN SHARE MODE`; a NULL into a NOT NULL column is error 1048; a
    /// conflict is 1213 / SQLSTATE 40001 (``MySQLError/isRolledBackConflict``); a duplicate key
    /// 1062; on a Galera
    /// node, the causal wait is a `SELECT 1` under `wsrep_sync_wait`.
    public var dialect: SQLDialect {
        SQLDialect(
            insertIgnore: "INSERT IGNORE", lockingRead: " LOCK IN SHARE MODE",
            causalWait: isClusterNode ? "SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1" : nil,
            keepsAbortedMarkers: isClusterNode, maxStatementBytes: maxAllowedPacket,
            isNotNullViolation: { ($0 as? MySQLError)?.code == 1048 },
            isRolledBackByConflict: { ($0 as? MySQLError)?.isRolledBackConflict == true },
            isDuplicateKey: { ($0 as? MySQLError)?.code == 1062 })
    }

    /// The server is a node of a Galera cluster (`wsrep_on` is ON), found at open.
    public let isClusterNode: Bool
    /// The server's `max_allowed_packet` at open: the largest statement (with its bound values)
    /// it takes.
    public let maxAllowedPacket: Int?

    public convenience init(url: String, configuration: Configuration = Configuration()) throws {
        try self.init(url: try MySQLURL(url), configuration: configuration)
    }

    public init(url: MySQLURL, configuration: Configuration = Configuration()) throws {
        if let problem = configuration.problem { throw MySQLUsageError(description: problem) }
        self.url = url
        self.configuration = configuration
        let conn = try MySQLConnection(url: url, configuration: configuration)
        defer { conn.close() }
        try conn.ensureMarkerTable()
        // MySQL has no such variable (error 1193): not a cluster node.
        isClusterNode = (try? conn.query("SELECT @@wsrep_on", []))?.first?[0].int64 == 1
        maxAllowedPacket = (try conn.query("SELECT @@max_allowed_packet", [])).first?[0].int64.map { Int($0) }
    }

    public func connect() throws -> any SQLConnection { try openConnection() }

    /// `GET_LOCK` on a connection of its own, kept open while the coordinator runs; the lock
    /// names the database, the marker table and the instance. It waits up to
    /// ``instanceHoldWait`` for a holder that is going away (a coordinator that just closed, a
    /// killed process whose connection the server has not dropped yet); nil if another session
    /// still holds it then. If the server drops the connection, the lock goes with it (see
    /// ``SQLDatabase/holdInstance(_:)``).
    /// The server rolls back what a lost connection had open; no writer queue in the process to
    /// hand a place in: closes `failed` and connects.
    public func connect(replacing failed: any SQLConnection) throws -> any SQLConnection {
        failed.close()
        return try connect()
    }

    public func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? {
        let conn = try openConnection()
        do {
            let name = Self.lockName(database: url.database, table: configuration.markerTable, instance: instance)
            let wait = Int64(Self.instanceHoldWait.components.seconds)
            let got = try conn.query("SELECT GET_LOCK(?, ?)", [.text(name), .integer(wait)]).first?[0].int64
            guard got == 1 else {
                conn.close()
                return nil
            }
            return ConnectionHold(conn, lock: name)
        } catch {
            conn.close()
            throw error
        }
    }

    static let instanceHoldWait: Duration = .seconds(10)

    /// At most 64 characters, as the server requires: the database and table hashed.
    static func lockName(database: String, table: String, instance: InstanceID) -> String {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a
        for byte in "\(database).\(table)".utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return "saga:\(String(hash, radix: 16)):\(instance.rawValue)"
    }

    /// A connection to `url` whose session refuses every write (`SET SESSION TRANSACTION READ
    /// ONLY`), opened without creating or migrating the marker table: what a tool that
    /// inspects a stopped node uses (the `saga` tool's `status`).
    package static func openReadOnly(url: MySQLURL, configuration: Configuration = Configuration()) throws -> MySQLConnection {
        if let problem = configuration.problem { throw MySQLUsageError(description: problem) }
        let conn = try MySQLConnection(url: url, configuration: configuration)
        do { try conn.execute("SET SESSION TRANSACTION READ ONLY", []) } catch {
            conn.close()
            throw error
        }
        return conn
    }

    /// A connection of the concrete type, for work outside sagas.
    public func openConnection() throws -> MySQLConnection {
        try MySQLConnection(url: url, configuration: configuration)
    }
}

/// A connection kept open for the named lock it holds. Letting go releases the lock first
/// (`RELEASE_LOCK` returns once it is free, so a coordinator opened right after this one
/// closed finds it free), then closes the connection.
final class ConnectionHold: InstanceHold, @unchecked Sendable {
    private let lock = NSLock()
    private var connection: MySQLConnection?
    private let name: String

    init(_ connection: MySQLConnection, lock name: String) {
        self.connection = connection
        self.name = name
    }

    func release() {
        let held = lock.withLock { () -> MySQLConnection? in
            defer { connection = nil }
            return connection
        }
        guard let held else { return }
        _ = try? held.query("SELECT RELEASE_LOCK(?)", [.text(name)])
        held.close()
    }

    deinit { release() }
}
