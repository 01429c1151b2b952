import Foundation

/// Which finished sagas committed, kept in the journal space after their marker rows are gone,
/// for ``SagaCoordinator/outcome(of:)``: one bit per saga id, in blocks of ``idsPerBlock`` ids.
///
/// Garbage collection sets the bits of the committed sagas it collects in the same synced batch
/// that deletes their journal records, and deletes their marker rows only after it (redo mode:
/// in the checkpoint's batch, before the redo rows go). So at every instant a committed saga at
/// or above the floor has a committed marker row or a set bit, and an id at or above the floor
/// with neither, no journal record and nothing in flight, did not commit. Nothing is written
/// per saga: one block entry per block touched per collection.
///
/// The floor (``floorKey``): ids below it are past the retention, answered "expired" (unless a
/// marker row still says committed). Each collection notes the highest id issued so far and
/// when (kept in memory, a few notes per retention); the floor moves up to the highest noted id
/// older than the retention, never past a saga not settled yet, and blocks wholly below it are
/// deleted, in the same batch.
///
/// A block entry: `'o'` + the block number (u64, big-endian) → ``idsPerBlock``/8 bytes of bits
/// (bit `i % 8` of byte `i / 8` for the block's `i`th id), then their CRC-32C (u32,
/// big-endian). The floor: `m:outcome-floor` → the lowest id still answered (u64) and its
/// CRC-32C.
final class OutcomeLog: Sendable {
    static let idsPerBlock: UInt64 = 4096
    static let floorKey: Bytes = Array("m:outcome-floor".utf8)
    private static let prefix: UInt8 = 0x6F  // 'o'

    private struct State {
        /// Every block in the journal.
        var blocks: Set<UInt64>
        var floor: UInt64
        /// Every id up to `id` was issued at or before `at` (ms since 1970), oldest first.
        var notes: [(id: UInt64, at: UInt64)]
    }
    private let state: Locked<State>
    private let kv: any KVStore

    /// Reads the blocks and the floor from `journal` (the scan made at open). A store without a
    /// floor yet (opened by a version before outcome lookups) gets `start`, the first id this
    /// open hands out, written synced: no earlier id has its outcome recorded.
    init(kv: any KVStore, journal: [(key: Bytes, value: Bytes)], start: UInt64, now: UInt64) throws {
        self.kv = kv
        var blocks: Set<UInt64> = []
        var floor: UInt64?
        for (key, value) in journal {
            if key == Self.floorKey {
                floor = try Self.decodeFloor(value)
            } else if let block = Self.block(fromKey: key) {
                blocks.insert(block)
            }
        }
        if floor == nil {
            var batch = KVWriteBatch()
            batch.put(Self.floorKey, Self.encodeFloor(start), in: .journal)
            try kv.write(batch, sync: true)
        }
        // Every id below `start` was issued before now.
        state = Locked(State(blocks: blocks, floor: floor ?? start, notes: start > 0 ? [(start - 1, now)] : []))
    }

    var floor: UInt64 { state.withLock { $0.floor } }

    // MARK: Lookups

    /// Whether `id`'s bit is set: it committed. Reads the journal.
    func isCommitted(_ id: SagaID) throws -> Bool {
        let key = Self.key(block: id.rawValue / Self.idsPerBlock)
        guard let raw = try kv.journalGet(key) else { return false }
        let bits = try Self.decode(raw, key: key)
        let i = Int(id.rawValue % Self.idsPerBlock)
        return bits[i / 8] & (1 << UInt8(i % 8)) != 0
    }

    // MARK: Garbage collection (under the coordinator's GC lock)

    /// What ``record(_:now:retention:settledBelow:highestIssued:into:)`` put into a batch, for
    /// ``written(_:)`` once the batch is durable.
    struct Change {
        var updated: [UInt64] = []
        var pruned: [UInt64] = []
        var floor: UInt64?
        var isEmpty: Bool { updated.isEmpty && pruned.isEmpty && floor == nil }
    }

    /// Notes that every id up to `highestIssued` was issued by `now`, then adds to `batch` the
    /// bits of `committed` and, for ids issued more than `retention` ms ago and below
    /// `settledBelow` (the lowest id whose outcome may still be recorded), the new floor and
    /// the deletion of the blocks wholly below it.
    func record(_ committed: [SagaID], now: UInt64, retention: UInt64, settledBelow: UInt64, highestIssued: UInt64, into batch: inout KVWriteBatch) throws -> Change {
        var change = Change()
        var byBlock: [UInt64: [Int]] = [:]
        for id in committed { byBlock[id.rawValue / Self.idsPerBlock, default: []].append(Int(id.rawValue % Self.idsPerBlock)) }
        for (block, indexes) in byBlock {
            let key = Self.key(block: block)
            var bits = try kv.journalGet(key).map { try Self.decode($0, key: key) } ?? Bytes(repeating: 0, count: Int(Self.idsPerBlock / 8))
            for i in indexes { bits[i / 8] |= 1 << UInt8(i % 8) }
            batch.put(key, Self.encode(bits), in: .journal)
            change.updated.append(block)
        }
        let bound = min(settledBelow, committed.map(\.rawValue).min() ?? .max)
        let (blocks, floor, expiredBelow) = state.withLock { s in
            // A note per sixteenth of the retention is precise enough, and keeps them few.
            if s.notes.last.map({ now >= $0.at &+ max(1, retention / 16) && highestIssued > $0.id }) ?? true {
                s.notes.append((highestIssued, now))
            }
            let cutoff = now > retention ? now - retention : 0
            let expired = s.notes.last(where: { $0.at < cutoff }).map { $0.id + 1 } ?? 0
            return (s.blocks, s.floor, expired)
        }
        let newFloor = min(expiredBelow, bound)
        guard newFloor > floor else { return change }
        batch.put(Self.floorKey, Self.encodeFloor(newFloor), in: .journal)
        change.floor = newFloor
        for block in blocks where (block + 1) * Self.idsPerBlock <= newFloor {
            batch.delete(Self.key(block: block), in: .journal)
            change.pruned.append(block)
        }
        return change
    }

    /// The batch holding `change` is durable.
    func written(_ change: Change) {
        state.withLock { s in
            s.blocks.formUnion(change.updated)
            s.blocks.subtract(change.pruned)
            if let floor = change.floor {
                s.floor = max(s.floor, floor)
                // Notes below the floor have served: keep the last of them.
                if let last = s.notes.lastIndex(where: { $0.id < s.floor }), last > 0 { s.notes.removeFirst(last) }
            }
        }
    }

    // MARK: Encoding

    static func key(block: UInt64) -> Bytes {
        var k: Bytes = [prefix]
        k.appendBigEndian(block)
        return k
    }

    static func block(fromKey key: Bytes) -> UInt64? {
        guard key.count == 9, key[0] == prefix else { return nil }
        return key[1...].reduce(0) { $0 << 8 | UInt64($1) }
    }

    static func encode(_ bits: Bytes) -> Bytes {
        var out = bits
        out.appendBigEndian(CRC32C.checksum(bits))
        return out
    }

    static func decode(_ raw: Bytes, key: Bytes) throws(SagaError) -> Bytes {
        let size = 4 + Int(idsPerBlock / 8)
        guard raw.count == size else { throw .journalCorrupt(saga: nil, key: key, reason: "outcome block has \(raw.count) bytes, expected \(size)") }
        let stored = raw[(size - 4)...].reduce(0) { $0 << 8 | UInt32($1) }
        guard stored == CRC32C.checksum(raw[..<(size - 4)]) else { throw .journalCorrupt(saga: nil, key: key, reason: "outcome block fails its checksum") }
        return Bytes(raw[..<(size - 4)])
    }

    /// The id ceiling's layout: the value, big-endian, then its CRC-32C.
    static func encodeFloor(_ floor: UInt64) -> Bytes { IDLease.encode(floor) }

    static func decodeFloor(_ raw: Bytes) throws(SagaError) -> UInt64 {
        guard raw.count == 12, raw[8..<12].reduce(0, { $0 << 8 | UInt32($1) }) == CRC32C.checksum(raw[0..<8]) else {
            throw .journalCorrupt(saga: nil, key: floorKey, reason: "outcome floor is damaged")
        }
        return raw[0..<8].reduce(0) { $0 << 8 | UInt64($1) }
    }
}
