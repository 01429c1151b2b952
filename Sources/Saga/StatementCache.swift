/// A backend connection's prepared statements by SQL text, at most `capacity` of them: the least
/// recently used one is finalized when a new one would pass the limit. Without a bound, a
/// long-running node that runs many distinct texts holds a server-side statement for each
/// (MySQL refuses new ones past `max_prepared_stmt_count`, for every client of the server).
/// Not thread-safe: a connection is used by one thread at a time.
package final class StatementCache<Statement> {
    private var entries: [String: (statement: Statement, lastUse: UInt64)] = [:]
    private var clock: UInt64 = 0
    private let finalize: (Statement) -> Void
    package let capacity: Int

    package init(capacity: Int, finalize: @escaping (Statement) -> Void) {
        precondition(capacity >= 1)
        self.capacity = capacity
        self.finalize = finalize
    }

    deinit { removeAll() }

    package var count: Int { entries.count }
    /// Statements prepared since the cache was made (hits are not counted).
    package private(set) var prepared = 0

    /// The cached statement for `sql`, or a new one from `prepare`, cached.
    package func statement(for sql: String, prepare: () throws -> Statement) rethrows -> Statement {
        clock += 1
        if let entry = entries[sql] {
            entries[sql] = (entry.statement, clock)
            return entry.statement
        }
        let statement = try prepare()
        prepared += 1
        if entries.count >= capacity, let oldest = entries.min(by: { $0.value.lastUse < $1.value.lastUse }) {
            entries[oldest.key] = nil
            finalize(oldest.value.statement)
        }
        entries[sql] = (statement, clock)
        return statement
    }

    /// Finalizes every statement.
    package func removeAll() {
        for (_, entry) in entries { finalize(entry.statement) }
        entries.removeAll()
    }
}
