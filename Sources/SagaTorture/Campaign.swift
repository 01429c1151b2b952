import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga
import SagaFaultKit
import SQLiteBackend

/// How hard a run tries.
struct Intensity: Sendable {
    var randomKills: Int
    var powerLosses: Int
    var serverKills: Int
    /// kill -9 of a Galera node under load, then its rejoin.
    var nodeKills: Int
    var contentionSagas: Int
    var replicaTriggers: Int
    /// KV write faults: runs per (files, mode, errno) combination, 8 combinations.
    var kvFaultsPerKind: Int
    /// SIGKILLs of a node with hundreds of sagas pending in its journal.
    var backlogKills: Int
    /// Simulated power losses of RocksDB's files (per coordinator mode).
    var kvPowerLosses: Int
    /// Second crashes in recovery after every first crash (long), or once per recovery step.
    var fullSecondCrashes: Bool

    static let short = Intensity(randomKills: 50, powerLosses: 10, serverKills: 4, nodeKills: 6, contentionSagas: 300, replicaTriggers: 30, kvFaultsPerKind: 2, backlogKills: 12, kvPowerLosses: 8, fullSecondCrashes: false)
    static let long = Intensity(randomKills: 1000, powerLosses: 300, serverKills: 60, nodeKills: 60, contentionSagas: 3000, replicaTriggers: 200, kvFaultsPerKind: 8, backlogKills: 100, kvPowerLosses: 100, fullSecondCrashes: true)

    /// The cluster's share of a short run. Its sagas are slower (every COMMIT is certified by
    /// three nodes) and a node's rejoin takes seconds, so it repeats less of what the other
    /// backends already cover (random kills, KV write faults, the backlog: the first backlog
    /// kill still leaves hundreds of sagas for one fence) and spends the time on node kills.
    var forShortClusterRun: Intensity {
        var i = self
        i.randomKills = min(randomKills, 16)
        i.nodeKills = min(nodeKills, 4)
        i.kvFaultsPerKind = min(kvFaultsPerKind, 1)
        i.backlogKills = min(backlogKills, 1)
        return i
    }
}

/// Every fault campaign against one SQL backend (with RocksDB), accumulating figures.
final class Campaign {
    let backend: NodeSite.Backend
    /// The coordinator mode every worker of this campaign runs in.
    let mode: CoordinatorMode
    let root: String
    let seed: UInt64
    let intensity: Intensity
    let server: MariaDBServer?
    /// The Galera backend's cluster.
    let cluster: GaleraCluster?
    /// Print each site's outcome counts.
    var verbose = false
    var figures: BackendFigures
    var rng: SplitMix64
    private var siteCount = 0
    /// Galera: each node's conflict counters at the last sample.
    var nodeCounters: [Int: [Int]] = [:]
    private let say: (String) -> Void

    init(backend: NodeSite.Backend, mode: CoordinatorMode = .compensate, root: String, seed: UInt64, intensity: Intensity, server: MariaDBServer?, cluster: GaleraCluster? = nil, say: @escaping (String) -> Void) {
        self.backend = backend
        self.mode = mode
        self.root = root + "/" + backend.rawValue + (mode == .redo ? "-redo" : "")
        self.seed = seed
        self.intensity = intensity
        self.server = server
        self.cluster = cluster
        self.say = say
        figures = BackendFigures(backend: backend.rawValue + (mode == .redo ? " redo" : ""))
        let stream: UInt64 = switch backend {
        case .sqlite: 0x51
        case .mysql: 0x3D
        case .galera: 0x6A
        }
        rng = SplitMix64(seed: seed ^ stream ^ (mode == .redo ? 0x7E00 : 0))
    }

    /// The backend, and the mode unless it is the default: how output names this campaign.
    var label: String { backend.rawValue + (mode == .redo ? " redo" : "") }

    /// The server (or cluster) URL to create and drop the sites' databases through.
    var adminURL: String? { server?.url ?? cluster?.url }

    /// The campaigns, in the order they run; `--campaigns` picks some.
    enum Name: String, CaseIterable, Sendable {
        case crashPoints = "crash-points", randomKills = "random-kills", ioCountdown = "io-countdown",
             powerLoss = "power-loss", serverKills = "server-kills", nodeKills = "node-kills", contention, replicas,
             kvWriteFaults = "kv-write-faults", pendingBacklog = "pending-backlog", kvPowerLoss = "kv-power-loss"
        /// Whether it applies to this backend at all.
        func applies(to backend: NodeSite.Backend) -> Bool {
            switch self {
            case .ioCountdown, .powerLoss: backend == .sqlite
            case .serverKills: backend == .mysql
            case .kvPowerLoss: backend == .sqlite || backend == .mysql
            case .nodeKills: backend == .galera
            default: true
            }
        }
    }

    func runAll(_ selected: [Name] = Name.allCases) throws {
        let start = Date()
        defer { figures.seconds = Date().timeIntervalSince(start) }
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        for name in Name.allCases where selected.contains(name) && name.applies(to: backend) {
            figures.campaigns.append(name.rawValue)
            let campaignStart = Date()
            defer { if verbose { say(String(format: "  (%@: %.0f s)", name.rawValue, Date().timeIntervalSince(campaignStart))) } }
            switch name {
            case .crashPoints: try crashMatrix()
            case .randomKills: try randomKills()
            case .ioCountdown: try ioCountdown()
            case .powerLoss: try powerLoss()
            case .serverKills: try serverKills()
            case .nodeKills: try nodeKills()
            case .contention: try contention()
            case .replicas: try replicas()
            case .kvWriteFaults: try kvWriteFaults()
            case .pendingBacklog: try pendingBacklog()
            case .kvPowerLoss: try kvPowerLoss()
            }
            if backend == .galera { sampleNodeCounters() }
        }
    }

    // MARK: Sites, workers, checks

    func newSite(_ tag: String) throws -> NodeSite {
        siteCount += 1
        let dir = root + "/\(siteCount)-\(tag)"
        // A fresh site even in a reused --workdir: old stores next to a new database would
        // look like lost sagas.
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var url: String?
        if backend.usesMySQL {
            guard let adminURL else { throw TortureError("no MariaDB server or cluster") }
            let database = "tt_\(siteCount)"
            let admin = try MySQLDatabase(url: adminURL).openConnection()
            defer { admin.close() }
            try admin.execute("DROP DATABASE IF EXISTS \(database)", [])
            try admin.execute("CREATE DATABASE \(database)", [])
            guard let slash = adminURL.lastIndex(of: "/") else { throw TortureError("bad server URL") }
            url = adminURL[..<slash] + "/" + database
        }
        let site = NodeSite(backend: backend, dir: dir, mysqlURL: url)
        try setUp(site)
        if backend == .galera { try waitUntilEveryNodeHas(site) }
        return site
    }

    /// Creates the site's tables and accounts here, in the parent, with no fault armed and
    /// straight to the database. A worker never does it: its SQL traffic goes through the
    /// faults of its campaign (a proxy that loses COMMIT replies, a power cut, a server kill,
    /// a SIGKILL at any moment), and a set-up transaction that one of them hits is not the
    /// system under test: it made the worker exit 1 (kill #1 of seed 788589312 on MariaDB:
    /// 2013 at the accounts' COMMIT, whose reply the proxy lost), or could leave a site with
    /// no tables for the checker.
    func setUp(_ site: NodeSite, accounts: Int? = nil) throws {
        let sql = try site.openSQL()
        try site.prepareSchema(sql, accounts: accounts ?? spec.accounts)
    }

    var spec: BankSpec { BankSpec(seed: seed) }

    func workerArgs(_ site: NodeSite, firstTxid: Int64, sagas: Int, extra: [String]) -> [String] {
        var args = ["worker", "--backend", backend.rawValue, "--mode", mode.rawValue, "--dir", site.dir, "--seed", "\(seed)",
                    "--first-txid", "\(firstTxid)", "--sagas", "\(sagas)", "--log", site.dir + "/outcomes.log"]
        if let url = site.mysqlURL { args += ["--mysql-url", url] }
        return args + extra
    }

    /// On a cluster every worker tries the nodes in an order of its own, drawn from the seed
    /// (`order`, or a new one): its recovery often runs on another node than the sagas of the
    /// worker before it.
    func startWorker(_ site: NodeSite, order: [Int]? = nil, firstTxid: Int64, sagas: Int, extra: [String], tag: String) throws -> ChildProcess {
        let site = backend == .galera ? try site.withNodeOrder(order ?? nodeOrder()) : site
        return try ChildProcess(ChildProcess.selfPath, workerArgs(site, firstTxid: firstTxid, sagas: sagas, extra: extra), outputIn: site.dir, tag: tag)
    }

    func nextTxid(_ site: NodeSite) throws -> Int64 {
        try OutcomeLog.read(site.dir + "/outcomes.log").maxTxid + 1
    }

    /// Runs the checker and counts what it found; `context` says which fault preceded it.
    @discardableResult
    func check(_ site: NodeSite, _ context: String, exact: Bool = false, spec: BankSpec? = nil) -> Bool {
        figures.checks += 1
        var site = site
        if backend == .galera {
            // Every node back and synced first: the checker then reads all three.
            if let unsynced = waitEveryNodeSynced() {
                fail("\(context): \(unsynced)")
                return false
            }
            do { site = try site.withNodeOrder(nodeOrder()) } catch {
                fail("\(context): \(error)")
                return false
            }
            figures.nodeChecks += 1
        }
        let r = Checker(site: site, spec: spec ?? self.spec, logPath: site.dir + "/outcomes.log").check(exact: exact)
        if backend == .galera, r.nodesIdentical { figures.nodesIdentical += 1 }
        figures.lost += r.lost.count
        figures.unexpected += r.unexpected.count
        figures.divergences += r.divergences.count
        if !r.ok { fail("\(context): \(r.summary)") }
        return r.ok
    }

    func fail(_ message: String) {
        figures.failures.append(message)
        say("  FAILED [\(label)] \(message)")
    }

    /// Adds a site's outcome log to the saga counts (once, when the site is done).
    func countOutcomes(_ site: NodeSite) {
        guard let log = try? OutcomeLog.read(site.dir + "/outcomes.log") else { return }
        if verbose {
            say("    \(site.dir): committed \(log.committed.count), failed \(log.failed.count), unknown \(log.unknown.count)")
            for (reason, n) in log.failureReasons.sorted(by: { $0.value > $1.value }).prefix(3) { say("      \(n) x \(reason)") }
        }
        figures.sagasCommitted += log.committed.count
        figures.sagasFailed += log.failed.count
        figures.sagasUnknown += log.unknown.count
        figures.sagasUnanswered += log.unanswered.count
        figures.forcedCommitFailures += log.begun.filter { spec.transfer($0).forcedFailure }.count
        if backend.usesMySQL { figures.lostReplies += log.fenced }
        figures.sagaConflicts += log.sagaConflicts
        figures.otherWriterConflicts += log.otherWriterConflicts
    }

    /// Removes the site's directory and database, unless a check failed (they are kept for
    /// the post-mortem; the database goes with its server or cluster unless SAGA_KEEP_SERVERS
    /// is set).
    func removeSite(_ site: NodeSite) {
        guard figures.failures.isEmpty else { return }
        try? FileManager.default.removeItem(atPath: site.dir)
        if let url = site.mysqlURL, let adminURL, let db = try? MySQLURL(url).database,
           let admin = try? MySQLDatabase(url: adminURL).openConnection() {
            _ = try? admin.execute("DROP DATABASE IF EXISTS \(db)", [])
            admin.close()
        }
    }

    // MARK: 1. Crash points

    /// The steps of recovery a second crash lands in.
    var recoverySteps: [SagaStep] {
        switch mode {
        case .compensate: [.resolve, .committed, .compensate, .compensated, .gcJournal, .gcMarkers]
        case .redo: [.replay, .checkpoint, .checkpointed]
        }
    }

    /// The steps a saga of this mode can crash at. Redo mode: replay is only reached at open
    /// (a second crash); on SQLite an unknown COMMIT (an fsync error) stops the node and the
    /// next open decides it by the claim, without a fence: resolve is MariaDB's.
    var sagaSteps: [SagaStep] {
        switch mode {
        case .compensate: SagaStep.steps(of: .compensate)
        case .redo: SagaStep.steps(of: .redo).filter { $0 != .replay && ($0 != .resolve || backend.usesMySQL) }
        }
    }

    /// Every step x every COMMIT outcome: the worker SIGKILLs itself at the step, the checker
    /// recovers and checks. Then a second crash at each step of recovery.
    func crashMatrix() throws {
        say("[\(label)] crash points: \(sagaSteps.count) steps x \(ForcedOutcome.allCases.count) COMMIT outcomes")
        var covered: Set<SagaStep> = []
        var secondCovered: Set<SagaStep> = []
        var crashedCells: [(SagaStep, ForcedOutcome)] = []
        figures.stepsKnown = sagaSteps.count
        for outcome in ForcedOutcome.allCases {
            for step in sagaSteps {
                figures.crashCells += 1
                let site = try newSite("crash-\(step)-\(outcome)")
                let crashed = try firstCrash(site, step, outcome)
                if crashed {
                    figures.firstCrashes += 1
                    covered.insert(step)
                    crashedCells.append((step, outcome))
                }
                check(site, "after a crash at \(step) (COMMIT \(outcome))")
                countOutcomes(site)
                removeSite(site)
            }
        }
        // Second crashes: inside the recovery that follows a first crash.
        var plan: [(SagaStep, ForcedOutcome, SagaStep)] = []
        if intensity.fullSecondCrashes {
            for (s, o) in crashedCells { for r in recoverySteps { plan.append((s, o, r)) } }
        } else if mode == .redo {
            // A crash right after COMMIT leaves a row above the watermark for the open to replay.
            for r in recoverySteps { plan.append((.committed, .committed, r)) }
        } else {
            for r in recoverySteps { plan.append((r == .committed ? .committed : .commit, .committed, r)) }
        }
        for (s, o, r) in plan {
            let site = try newSite("crash2-\(s)-\(o)-\(r)")
            guard try firstCrash(site, s, o) else { removeSite(site); continue }
            let child = try startWorker(site, firstTxid: 1000, sagas: 0, extra: ["--crash-at", r.rawValue, "--gc-every", "1"], tag: "second")
            switch child.wait() {
            case .signaled(SIGKILL):
                figures.secondCrashes += 1
                secondCovered.insert(r)
            case .exited(0): break  // recovery did not reach that step from this state
            case let t: fail("recovery after a crash at \(s) (\(o)), crashing at \(r): \(t): \(child.lastOutput)")
            }
            check(site, "after a crash at \(s) (COMMIT \(o)) and a second one in recovery at \(r)")
            countOutcomes(site)
            removeSite(site)
        }
        figures.stepsCovered = covered.count
        let missing = sagaSteps.filter { !covered.contains($0) }
        if !missing.isEmpty { fail("steps never reached by a crash: \(missing)") }
        let missingSecond = recoverySteps.filter { !secondCovered.contains($0) }
        if !missingSecond.isEmpty { fail("recovery steps never reached by a second crash: \(missingSecond)") }
        say("  covered \(covered.count)/\(sagaSteps.count) steps: crashed in \(figures.firstCrashes) of \(figures.crashCells) cells (the others are off that outcome's path), \(figures.secondCrashes) more crashes inside recovery")
    }

    /// Three sagas with the forced outcome, crash at the first time `step` is reached.
    private func firstCrash(_ site: NodeSite, _ step: SagaStep, _ outcome: ForcedOutcome) throws -> Bool {
        let child = try startWorker(site, firstTxid: 1, sagas: 3, extra: ["--outcome", outcome.rawValue, "--crash-at", step.rawValue, "--gc-every", "1"], tag: "first")
        switch child.wait() {
        case .signaled(SIGKILL):
            return true
        case .exited(0):
            return false  // the step is not on this outcome's path
        case let t:
            fail("worker crashing at \(step) (COMMIT \(outcome)): \(t): \(child.lastOutput)")
            return false
        }
    }

    // MARK: 2. Random kills

    func randomKills() throws {
        let n = intensity.randomKills
        say("[\(label)] random kills: \(n) SIGKILLs of a 4-thread workload (hot keys, 1-20 keys a saga, 1 in 10 COMMITs failing\(backend.usesMySQL ? ", 1 in 8 COMMIT replies lost" : "")\(backend == .galera ? "; nodes tried in a new order each run, another writer on the last" : ""))")
        let site = try newSite("kills")
        var extra = ["--threads", "4", "--fail-one-in", "10"]
        if backend.usesMySQL { extra += ["--lose-replies-one-in", "8"] }
        for i in 0..<n {
            let order = nodeOrder()
            let child = try startWorker(site, order: order, firstTxid: try nextTxid(site), sagas: 1_000_000, extra: extra + otherWriter(site, on: order.last), tag: "kill")
            usleep(useconds_t(rng.between(150, 900)) * 1000)
            if child.hasEnded {
                fail("kill #\(i + 1): the worker ended before it was killed (\(child.wait())): \(child.lastOutput)")
            } else {
                child.killNow()
                figures.randomKills += 1
            }
            if !check(site, "after random kill #\(i + 1)") { break }
            if (i + 1) % 10 == 0 { say("  \(i + 1) kills") }
        }
        countOutcomes(site)
        removeSite(site)
    }

    // MARK: 3. I/O error countdown (SQLite)

    /// Fails operation n = 1, 2, ... of a saga's commit path (writes and syncs, once and
    /// persistent) until the saga gets through untouched; after each, reopen and check.
    func ioCountdown() throws {
        say("[sqlite] I/O error countdown: xWrite and xSync, once and persistent, n = 1, 2, ... until a saga completes")
        var logger = Logger(label: "saga-torture.io") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .critical
        for op in [SQLiteFaults.Operation.sync, .write] {
            for persistent in [false, true] {
                let site = try newSite("io-\(op)-\(persistent ? "persistent" : "once")")
                let log = try OutcomeLog(path: site.dir + "/outcomes.log")
                var txid: Int64 = 1
                for n in 1...200 {
                    let sql = try site.openSQL()
                    let kv = try RocksDBStore(path: site.kvPath)
                    let coordinator = try SagaCoordinator(kv: kv, sql: sql, configuration: .init(gcThreshold: 4), logger: logger)
                    let t = BankSpec.Transfer(txid: txid, deltas: spec.transfer(txid).deltas, forcedFailure: false)
                    log.record(.begun, txid)
                    SQLiteFaults.arm(op, countdown: n, persistent: persistent, pathPrefix: site.sqlitePath)
                    let result = Result { () throws(SagaError) in try runTransfer(t, on: coordinator, backend: .sqlite, killer: nil) }
                    let fired = SQLiteFaults.failures
                    SQLiteFaults.disarm()
                    switch result {
                    case .success: log.record(.committed, txid)
                    case .failure(.inDoubt): log.record(.unknown, txid)
                    case .failure: log.record(.failed, txid)
                    }
                    coordinator.close()
                    kv.close()
                    figures.ioFaults += fired
                    check(site, "after \(op) #\(n) failed (\(persistent ? "persistent" : "once"))")
                    txid += 1
                    if fired == 0 { break }
                }
                countOutcomes(site)
                removeSite(site)
            }
        }
        say("  \(figures.ioFaults) injected I/O errors")
    }

    // MARK: 4. Power loss (SQLite)

    func powerLoss() throws {
        let n = intensity.powerLosses
        say("[sqlite] power loss: \(n) cuts; unsynced SQLite writes kept, dropped or garbled")
        let site = try newSite("power")
        for i in 0..<n {
            let child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 1_000_000,
                                        extra: ["--threads", "4", "--power-loss-after-ms", "\(rng.between(200, 900))"], tag: "power")
            switch child.wait() {
            case .signaled(SIGKILL): figures.powerLosses += 1
            case let t: fail("power-loss worker: \(t): \(child.lastOutput)")
            }
            if !check(site, "after power loss #\(i + 1) (\(child.stdout.trimmingCharacters(in: .whitespacesAndNewlines)))") { break }
            if (i + 1) % 25 == 0 { say("  \(i + 1) power losses") }
        }
        countOutcomes(site)
        removeSite(site)
    }

    // MARK: 5. Server kills (MariaDB)

    func serverKills() throws {
        guard let server else { return }
        let n = intensity.serverKills
        say("[mysql] server faults: \(n) kill -9 of mariadbd under load, restart, recover")
        let site = try newSite("server")
        for i in 0..<n {
            let child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 1_000_000, extra: ["--threads", "4", "--fail-one-in", "10", "--lose-replies-one-in", "8"], tag: "server")
            usleep(useconds_t(rng.between(300, 900)) * 1000)
            let endedEarly = child.hasEnded
            if endedEarly { fail("server kill #\(i + 1): the worker ended before the server was killed (\(child.wait())): \(child.lastOutput)") }
            server.kill9()
            figures.serverKills += 1
            usleep(300_000)  // the workload meets the dead server
            // It retries its reopen while the server is away: ending here is a bug.
            if !endedEarly, child.hasEnded { fail("server kill #\(i + 1): the worker ended after the server was killed (\(child.wait())): \(child.lastOutput)") }
            child.killNow()
            try server.start()
            if !check(site, "after server kill #\(i + 1)") { break }
            if (i + 1) % 10 == 0 { say("  \(i + 1) server kills") }
        }
        countOutcomes(site)
        removeSite(site)
    }

    // MARK: 6. Contention

    func contention() throws {
        let n = intensity.contentionSagas
        say("[\(label)] contention: \(n) sagas on 8 threads over 4 hot accounts, 1 in 10 COMMITs failing\(backend == .galera ? ", another writer of the hot accounts on another node" : "")")
        let site = try newSite("contention")
        let order = nodeOrder()
        let child = try startWorker(site, order: order, firstTxid: 1, sagas: n, extra: ["--threads", "8", "--hot", "4", "--fail-one-in", "10"] + otherWriter(site, on: order.last), tag: "contention")
        let t = child.wait()
        if t != .exited(0) { fail("contention worker: \(t): \(child.lastOutput)") }
        var spec = self.spec
        spec.hot = 4
        if check(site, "after the contention run", exact: true, spec: spec) { figures.contentionSagas += n }
        countOutcomes(site)
        removeSite(site)
    }
}
