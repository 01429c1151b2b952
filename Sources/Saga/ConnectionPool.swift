import Foundation

/// Idle SQL connections, reused between sagas. A connection is lent to one saga at a time;
/// the lock guards only the idle list, never a connection in use.
final class ConnectionPool: @unchecked Sendable {
    private let lock = NSLock()
    private var idle: [any SQLConnection] = []
    private let database: any SQLDatabase
    private let limit: Int

    init(database: any SQLDatabase, limit: Int = 16) {
        self.database = database
        self.limit = limit
    }

    /// Idle connections are closed with the pool (also when the coordinator failed to open).
    deinit { closeAll() }

    func take() throws -> any SQLConnection {
        if let conn = lock.withLock({ idle.popLast() }) { return conn }
        return try database.connect()
    }

    /// Returns a healthy connection with no open transaction; anything else is closed.
    func giveBack(_ conn: any SQLConnection) {
        guard !conn.isInTransaction, !conn.isBroken else { conn.close(); return }
        let kept = lock.withLock { () -> Bool in
            guard idle.count < limit else { return false }
            idle.append(conn)
            return true
        }
        if !kept { conn.close() }
    }

    func closeAll() {
        let conns = lock.withLock { () -> [any SQLConnection] in
            defer { idle.removeAll() }
            return idle
        }
        for c in conns { c.close() }
    }
}
