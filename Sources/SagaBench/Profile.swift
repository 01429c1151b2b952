import Dispatch
import Foundation
import RocksDBBackend
import Saga

// `saga-bench --profile`: where a saga's time goes, step by step. The coordinator's public
// hooks (`SagaHooks`, called at every `SagaStep`) stamp a monotonic clock on the saga's own
// thread; the body stamps its parts; a thin wrapper around the KV store stamps the pre-image
// multi-get and the batch write, which no hook separates from their neighbours. The unsafe+row
// sequence is stamped inline at the same places, so each row of the table has its reference.

/// The points a saga (or an unsafe+row operation) passes, in order. Not every one is reached by
/// every saga: GC runs in one saga of `gcThreshold`.
enum ProfilePoint: Int, CaseIterable {
    case call, beginHook, bodyStart, readsDone, sqlDone, bodyEnd, bodyHook
    case preImageStart, preImageEnd, prepareHook, writeStart, writeEnd, preparedHook, markerHook, commitHook, committedHook
    case gcJournalHook, gcMarkersHook, returned
}

/// One thread's stamps for the operation it runs, and every operation's so far.
final class ProfileRecorder: @unchecked Sendable {
    @TaskLocal static var current: ProfileRecorder?

    private(set) var stamps = [UInt64](repeating: 0, count: ProfilePoint.allCases.count)
    /// One row of stamps per completed operation (0: not reached).
    private(set) var rows: [[UInt64]] = []

    static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    func start() {
        for i in stamps.indices { stamps[i] = 0 }
        stamps[ProfilePoint.call.rawValue] = Self.now()
    }
    func mark(_ p: ProfilePoint) { stamps[p.rawValue] = Self.now() }
    func finish() {
        mark(.returned)
        rows.append(stamps)
    }
    /// Whether the body hook was reached: a multi-get after it is the pre-image read.
    var bodyDone: Bool { stamps[ProfilePoint.bodyHook.rawValue] != 0 }
}

/// The coordinator's hooks: a stamp per step, on the saga's thread.
struct ProfileHooks: SagaHooks {
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard let r = ProfileRecorder.current else { return }
        switch step {
        case .begin: r.mark(.beginHook)
        case .body: r.mark(.bodyHook)
        case .prepare: r.mark(.prepareHook)
        case .prepared: r.mark(.preparedHook)
        case .marker: r.mark(.markerHook)
        case .commit: r.mark(.commitHook)
        case .committed: r.mark(.committedHook)
        case .gcJournal: r.mark(.gcJournalHook)
        case .gcMarkers: r.mark(.gcMarkersHook)
        // Compensation and fencing are off the measured path; redo mode is not profiled.
        case .compensate, .compensated, .resolve, .applied, .checkpoint, .checkpointed, .replay: break
        }
    }
}

/// The KV store the profiled coordinator runs on: the bench's RocksDB store, with the
/// pre-image multi-get (the first multi-get after the body) and the batch write stamped.
final class StampedKVStore: KVStore, @unchecked Sendable {
    let base: any KVStore
    init(_ base: any KVStore) { self.base = base }

    func multiGet(_ keys: [Bytes]) throws -> [Bytes?] {
        guard let r = ProfileRecorder.current, r.bodyDone else { return try base.multiGet(keys) }
        r.mark(.preImageStart)
        defer { r.mark(.preImageEnd) }
        return try base.multiGet(keys)
    }
    func write(_ batch: KVWriteBatch, sync: Bool) throws {
        guard let r = ProfileRecorder.current, r.bodyDone, sync else { return try base.write(batch, sync: sync) }
        // GC's journal delete is a synced write too: stamp only the saga's forward batch.
        if r.stamps[ProfilePoint.writeStart.rawValue] != 0 { return try base.write(batch, sync: sync) }
        r.mark(.writeStart)
        defer { r.mark(.writeEnd) }
        try base.write(batch, sync: sync)
    }
    func journalGet(_ key: Bytes) throws -> Bytes? { try base.journalGet(key) }
    func journalEntries() throws -> [(key: Bytes, value: Bytes)] { try base.journalEntries() }
}

/// One row of the table: the median over operations of the time between two points.
struct ProfileStep: Codable, Sendable {
    var name: String
    var sagaMicros: Double?
    var referenceMicros: Double?
    var note: String
}

struct ProfileFigures: Codable, Sendable {
    var backend: BenchBackend
    var workload: String
    var threads: Int
    var sagas: Int
    var references: Int
    var steps: [ProfileStep]
    var sagaTotalMicros: Double
    var referenceTotalMicros: Double

    /// Saga rows and unsafe+row rows of stamps, from interleaved rounds.
    init(backend: BenchBackend, workload: String, threads: Int, saga: [[UInt64]], reference: [[UInt64]]) {
        self.backend = backend
        self.workload = workload
        self.threads = threads
        sagas = saga.count
        references = reference.count
        func d(_ rows: [[UInt64]], _ a: ProfilePoint, _ b: ProfilePoint, where keep: ([UInt64]) -> Bool = { _ in true }) -> Double? {
            let xs = rows.filter { $0[a.rawValue] != 0 && $0[b.rawValue] != 0 && keep($0) }
                .map { Double($0[b.rawValue] &- $0[a.rawValue]) / 1000 }
            return xs.isEmpty ? nil : median(xs)
        }
        let gc = ProfilePoint.gcJournalHook.rawValue
        let noGC: ([UInt64]) -> Bool = { $0[gc] == 0 }
        // GC's share: its whole time (first GC hook to the saga's return) over every saga.
        let gcTotal = saga.filter { $0[gc] != 0 }.map { Double($0[ProfilePoint.returned.rawValue] &- $0[gc]) / 1000 }.reduce(0, +)
        let gcShare = saga.isEmpty ? 0 : gcTotal / Double(saga.count)
        steps = [
            ProfileStep(name: "begin: run() to the begin hook", sagaMicros: d(saga, .call, .beginHook), referenceMicros: nil,
                        note: "nesting check, saga book, id lease, task-local, logger metadata"),
            ProfileStep(name: "BEGIN (pool, BEGIN, Saga)", sagaMicros: d(saga, .beginHook, .bodyStart), referenceMicros: d(reference, .call, .bodyStart),
                        note: "saga: begin hook to the body's first line"),
            ProfileStep(name: "body: KV reads", sagaMicros: d(saga, .bodyStart, .readsDone), referenceMicros: d(reference, .bodyStart, .readsDone),
                        note: "saga: a lock and a get per key; unsafe: one multi-get"),
            ProfileStep(name: "body: SQL statements", sagaMicros: d(saga, .readsDone, .sqlDone), referenceMicros: d(reference, .readsDone, .sqlDone),
                        note: "the body's own SQL work (saga: + the statement guard)"),
            ProfileStep(name: "body: KV writes staged", sagaMicros: d(saga, .sqlDone, .bodyEnd), referenceMicros: d(reference, .sqlDone, .bodyEnd),
                        note: "saga: a lock and a staged image per key; unsafe: the batch built"),
            ProfileStep(name: "body end to body hook", sagaMicros: d(saga, .bodyEnd, .bodyHook), referenceMicros: nil, note: "poison check"),
            ProfileStep(name: "body hook to pre-image read", sagaMicros: d(saga, .bodyHook, .preImageStart), referenceMicros: nil,
                        note: "staged writes listed (KV wrapper stamp)"),
            ProfileStep(name: "pre-image read (multi-get)", sagaMicros: d(saga, .preImageStart, .preImageEnd), referenceMicros: nil,
                        note: "KV wrapper stamps"),
            ProfileStep(name: "record encode, batch built", sagaMicros: d(saga, .preImageEnd, .prepareHook), referenceMicros: nil,
                        note: "entries, encode + CRC, batch (to the prepare hook)"),
            ProfileStep(name: "prepare hook to batch write", sagaMicros: d(saga, .prepareHook, .writeStart), referenceMicros: nil,
                        note: "cancellation check, saga book"),
            ProfileStep(name: "batch write (synced)", sagaMicros: d(saga, .writeStart, .writeEnd), referenceMicros: d(reference, .bodyEnd, .writeEnd),
                        note: "RocksDB write + WAL fsync (group commit at 8 threads)"),
            ProfileStep(name: "batch write to marker+COMMIT sent", sagaMicros: d(saga, .writeEnd, .commitHook), referenceMicros: nil,
                        note: "prepared, marker, commit hooks; transaction check"),
            ProfileStep(name: "marker + COMMIT", sagaMicros: d(saga, .commitHook, .committedHook), referenceMicros: d(reference, .writeEnd, .committedHook),
                        note: "saga: marker insert and COMMIT (one round trip on MariaDB); unsafe+row: the extra row, COMMIT"),
            ProfileStep(name: "release (no GC)", sagaMicros: d(saga, .committedHook, .returned, where: noGC), referenceMicros: d(reference, .committedHook, .returned),
                        note: "pool give-back, saga book, locks released, run() returns"),
            ProfileStep(name: "GC share", sagaMicros: gcShare, referenceMicros: nil,
                        note: "mean, not median: GC time (gcJournal hook to return) over every saga"),
        ]
        sagaTotalMicros = d(saga, .call, .returned) ?? 0
        referenceTotalMicros = d(reference, .call, .returned) ?? 0
    }

    func table() -> String {
        var out = "\(backend.rawValue), \(workload), \(threads) thread(s): \(sagas) sagas, \(references) unsafe+row operations, median µs per operation\n"
        out += "step                                | saga µs | unsafe+row µs | what it holds\n"
        out += "------------------------------------+---------+---------------+--------------\n"
        func f(_ x: Double?) -> String { x.map { String(format: "%.1f", $0) } ?? "-" }
        for s in steps {
            out += "\(s.name.padded(35)) | \(f(s.sagaMicros).leftPadded(7)) | \(f(s.referenceMicros).leftPadded(13)) | \(s.note)\n"
        }
        let sumSaga = steps.compactMap(\.sagaMicros).reduce(0, +), sumRef = steps.compactMap(\.referenceMicros).reduce(0, +)
        out += "\("sum of the rows".padded(35)) | \(f(sumSaga).leftPadded(7)) | \(f(sumRef).leftPadded(13)) |\n"
        out += "\("whole operation (median)".padded(35)) | \(f(sagaTotalMicros).leftPadded(7)) | \(f(referenceTotalMicros).leftPadded(13)) | saga - unsafe+row: \(f(sagaTotalMicros - referenceTotalMicros)) µs\n"
        return out
    }

    static let legend = """
        Legend: each row is the median over operations of the time between two stamps (so the
        rows need not add up to the whole). Saga stamps come from the coordinator's hooks
        (begin, body, prepare, prepared, marker, commit, committed, gcJournal, gcMarkers), from
        the body itself (its first line, after its reads, after its SQL, its last line), and
        from a wrapper around the KV store for the two boundaries no hook marks: the pre-image
        multi-get (between the body and prepare hooks, so "pre-image read" and "record encode"
        are told apart by it) and the synced batch write (between the prepare and prepared
        hooks). Not observable by hooks, so not split: pool take vs BEGIN (one row), the
        marker insert vs COMMIT (sent in one round trip on MariaDB, so one row), and lock
        release vs the saga book (one row). unsafe+row is stamped inline at the same places; in
        the profile it runs in the saga's order (BEGIN, KV reads, SQL, batch, synced write, the
        extra row, COMMIT), so its extra row sits where the saga's marker does.
        """
}

extension String {
    func leftPadded(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
}

extension Operation {
    /// A saga, stamped: the body marks its first line, its reads, its SQL and its last line.
    func runSagaProfiled(_ coordinator: SagaCoordinator, _ r: ProfileRecorder) throws {
        r.start()
        try coordinator.run { saga in
            r.mark(.bodyStart)
            var values: [Bytes?] = []
            for k in reads { values.append(try saga.kv.get(k)) }
            r.mark(.readsDone)
            for (sql, args) in statements { try saga.sql.execute(sql, args) }
            r.mark(.sqlDone)
            for (k, v) in writes(values) { try saga.kv.put(k, v) }
            r.mark(.bodyEnd)
        }
        r.finish()
    }

    /// unsafe+row, stamped, in the saga's order: the extra row goes where the marker goes.
    func runUnsafeWithRowProfiled(kv: RocksDBStore, conn: any SQLConnection, extraRow: Int64, _ r: ProfileRecorder) throws {
        r.start()
        try conn.begin()
        r.mark(.bodyStart)
        do {
            let values = try kv.multiGet(reads)
            r.mark(.readsDone)
            for (sql, args) in statements { try conn.execute(sql, args) }
            r.mark(.sqlDone)
            var batch = KVWriteBatch()
            for (k, v) in writes(values) { batch.put(k, v) }
            r.mark(.bodyEnd)
            try kv.write(batch, sync: true)
            r.mark(.writeEnd)
            try conn.execute("INSERT INTO bench_extra_rows (id) VALUES (?)", [.integer(extraRow)])
        } catch {
            try? conn.rollback()
            throw error
        }
        switch conn.commit() {
        case .committed: break
        case .failed(let e), .unknown(let e): throw e
        }
        r.mark(.committedHook)
        r.finish()
    }
}
