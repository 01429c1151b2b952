import Dispatch
import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend

/// Recovery time for N prepared sagas: the on-disk state that N sagas leave when the process
/// dies between prepare and the end (forward KV writes and `prepared` records, synced; half of
/// them committed in SQL with their marker, half not), written with the journal's own encoder.
/// Then the stores are reopened and the coordinator's open (which recovers) is timed.
struct RecoveryBench {
    let backend: BenchBackend
    let dir: String
    let mysqlURL: String?
    let count: Int

    struct Result: Codable, Sendable {
        var sagas: Int
        var seconds: Double
        var committed: Int
        var compensated: Int
        var correct: Bool
    }

    func run(logger: Logger) throws -> Result {
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let sql: any SQLDatabase = backend == .sqlite
            ? try SQLiteDatabase(path: dir + "/recovery.sqlite")
            : try MySQLDatabase(url: mysqlURL ?? "")
        var kv = try RocksDBStore(path: dir + "/kv")
        // A coordinator once, for the marker table; then the crash state.
        try SagaCoordinator(kv: kv, sql: sql, logger: logger).close()
        let conn = try sql.connect()
        try conn.execute("CREATE TABLE IF NOT EXISTS bench_recovery (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)", [])
        let base: UInt64 = 1_000_000
        let instance = try SagaCoordinator.instance(in: kv)
        var initial = KVWriteBatch()
        for i in 0..<count { initial.put(Bytes("r/\(i)".utf8), Bytes("before".utf8)) }
        try kv.write(initial, sync: true)
        for chunk in stride(from: 0, to: count, by: 1000) {
            let ids = chunk..<min(count, chunk + 1000)
            var batch = KVWriteBatch()
            for i in ids {
                let key = Bytes("r/\(i)".utf8)
                let record = JournalRecord(saga: SagaID(base + UInt64(i)), state: .prepared,
                                           entries: [.init(key: key, preImage: Bytes("before".utf8), afterImage: Bytes("after".utf8))])
                batch.put(key, Bytes("after".utf8))
                batch.put(JournalRecord.key(for: SagaID(base + UInt64(i))), record.encoded(), in: .journal)
            }
            try kv.write(batch, sync: true)
            // The even ones committed in SQL (with their marker) before the crash.
            try conn.begin()
            for i in ids where i % 2 == 0 {
                try conn.execute("INSERT INTO bench_recovery (id, v) VALUES (?, 1)", [.integer(Int64(i))])
                try conn.execute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, ?, 'committed')", [.integer(Int64(instance.rawValue)), .integer(Int64(base + UInt64(i)))])
            }
            if case .failed(let e) = conn.commit() { throw e }
        }
        conn.close()
        kv.close()

        // Reopen and time the open, which runs recovery.
        kv = try RocksDBStore(path: dir + "/kv")
        let t0 = DispatchTime.now().uptimeNanoseconds
        let coordinator = try SagaCoordinator(kv: kv, sql: sql, logger: logger)
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        defer { coordinator.close(); kv.close() }

        // Check what it did.
        var committed = 0, compensated = 0, correct = coordinator.inDoubt.isEmpty
        for i in 0..<count {
            let v = try kv.get(Bytes("r/\(i)".utf8)).map { String(decoding: $0, as: UTF8.self) }
            if v == "after" { committed += 1 } else if v == "before" { compensated += 1 }
            if (i % 2 == 0) != (v == "after") { correct = false }
        }
        for (key, value) in try kv.journalEntries() where JournalRecord.saga(fromKey: key) != nil {
            if (try? JournalRecord(decoding: value))?.state == .prepared { correct = false }
        }
        return Result(sagas: count, seconds: seconds, committed: committed, compensated: compensated, correct: correct)
    }
}

/// Journal and marker sizes while many sagas run with garbage collection on: sampled every
/// `every` sagas; they must stay flat.
struct GrowthBench {
    let backend: BenchBackend
    let dir: String
    let mysqlURL: String?
    let count: Int
    let every: Int

    struct Sample: Codable, Sendable {
        var sagas: Int
        var journalRecords: Int
        var journalBytes: Int
        var markerRows: Int
    }

    func run(logger: Logger, progress: (String) -> Void) throws -> [Sample] {
        let stores = try BenchStores(backend: backend, dir: dir, mysqlURL: mysqlURL, logger: logger)
        defer { stores.close() }
        let workload = TransferWorkload()
        let runner = try CellRunner(stores: stores, workload: workload, threads: 1)
        defer { runner.close() }
        let conn = try stores.sql.connect()
        defer { conn.close() }
        var samples: [Sample] = []
        for n in 1...count {
            try workload.operation(thread: 0, seq: n).runSaga(stores.coordinator)
            if n % every == 0 {
                var records = 0, bytes = 0
                for (key, value) in try stores.kv.journalEntries() where JournalRecord.saga(fromKey: key) != nil {
                    records += 1
                    bytes += value.count
                }
                let markers = try conn.query("SELECT COUNT(*) FROM saga_markers", []).first?[0].int64 ?? -1
                samples.append(Sample(sagas: n, journalRecords: records, journalBytes: bytes, markerRows: Int(markers)))
                progress("    \(n) sagas: \(records) journal records (\(bytes) bytes), \(markers) marker rows")
            }
        }
        return samples
    }
}
