import Foundation
import Logging

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
    /// Where the async `run` runs sagas: `configuration.executor`, or `ownPool`.
    let asyncExecutor: any TaskExecutor
    /// The coordinator's own threads for async sagas, shut down once closed and idle.
    let ownPool: SagaThreadPool?
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
    public var inDoubt: [SagaID] { book.withLock { $0.inDoubt.sorted() } }

    /// Closes the idle SQL connections; later sagas fail with ``SagaError/Misuse/closed``.
    /// Sagas already running finish (their connections are closed as they end), and the KV
    /// store is let go for another coordinator once the last of them has ended. The stores
    /// themselves belong to the caller.
    public func close() {
        let idle = book.withLock { $0.close() }
        // Redo mode: the last checkpoint, so that the next open finds nothing to replay.
        if configuration.mode == .redo, book.withLock({ $0.stopped }) == nil {
            do { _ = try collectGarbage() } catch { logger.warning("the checkpoint at close failed: \(error)") }
        }
        pool.closeAll()
        // Sagas still running keep the store: no other coordinator may open on it before the
        // last one has ended.
        if idle { releaseStores() }
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

    func hook(_ step: SagaStep, _ id: SagaID?, phase: SagaPhase = .run) throws {
        try configuration.hooks?.reached(step, phase: phase, saga: id)
    }
}
