import CoreMetrics
import Foundation
import Logging
import Tracing

/// Makes one logical write atomic across a KV store and an SQL database.
///
/// ```swift
/// let coordinator = try SagaCoordinator(kv: rocks, sql: sqlite)   // recovery runs here
/// let balance = try coordinator.run { saga in
///     try saga.sql.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", 5, 1)
///     try saga.kv.put("st\nADDR\nbalance", "n\n105")
///     return 105
/// }
/// ```
///
/// The SQL `COMMIT` is the single decision point: a saga is committed if and only if its SQL
/// transaction committed. The KV writes are made durable together with a journal record before
/// `COMMIT`; if `COMMIT` fails they are undone, and after a crash recovery finishes the job.
/// The steps follow <doc:Protocol> and are named by ``SagaStep``. This file opens and closes
/// the coordinator; running a saga, compensation, recovery and garbage collection each have a
/// file of their own (`SagaCoordinator+*.swift`).
public final class SagaCoordinator: Sendable {
    public let configuration: Configuration
    let kv: any KVStore
    let sql: any SQLDatabase
    let logger: Logger
    let locks = KeyLocks()
    let pool: ConnectionPool
    /// Which sagas run, are prepared, in doubt or waiting for garbage collection.
    let book = Locked(SagaBook())
    let ids: IDLease
    /// Which finished sagas committed, after their marker rows are gone (``outcome(of:)``).
    let outcomes: OutcomeLog
    /// When caller keys past the retention were last pruned (ms since 1970).
    let keyPruning = Locked<UInt64>(0)
    /// Every statement on the marker tables, in the database's dialect.
    let markers: MarkerTable.Statements
    /// This coordinator's instance: every marker row it reads, writes or deletes carries it.
    public let instance: InstanceID
    /// The instance with the claim this open made: every marker write checks it.
    let owner: MarkerOwner
    private let claim: StoreClaim
    /// The SQL database's hold on the instance, released with the store claim.
    private let hold: any InstanceHold
    /// Redo mode's sequence, watermark and checkpoint schedule.
    let redoLog = RedoLog(after: 0, durable: 0)
    /// Redo mode: sagas of this process whose COMMIT outcome is unknown, for ``recover()``.
    let redoPending = Locked<[SagaID: RedoPending]>([:])
    let gcLock = Lock()
    let recoveryLock = Lock()
    /// Where the async `run` runs sagas: `configuration.executor`, or `ownPool`. The package's
    /// service runs recovery and garbage collection there too (they block).
    package let asyncExecutor: any TaskExecutor
    /// Made once, here: no metric handle is made per saga.
    let metrics: SagaMetrics
    /// The tracer sagas' spans go to: the configured one or the global one, read at open; nil
    /// when that is the no-op tracer (then a saga makes no span at all).
    let tracer: (any Tracer)?
    /// The coordinator's own threads for async sagas, shut down once closed and idle.
    let ownPool: SagaThreadPool?
    /// ``shutdown()``'s callers, resumed once the closing work is done.
    private let closeWaiters = Locked<(done: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))
    /// What the recovery at open decided (set once, before `init` returns).
    private let openReport = Locked(RecoveryReport())

    /// Opens a coordinator on the two stores and runs recovery before returning.
    ///
    /// Throws if the marker table cannot be created, the journal cannot be read, or a journal
    /// record is damaged (recovery refuses to guess). Sagas that recovery could not decide
    /// (database unreachable, foreign write) stay prepared and locked: see ``inDoubt``.
    public init(kv: any KVStore, sql: any SQLDatabase, configuration: Configuration = .init(), logger: Logger = Logger(label: "saga")) throws(SagaError) {
        if let problem = configuration.problem { throw .misuse(.invalidConfiguration(problem)) }
        if configuration.mode == .redo, sql.dialect.keepsAbortedMarkers {
            // At open, redo mode relies on the instance's claim row to refuse a late COMMIT of an
            // earlier open; on a cluster a locking read of it does not reach across nodes.
            throw .misuse(.invalidConfiguration("redo mode is not supported on a clustered database (\(sql.markerTable) keeps aborted markers: a Galera cluster); use compensate mode"))
        }
        // The name is spliced into SQL text: a backend of someone else's must not pass anything
        // but a plain identifier.
        guard MarkerTable.isValidName(sql.markerTable) else {
            throw .misuse(.invalidConfiguration("invalid marker table name \"\(sql.markerTable)\": use letters, digits and underscores, not starting with a digit"))
        }
        self.kv = kv
        self.sql = sql
        self.configuration = configuration
        self.logger = logger
        metrics = SagaMetrics(factory: configuration.metricsFactory ?? MetricsSystem.factory, mode: configuration.mode)
        let tracer = configuration.tracer ?? InstrumentationSystem.tracer
        self.tracer = tracer is NoOpTracer ? nil : tracer
        self.pool = ConnectionPool(database: sql, limit: configuration.poolSize)
        self.markers = MarkerTable.Statements(for: sql)
        ownPool = configuration.executor == nil ? SagaThreadPool(threads: configuration.asyncThreads, name: "saga-async") : nil
        asyncExecutor = configuration.executor ?? ownPool!
        // One journal, one coordinator: a second one on the same store (in this process; RocksDB
        // refuses a second process itself) would decide the first one's sagas.
        guard let claim = StoreClaim(kv) else { throw .misuse(.storeInUse) }
        self.claim = claim
        // One scan of the journal serves the instance, the id floor and recovery: nothing else
        // writes records before recovery has run.
        let journal: [(key: Bytes, value: Bytes)]
        var record: InstanceRecord
        do {
            journal = try kv.journalEntries()
            record = try InstanceRecord.load(from: kv, journal: journal)
        } catch let e as SagaError {
            throw e
        } catch {
            throw .stopped(reason: "cannot read the journal or store the instance record: \(error)")
        }
        instance = record.id
        // While this coordinator runs, no other may open with its instance (a copy of this KV
        // store, opened by another process on the same database).
        do {
            guard let hold = try sql.holdInstance(record.id) else { throw SagaError.misuse(.instanceInUse(record.id)) }
            self.hold = hold
        } catch let e as SagaError {
            throw e
        } catch {
            throw .sqlFailed(saga: nil, step: .begin, underlying: error)
        }
        var floor: UInt64 = 0
        let maxMarker: SagaID?
        let heldByAnother: UInt64?
        do {
            let conn = try pool.take().connection
            // Closed, not pooled, when a check fails: nothing leaks.
            do {
                try conn.ensureMarkerTable()
                // Before any marker row is read or touched: the instance must be this journal's.
                // The claim this open makes is recorded before it is made (a crash in between
                // leaves the table holding a value the journal knows), once the database has
                // answered.
                let claim = InstanceRecord.newClaim()
                let accepting = [record.current] + record.pending
                record.pending = Array((record.pending + [claim]).suffix(InstanceRecord.maxPending))
                do { try record.store(in: kv) } catch {
                    throw SagaError.stopped(reason: "cannot store the instance record: \(error)")
                }
                heldByAnother = try markers.claim(record.id, accepting: accepting, claim: claim, on: conn)
                if heldByAnother == nil {
                    record.current = claim
                    record.pending = []
                }
                maxMarker = heldByAnother == nil ? try markers.maxID(instance: instance, on: conn) : nil
            } catch {
                conn.close()
                throw error
            }
            pool.giveBack(conn)
        } catch let e as SagaError {
            throw e
        } catch {
            throw .sqlFailed(saga: nil, step: .begin, underlying: error)
        }
        if heldByAnother != nil { throw .misuse(.instanceClaimedByAnotherJournal(record.id)) }
        do {
            try record.store(in: kv)
        } catch {
            throw .stopped(reason: "cannot store the instance record: \(error)")
        }
        owner = MarkerOwner(instance: record.id, claim: record.current)
        if let maxMarker {
            guard maxMarker.isValid else { throw .sqlFailed(saga: nil, step: .begin, underlying: SagaID.OutOfRange(id: maxMarker, place: "the marker table")) }
            floor = maxMarker.rawValue + 1
        }
        do {
            for (key, _) in journal {
                guard let id = JournalRecord.saga(fromKey: key) else { continue }
                guard id.isValid else {
                    throw SagaError.journalCorrupt(saga: id, key: key, reason: "saga id \(id.rawValue) is outside 1...\(SagaID.maxValid.rawValue): damaged")
                }
                floor = Swift.max(floor, id.rawValue + 1)
            }
            ids = try IDLease(kv: kv, atLeast: floor)
            outcomes = try OutcomeLog(kv: kv, journal: journal, start: ids.first, now: JournalRecord.now())
        } catch let e as SagaError {
            throw e
        } catch {
            throw .stopped(reason: "cannot persist the id lease: \(error)")
        }
        book.withLock { $0.highestIssued = ids.first - 1 }
        var report = try recover(atOpen: true, journal: journal)
        try replayRedoRows(into: &report)
        metrics.recovered(report)
        if let corrupt = report.problems.first(where: { if case .journalCorrupt = $0 { true } else { false } }) {
            throw corrupt
        }
        if !report.committed.isEmpty || !report.compensated.isEmpty || !report.isClean {
            logger.notice("\(report)")
        }
        openReport.withLock { $0 = report }
    }

    /// What the recovery this coordinator ran at open decided: the sagas it found committed,
    /// compensated, replayed or could not decide, and the problems it met. Empty after a clean
    /// ``close()``: nothing was left to recover.
    public var recoveryAtOpen: RecoveryReport { openReport.withLock { $0 } }

    /// The instance id of the journal in `kv`, created (and stored, synced) if the journal has
    /// none yet: what the coordinator that opens on `kv` will use. For tools and tests that
    /// read or write marker rows outside a coordinator.
    public static func instance(in kv: any KVStore) throws -> InstanceID {
        try InstanceRecord.load(from: kv, journal: try kv.journalEntries()).id
    }

    /// Sagas that are prepared but undecided or unfinished; their keys stay locked until
    /// ``recover()`` resolves them.
    public var inDoubt: [SagaID] { book.withLock { $0.inDoubtSince.keys.sorted() } }

    /// How long the oldest saga in doubt has been in doubt; nil when none is. A saga found
    /// prepared by recovery counts from when it was prepared (its journal record says, also
    /// from before a restart); one of this process from when its outcome became undecided.
    public var oldestInDoubtAge: Duration? {
        book.withLock { $0.inDoubtSummary.oldest }.map { .now - $0 }
    }

    /// Sets the `saga_in_doubt` and `saga_oldest_in_doubt_seconds` gauges (<doc:OperatingANode>)
    /// to their values now. They are set whenever the in-doubt set changes; the age also grows
    /// in between, so a periodic task calls this (`SagaService` does).
    public func refreshInDoubtGauges() {
        let (count, oldest) = book.withLock { $0.inDoubtSummary }
        metrics.inDoubt(count: count, oldest: oldest)
    }

    /// Changes the book; when the change moved the in-doubt set, sets the in-doubt gauges.
    func updateBook<R>(_ change: (inout SagaBook) -> R) -> R {
        let (result, doubt) = book.withLock { b in
            let before = b.inDoubtChanges
            let result = change(&b)
            return (result, b.inDoubtChanges == before ? nil : b.inDoubtSummary)
        }
        if let doubt { metrics.inDoubt(count: doubt.count, oldest: doubt.oldest) }
        return result
    }

    /// Closes the coordinator cleanly: later sagas fail with ``SagaError/Misuse/closed``, sagas
    /// already running finish, and once the last of them has ended the journal records and
    /// marker rows of every finished saga are collected (in redo mode: the last checkpoint), the
    /// SQL connections are closed and the KV store is let go for another coordinator. The next
    /// open then finds nothing to recover (only sagas left in doubt, if any) and logs nothing.
    ///
    /// Does not wait for running sagas: the last one to end does the closing work on its way
    /// out. To wait for it, call ``shutdown()``. The stores themselves belong to the caller;
    /// close them after the coordinator has let them go. Idempotent.
    public func close() {
        if book.withLock({ $0.close() }) { finishClosing() }
    }

    /// Whether ``close()`` (or ``shutdown()``) was called: new sagas are refused.
    public var isClosed: Bool { book.withLock { $0.closed } }

    /// Closes the coordinator like ``close()`` and returns once the closing work is done: the
    /// running sagas have ended, finished sagas are collected, the connections are closed and
    /// the KV store is let go. Then the stores can be closed, or another coordinator opened on
    /// them. The closing work runs on the coordinator's executor, not the caller's.
    public func shutdown() async {
        await withTaskExecutorPreference(asyncExecutor) { self.close() }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            let now = closeWaiters.withLock { state -> Bool in
                if state.done { return true }
                state.waiters.append(done)
                return false
            }
            if now { done.resume() }
        }
    }

    /// The closing work, once, by ``close()`` when no saga runs or by the last saga to end.
    func finishClosing() {
        // Collected now, the next open finds no record to fence; after a failed store write
        // (stopped) nothing is written, and the next open's recovery decides.
        if book.withLock({ $0.stopped }) == nil {
            do { _ = try collectGarbage() } catch { logger.warning("garbage collection at close failed: \(error); the next open recovers what is left") }
        }
        pool.closeAll()
        releaseStores()
        let waiters = closeWaiters.withLock { state in
            state.done = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for w in waiters { w.resume() }
    }

    func releaseStores() {
        hold.release()
        claim.release()
        ownPool?.shutdown()
    }

    deinit { hold.release() }

    /// Another journal claimed the instance: nothing of this coordinator may decide, write or
    /// delete by the marker table any more. Stops it (the next open of this journal is refused).
    func stopIfClaimLost(_ error: any Error) {
        guard error is InstanceClaimLost else { return }
        stop("\(error); reopening this journal will be refused while the other one holds the instance")
    }

    /// Refuses every later saga until the stores are reopened (and recovery has run).
    func stop(_ reason: String) {
        book.withLock { $0.stop(reason) }
    }

    // MARK: - Hooks

    /// Every step of the protocol passes here: the hooks, and the step's timing and span event.
    func hook(_ step: SagaStep, _ id: SagaID?, phase: SagaPhase = .run) throws {
        if let probe = Self.probe, probe.coordinator == ObjectIdentifier(self) { probe.reached(step, phase: phase) }
        try configuration.hooks?.reached(step, phase: phase, saga: id)
    }
}
