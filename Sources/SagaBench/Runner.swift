import CFsyncFaults
import Dispatch
import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend

enum BenchBackend: String, Codable, Sendable, CaseIterable {
    case sqlite, mysql
    /// A MariaDB Galera cluster: every connection to the first node of its URL that answers.
    case galera

    /// MariaDB's SQL (one server or a cluster of them).
    var isMariaDB: Bool { self != .sqlite }
    /// XA runs on one server only: MariaDB refuses `XA START` with Galera replication (1235).
    var runsXA: Bool { self == .mysql }
}

/// One set of stores (RocksDB + one SQL database) that every mode of a cell runs on, with the
/// same data and the same sync settings.
final class BenchStores: @unchecked Sendable {
    let backend: BenchBackend
    let kv: RocksDBStore
    let sql: any SQLDatabase
    /// Per coordinator mode (``Mode/coordinatorConfiguration``), a coordinator on a RocksDB
    /// store of its own (a store takes one coordinator), sharing the SQL database.
    private let coordinators: [Mode: (coordinator: SagaCoordinator, kv: RocksDBStore)]
    /// The saga mode's coordinator.
    var coordinator: SagaCoordinator { coordinators[.saga]!.coordinator }
    func coordinator(for mode: Mode) -> SagaCoordinator? { coordinators[mode]?.coordinator }
    /// For the servers' counters: one connection to each server (each node of a cluster).
    let admins: [any SQLConnection]

    /// - Parameter profile: the coordinator runs with ``ProfileHooks`` on a ``StampedKVStore``
    ///   (for `--profile`; the unsafe modes use the store directly).
    init(backend: BenchBackend, dir: String, mysqlURL: String?, logger: Logger, profile: Bool = false) throws {
        self.backend = backend
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        kv = try RocksDBStore(path: dir + "/kv")
        switch backend {
        case .sqlite:
            sql = try SQLiteDatabase(path: dir + "/bench.sqlite")  // WAL, synchronous=FULL
            admins = []
        case .mysql, .galera:
            guard let mysqlURL else { throw BenchError("no MySQL URL") }
            let url = try MySQLURL(mysqlURL)
            sql = try MySQLDatabase(url: url)
            admins = try url.endpoints.map { endpoint in
                var one = url
                one.endpoints = [endpoint]
                return try MySQLDatabase(url: one).connect()
            }
        }
        var coordinators: [Mode: (SagaCoordinator, RocksDBStore)] = [:]
        for mode in Mode.allCases {
            guard var configuration = mode.coordinatorConfiguration else { continue }
            // The saga mode keeps the store the unsafe modes use (as before); others get their own.
            let store = mode == .saga ? kv : try RocksDBStore(path: dir + "/kv-\(mode.rawValue)")
            if profile { configuration.hooks = ProfileHooks() }
            coordinators[mode] = (try SagaCoordinator(kv: profile ? StampedKVStore(store) : store, sql: sql, configuration: configuration, logger: logger), store)
        }
        self.coordinators = coordinators
    }

    func close() {
        for (_, c) in coordinators {
            c.coordinator.close()
            if c.kv !== kv { c.kv.close() }
        }
        admins.forEach { $0.close() }
        kv.close()
    }

    /// The counters so far: this process's fsyncs (RocksDB, SQLite) plus the servers' own,
    /// summed over every server.
    func counters() -> ServerCounters {
        var c = ServerCounters()
        c.fsyncs = Int(saga_fault_fsync_calls())
        for admin in admins {
            guard let rows = try? admin.query("SHOW GLOBAL STATUS WHERE Variable_name IN (\(ServerCounters.names))", []) else { continue }
            for row in rows {
                c.add(row[0].string ?? "", Int(row[1].string ?? "") ?? Int(row[1].int64 ?? 0))
            }
        }
        return c
    }
}

/// Server status counters, summed over a cluster's nodes. A write set is what one COMMIT on a
/// Galera node replicates and the cluster certifies; a certification failure or brute-force
/// abort rolls a transaction back (the client sees 1213).
struct ServerCounters: Codable, Sendable {
    var fsyncs = 0
    var writeSets = 0
    var writeSetBytes = 0
    var certificationFailures = 0
    var bruteForceAborts = 0

    static let names = "'Innodb_os_log_fsyncs', 'Innodb_data_fsyncs', 'wsrep_replicated', 'wsrep_replicated_bytes', 'wsrep_local_cert_failures', 'wsrep_local_bf_aborts'"

    mutating func add(_ name: String, _ value: Int) {
        switch name.lowercased() {
        case "innodb_os_log_fsyncs", "innodb_data_fsyncs": fsyncs += value
        case "wsrep_replicated": writeSets += value
        case "wsrep_replicated_bytes": writeSetBytes += value
        case "wsrep_local_cert_failures": certificationFailures += value
        case "wsrep_local_bf_aborts": bruteForceAborts += value
        default: break
        }
    }

    static func - (a: ServerCounters, b: ServerCounters) -> ServerCounters {
        ServerCounters(fsyncs: a.fsyncs - b.fsyncs, writeSets: a.writeSets - b.writeSets, writeSetBytes: a.writeSetBytes - b.writeSetBytes,
                       certificationFailures: a.certificationFailures - b.certificationFailures,
                       bruteForceAborts: a.bruteForceAborts - b.bruteForceAborts)
    }

    static func + (a: ServerCounters, b: ServerCounters) -> ServerCounters {
        ServerCounters(fsyncs: a.fsyncs + b.fsyncs, writeSets: a.writeSets + b.writeSets, writeSetBytes: a.writeSetBytes + b.writeSetBytes,
                       certificationFailures: a.certificationFailures + b.certificationFailures,
                       bruteForceAborts: a.bruteForceAborts + b.bruteForceAborts)
    }
}

struct RoundResult {
    var ops = 0
    var seconds = 0.0
    var latenciesMicros: [Double] = []
    var counters = ServerCounters()
    var errors = 0
    var firstError: String?
    /// With `--profile`: one row of stamps per operation (see ``ProfilePoint``).
    var stamps: [[UInt64]] = []
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
        for s in workload.schema(mysql: stores.backend.isMariaDB) { try conn.execute(s, []) }
        try conn.begin()
        for (s, args) in workload.seedStatements(threads: threads, mysql: stores.backend.isMariaDB) { try conn.execute(s, args) }
        if case .failed(let e) = conn.commit() { throw e }
        try conn.execute("CREATE TABLE IF NOT EXISTS bench_extra_rows (id BIGINT PRIMARY KEY)", [])
        for mode in [Mode.unsafe, .xa, .unsafeWithRow] where mode != .xa || stores.backend.runsXA {
            connections[mode] = try (0..<threads).map { _ in try stores.sql.connect() }
        }
    }

    func close() { connections.values.forEach { $0.forEach { $0.close() } } }

    func round(_ mode: Mode, duration: Double, profile: Bool = false) -> RoundResult {
        let countersBefore = stores.counters()
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
                let recorder = profile ? ProfileRecorder() : nil
                ProfileRecorder.$current.withValue(recorder) {
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
                            if let recorder {
                                try op.runUnsafeWithRowProfiled(kv: stores.kv, conn: conn, extraRow: Int64(xidCounter.next()), recorder)
                            } else {
                                try op.runUnsafe(kv: stores.kv, conn: conn, extraRow: Int64(xidCounter.next()))
                            }
                        case _ where mode.coordinatorConfiguration != nil:
                            guard let coordinator = stores.coordinator(for: mode) else { throw BenchError("no coordinator for \(mode)") }
                            if let recorder { try op.runSagaProfiled(coordinator, recorder) } else { try op.runSaga(coordinator) }
                        case .xa:
                            guard let mysql = conn as? MySQLConnection else { throw BenchError("XA needs a MySQL connection") }
                            try op.runXA(kv: stores.kv, conn: mysql, xid: "x\(xidCounter.next())")
                        default:
                            throw BenchError("mode \(mode) has no runner")
                        }
                        r.ops += 1
                        r.latenciesMicros.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1000)
                    } catch {
                        r.errors += 1
                        if r.firstError == nil { r.firstError = "\(error)" }
                    }
                }
                }
                r.stamps = recorder?.rows ?? []
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
            total.stamps += r.stamps
        }
        total.counters = stores.counters() - countersBefore
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

/// The median of `a[i] / b[i]` over the rounds both have (0 if none).
func medianOfRatios(_ a: [Double], _ b: [Double]) -> Double {
    median(zip(a, b).compactMap { $1 > 0 ? $0 / $1 : nil })
}

func median(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}
