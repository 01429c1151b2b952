import ArgumentParser
import Dispatch
import Foundation
import Logging
import MySQLBackend
import SagaFaultKit

@main
struct SagaBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "saga-bench",
        abstract: "Saga against the unsafe sequence and against XA, side by side, on the same stores and durability.",
        discussion: """
            Modes run interleaved (unsafe, saga, xa, unsafe, saga, xa, ...) after a warm-up round; \
            each figure is the median over the rounds, and every ratio is to the unsafe mode of \
            the same run. Also times recovery of prepared sagas and samples journal and marker \
            sizes while sagas run with garbage collection.
            """)

    @Option(help: "SQL backends: sqlite, mysql, both (sqlite and mysql), or galera (a 3-node MariaDB Galera cluster against one MariaDB server, rounds interleaved in the same run).") var backend: String = "both"
    @Option(help: "Workloads: aa-trigger, transfer, or both.") var workload: String = "both"
    @Option(help: "Thread counts, comma-separated (disjoint keys per thread).") var concurrency: String = "1,8"
    @Option(help: "Modes to run, comma-separated (unsafe, saga, redo, xa, unsafe+row); saga is the coordinator in compensate mode, redo in redo mode; xa runs on one MySQL server only (not with --backend galera: MariaDB refuses XA with Galera replication). unsafe+row adds one row insert to the unsafe sequence: what the marker alone costs.") var modes: String = "unsafe,saga,redo,xa"
    @Option(help: "Measured rounds per mode (after one warm-up round).") var rounds: Int = 5
    @Option(help: "Seconds each mode runs in a round.") var seconds: Double = 2
    @Option(name: .customLong("recovery-sagas"), help: "Prepared sagas to recover (0: skip).") var recoverySagas: Int = 10_000
    @Option(name: .customLong("growth-sagas"), help: "Sagas to run while sampling journal and marker sizes (0: skip).") var growthSagas: Int = 100_000
    @Option(name: .customLong("mysql-url"), help: "Use this MariaDB server (its database is used as is) instead of starting a throwaway one.") var mysqlURL: String?
    @Option(name: .customLong("galera-url"), help: "With --backend galera: use this cluster (mysql://user:password@host1:port1,host2:port2,.../db; its database is used as is) instead of starting a throwaway one.") var galeraURL: String?
    @Option(help: "Write the figures as JSON to this file.") var json: String?
    @Flag(help: "Instead of the throughput table: where a saga's time goes, step by step (µs per saga, median), beside unsafe+row stamped at the same places. Uses --backend, --workload, --concurrency, --rounds, --seconds.") var profile = false
    @Option(name: .customLong("fsync-delay-ms"), help: "Added latency of every fsync/fdatasync, in ms, comma-separated: each mode runs at each delay (a fast virtual disk to a real one). Applies to this process (RocksDB, SQLite) and to a MariaDB server saga-bench starts (through an LD_PRELOAD library built with cc); not to a server given with --mysql-url.") var fsyncDelayMs: String = "0"
    @Option(help: "Write a chart of throughput against added fsync latency (one panel per backend and thread count, one line per mode) as SVG to this file.") var svg: String?
    @Option(name: .customLong("chart-from"), help: "Only draw the --svg chart from this JSON file (written by --json), running nothing.") var chartFrom: String?
    @Option(help: "Work in this directory (default: a new one under the temporary directory).") var workdir: String?

    func validate() throws {
        guard ["sqlite", "mysql", "both", "galera"].contains(backend) else { throw ValidationError("--backend must be sqlite, mysql, both or galera, not \(backend)") }
        guard ["aa-trigger", "transfer", "both"].contains(workload) else { throw ValidationError("--workload must be aa-trigger, transfer or both, not \(workload)") }
        guard rounds >= 1 else { throw ValidationError("--rounds must be at least 1") }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard !threadCounts.isEmpty, threadCounts.allSatisfy({ (1...64).contains($0) }) else {
            throw ValidationError("--concurrency takes thread counts from 1 to 64, comma-separated, not \(concurrency)")
        }
        guard !selectedModes.isEmpty, modes.split(separator: ",").allSatisfy({ Mode(rawValue: String($0)) != nil }) else {
            throw ValidationError("--modes takes \(Mode.allCases.map(\.rawValue).joined(separator: ", ")), comma-separated, not \(modes)")
        }
        guard let delays = fsyncDelays, !delays.isEmpty, delays.allSatisfy({ $0 >= 0 && $0 <= 1000 }) else {
            throw ValidationError("--fsync-delay-ms takes delays from 0 to 1000 ms, comma-separated, not \(fsyncDelayMs)")
        }
        if chartFrom != nil, svg == nil { throw ValidationError("--chart-from goes with --svg") }
        guard recoverySagas >= 0, growthSagas >= 0 else { throw ValidationError("saga counts must be 0 or more") }
        if galeraURL != nil, backend != "galera" { throw ValidationError("--galera-url goes with --backend galera") }
    }

    var fsyncDelays: [Double]? {
        let parts = fsyncDelayMs.split(separator: ",").map { Double($0.trimmingCharacters(in: .whitespaces)) }
        return parts.contains(nil) ? nil : parts.compactMap { $0 }
    }

    var selectedModes: [Mode] { modes.split(separator: ",").compactMap { Mode(rawValue: String($0)) } }

    var threadCounts: [Int] { concurrency.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }

    /// Backends measured together, their rounds interleaved: the cluster with one server.
    var groups: [[BenchBackend]] {
        switch backend {
        case "both": [[.sqlite], [.mysql]]
        case "galera": [[.galera, .mysql]]
        default: [[BenchBackend(rawValue: backend) ?? .sqlite]]
        }
    }

    func run() throws {
        if let chartFrom, let svg {
            let report = try JSONDecoder().decode(BenchReport.self, from: Data(contentsOf: URL(fileURLWithPath: chartFrom)))
            try FsyncChart(report: report).svg().write(toFile: svg, atomically: true, encoding: .utf8)
            say("chart written to \(svg)")
            return
        }
        var logger = Logger(label: "saga-bench") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .error
        let root = try workdir ?? MariaDBServer.makeTempDir("saga-bench")
        defer { if workdir == nil { try? FileManager.default.removeItem(atPath: root) } }
        var report = BenchReport(machine: MachineInfo.read(workdir: root), rounds: rounds, secondsPerRound: seconds)
        say("saga-bench on \(report.machine.summary)")
        say("rounds: \(rounds) x \(seconds) s per mode after a warm-up, modes interleaved; work in \(root)\n")
        let workloads: [any Workload] = workload == "both" ? [AATriggerWorkload(), TransferWorkload()]
            : workload == "transfer" ? [TransferWorkload()] : [AATriggerWorkload()]
        let servers = StartedServers()
        defer { servers.stopAll() }
        let delays = fsyncDelays ?? [0]
        let delay = try FsyncDelay(dir: root, slowServer: delays.contains { $0 > 0 })
        if delays.contains(where: { $0 > 0 }), mysqlURL != nil, groups.joined().contains(where: \.isMariaDB) {
            say("(--fsync-delay-ms slows this process's fsyncs (RocksDB, SQLite) only: the server given with --mysql-url syncs at its own speed)")
        }
        if profile {
            try runProfile(root: root, workloads: workloads, servers: servers, delay: delay, logger: logger)
            return
        }
        // An interrupted run does not reach the defer above: its work goes with the servers.
        if workdir == nil { servers.add { try? FileManager.default.removeItem(atPath: root) } }
        var cellNumber = 0

        for group in groups {
            let targets = try group.map { try target($0, servers, delay: delay) }
            let modes = selectedModes.filter { $0 != .xa || group.allSatisfy(\.runsXA) }
            if modes.count < selectedModes.count { say("(xa is not run with --backend galera: MariaDB refuses XA transactions with Galera replication, error 1235)") }

            for w in workloads {
                for threads in threadCounts {
                    var cells: [(target: BenchTarget, stores: BenchStores, runner: CellRunner)] = []
                    defer { for c in cells { c.runner.close(); c.stores.close() } }
                    for t in targets {
                        cellNumber += 1
                        let stores = try BenchStores(backend: t.backend, dir: root + "/\(t.backend.rawValue)-\(w.name)-\(threads)-\(cellNumber)",
                                                     mysqlURL: try t.freshDatabase(cellNumber), logger: logger)
                        cells.append((t, stores, try CellRunner(stores: stores, workload: w, threads: threads)))
                    }
                    for delayMs in delays {
                    delay.set(ms: delayMs)
                    say("[\(group.map(\.rawValue).joined(separator: ", "))] \(w.name), \(threads) thread(s): \(modes.map(\.rawValue).joined(separator: ", "))"
                        + (delays.count > 1 || delayMs > 0 ? String(format: ", fsync delay %.1f ms", delayMs) : ""))
                    var perMode = Array(repeating: [Mode: [RoundResult]](), count: cells.count)
                    for c in cells { for mode in modes { _ = c.runner.round(mode, duration: min(1, seconds)) } }  // warm-up
                    for r in 1...rounds {
                        for (i, c) in cells.enumerated() {
                            for mode in modes {
                                let result = c.runner.round(mode, duration: seconds)
                                perMode[i][mode, default: []].append(result)
                                if let e = result.firstError { say("    [\(c.target.backend.rawValue)] \(mode) round \(r): \(result.errors) error(s), first: \(e)") }
                            }
                        }
                    }
                    let figures = cells.indices.map { i in
                        CellFigures(backend: cells[i].target.backend, workload: w.name, threads: threads, modes: modes, results: perMode[i], fsyncDelayMs: delayMs)
                    }
                    for cell in figures {
                        for line in cell.lines() { say("    " + (figures.count > 1 ? "[\(cell.backend.rawValue)] " : "") + line) }
                    }
                    report.cells += figures
                    if let cluster = figures.first(where: { $0.backend == .galera }), let single = figures.first(where: { $0.backend == .mysql }) {
                        let pairs = ClusterComparison.pairs(cluster: cluster, single: single)
                        for p in pairs { say("    " + p.line()) }
                        report.clusterComparisons += pairs
                    }
                    }
                    delay.set(ms: 0)
                }
            }

            for t in targets {
                let b = t.backend
                cellNumber += 1
                if recoverySagas > 0 {
                    say("[\(b.rawValue)] recovery of \(recoverySagas) prepared sagas (half committed in SQL, half not)")
                    let r = try RecoveryBench(backend: b, dir: root + "/\(b.rawValue)-recovery", mysqlURL: try t.freshDatabase(cellNumber), count: recoverySagas).run(logger: logger)
                    say(String(format: "    reopen with recovery: %.3f s (%d kept, %d compensated, %@)", r.seconds, r.committed, r.compensated, r.correct ? "correct" : "WRONG"))
                    report.recovery[b.rawValue] = r
                }
                cellNumber += 1
                if growthSagas > 0 {
                    say("[\(b.rawValue)] journal and marker sizes over \(growthSagas) sagas with GC (default threshold 512)")
                    let samples = try GrowthBench(backend: b, dir: root + "/\(b.rawValue)-growth", mysqlURL: try t.freshDatabase(cellNumber),
                                                  count: growthSagas, every: max(1, growthSagas / 10)).run(logger: logger, progress: say)
                    report.growth[b.rawValue] = samples
                }
            }
        }
        say("")
        say(report.table())
        if let json { try report.json().write(toFile: json, atomically: true, encoding: .utf8); say("figures written to \(json)") }
        if let svg { try FsyncChart(report: report).svg().write(toFile: svg, atomically: true, encoding: .utf8); say("chart written to \(svg)") }
    }

    /// `--profile`: saga and unsafe+row, rounds interleaved, every operation stamped.
    func runProfile(root: String, workloads: [any Workload], servers: StartedServers, delay: FsyncDelay, logger: Logger) throws {
        var report = BenchReport(machine: MachineInfo.read(workdir: root), rounds: rounds, secondsPerRound: seconds)
        var cellNumber = 0
        let modes: [Mode] = [.unsafeWithRow, .saga]
        for group in groups {
            let targets = try group.map { try target($0, servers, delay: delay) }
            for w in workloads {
                for threads in threadCounts {
                    for t in targets {
                        cellNumber += 1
                        let stores = try BenchStores(backend: t.backend, dir: root + "/\(t.backend.rawValue)-\(w.name)-\(threads)-\(cellNumber)",
                                                     mysqlURL: try t.freshDatabase(cellNumber), logger: logger, profile: true)
                        defer { stores.close() }
                        let runner = try CellRunner(stores: stores, workload: w, threads: threads)
                        defer { runner.close() }
                        say("[\(t.backend.rawValue)] profile of \(w.name), \(threads) thread(s)")
                        for mode in modes { _ = runner.round(mode, duration: min(1, seconds), profile: true) }  // warm-up
                        var stamps: [Mode: [[UInt64]]] = [:]
                        for _ in 1...rounds {
                            for mode in modes {
                                let result = runner.round(mode, duration: seconds, profile: true)
                                if let e = result.firstError { say("    \(mode): \(result.errors) error(s), first: \(e)") }
                                stamps[mode, default: []] += result.stamps
                            }
                        }
                        let figures = ProfileFigures(backend: t.backend, workload: w.name, threads: threads, saga: stamps[.saga] ?? [], reference: stamps[.unsafeWithRow] ?? [])
                        say(figures.table())
                        report.profiles = (report.profiles ?? []) + [figures]
                    }
                }
            }
        }
        say(ProfileFigures.legend)
        if let json { try report.json().write(toFile: json, atomically: true, encoding: .utf8); say("figures written to \(json)") }
    }

    /// The caller's server or cluster, or one started for the run (and stopped with it).
    func target(_ backend: BenchBackend, _ servers: StartedServers, delay: FsyncDelay) throws -> BenchTarget {
        switch backend {
        case .sqlite:
            return BenchTarget(backend: .sqlite, serverURL: nil, given: false)
        case .mysql:
            if let mysqlURL { return BenchTarget(backend: .mysql, serverURL: mysqlURL, given: true) }
            say("[mysql] starting a throwaway MariaDB server (innodb_flush_log_at_trx_commit=1)")
            let server = try MariaDBServer(environment: delay.serverEnvironment)
            servers.add { server.stop() }
            return BenchTarget(backend: .mysql, serverURL: server.url, given: false)
        case .galera:
            if let galeraURL { return BenchTarget(backend: .galera, serverURL: galeraURL, given: true) }
            say("[galera] starting a throwaway 3-node MariaDB Galera cluster on loopback (innodb_flush_log_at_trx_commit=1 on each node)")
            let cluster = try GaleraCluster()
            servers.add { cluster.stop() }
            return BenchTarget(backend: .galera, serverURL: cluster.url, given: false)
        }
    }
}

/// Where one backend's SQL goes.
struct BenchTarget {
    let backend: BenchBackend
    /// The server's (or cluster's) URL; nil for SQLite.
    let serverURL: String?
    /// The caller's: its database is used as is.
    let given: Bool

    /// A database for one cell: a new one, `bench_N`, on a server started for the run (on a
    /// cluster it is created on every node); the caller's as is.
    func freshDatabase(_ n: Int) throws -> String? {
        guard backend.isMariaDB, let serverURL else { return nil }
        if given { return serverURL }
        let name = "bench_\(n)"
        let admin = try MySQLDatabase(url: serverURL).openConnection()
        defer { admin.close() }
        try admin.execute("DROP DATABASE IF EXISTS \(name)", [])
        try admin.execute("CREATE DATABASE \(name)", [])
        guard let slash = serverURL.lastIndex(of: "/") else { throw BenchError("bad server URL") }
        return serverURL[..<slash] + "/" + name
    }
}

/// The servers and clusters this run started (and its temporary work directory): stopped (and
/// removed) when the run ends or fails (a `defer`), and when it is interrupted (SIGINT,
/// SIGTERM), so that none is left running on the machine.
final class StartedServers: @unchecked Sendable {
    private let lock = NSLock()
    private var stops: [@Sendable () -> Void] = []
    private var sources: [any DispatchSourceSignal] = []

    init() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { [self] in
                say("interrupted: stopping the servers this run started")
                stopAll()
                exit(128 + sig)
            }
            source.resume()
            sources.append(source)
        }
    }

    func add(_ stop: @escaping @Sendable () -> Void) { lock.withLock { stops.append(stop) } }

    /// Stops each server once, the last started first.
    func stopAll() {
        let all = lock.withLock { () -> [@Sendable () -> Void] in
            defer { stops.removeAll() }
            return stops
        }
        for stop in all.reversed() { stop() }
    }
}

func say(_ line: String) {
    print(line)
    fflush(nil)
}
