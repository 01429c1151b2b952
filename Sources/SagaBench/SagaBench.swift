import ArgumentParser
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

    @Option(help: "SQL backends: sqlite, mysql, or both.") var backend: String = "both"
    @Option(help: "Workloads: aa-trigger, transfer, or both.") var workload: String = "both"
    @Option(help: "Thread counts, comma-separated (disjoint keys per thread).") var concurrency: String = "1,8"
    @Option(help: "Modes to run, comma-separated (unsafe, saga, xa, unsafe+row); xa runs on MySQL only. unsafe+row adds one row insert to the unsafe sequence: what the marker alone costs.") var modes: String = "unsafe,saga,xa"
    @Option(help: "Measured rounds per mode (after one warm-up round).") var rounds: Int = 5
    @Option(help: "Seconds each mode runs in a round.") var seconds: Double = 2
    @Option(name: .customLong("recovery-sagas"), help: "Prepared sagas to recover (0: skip).") var recoverySagas: Int = 10_000
    @Option(name: .customLong("growth-sagas"), help: "Sagas to run while sampling journal and marker sizes (0: skip).") var growthSagas: Int = 100_000
    @Option(name: .customLong("mysql-url"), help: "Use this MariaDB server (its database is used as is) instead of starting a throwaway one.") var mysqlURL: String?
    @Option(help: "Write the figures as JSON to this file.") var json: String?
    @Option(help: "Work in this directory (default: a new one under the temporary directory).") var workdir: String?

    func validate() throws {
        guard ["sqlite", "mysql", "both"].contains(backend) else { throw ValidationError("--backend must be sqlite, mysql or both, not \(backend)") }
        guard ["aa-trigger", "transfer", "both"].contains(workload) else { throw ValidationError("--workload must be aa-trigger, transfer or both, not \(workload)") }
        guard rounds >= 1 else { throw ValidationError("--rounds must be at least 1") }
        guard seconds > 0 else { throw ValidationError("--seconds must be positive") }
        guard !threadCounts.isEmpty, threadCounts.allSatisfy({ (1...64).contains($0) }) else {
            throw ValidationError("--concurrency takes thread counts from 1 to 64, comma-separated, not \(concurrency)")
        }
        guard !selectedModes.isEmpty, modes.split(separator: ",").allSatisfy({ Mode(rawValue: String($0)) != nil }) else {
            throw ValidationError("--modes takes unsafe, saga, xa and unsafe+row, comma-separated, not \(modes)")
        }
        guard recoverySagas >= 0, growthSagas >= 0 else { throw ValidationError("saga counts must be 0 or more") }
    }

    var selectedModes: [Mode] { modes.split(separator: ",").compactMap { Mode(rawValue: String($0)) } }

    var threadCounts: [Int] { concurrency.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) } }

    func run() throws {
        var logger = Logger(label: "saga-bench") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .error
        let root = try workdir ?? MariaDBServer.makeTempDir("saga-bench")
        defer { if workdir == nil { try? FileManager.default.removeItem(atPath: root) } }
        var report = BenchReport(machine: MachineInfo.read(workdir: root), rounds: rounds, secondsPerRound: seconds)
        say("saga-bench on \(report.machine.summary)")
        say("rounds: \(rounds) x \(seconds) s per mode after a warm-up, modes interleaved; work in \(root)\n")
        let backends: [BenchBackend] = backend == "both" ? [.sqlite, .mysql] : [BenchBackend(rawValue: backend) ?? .sqlite]
        let workloads: [any Workload] = workload == "both" ? [AATriggerWorkload(), TransferWorkload()]
            : workload == "transfer" ? [TransferWorkload()] : [AATriggerWorkload()]
        var cellNumber = 0

        for b in backends {
            var server: MariaDBServer?
            if b == .mysql, mysqlURL == nil {
                say("[mysql] starting a throwaway MariaDB server (innodb_flush_log_at_trx_commit=1)")
                server = try MariaDBServer()
            }
            defer { server?.stop() }
            let serverURL = mysqlURL ?? server?.url
            func freshDatabase() throws -> String? {
                guard b == .mysql, let serverURL else { return nil }
                cellNumber += 1
                if mysqlURL != nil { return serverURL }  // the caller's database, as is
                let name = "bench_\(cellNumber)"
                let admin = try MySQLDatabase(url: serverURL).openConnection()
                defer { admin.close() }
                try admin.execute("DROP DATABASE IF EXISTS \(name)", [])
                try admin.execute("CREATE DATABASE \(name)", [])
                guard let slash = serverURL.lastIndex(of: "/") else { throw BenchError("bad server URL") }
                return serverURL[..<slash] + "/" + name
            }

            for w in workloads {
                for threads in threadCounts {
                    cellNumber += 1
                    let dir = root + "/\(b.rawValue)-\(w.name)-\(threads)-\(cellNumber)"
                    let stores = try BenchStores(backend: b, dir: dir, mysqlURL: try freshDatabase(), logger: logger)
                    let runner = try CellRunner(stores: stores, workload: w, threads: threads)
                    let modes = selectedModes.filter { $0 != .xa || b == .mysql }
                    say("[\(b.rawValue)] \(w.name), \(threads) thread(s): \(modes.map(\.rawValue).joined(separator: ", "))")
                    var perMode: [Mode: [RoundResult]] = [:]
                    for mode in modes { _ = runner.round(mode, duration: min(1, seconds)) }  // warm-up
                    for r in 1...rounds {
                        for mode in modes {
                            let result = runner.round(mode, duration: seconds)
                            perMode[mode, default: []].append(result)
                            if let e = result.firstError { say("    \(mode) round \(r): \(result.errors) error(s), first: \(e)") }
                        }
                    }
                    runner.close()
                    stores.close()
                    let cell = CellFigures(backend: b, workload: w.name, threads: threads, modes: modes, results: perMode)
                    for line in cell.lines() { say("    " + line) }
                    report.cells.append(cell)
                }
            }

            if recoverySagas > 0 {
                say("[\(b.rawValue)] recovery of \(recoverySagas) prepared sagas (half committed in SQL, half not)")
                let r = try RecoveryBench(backend: b, dir: root + "/\(b.rawValue)-recovery", mysqlURL: try freshDatabase(), count: recoverySagas).run(logger: logger)
                say(String(format: "    reopen with recovery: %.3f s (%d kept, %d compensated, %@)", r.seconds, r.committed, r.compensated, r.correct ? "correct" : "WRONG"))
                report.recovery[b.rawValue] = r
            }
            if growthSagas > 0 {
                say("[\(b.rawValue)] journal and marker sizes over \(growthSagas) sagas with GC (default threshold 512)")
                let samples = try GrowthBench(backend: b, dir: root + "/\(b.rawValue)-growth", mysqlURL: try freshDatabase(),
                                              count: growthSagas, every: max(1, growthSagas / 10)).run(logger: logger, progress: say)
                report.growth[b.rawValue] = samples
            }
        }
        say("")
        say(report.table())
        if let json { try report.json().write(toFile: json, atomically: true, encoding: .utf8); say("figures written to \(json)") }
    }
}

func say(_ line: String) {
    print(line)
    fflush(nil)
}
