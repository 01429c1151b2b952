import CMariaDB
import Saga

/// A MySQL/MariaDB failure: the server's (or client library's) error code, the SQLSTATE, the
/// message, and what was being done.
public struct MySQLError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The error number: 1xxx from the server (1213 deadlock, 1205 lock wait timeout, 1045
    /// access denied...), 2xxx from the client library (2013 lost connection during query,
    /// 2006 server gone away...).
    public let code: UInt32
    /// The five-character SQLSTATE (`40001` for a deadlock, `HY000` when unknown).
    public let sqlState: String
    public let message: String
    /// The statement or step that failed.
    public let context: String?

    public init(code: UInt32, sqlState: String, message: String, context: String? = nil) {
        self.code = code
        self.sqlState = sqlState
        self.message = message
        self.context = context
    }

    public static let deadlock: UInt32 = 1213
    public static let lockWaitTimeout: UInt32 = 1205

    /// A conflict the server resolved by rolling this transaction back whole: a deadlock
    /// victim (1213, SQLSTATE 40001), or on a Galera cluster a failed certification or a
    /// brute-force abort by a replicated write, reported the same way at any statement and at
    /// `COMMIT`. Nothing of the transaction was committed.
    public var isRolledBackConflict: Bool { code == Self.deadlock || sqlState == "40001" }

    /// The connection is gone (or the server killed it): the server rolls back any open
    /// transaction on its own, unless a COMMIT was already on its way.
    public var isConnectionLost: Bool {
        [2006, 2013, 2055, 4031, 1927, 1053, 2026].contains(code)
    }

    public var description: String {
        var s = "MySQL error \(code) (SQLSTATE \(sqlState)): \(message)"
        if let context { s += " -- while running `\(Self.shortened(context))`" }
        return s
    }

    /// A statement as an error message shows it: at most ``contextLimit`` characters (a redo
    /// row's after-images can make one as long as a saga's writes).
    static func shortened(_ statement: String) -> String {
        guard statement.count > contextLimit else { return statement }
        return statement.prefix(contextLimit) + "... (\(statement.count - contextLimit) more characters)"
    }

    static let contextLimit = 300

    init(connection: UnsafeMutablePointer<MYSQL>, context: String?) {
        self.init(
            code: mysql_errno(connection),
            sqlState: String(cString: mysql_sqlstate(connection)),
            message: String(cString: mysql_error(connection)),
            context: context)
    }

    init(statement: UnsafeMutablePointer<MYSQL_STMT>, context: String?) {
        self.init(
            code: mysql_stmt_errno(statement),
            sqlState: String(cString: mysql_stmt_sqlstate(statement)),
            message: String(cString: mysql_stmt_error(statement)),
            context: context)
    }
}

/// A problem found before the server was asked: a bad URL, a wrong number of arguments.
public struct MySQLUsageError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

extension MySQLError: TransientClassifiable {
    /// Deadlock victim (1213, SQLSTATE 40001), lock wait timeout (1205), too many connections
    /// (1040), the server unreachable (2002, 2003) or shutting down (1053), a cluster node that
    /// left the primary component or refuses queries (1047), a lost connection:
    /// the same work may succeed when run again.
    public var isTransient: Bool {
        code == Self.deadlock || code == Self.lockWaitTimeout || sqlState == "40001"
            || [1040, 2002, 2003, 1047].contains(code) || isConnectionLost
    }
}
