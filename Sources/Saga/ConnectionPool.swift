import Foundation

/// Idle SQL connections, reused between sagas. A connection is lent to one saga at a time;
/// the lock guards only the idle list, never a connection in use.
///
/// A connection that sat idle for ``checkAfter`` or longer is checked before it is lent again
/// (the server may have closed it: MySQL's `wait_timeout`); a dead one is closed and the next
/// is tried.
final class ConnectionPool: @unchecked Sendable {
    private let lock = NSLock()
    private var idle: [(connection: any SQLConnection, since: ContinuousClock.Instant)] = []
    /// After ``closeAll()``: connections given back are closed, not kept.
    private var closed = false
    private let database: any SQLDatabase
    private let limit: Int
    let checkAfter: Duration

    init(database: any SQLDatabase, limit: Int = 16, checkAfter: Duration = .milliseconds(500)) {
        self.database = database
        self.limit = limit
        self.checkAfter = checkAfter
    }

    /// Idle connections are closed with the pool (also when the coordinator failed to open).
    deinit { closeAll() }

    /// A pooled connection (`reused`), or a new one.
    func take() throws -> (connection: any SQLConnection, reused: Bool) {
        while let (conn, since) = lock.withLock({ idle.popLast() }) {
            if ContinuousClock.now - since < checkAfter || conn.isUsableAfterIdling() { return (conn, true) }
            conn.close()
        }
        return (try database.connect(), false)
    }

    /// Returns a healthy connection with no open transaction; anything else is closed.
    func giveBack(_ conn: any SQLConnection) {
        guard !conn.isInTransaction, !conn.isBroken else { conn.close(); return }
        let kept = lock.withLock { () -> Bool in
            guard !closed, idle.count < limit else { return false }
            idle.append((conn, ContinuousClock.now))
            return true
        }
        if !kept { conn.close() }
    }

    func closeAll() {
        let conns = lock.withLock { () -> [any SQLConnection] in
            closed = true
            defer { idle.removeAll() }
            return idle.map(\.connection)
        }
        for c in conns { c.close() }
    }
}
