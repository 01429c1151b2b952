
/// Hands out saga ids that are never reused, across restarts too.
///
/// The journal space holds a ceiling; ids below it may have been used. On open the lease starts
/// at the ceiling (or past the highest id found in the journal or the marker table, whichever is
/// larger) and writes a new ceiling, synced, a block ahead. Within a block, an id costs nothing;
/// crossing a block costs one small synced write, once every ``blockSize`` sagas.
final class IDLease: Sendable {
    static let ceilingKey: Bytes = Array("m:id-ceiling".utf8)
    static let blockSize: UInt64 = 1 << 16

    private struct State { var next: UInt64; var ceiling: UInt64 }
    private let state: Locked<State>
    private let kv: any KVStore

    init(kv: any KVStore, atLeast floor: UInt64) throws {
        self.kv = kv
        var start = floor
        if let raw = try kv.journalGet(Self.ceilingKey) {
            guard raw.count == 8 else {
                throw SagaError.journalCorrupt(saga: nil, key: Self.ceilingKey, reason: "id ceiling has \(raw.count) bytes, expected 8")
            }
            start = max(start, raw.reduce(0) { $0 << 8 | UInt64($1) })
        }
        start = max(start, 1)
        let ceiling = start + Self.blockSize
        try Self.persist(ceiling: ceiling, kv: kv)
        state = Locked(State(next: start, ceiling: ceiling))
    }

    private static func persist(ceiling: UInt64, kv: any KVStore) throws {
        var batch = KVWriteBatch()
        var value: Bytes = []
        value.appendBigEndian(ceiling)
        batch.put(ceilingKey, value, in: .journal)
        try kv.write(batch, sync: true)
    }

    func next() throws -> SagaID {
        try state.withLock { s in
            if s.next >= s.ceiling {
                let ceiling = s.ceiling + Self.blockSize
                try Self.persist(ceiling: ceiling, kv: kv)
                s.ceiling = ceiling
            }
            defer { s.next += 1 }
            return SagaID(s.next)
        }
    }
}
