import Foundation

/// Redo mode's bookkeeping (<doc:Protocol>, "Redo mode"): the commit sequence, the watermark
/// and when the next checkpoint is due.
///
/// A saga takes its sequence while it holds every one of its key locks, right before its marker
/// row is inserted, so for any key the order of sequences is the order of writes. A sequence is
/// *outstanding* from then until its saga is settled: applied to the KV store after COMMIT, or
/// known not committed (a failed COMMIT leaves a hole that never holds the watermark back). The
/// watermark is the highest sequence at or below which nothing is outstanding: every committed
/// saga up to it is in the KV store (not necessarily synced yet).
final class RedoLog: Sendable {
    /// The journal key of the durable watermark.
    static let watermarkKey: Bytes = Array("m:redo-watermark".utf8)

    private struct State {
        var next: UInt64
        var outstanding: Set<UInt64> = []
        var appliedSinceCheckpoint = 0
        var lastCheckpoint: ContinuousClock.Instant
        /// The watermark the last checkpoint made durable.
        var durable: UInt64
        /// Sagas applied in this process whose rows are not deleted yet, by sequence.
        var applied: [(sequence: UInt64, saga: SagaID)] = []
    }
    private let state: Locked<State>

    /// Starts after `highest`, the largest sequence already used (the durable watermark, or a
    /// redo row's sequence, whichever is larger); `durable` is the watermark in the journal.
    init(after highest: UInt64, durable: UInt64) {
        state = Locked(State(next: highest + 1, lastCheckpoint: .now, durable: durable))
    }

    /// After replay at open: sequences go on after `highest`.
    func restart(after highest: UInt64, durable: UInt64) {
        state.withLock { s in
            s = State(next: highest + 1, lastCheckpoint: .now, durable: durable)
        }
    }

    /// The next sequence; outstanding until ``settle(_:applied:)``.
    func take() -> UInt64 {
        state.withLock { s in
            defer { s.next += 1 }
            s.outstanding.insert(s.next)
            return s.next
        }
    }

    /// The saga with `sequence` is in the KV store (`applied`: its id, for the deletion of its
    /// row), or is known not committed (nil). Returns whether a checkpoint is due.
    func settle(_ sequence: UInt64, applied saga: SagaID?, every: Int, interval: Duration) -> Bool {
        state.withLock { s in
            s.outstanding.remove(sequence)
            if let saga {
                s.appliedSinceCheckpoint += 1
                s.applied.append((sequence, saga))
            }
            guard s.appliedSinceCheckpoint > 0 else { return false }
            return s.appliedSinceCheckpoint >= every || ContinuousClock.now - s.lastCheckpoint >= interval
        }
    }

    /// The highest sequence at or below which no saga is outstanding, and whether it is past
    /// the durable one.
    var watermark: (value: UInt64, advanced: Bool) {
        state.withLock { s in
            let w = (s.outstanding.min() ?? s.next) - 1
            return (w, w > s.durable)
        }
    }

    /// A checkpoint made `watermark` durable.
    func checkpointed(_ watermark: UInt64) {
        state.withLock { s in
            s.durable = max(s.durable, watermark)
            s.appliedSinceCheckpoint = 0
            s.lastCheckpoint = .now
        }
    }

    /// The sagas applied in this process with a sequence at or below `watermark`: their rows
    /// go by id (a delete by primary key locks only those rows; one by a range of sequences
    /// would lock the range, and on InnoDB make every concurrent marker insert wait for it).
    func takeApplied(upTo watermark: UInt64) -> [SagaID] {
        state.withLock { s in
            let due = s.applied.filter { $0.sequence <= watermark }
            s.applied.removeAll { $0.sequence <= watermark }
            return due.map(\.saga)
        }
    }

    /// The lowest saga applied in this process whose row no checkpoint has taken yet.
    var lowestApplied: UInt64? {
        state.withLock { s in s.applied.map(\.saga.rawValue).min() }
    }

    /// Rows whose deletion failed: the next checkpoint tries again.
    func putBack(_ sagas: [SagaID], sequence: UInt64) {
        state.withLock { s in s.applied += sagas.map { (sequence, $0) } }
    }

    // MARK: The watermark record

    /// The watermark, big-endian, then its CRC-32C (12 bytes).
    static func encode(_ watermark: UInt64) -> Bytes {
        var value: Bytes = []
        value.appendBigEndian(watermark)
        value.appendBigEndian(CRC32C.checksum(value))
        return value
    }

    /// The durable watermark in `kv`'s journal (0 when there is none).
    static func durableWatermark(in kv: any KVStore) throws -> UInt64 {
        guard let raw = try kv.journalGet(watermarkKey) else { return 0 }
        return try decodeWatermark(raw)
    }

    /// A watermark record's value, or `journalCorrupt` naming what is wrong with it.
    static func decodeWatermark(_ raw: Bytes) throws(SagaError) -> UInt64 {
        func damaged(_ why: String) -> SagaError { .journalCorrupt(saga: nil, key: watermarkKey, reason: "redo watermark \(why)") }
        guard raw.count == 12 else { throw damaged("has \(raw.count) bytes, expected 12") }
        let value = raw[0..<8].reduce(0) { $0 << 8 | UInt64($1) }
        let stored = raw[8..<12].reduce(0) { $0 << 8 | UInt32($1) }
        guard stored == CRC32C.checksum(raw[0..<8]) else { throw damaged("fails its checksum") }
        return value
    }

    /// The largest sequence a redo row may carry: sequences are bound as signed 64-bit
    /// integers.
    static let maxSequence = UInt64(Int64.max)
}

/// A redo row of the marker table: a committed saga's sequence and after-images.
package struct RedoRow: Sendable {
    package let saga: SagaID
    package let sequence: UInt64
    package let record: JournalRecord
}
