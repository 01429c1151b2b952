/// Per-key exclusive locks, held from a saga's first touch of a key until the saga has
/// completed (strict two-phase locking).
///
/// A waiter that would close a cycle of sagas waiting for each other is refused at once with
/// ``SagaError/deadlock(saga:keys:cycle:)``; any other wait is bounded by a timeout, which also
/// ends deadlocks that run through the SQL database's own locks. Sagas on disjoint keys never
/// wait for each other.
final class KeyLocks: @unchecked Sendable {
    // All state below is guarded by `condition`.
    private let condition = MonotonicCondition()
    private var owner: [HashedBytes: SagaID] = [:]
    private var held: [SagaID: [Bytes]] = [:]
    private var waitingFor: [SagaID: Bytes] = [:]

    /// Locks `key` for `saga`, waiting at most `timeout`. Re-locking a key the saga holds is free.
    func lock(_ key: Bytes, for saga: SagaID, timeout: Duration) throws(SagaError) {
        condition.lock()
        defer { condition.unlock() }
        let deadline = MonotonicCondition.Deadline(after: timeout)
        while true {
            guard let current = owner[HashedBytes(key)] else {
                owner[HashedBytes(key)] = saga
                held[saga, default: []].append(key)
                return
            }
            if current == saga { return }
            if let cycle = cycle(from: current, to: saga) {
                throw .deadlock(saga: saga, keys: [key], cycle: [saga] + cycle)
            }
            waitingFor[saga] = key
            let signalled = condition.wait(until: deadline)
            waitingFor[saga] = nil
            if !signalled, let holder = owner[HashedBytes(key)], holder != saga {
                throw .lockTimeout(saga: saga, keys: [key], heldBy: [holder])
            }
        }
    }

    /// Follows "holder waits for a key held by ..." from `start`; returns the chain if it
    /// reaches `target`.
    private func cycle(from start: SagaID, to target: SagaID) -> [SagaID]? {
        var chain = [start]
        var seen: Set<SagaID> = [start]
        var at = start
        while let key = waitingFor[at], let next = owner[HashedBytes(key)] {
            if next == target { return chain + [target] }
            guard seen.insert(next).inserted else { return nil }
            chain.append(next)
            at = next
        }
        return nil
    }

    /// Takes locks for a saga found in the journal at recovery. Keys held by another saga are
    /// reported, not waited for.
    func adopt(_ keys: [Bytes], for saga: SagaID) -> [(Bytes, SagaID)] {
        condition.lock()
        defer { condition.unlock() }
        var conflicts: [(Bytes, SagaID)] = []
        for key in keys {
            if let current = owner[HashedBytes(key)], current != saga { conflicts.append((key, current)); continue }
            if owner[HashedBytes(key)] == nil {
                owner[HashedBytes(key)] = saga
                held[saga, default: []].append(key)
            }
        }
        return conflicts
    }

    func releaseAll(_ saga: SagaID) {
        condition.lock()
        defer { condition.unlock() }
        guard let keys = held.removeValue(forKey: saga) else { return }
        for key in keys where owner[HashedBytes(key)] == saga { owner[HashedBytes(key)] = nil }
        condition.broadcast()
    }

    func keys(heldBy saga: SagaID) -> [Bytes] {
        condition.lock()
        defer { condition.unlock() }
        return held[saga] ?? []
    }
}
