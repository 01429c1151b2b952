import ArgumentParser
import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga
import SagaFaultKit
import SQLiteBackend
import Synchronization

extension NodeSite.Backend: ExpressibleByArgument {}

/// How a worker forces the outcome of every COMMIT (for the crash-point matrix).
enum ForcedOutcome: String, CaseIterable, Sendable, Codable, ExpressibleByArgument {
    case committed, failed, unknown
}

/// The child process: runs the bank workload on one node, recording every outcome in the
/// outcome log, until it is done, crashes itself at a step, or is killed.
struct Worker: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "worker", abstract: "Internal: the workload child the torture parent starts and kills.", shouldDisplay: false)

    @Option var backend: NodeSite.Backend
    @Option var dir: String
    @Option(name: .customLong("mysql-url")) var mysqlURL: String?
    @Option var seed: UInt64
    @Option(name: .customLong("first-txid")) var firstTxid: Int64
    @Option var sagas: Int
    @Option var threads: Int = 1
    @Option var accounts: Int = 200
    @Option var hot: Int = 8
    @Option(name: .customLong("fail-one-in")) var failOneIn: Int = 10
    @Option var outcome: ForcedOutcome?
    @Option(name: .customLong("crash-at")) var crashAt: String?
    @Option(name: .customLong("crash-occurrence")) var crashOccurrence: Int = 1
    @Option(name: .customLong("gc-every")) var gcEvery: Int = 64
    @Option(name: .customLong("power-loss-after-ms")) var powerLossAfterMs: Int?
    @Option(name: .customLong("lose-replies-one-in")) var loseRepliesOneIn: Int?
    @Option var log: String

    func run() throws {
        var logger = Logger(label: "saga-torture.worker") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .error
        let site = NodeSite(backend: backend, dir: dir, mysqlURL: mysqlURL)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let spec = BankSpec(seed: seed, accounts: accounts, hot: hot, failOneIn: outcome.map { $0 == .failed ? 1 : 0 } ?? failOneIn)
        let outcomes = try OutcomeLog(path: log)

        // MySQL: a proxy of our own that can lose COMMIT replies.
        var proxy: MySQLProxy?
        if backend == .mysql, outcome == .unknown || loseRepliesOneIn != nil {
            let url = try MySQLURL(mysqlURL ?? "")
            proxy = try MySQLProxy(targetHost: url.host == "localhost" ? "127.0.0.1" : url.host, targetPort: UInt16(url.port))
            if let n = loseRepliesOneIn { proxy?.loseRepliesAtRandom(oneIn: n, seed: seed) }
        }
        var hooks: [any SagaHooks] = []
        if let crashAt {
            guard let step = SagaStep(rawValue: crashAt) else { throw ValidationError("unknown step \(crashAt)") }
            hooks.append(StepTrigger(.crash, at: step, occurrence: crashOccurrence))
        }
        if outcome == .unknown { hooks.append(UnknownCommit(site: site, proxy: proxy)) }
        hooks.append(FenceCounter(log: outcomes))

        if let ms = powerLossAfterMs {
            SQLiteFaults.trackUnsyncedWrites(true, pathPrefix: site.sqlitePath)
            let seed = self.seed
            Thread.detachNewThread {
                usleep(useconds_t(ms) * 1000)
                let loss = SQLiteFaults.simulatePowerLoss(seed: seed)
                let line = Array("power loss: \(loss)\n".utf8)
                _ = line.withUnsafeBytes { write(1, $0.baseAddress, $0.count) }
                kill(getpid(), SIGKILL)
            }
        }

        let node = try WorkerNode(site: site, proxyPort: proxy?.port, hooks: CombinedHooks(hooks), gcEvery: gcEvery, logger: logger)
        let next = Atomic<Int64>(firstTxid)
        let end = firstTxid + Int64(sagas)
        let killer = backend == .mysql ? try site.openSQL() : nil
        let failures = Mutex<[String]>([])
        let group = DispatchGroup()
        for _ in 0..<max(1, threads) {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                while true {
                    let txid = next.add(1, ordering: .relaxed).oldValue
                    if txid >= end { return }
                    let t = spec.transfer(txid)
                    outcomes.record(.begun, txid)
                    let result = node.withCoordinator { c, generation in
                        (Result { () throws(SagaError) in try runTransfer(t, on: c, backend: site.backend, killer: killer) }, generation)
                    }
                    switch result.0 {
                    case .success:
                        outcomes.record(.committed, txid)
                    case .failure(let e):
                        switch e {
                        case .inDoubt:
                            outcomes.record(.unknown, txid, String("\(e)".prefix(200)))
                        default:
                            outcomes.record(.failed, txid, String("\(e)".prefix(120)))
                        }
                        switch e {
                        case .inDoubt, .stopped, .compensationFailed, .foreignWrite, .kvWriteFailed:
                            // As a node would: reopen both stores; recovery at open decides.
                            do { try node.reopen(ifGeneration: result.1) } catch {
                                failures.withLock { $0.append("reopen failed: \(error)") }
                                return
                            }
                        case .sqlFailed:
                            usleep(100_000)  // the database is away (killed server): back off
                        default: break
                        }
                    }
                }
            }
        }
        group.wait()
        if let problem = failures.withLock({ $0.first }) { throw TortureError(problem) }
        try node.finish()
        print("worker done: txids \(firstTxid)..<\(end)")
    }
}

/// Makes every COMMIT's outcome unknown for real: an fsync failure in SQLite's fault VFS, or
/// (MySQL) the proxy forwards COMMIT and loses the reply.
struct UnknownCommit: SagaHooks {
    let site: NodeSite
    let proxy: MySQLProxy?
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard step == .commit, phase == .run else { return }
        switch site.backend {
        case .sqlite: SQLiteFaults.arm(.sync, pathPrefix: site.sqlitePath)
        case .mysql: proxy?.arm(.loseReply)
        }
    }
}

/// Notes in the outcome log every COMMIT outcome decided by fencing while a saga ran.
struct FenceCounter: SagaHooks {
    let log: OutcomeLog
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == .resolve, phase == .run { log.record(.fenced, Int64(saga?.rawValue ?? 0)) }
    }
}

/// The node's stores and coordinator; replaced as a whole when the worker reopens them.
final class WorkerNode: @unchecked Sendable {
    // Writer first: a reopen must not wait behind threads that keep starting sagas.
    private let lock = ReadWriteLock(preferWriters: true)
    private var kv: RocksDBStore
    private var sql: any SQLDatabase
    private var coordinator: SagaCoordinator
    private var generation = 0
    private let site: NodeSite
    private let proxyPort: UInt16?
    private let hooks: any SagaHooks
    private let gcEvery: Int
    private let logger: Logger

    init(site: NodeSite, proxyPort: UInt16?, hooks: any SagaHooks, gcEvery: Int, logger: Logger) throws {
        self.site = site
        self.proxyPort = proxyPort
        self.hooks = hooks
        self.gcEvery = gcEvery
        self.logger = logger
        // The tables and accounts exist already: the parent made them with no fault armed
        // (`Campaign.setUp`). Everything here goes through the campaign's faults, so the first
        // open retries like every reopen.
        (sql, kv, coordinator) = try Self.open(site: site, proxyPort: proxyPort, hooks: hooks, gcEvery: gcEvery, logger: logger)
    }

    /// Opens both stores and the coordinator (recovery runs at open). The database may be away
    /// (a killed server, being restarted): retry, as a node would, for up to a minute.
    private static func open(site: NodeSite, proxyPort: UInt16?, hooks: any SagaHooks, gcEvery: Int, logger: Logger) throws
        -> (any SQLDatabase, RocksDBStore, SagaCoordinator)
    {
        var attempt = 0
        while true {
            do {
                let newSQL = try site.openSQL(proxyPort: proxyPort)
                let newKV = try RocksDBStore(path: site.kvPath)
                do {
                    let c = try SagaCoordinator(kv: newKV, sql: newSQL, configuration: .init(lockTimeout: .seconds(1), hooks: hooks, gcThreshold: gcEvery), logger: logger)
                    return (newSQL, newKV, c)
                } catch {
                    newKV.close()  // the next attempt opens it again
                    throw error
                }
            } catch {
                attempt += 1
                if attempt >= 300 { throw error }
                usleep(200_000)
            }
        }
    }

    func withCoordinator<T>(_ body: (SagaCoordinator, Int) -> T) -> T {
        lock.withReadLock { body(coordinator, generation) }
    }

    /// Closes and reopens both stores unless another thread already did since `generation`.
    func reopen(ifGeneration seen: Int) throws {
        try lock.withWriteLock { () throws in try reopenLocked(ifGeneration: seen) }
    }

    private func reopenLocked(ifGeneration seen: Int) throws {
        guard seen == generation else { return }
        coordinator.close()
        kv.close()
        // Every other thread waits here instead of running into the closed coordinator.
        (sql, kv, coordinator) = try Self.open(site: site, proxyPort: proxyPort, hooks: hooks, gcEvery: gcEvery, logger: logger)
        generation += 1
    }

    func finish() throws {
        lock.withWriteLock {
            _ = try? coordinator.collectGarbage()
            coordinator.close()
            kv.close()
        }
    }
}
