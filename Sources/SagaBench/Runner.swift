import CFsyncFaults
import Dispatch
import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend

enum BenchBackend: String, Codable, Sendable, CaseIterable { case sqlite, mysql }

/// One set of stores (RocksDB + one SQL database) that every mode of a cell runs on, with the
/// same data and the same sync settings.
final class BenchStores: @unchecked Sendable {
    let backend: BenchBackend
    let kv: RocksDBStore
    let sql: any SQLDatabase
    let coordinator: SagaCoordinator
    /// For server-side fsync counts (MySQL).
    let admin: (any SQLConnection)?

    init(backend: BenchBackend, dir: String, mysqlURL: String?, logger: Logger) throws {
        self.backend = backend
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        kv = try RocksDBStore(path: dir + "/kv")
        switch backend {
        case .sqlite:
            sql = try SQLiteDatabase(path: dir + "/bench.sqlite")  // WAL, synchronous=FULL
            admin = nil
        case .mysql:
            guard let mysqlURL else { throw BenchError("no MySQL URL") }
            let db = try MySQLDatabase(url: mysqlURL)
            sql = db
            admin = try db.connect()
        }
        coordinator = try SagaCoordinator(kv: kv, sql: sql, logger: logger)
    }

    func close() {
        coordinator.close()
        admin?.close()
        kv.close()
    }

    /// fsyncs so far: this process's (RocksDB, SQLite) plus, for MySQL, the server's InnoDB ones.
    func fsyncs() -> Int {
        var n = Int(saga_fault_fsync_calls())
        if let admin, let rows = try? admin.query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_os_log_fsyncs', 'Innodb_data_fsyncs')", []) {
            for row in rows { n += Int(row[1].string ?? "") ?? Int(row[1].int64 ?? 0) }
        }
        return n
    }
}

struct RoundResult {
    var ops = 0
    var seconds = 0.0
    var latenciesMicros: [Double] = []
    var fsyncs = 0
    var errors = 0
    var firstError: String?
    var throughput: Double { seconds > 0 ? Double(ops) / seconds : 0 }
}

/// Runs rounds of one mode with `threads` threads for `duration`, each thread on its own keys.
final class CellRunner {
    let stores: BenchStores
    let workload: any Workload
    let threads: Int
    /// Per thread: the next sequence number (continues across rounds and modes).
    private var seq: [Int]
    private var connections: [Mode: [any SQLConnection]] = [:]
    private let xidCounter = XIDCounter()

    init(stores: BenchStores, workload: any Workload, threads: Int) throws {
        self.stores = stores
        self.workload = workload
        self.threads = threads
        seq = Array(repeating: 0, count: threads)
        let conn = try stores.sql.connect()
        defer { conn.close() }
        for s in workload.schema(mysql: stores.backend == .mysql) { try conn.execute(s, []) }
        try conn.begin()
        for (s, args) in workload.seedStatements(threads: threads, mysql: stores.backend == .mysql) { try conn.execute(s, args) }
        if case .failed(let e) = conn.commit() { throw e }
        try conn.execute("CREATE TABLE IF NOT EXISTS bench_extra_rows (id BIGINT PRIMARY KEY)", [])
        for mode in [Mode.unsafe, .xa, .unsafeWithRow] where mode != .xa || stores.backend == .mysql {
            connections[mode] = try (0..<threads).map { _ in try stores.sql.connect() }
        }
    }

    func close() { connections.values.forEach { $0.forEach { $0.close() } } }

    func round(_ mode: Mode, duration: Double) -> RoundResult {
        let fsyncsBefore = stores.fsyncs()
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(duration * 1e9)
        let group = DispatchGroup()
        let results = ResultsBox(count: threads)
        let start = DispatchTime.now().uptimeNanoseconds
        for t in 0..<threads {
            let first = seq[t]
            // Each thread owns its connection for the round.
            let owned = OwnedConnection(connections[mode]?[t])
            group.enter()
            Thread.detachNewThread { [stores, workload, xidCounter] in
                defer { group.leave() }
                let conn = owned.connection
                var r = RoundResult()
                r.latenciesMicros.reserveCapacity(4096)
                var s = first
                while DispatchTime.now().uptimeNanoseconds < deadline {
                    let op = workload.operation(thread: t, seq: s)
                    s += 1
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    do {
                        switch mode {
                        case .unsafe:
                            guard let conn else { throw BenchError("no connection for the unsafe mode") }
                            try op.runUnsafe(kv: stores.kv, conn: conn)
                        case .unsafeWithRow:
                            guard let conn else { throw BenchError("no connection for the unsafe+row mode") }
                            try op.runUnsafe(kv: stores.kv, conn: conn, extraRow: Int64(xidCounter.next()))
                        case .saga:
                            try op.runSaga(stores.coordinator)
                        case .xa:
                            guard let mysql = conn as? MySQLConnection else { throw BenchError("XA needs a MySQL connection") }
                            try op.runXA(kv: stores.kv, conn: mysql, xid: "x\(xidCounter.next())")
                        }
                        r.ops += 1
                        r.latenciesMicros.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
                    } catch {
                        r.errors += 1
                        if r.firstError == nil { r.firstError = "\(error)" }
                    }
                }
                results.set(t, r, seq: s)
            }
        }
        group.wait()
        let elapsed = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        var total = RoundResult()
        total.seconds = elapsed
        for t in 0..<threads {
            let (r, s) = results.get(t)
            seq[t] = s
            total.ops += r.ops
            total.errors += r.errors
            total.firstError = total.firstError ?? r.firstError
            total.latenciesMicros += r.latenciesMicros
        }
        total.fsyncs = stores.fsyncs() - fsyncsBefore
        return total
    }
}

/// A connection handed to the one thread that uses it.
final class OwnedConnection: @unchecked Sendable {
    let connection: (any SQLConnection)?
    init(_ connection: (any SQLConnection)?) { self.connection = connection }
}

final class XIDCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = UInt64(Date().timeIntervalSince1970)
    func next() -> UInt64 { lock.withLock { n += 1; return n } }
}

final class ResultsBox: @unchecked Sendable {
    private let lock = NSLock()
    private var items: [(RoundResult, Int)]
    init(count: Int) { items = Array(repeating: (RoundResult(), 0), count: count) }
    func set(_ i: Int, _ r: RoundResult, seq: Int) { lock.withLock { items[i] = (r, seq) } }
    func get(_ i: Int) -> (RoundResult, Int) { lock.withLock { items[i] } }
}

struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    let i = min(sorted.count - 1, max(0, Int((p * Double(sorted.count)).rounded(.up)) - 1))
    return sorted[i]
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}
