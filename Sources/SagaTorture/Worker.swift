import SagaTestKit
import ArgumentParser
import CFsyncFaults
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
    @Option(name: .customLong("kv-power-loss-after-ms"), help: "Arm the KV power-loss simulation on the RocksDB directory before the node opens, and cut after this many milliseconds.")
    var kvPowerLossAfterMs: Int?
    @Option(name: .customLong("kv-power-loss-seed")) var kvPowerLossSeed: UInt64 = 0
    @Option(name: .customLong("kv-write-buffer"), help: "RocksDB's memtable size in bytes (small: flushes and compactions under the workload).")
    var kvWriteBuffer: Int?
    @Option(help: "The coordinator's mode.") var mode: CoordinatorMode = .compensate
    @Option(name: .customLong("lose-replies-one-in")) var loseRepliesOneIn: Int?
    @Option(name: .customLong("conflict-url"), help: "Galera: another writer on this node (a URL of one node) keeps changing hot accounts and back in transactions of its own, so that sagas on other nodes lose certification to it (1213) and it to them.")
    var conflictURL: String?
    @Option(name: .customLong("kv-write-fault"), help: "N:once|persistent|full:ENOSPC|EIO; once the node is open, the N-th write to a file of its RocksDB directory fails (full: persistent ENOSPC after a short write).")
    var kvWriteFault: KVWriteFault?
    @Flag(name: .customLong("expect-no-doubt"), help: "Exit 1 if the coordinator leaves any saga in doubt at open (the database is reachable).")
    var expectNoDoubt = false
    @Option var log: String

    func run() throws {
        var logger = Logger(label: "saga-torture.worker") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = ProcessInfo.processInfo.environment["SAGA_TORTURE_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .warning
        let site = NodeSite(backend: backend, dir: dir, mysqlURL: mysqlURL)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let spec = BankSpec(seed: seed, accounts: accounts, hot: hot, failOneIn: outcome.map { $0 == .failed ? 1 : 0 } ?? failOneIn)
        let outcomes = try OutcomeLog(path: log)

        // MySQL: a proxy of our own that can lose COMMIT replies (on a cluster, in front of the
        // URL's first node; the others follow it in the URL).
        var proxy: MySQLProxy?
        if backend.usesMySQL, outcome == .unknown || loseRepliesOneIn != nil {
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

        if let ms = kvPowerLossAfterMs {
            // Armed before the node opens: its recovery's writes are tracked too.
            try KVPowerLoss.arm(directory: site.kvPath)
            KVPowerLoss.cut(afterMilliseconds: ms, seed: kvPowerLossSeed)
        }

        let openStart = Date()
        let node = try WorkerNode(site: site, proxyPort: proxy?.port, hooks: CombinedHooks(hooks), gcEvery: gcEvery,
                                  kvWriteBuffer: kvWriteBuffer, mode: mode, logger: logger)
        let inDoubt = node.withCoordinator { c, _ in c.inDoubt }
        if expectNoDoubt {
            print(String(format: "open (recovery included): %.3f s, in doubt: %d", Date().timeIntervalSince(openStart), inDoubt.count))
        }
        if expectNoDoubt, !inDoubt.isEmpty {
            throw TortureError("\(inDoubt.count) saga(s) left in doubt after open with the database reachable: \(inDoubt.prefix(5))")
        }
        // Armed only now that the node is open: the fault hits the workload, not the set-up.
        if let kvWriteFault { try kvWriteFault.arm(site: site) }
        // Set by the first error that stops a node (KV write failures): the threads then stop
        // too, and the worker checks that the coordinator refuses new sagas.
        let stopErrors = Mutex<[SagaError]>([])
        let next = Atomic<Int64>(firstTxid)
        let end = firstTxid + Int64(sagas)
        let killer = try mysqlURL.map(ConnectionKiller.init(url:))
        if let conflictURL { try OtherWriter(url: conflictURL, spec: spec, seed: seed ^ UInt64(bitPattern: firstTxid), log: outcomes).start() }
        let failures = Mutex<[String]>([])
        let group = DispatchGroup()
        for _ in 0..<max(1, threads) {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                while true {
                    if kvWriteFault != nil, stopErrors.withLock({ !$0.isEmpty }) { return }
                    let txid = next.add(1, ordering: .relaxed).oldValue
                    if txid >= end { return }
                    let t = spec.transfer(txid)
                    outcomes.record(.begun, txid)
                    let result = node.withCoordinator { c, generation in
                        (Result { () throws(SagaError) in try runTransfer(t, on: c, backend: site.backend, killer: killer) }, generation)
                    }
                    switch result.0 {
                    case .success(let node):
                        outcomes.record(.committed, txid, node.map { "node port \($0) at \(Self.now())" } ?? "")
                    case .failure(let e):
                        if e.isClusterConflict { outcomes.record(.conflict, txid) }
                        switch e {
                        case .inDoubt:
                            outcomes.record(.unknown, txid, String("\(e)".prefix(200)))
                        default:
                            outcomes.record(.failed, txid, String("\(e)".prefix(120)))
                        }
                        if kvWriteFault != nil, e.stopsTheNode {
                            // With the disk still failing, a reopen would only fail too: stop
                            // here as the node would, and let the parent restart it.
                            stopErrors.withLock { $0.append(e) }
                            return
                        }
                        switch e {
                        case .inDoubt, .stopped, .compensationFailed, .compensationFailedAfterCommit, .foreignWrite, .kvWriteFailed:
                            // As a node would: reopen both stores; recovery at open decides.
                            do { try node.reopen(ifGeneration: result.1) } catch {
                                failures.withLock { $0.append("reopen failed: \(error)") }
                                return
                            }
                        case .sqlFailed:
                            usleep(100_000)  // the database is away (killed server): back off
                        case .lockTimeout(_, _, let holders), .deadlock(_, _, let holders):
                            // As a node would: a holder that recovery left in doubt (the
                            // database could not be reached or the fence failed) keeps its
                            // locks until recovery on demand decides it.
                            node.recoverIfHeldInDoubt(holders)
                        default: break
                        }
                    }
                }
            }
        }
        group.wait()
        if let problem = failures.withLock({ $0.first }) { throw TortureError(problem) }
        let stops = stopErrors.withLock { $0 }
        if let first = stops.first {
            // Nothing may be written on top of a store that failed a write (a saga's forward
            // batch, a compensation, garbage collection) until a reopen has let recovery decide:
            // the coordinator stops itself then. RocksDB may not: it resumes by itself after
            // ENOSPC, so its refusal proves nothing. The probe is a KV-only saga on a key of its
            // own (outside the bank, so no lock of a held saga is in its way); it must be
            // refused with `stopped`. Only if no KV write failed (in doubt, foreign write) may
            // it go on.
            let mustStop = stops.contains { e in
                switch e {
                case .kvWriteFailed, .compensationFailed, .stopped: true
                case .compensationFailedAfterCommit(_, _, let undo): if case .compensationFailed = undo { true } else { false }
                default: false
                }
            }
            let probeKey = Bytes("probe/\(firstTxid)".utf8)
            let probe = node.withCoordinator { c, _ in
                Result { () throws(SagaError) in try c.run { saga in try saga.kv.put(probeKey, Bytes("1".utf8)) } }
            }
            let verdict: String
            let exit: Int32
            switch probe {
            case .failure(.stopped): verdict = "refused by the coordinator (stopped)"; exit = Self.stoppedExit
            case .success where !mustStop: verdict = "committed: no KV write had failed, the node went on"; exit = Self.wentOnExit
            case .success: verdict = "COMMITTED on top of a store that failed a write"; exit = Self.notStoppedExit
            case .failure(let e): verdict = "not refused by the coordinator after a failed KV write: \(e)"; exit = Self.notStoppedExit
            }
            let kinds = Dictionary(stops.map { ($0.kind, 1) }, uniquingKeysWith: +).sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }
            print("kv write fault: \(saga_fault_write_failures()) injected; first error: \(first.kind): \(String("\(first)".prefix(300)))")
            print("errors that stopped the threads: \(kinds.joined(separator: ", "))")
            print("probe saga after it: \(verdict)")
            fflush(nil)
            node.closeWithoutGC()
            print("closed")
            fflush(nil)
            Foundation.exit(exit)
        }
        if kvWriteFault != nil { print("kv write fault: \(saga_fault_write_failures()) injected, \(saga_fault_write_matched()) writes to the KV directory; no saga was stopped") }
        try node.finish()
        print("worker done: txids \(firstTxid)..<\(end)")
    }
}

extension Worker {
    /// Wall-clock seconds to the millisecond, to line the outcome log up with the campaign's events.
    static func now() -> String { String(format: "%.3f", Date().timeIntervalSince1970) }
    /// Exit status of a worker whose node stopped after a KV write fault and refused the probe.
    static let stoppedExit: Int32 = 3
    /// ... and of one whose coordinator went on accepting sagas after it.
    static let notStoppedExit: Int32 = 4
    /// ... and of one that stopped its threads on an error that was no KV write failure (in
    /// doubt, foreign write), after which the node may go on (the probe committed).
    static let wentOnExit: Int32 = 5
}

/// A KV write fault for the worker: `N:once|persistent|full:ENOSPC|EIO[:all|data]`.
struct KVWriteFault: ExpressibleByArgument, CustomStringConvertible, Sendable {
    /// once: only the N-th write fails; persistent: it and every later one; full: a disk that
    /// fills up, persistent ENOSPC after a short write (and fallocate fails too).
    enum Mode: String, CaseIterable, Sendable { case once, persistent, full }
    /// all: every file of the RocksDB directory (a real full disk); data: the numbered files
    /// only (WAL and SST), not RocksDB's own info LOG or MANIFEST.
    enum Files: String, CaseIterable, Sendable { case all, data }
    var n: Int
    var mode: Mode
    /// ENOSPC or EIO.
    var errorNumber: Int32
    var files: Files

    init(n: Int, mode: Mode, errorNumber: Int32, files: Files) {
        self.n = n
        self.mode = mode
        self.errorNumber = mode == .full ? ENOSPC : errorNumber
        self.files = files
    }

    init?(argument: String) {
        let parts = argument.split(separator: ":").map(String.init)
        guard parts.count == 3 || parts.count == 4, let n = Int(parts[0]), n >= 1, let mode = Mode(rawValue: parts[1]) else { return nil }
        switch parts[2].uppercased() {
        case "ENOSPC": errorNumber = ENOSPC
        case "EIO": errorNumber = EIO
        default: return nil
        }
        guard let files = parts.count == 4 ? Files(rawValue: parts[3]) : .all else { return nil }
        self.n = n
        self.mode = mode
        self.files = files
    }

    var errnoName: String { errorNumber == ENOSPC ? "ENOSPC" : "EIO" }
    var description: String { "\(n):\(mode.rawValue):\(errnoName):\(files.rawValue)" }

    /// Arms the interposer on the site's RocksDB directory; every injected failure is logged
    /// to `kvfaults.log` there (one write each, so the lines survive an abort).
    func arm(site: NodeSite) throws {
        let fd = open(site.dir + "/kvfaults.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TortureError("cannot open \(site.dir)/kvfaults.log: errno \(errno)") }
        saga_fault_write_log_to(fd)
        saga_fault_write_arm(site.kvPath + "/" + (files == .data ? "0" : ""), n, mode == .once ? 0 : 1, errorNumber, mode == .full ? 1 : 0)
    }
}

extension SagaError {
    /// Errors after which a node cannot go on without reopening its stores.
    var stopsTheNode: Bool {
        switch self {
        case .inDoubt, .stopped, .compensationFailed, .compensationFailedAfterCommit, .foreignWrite, .kvWriteFailed: true
        default: false
        }
    }
    var isInDoubt: Bool { if case .inDoubt = self { true } else { false } }
    /// The database rolled the saga's transaction back because a conflicting one won: 1213 /
    /// SQLSTATE 40001 (on a cluster, a failed certification or a brute-force abort).
    var isClusterConflict: Bool {
        let text = "\(self)"
        return text.contains("MySQL error 1213 ") || text.contains("SQLSTATE 40001")
    }
    /// The case name, for counting.
    var kind: String {
        switch self {
        case .bodyFailed: "bodyFailed"
        case .transactionLost: "transactionLost"
        case .transactionEndedByStatement: "transactionEndedByStatement"
        case .sqlFailed: "sqlFailed"
        case .kvWriteFailed: "kvWriteFailed"
        case .commitFailed: "commitFailed"
        case .inDoubt: "inDoubt"
        case .foreignWrite: "foreignWrite"
        case .compensationFailed: "compensationFailed"
        case .compensationFailedAfterCommit(_, _, let undo): "\(undo.kind) after a failed COMMIT"
        case .lockTimeout: "lockTimeout"
        case .deadlock: "deadlock"
        case .journalCorrupt: "journalCorrupt"
        case .misuse: "misuse"
        case .stopped: "stopped"
        case .cancelled: "cancelled"
        case .alreadyCommitted: "alreadyCommitted"
        }
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
        case .mysql, .galera: proxy?.arm(.loseReply)
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

/// The coordinator's mode for a worker and a campaign. The library has one mode today; when
/// `SagaCoordinator.Configuration.mode` lands, add `case redo` here and set the mode in
/// `WorkerNode.open` (the line marked there): every campaign that loops over `allCases` (the
/// KV power loss) then runs in both modes.
enum CoordinatorMode: String, CaseIterable, Sendable, ExpressibleByArgument {
    case compensate, redo

    var library: SagaCoordinator.Configuration.Mode {
        switch self {
        case .compensate: .compensate
        case .redo: .redo
        }
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
    private let kvOptions: RocksDBStore.Options
    private let mode: CoordinatorMode
    private let logger: Logger

    init(site: NodeSite, proxyPort: UInt16?, hooks: any SagaHooks, gcEvery: Int, kvWriteBuffer: Int? = nil, mode: CoordinatorMode = .compensate, logger: Logger) throws {
        self.site = site
        self.proxyPort = proxyPort
        self.hooks = hooks
        self.gcEvery = gcEvery
        var kvOptions = RocksDBStore.Options()
        kvOptions.writeBufferSize = kvWriteBuffer
        self.kvOptions = kvOptions
        self.mode = mode
        self.logger = logger
        // The tables and accounts exist already: the parent made them with no fault armed
        // (`Campaign.setUp`). Everything here goes through the campaign's faults, so the first
        // open retries like every reopen.
        (sql, kv, coordinator) = try Self.open(site: site, proxyPort: proxyPort, hooks: hooks, gcEvery: gcEvery, kvOptions: kvOptions, mode: mode, logger: logger)
    }

    /// Opens both stores and the coordinator (recovery runs at open). The database may be away
    /// (a killed server, being restarted): retry, as a node would, for up to a minute.
    private static func open(site: NodeSite, proxyPort: UInt16?, hooks: any SagaHooks, gcEvery: Int, kvOptions: RocksDBStore.Options,
                             mode: CoordinatorMode, logger: Logger) throws
        -> (any SQLDatabase, RocksDBStore, SagaCoordinator)
    {
        // Redo mode checkpoints every gcEvery sagas, and by time only when that is rare (the
        // backlog campaign's 100000: rows pile up above the watermark for the next open).
        let configuration = SagaCoordinator.Configuration(lockTimeout: .seconds(1), hooks: hooks, gcThreshold: gcEvery, mode: mode.library,
                                                          checkpointEvery: gcEvery, checkpointInterval: gcEvery >= 10_000 ? .seconds(3600) : .milliseconds(200))
        var attempt = 0
        while true {
            do {
                let newSQL = try site.openSQL(proxyPort: proxyPort)
                let newKV = try RocksDBStore(path: site.kvPath, options: kvOptions)
                do {
                    let c = try SagaCoordinator(kv: newKV, sql: newSQL, configuration: configuration, logger: logger)
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

    /// One thread at a time runs recovery on demand.
    private let recovering = Mutex(false)

    /// Runs recovery on demand if any of `holders` is in doubt (one thread at a time; the
    /// others back off meanwhile).
    func recoverIfHeldInDoubt(_ holders: [SagaID]) {
        guard recovering.withLock({ busy in
            if busy { return false }
            busy = true
            return true
        }) else {
            usleep(100_000)
            return
        }
        defer { recovering.withLock { $0 = false } }
        withCoordinator { c, _ in
            let doubtful = Set(c.inDoubt).intersection(holders)
            guard !doubtful.isEmpty else { return }
            do {
                let report = try c.recover()
                logger.warning("recovery on demand for \(doubtful.sorted()) held in doubt: \(report)")
            } catch {
                logger.warning("recovery on demand for \(doubtful.sorted()) failed: \(error)")
                usleep(100_000)
            }
        }
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
        (sql, kv, coordinator) = try Self.open(site: site, proxyPort: proxyPort, hooks: hooks, gcEvery: gcEvery, kvOptions: kvOptions, mode: mode, logger: logger)
        generation += 1
    }

    /// Closes without collecting garbage (which writes to the KV store): for a node whose
    /// disk has failed.
    func closeWithoutGC() {
        lock.withWriteLock {
            coordinator.close()
            kv.close()
        }
    }

    func finish() throws {
        lock.withWriteLock {
            _ = try? coordinator.collectGarbage()
            coordinator.close()
            kv.close()
        }
    }
}

/// Another writer of the same database on one cluster node, outside any saga: in transactions of
/// its own it adds 1 to a hot account and takes it away again (a write to the row, the balance
/// unchanged), so that sagas running on other nodes conflict with it at certification or are
/// aborted by its replicated writes (1213), and it with them. Every conflict it loses is noted
/// in the outcome log (`X`). It runs until the worker ends or is killed; when its node is down
/// it waits and connects again.
struct OtherWriter: Sendable {
    let url: String
    let spec: BankSpec
    let seed: UInt64
    let log: OutcomeLog

    func start() throws {
        let target = try MySQLURL(url)
        Thread.detachNewThread { run(target) }
    }

    private func run(_ target: MySQLURL) {
        var rng = SplitMix64(seed: seed)
        var conn: MySQLConnection?
        while true {
            do {
                let c = try conn ?? MySQLDatabase(url: target).openConnection()
                conn = c
                let account = Int64(rng.below(spec.hot))
                try c.begin()
                try c.execute("UPDATE tt_accounts SET balance = balance + 1 WHERE k = ?", [.integer(account)])
                try c.execute("UPDATE tt_accounts SET balance = balance - 1 WHERE k = ?", [.integer(account)])
                switch c.commit() {
                case .committed: break
                case .failed(let e), .unknown(let e): throw e
                }
            } catch {
                if let e = error as? MySQLError, e.isRolledBackConflict {
                    log.record(.conflict, 0, "other writer")
                    _ = try? conn?.rollback()
                } else {
                    conn?.close()
                    conn = nil
                    usleep(200_000)  // its node is down (killed, rejoining): wait
                }
            }
            usleep(useconds_t(rng.between(1, 5)) * 1000)
        }
    }
}
