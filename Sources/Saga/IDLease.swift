
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
    /// The first id this open hands out: every lower one was handed out (or skipped) before.
    let first: UInt64

    init(kv: any KVStore, atLeast floor: UInt64) throws {
        self.kv = kv
        var start = floor
        if let raw = try kv.journalGet(Self.ceilingKey) {
            start = max(start, try Self.decode(raw))
        }
        start = max(start, 1)
        let ceiling = min(start + Self.blockSize, SagaID.maxValid.rawValue + 1)
        guard start < ceiling else { throw Exhausted() }
        try Self.persist(ceiling: ceiling, kv: kv)
        first = start
        state = Locked(State(next: start, ceiling: ceiling))
    }

    /// The ceiling record: the ceiling, big-endian, then its CRC-32C (12 bytes). Records of 8
    /// bytes, without a checksum, were written by earlier versions and are still read.
    static func encode(_ ceiling: UInt64) -> Bytes {
        var value: Bytes = []
        value.appendBigEndian(ceiling)
        value.appendBigEndian(CRC32C.checksum(value))
        return value
    }

    static func decode(_ raw: Bytes) throws(SagaError) -> UInt64 {
        func damaged(_ why: String) -> SagaError { .journalCorrupt(saga: nil, key: ceilingKey, reason: "id ceiling \(why)") }
        guard raw.count == 12 || raw.count == 8 else { throw damaged("has \(raw.count) bytes, expected 12") }
        let ceiling = raw[0..<8].reduce(0) { $0 << 8 | UInt64($1) }
        if raw.count == 12 {
            let stored = raw[8..<12].reduce(0) { $0 << 8 | UInt32($1) }
            guard stored == CRC32C.checksum(raw[0..<8]) else { throw damaged("fails its checksum") }
        }
        guard ceiling <= SagaID.maxValid.rawValue + 1 else { throw damaged("\(ceiling) is past the largest saga id") }
        return ceiling
    }

    private static func persist(ceiling: UInt64, kv: any KVStore) throws {
        var batch = KVWriteBatch()
        batch.put(ceilingKey, encode(ceiling), in: .journal)
        try kv.write(batch, sync: true)
    }

    /// Every id up to ``SagaID/maxValid`` has been handed out.
    struct Exhausted: Error, CustomStringConvertible {
        var description: String { "saga ids are exhausted (every id up to \(SagaID.maxValid.rawValue) has been used)" }
    }

    /// The next id; `register` runs with it under the lease's lock, so that ids are registered
    /// in the order they are handed out.
    func next(register: (SagaID) -> Void = { _ in }) throws -> SagaID {
        try state.withLock { s in
            if s.next >= s.ceiling {
                let ceiling = min(s.ceiling + Self.blockSize, SagaID.maxValid.rawValue + 1)
                guard s.next < ceiling else { throw Exhausted() }
                try Self.persist(ceiling: ceiling, kv: kv)
                s.ceiling = ceiling
            }
            defer { s.next += 1 }
            register(SagaID(s.next))
            return SagaID(s.next)
        }
    }
}
