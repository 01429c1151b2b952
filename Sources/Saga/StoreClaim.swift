/// A coordinator's hold on its KV store in this process: a store has one journal, and two
/// coordinators on it would decide each other's sagas. Let go by ``release()`` or when the
/// claim is freed (also when the coordinator failed to open).
final class StoreClaim: Sendable {
    private static let claimed = Locked<Set<ObjectIdentifier>>([])
    private let store: ObjectIdentifier
    private let held = Locked(true)

    /// nil if the store is claimed already.
    init?(_ kv: any KVStore) {
        store = ObjectIdentifier(kv)
        guard Self.claimed.withLock({ $0.insert(store).inserted }) else { return nil }
    }

    func release() {
        guard held.withLock({ h -> Bool in defer { h = false }; return h }) else { return }
        _ = Self.claimed.withLock { $0.remove(store) }
    }

    deinit { release() }
}
