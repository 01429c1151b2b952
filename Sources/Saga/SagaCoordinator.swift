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
/// The steps below follow <doc:Protocol> and are named by ``SagaStep``.
public final class SagaCoordinator: Sendable {
    public struct Configuration: Sendable {
        /// How long a saga waits for a key lock before giving up (also ends deadlocks that run
        /// through the SQL database's own locks). At most ``maxLockTimeout``.
        public var lockTimeout: Duration
        /// Fault-injection and test hooks, called at every protocol step.
        public var hooks: (any SagaHooks)?
        /// Garbage collection runs once this many sagas have finished.
        public var gcThreshold: Int
        /// Idle SQL connections kept for reuse.
        public var poolSize: Int
        /// The largest journal record a saga may write: its keys with their pre- and
        /// after-images. A saga over it is refused at prepare with
        /// ``SagaError/Misuse/sagaTooLarge(size:limit:)``, and nothing is written. RocksDB
        /// refuses values of 4 GiB and more.
        public var maxRecordSize: Int

        public static let maxLockTimeout: Duration = .seconds(24 * 3600)
        public static let maxGCThreshold = 1 << 24
        public static let maxPoolSize = 4096
        public static let recordSizeLimit = Int(UInt32.max) - (1 << 20)

        public init(lockTimeout: Duration = .seconds(5), hooks: (any SagaHooks)? = nil, gcThreshold: Int = 512, poolSize: Int = 16, maxRecordSize: Int = 1 << 30) {
            self.lockTimeout = lockTimeout
            self.hooks = hooks
            self.gcThreshold = gcThreshold
            self.poolSize = poolSize
            self.maxRecordSize = maxRecordSize
        }

        /// What is wrong with the values, if anything.
        var problem: String? {
            if lockTimeout <= .zero || lockTimeout > Self.maxLockTimeout {
                return "lockTimeout must be positive and at most \(Self.maxLockTimeout), not \(lockTimeout)"
            }
            if gcThreshold < 1 || gcThreshold > Self.maxGCThreshold {
                return "gcThreshold must be between 1 and \(Self.maxGCThreshold), not \(gcThreshold)"
            }
            if poolSize < 0 || poolSize > Self.maxPoolSize { return "poolSize must be between 0 and \(Self.maxPoolSize), not \(poolSize)" }
            if maxRecordSize < 1024 || maxRecordSize > Self.recordSizeLimit {
                return "maxRecordSize must be between 1024 and \(Self.recordSizeLimit) bytes, not \(maxRecordSize)"
            }
            return nil
        }
    }

    private struct State {
        /// Finished sagas whose journal records are still to be deleted.
        var finished: [SagaID] = []
        /// The same ids, for lookups: a committed saga's record stays `prepared` until
        /// garbage collection deletes it, and recovery on demand must leave it alone.
        var recentlyFinished: Set<SagaID> = []
        /// Sagas whose journal records are gone but whose marker rows are still to be deleted.
        var markersToDelete: [SagaID] = []
        /// Sagas past `prepare` and not yet finished in this process.
        var active: Set<SagaID> = []
        /// Prepared sagas whose outcome could not be decided or finished; recovery retries them.
        var inDoubt: Set<SagaID> = []
        var closed = false
        /// Sagas inside ``run(_:)``: the KV store stays claimed until the last one has ended,
        /// also after ``close()``.
        var running = 0
        /// Set when a KV write failed: the store may hold part of it, so nothing may run on
        /// top of it until a reopen lets recovery decide.
        var stopped: String?
    }

    public let configuration: Configuration
    let kv: any KVStore
    let sql: any SQLDatabase
    let logger: Logger
    private let locks = KeyLocks()
    private let pool: ConnectionPool
    private let state = Locked(State())
    private let ids: IDLease
    /// This coordinator's instance: every marker row it reads, writes or deletes carries it.
    public let instance: InstanceID
    /// The instance with the claim this open made: every marker write checks it.
    let owner: MarkerOwner
    private let claim: StoreClaim
    /// The SQL database's hold on the instance, released with the store claim.
    private let hold: any InstanceHold
    private let gcLock = Lock()
    private let recoveryLock = Lock()

    /// Opens a coordinator on the two stores and runs recovery before returning.
    ///
    /// Throws if the marker table cannot be created, the journal cannot be read, or a journal
    /// record is damaged (recovery refuses to guess). Sagas that recovery could not decide
    /// (database unreachable, foreign write) stay prepared and locked: see ``inDoubt``.
    public init(kv: any KVStore, sql: any SQLDatabase, configuration: Configuration = .init(), logger: Logger = Logger(label: "saga")) throws(SagaError) {
        if let problem = configuration.problem { throw .misuse(.invalidConfiguration(problem)) }
        self.kv = kv
        self.sql = sql
        self.configuration = configuration
        self.logger = logger
        self.pool = ConnectionPool(database: sql, limit: configuration.poolSize)
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
                heldByAnother = try conn.claimInstance(record.id, accepting: accepting, claim: claim)
                if heldByAnother == nil {
                    record.current = claim
                    record.pending = []
                }
                maxMarker = heldByAnother == nil ? try conn.maxMarkerID(instance: instance) : nil
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
        } catch let e as SagaError {
            throw e
        } catch {
            throw .stopped(reason: "cannot persist the id lease: \(error)")
        }
        let report = try recover(atOpen: true, journal: journal)
        if let corrupt = report.problems.first(where: { if case .journalCorrupt = $0 { true } else { false } }) {
            throw corrupt
        }
        if !report.committed.isEmpty || !report.compensated.isEmpty || !report.isClean {
            logger.notice("\(report)")
        }
    }

    /// The instance id of the journal in `kv`, created (and stored, synced) if the journal has
    /// none yet: what the coordinator that opens on `kv` will use. For tools and tests that
    /// read or write marker rows outside a coordinator.
    public static func instance(in kv: any KVStore) throws -> InstanceID {
        try InstanceRecord.load(from: kv, journal: try kv.journalEntries()).id
    }

    /// Sagas that are prepared but undecided or unfinished; their keys stay locked until
    /// ``recover()`` resolves them.
    public var inDoubt: [SagaID] { state.withLock { $0.inDoubt.sorted() } }

    /// Closes the idle SQL connections; later sagas fail with ``SagaError/Misuse/closed``.
    /// Sagas already running finish (their connections are closed as they end), and the KV
    /// store is let go for another coordinator once the last of them has ended. The stores
    /// themselves belong to the caller.
    public func close() {
        let idle = state.withLock { s -> Bool in
            s.closed = true
            return s.running == 0
        }
        pool.closeAll()
        // Sagas still running keep the store: no other coordinator may open on it before the
        // last one has ended.
        if idle { releaseStores() }
    }

    // MARK: - Running a saga

    @TaskLocal private static var running: [RunningSaga] = []
    private struct RunningSaga: Sendable { let coordinator: ObjectIdentifier; let saga: SagaID }

    /// Runs one saga: `body` executes SQL through `saga.sql` and stages KV writes through
    /// `saga.kv`; when it returns, the KV writes and the SQL transaction commit together or
    /// not at all. Returns what `body` returned.
    ///
    /// Blocking: call it from a thread of your own, not from Swift's cooperative pool.
    public func run<T>(_ body: (Saga) throws -> T) throws(SagaError) -> T {
        if let outer = Self.running.first(where: { $0.coordinator == ObjectIdentifier(self) }) {
            throw .misuse(.nestedSaga(outer.saga))
        }
        try state.withLock { s throws(SagaError) in
            if s.closed { throw .misuse(.closed) }
            s.running += 1
        }
        defer {
            let last = state.withLock { s -> Bool in
                s.running -= 1
                return s.closed && s.running == 0
            }
            if last { releaseStores() }
        }
        if let reason = state.withLock({ $0.stopped }) { throw .stopped(reason: reason) }
        let id: SagaID
        do { id = try ids.next() } catch {
            stop("cannot persist the saga id lease: \(error)")
            throw .stopped(reason: "cannot persist the saga id lease: \(error)")
        }
        do {
            return try Self.$running.withValue(Self.running + [RunningSaga(coordinator: ObjectIdentifier(self), saga: id)]) {
                try execute(id, body)
            }
        } catch let e as SagaError {
            throw e
        } catch {
            preconditionFailure("execute only throws SagaError, got \(error)")
        }
    }

    /// The saga state machine: begin, body, prepare, marker, commit, and the three outcomes.
    private func execute<T>(_ id: SagaID, _ body: (Saga) throws -> T) throws(SagaError) -> T {
        var log = logger
        log[metadataKey: "saga"] = "\(id.rawValue)"

        // 1. Begin.
        let conn: any SQLConnection
        do {
            try hook(.begin, id)
            conn = try beginTransaction()
        } catch {
            throw .sqlFailed(saga: id, step: .begin, underlying: error)
        }
        // The server session the transaction runs in: a COMMIT sent on it may arrive late, so
        // it must be seen gone before an unknown outcome is decided (after a crash too).
        let session = conn.session

        // 2. Body (3. locks are taken as keys are touched).
        let saga = Saga(id: id, connection: conn, context: SagaContext(kv: kv, locks: locks, lockTimeout: configuration.lockTimeout))
        let value: T
        do {
            value = try body(saga)
            saga.ended = true
            // The body may have caught the statement's error: the saga stays poisoned.
            if let poison = saga.poison { throw poison.error(saga: id) }
            try hook(.body, id)
        } catch {
            saga.ended = true
            abandon(saga, conn)
            throw classifyBodyError(error, saga: saga)
        }

        // 4. Prepare: pre-images in one multi-get; forward writes + `prepared` in one synced batch.
        let writes = saga.writes
        var record: JournalRecord?
        var kvFailure: (any Error)?
        if !writes.isEmpty {
            do {
                let keys = writes.map(\.key)
                let pre = try kv.multiGet(keys)
                let entries = zip(writes, pre).map { JournalRecord.Entry(key: $0.key, preImage: $1, afterImage: $0.image) }
                let prepared = JournalRecord(saga: id, state: .prepared, entries: entries, session: session)
                let encoded = prepared.encoded()
                if encoded.count > configuration.maxRecordSize {
                    throw SagaError.misuse(.sagaTooLarge(size: encoded.count, limit: configuration.maxRecordSize))
                }
                var batch = KVWriteBatch()
                for w in writes { batch.set(w.key, to: w.image) }
                batch.put(JournalRecord.key(for: id), encoded, in: .journal)
                try hook(.prepare, id)
                state.withLock { _ = $0.active.insert(id) }
                record = prepared
                try kv.write(batch, sync: true)
            } catch {
                // A synced batch is atomic: either it is durable or not. If the store says it
                // failed but the record is readable, it landed: compensate below. Otherwise
                // nothing landed in this process, and if it reaches disk later, recovery on
                // reopen fences the saga (no marker) and undoes it.
                if let misuse = error as? SagaError {
                    abandon(saga, conn)
                    throw misuse
                }
                let landed = record != nil && ((try? kv.journalGet(JournalRecord.key(for: id))) ?? nil) != nil
                if !landed {
                    state.withLock { s in
                        s.active.remove(id)
                        // An injected fault stops before the write; a real failure may have
                        // left the batch on disk (RocksDB replays an unsynced WAL record).
                        if !(error is InjectedFault), s.stopped == nil { s.stopped = "the KV store failed a write of \(id): \(error)" }
                    }
                    abandon(saga, conn)
                    log.warning("KV write failed, SQL rolled back: \(error)")
                    throw .kvWriteFailed(saga: id, underlying: error)
                }
                log.warning("KV write reported failure but the batch is durable; compensating: \(error)")
                // The store failed a write all the same: nothing more runs on top of it until a
                // reopen (the compensation below is the last write of this saga).
                if !(error is InjectedFault) { stop("the KV store failed a write of \(id): \(error)") }
                kvFailure = error
            }
        }

        // 5. Marker, and 6. Commit. COMMIT is the decision point.
        var outcome: CommitResult
        do {
            if let kvFailure { throw kvFailure }
            if record != nil { try hook(.prepared, id) }
            try hook(.marker, id)
            // A transaction that ended under us must never be "continued": in autocommit mode
            // the marker would commit on its own.
            guard conn.isInTransaction else { throw TransactionEnded() }
            try hook(.commit, id)
            outcome = conn.commit(insertingMarker: id, owner: owner)
        } catch {
            // COMMIT was never sent, so the transaction cannot commit.
            if conn.isInTransaction { try? conn.rollback() }
            outcome = .failed(error)
        }

        switch outcome {
        case .committed:
            giveBack(conn, after: saga)
            finishCommitted(id, phase: .run, log: log)
            return value

        case .failed(let error):
            log.warning("COMMIT failed: \(error); compensating")
            // Proved failed, so undoing the KV side is right even after an I/O error; but
            // nothing runs on top of a store that failed a write until it is reopened.
            defer {
                if error.requiresReopen { stop("the SQL database failed I/O at COMMIT of \(id): \(error)") }
                stopIfClaimLost(error)
            }
            let restored: Int
            do { restored = try compensateOrHold(id, record, after: error, log: log) } catch {
                // The saga stays prepared, and its record names this connection's session,
                // which recovery ends before it decides: closed, never lent to another saga
                // that the KILL would then hit.
                conn.close()
                throw error
            }
            giveBack(conn, after: saga)
            throw .commitFailed(saga: id, underlying: error, restoredKeys: restored)

        case .unknown(let error) where error.requiresReopen:
            // An fsync or write failed inside COMMIT. The database's own files decide the
            // outcome, and only after a reopen (its log may replay the transaction or not):
            // never fence or continue on top of them in this process.
            conn.close()
            stop("the SQL database failed I/O at COMMIT of \(id): \(error)")
            end(id, record != nil ? .inDoubt : .abandoned)
            log.error("COMMIT failed with an I/O error: \(error); stopped, recovery after reopening decides")
            throw .inDoubt(saga: id, underlying: error)

        case .unknown(let error):
            // Never assume a rollback. Close the failed connection (SQLite recovers its
            // journal), then decide with a fencing insert on a fresh connection that keeps the
            // saga's turn at the database (it still holds its keys), once the old session is
            // gone: its COMMIT may still be on the way.
            log.warning("COMMIT outcome unknown: \(error); fencing")
            let fenceConnection = Result { try sql.connect(replacing: conn) }
            switch fence([id], ending: session.map { [$0] } ?? [], phase: .run, on: fenceConnection)?[id] {
            case .committed:
                finishCommitted(id, phase: .run, log: log)
                return value
            case .aborted:
                let restored = try compensateOrHold(id, record, after: error, log: log)
                throw .commitFailed(saga: id, underlying: error, restoredKeys: restored)
            case nil:
                end(id, record != nil ? .inDoubt : .abandoned)
                throw .inDoubt(saga: id, underlying: error)
            }
        }
    }

    /// A connection with a transaction begun on it. A pooled connection that BEGIN finds lost
    /// is closed and the next one tried (the server may have closed it while it sat idle;
    /// nothing of a saga had run on it). Any other failure (a busy database, a lost new
    /// connection) is the saga's: retrying it on every pooled connection would only multiply
    /// the wait.
    private func beginTransaction() throws -> any SQLConnection {
        while true {
            let (conn, reused) = try pool.take()
            do {
                try conn.begin()
                return conn
            } catch {
                let lost = conn.isBroken
                conn.close()
                guard reused, lost else { throw error }
                logger.debug("a pooled connection was found lost at BEGIN (\(error)); trying another")
            }
        }
    }

    private func releaseStores() {
        hold.release()
        claim.release()
    }

    deinit { hold.release() }

    /// Another journal claimed the instance: nothing of this coordinator may decide, write or
    /// delete by the marker table any more. Stops it (the next open of this journal is refused).
    private func stopIfClaimLost(_ error: any Error) {
        guard error is InstanceClaimLost else { return }
        stop("\(error); reopening this journal will be refused while the other one holds the instance")
    }

    /// Refuses every later saga until the stores are reopened (and recovery has run).
    private func stop(_ reason: String) {
        state.withLock { if $0.stopped == nil { $0.stopped = reason } }
    }

    private func classifyBodyError(_ error: any Error, saga: Saga) -> SagaError {
        if let poison = saga.poison { return poison.error(saga: saga.id) }
        if let e = error as? SagaError {
            switch e {
            case .lockTimeout, .deadlock, .misuse, .transactionLost, .transactionEndedByStatement: return e
            default: break
            }
        }
        return .bodyFailed(saga: saga.id, underlying: error)
    }

    /// Rolls back a saga that wrote nothing to the KV store, releases its locks and returns the
    /// connection (closed instead when the rollback failed: the server then rolls back).
    private func abandon(_ saga: Saga, _ conn: any SQLConnection) {
        if conn.isInTransaction {
            do { try conn.rollback() } catch {
                logger.warning("ROLLBACK of \(saga.id) failed: \(error); closing the connection")
                conn.close()
            }
        }
        giveBack(conn, after: saga)
        end(saga.id, .abandoned)
    }

    /// Returns a saga's connection to the pool, unless its body ran a statement that may have
    /// left session state behind (table locks, `SET autocommit`, pragmas): that one is closed,
    /// and the next saga gets a clean connection.
    private func giveBack(_ conn: any SQLConnection, after saga: Saga) {
        if saga.ranSessionStatement { conn.close() } else { pool.giveBack(conn) }
    }

    /// How a saga leaves the coordinator. Every terminal path goes through ``end(_:_:)``: the
    /// one place that releases a saga's locks or keeps them.
    private enum Ending {
        /// Committed or compensated: locks released, the journal record collected later.
        case finished
        /// Prepared and undecided (or not undoable): keys stay locked until recovery.
        case inDoubt
        /// Nothing of it is in the KV store: locks released, nothing to collect.
        case abandoned
    }

    private func end(_ id: SagaID, _ ending: Ending) {
        switch ending {
        case .finished:
            finish(id)
        case .inDoubt:
            state.withLock { s in
                s.active.insert(id)
                s.inDoubt.insert(id)
            }
        case .abandoned:
            state.withLock { s in
                s.active.remove(id)
                s.inDoubt.remove(id)
            }
            locks.releaseAll(id)
        }
    }

    /// Committed. No journal write: the marker row proves the outcome, and garbage collection
    /// deletes the `prepared` record (a separate write here would cost a WAL append per saga
    /// and split RocksDB's group commits of synced batches).
    private func finishCommitted(_ id: SagaID, phase: SagaPhase, log: Logger) {
        do { try hook(.committed, id, phase: phase) } catch {
            log.warning("hook failure after COMMIT of \(id) ignored: \(error)")
        }
        end(id, .finished)
    }

    private func finish(_ id: SagaID) {
        let due = state.withLock { s -> Bool in
            s.active.remove(id)
            s.inDoubt.remove(id)
            s.finished.append(id)
            s.recentlyFinished.insert(id)
            return s.finished.count >= configuration.gcThreshold
        }
        locks.releaseAll(id)
        if due {
            do { _ = try collectGarbage() } catch { logger.warning("garbage collection failed: \(error)") }
        }
    }

    /// Undoes a saga whose COMMIT failed (`commitError`). On success the saga is finished;
    /// when compensation cannot be done, the saga stays prepared, its keys stay locked, and the
    /// error carries both the COMMIT's error and why the undo stopped.
    private func compensateOrHold(_ id: SagaID, _ record: JournalRecord?, after commitError: any Error, log: Logger) throws(SagaError) -> Int {
        // Nothing reached the KV store (a saga that only read keys): nothing to undo, but its
        // locks must go all the same.
        guard let record else {
            end(id, .finished)
            return 0
        }
        switch compensate([record], phase: .run)[record.saga] {
        case .success(let restored)?:
            return restored
        case .failure(let error)?:
            log.error("compensation after the failed COMMIT (\(commitError)) stopped: \(error)")
            throw .compensationFailedAfterCommit(saga: id, commitError: commitError, compensation: error)
        case nil:
            preconditionFailure("compensate answers for every record")
        }
    }

    /// Undoes failed sagas with one synced batch restoring every pre-image, plus a
    /// `compensated` record for each. Checks each key first: after-image → restore; pre-image →
    /// already restored; anything else → that saga stops (foreign write) and the others go on.
    /// Sagas that could not be undone stay prepared and in doubt, with their keys locked.
    /// Unfinished sagas never share a key (each holds its keys' locks until finished), so one
    /// batch can undo many; should two records name one key anyway, the later one (records come
    /// newest first) waits for a batch of its own.
    private func compensate(_ records: [JournalRecord], phase: SagaPhase) -> [SagaID: Result<Int, SagaError>] {
        var results: [SagaID: Result<Int, SagaError>] = [:]
        var ready: [JournalRecord] = []
        var later: [JournalRecord] = []
        var batchKeys: Set<Bytes> = []
        for record in records {
            let keys = record.entries.map(\.key)
            if keys.contains(where: batchKeys.contains) { later.append(record); continue }
            batchKeys.formUnion(keys)
            do { try hook(.compensate, record.saga, phase: phase); ready.append(record) } catch {
                results[record.saga] = .failure(.compensationFailed(saga: record.saga, underlying: error))
            }
        }
        let current: [Bytes?]
        do { current = try kv.multiGet(ready.flatMap { $0.entries.map(\.key) }) } catch {
            for r in ready { results[r.saga] = .failure(.compensationFailed(saga: r.saga, underlying: error)) }
            return hold(results)
        }
        var batch = KVWriteBatch()
        var undone: [(SagaID, Int)] = []
        var offset = 0
        for record in ready {
            let now = current[offset..<(offset + record.entries.count)]
            offset += record.entries.count
            var restores: [(Bytes, Bytes?)] = []
            var foreign: SagaError?
            for (entry, value) in zip(record.entries, now) {
                if value == entry.afterImage {
                    restores.append((entry.key, entry.preImage))
                } else if value != entry.preImage {
                    foreign = .foreignWrite(saga: record.saga, key: entry.key, preImage: entry.preImage, afterImage: entry.afterImage, current: value)
                    break
                }
            }
            if let foreign { results[record.saga] = .failure(foreign); continue }
            for (key, image) in restores { batch.set(key, to: image) }
            batch.put(JournalRecord.key(for: record.saga), JournalRecord(saga: record.saga, state: .compensated).encoded(), in: .journal)
            undone.append((record.saga, restores.count))
        }
        if !undone.isEmpty {
            do { try kv.write(batch, sync: true) } catch {
                // The store may hold part of the batch: nothing runs on top of it until a
                // reopen lets recovery decide.
                if !(error is InjectedFault) { stop("the KV store failed the compensating write of \(undone.map { "\($0.0)" }.joined(separator: ", ")): \(error)") }
                for (id, _) in undone { results[id] = .failure(.compensationFailed(saga: id, underlying: error)) }
                return hold(results)
            }
        }
        for (id, restored) in undone {
            do { try hook(.compensated, id, phase: phase) } catch {
                logger.warning("hook failure after compensation of \(id) ignored: \(error)")
            }
            end(id, .finished)
            results[id] = .success(restored)
        }
        if !later.isEmpty { results.merge(compensate(later, phase: phase)) { $1 } }
        return hold(results)
    }

    /// Keeps every saga that failed to compensate in doubt (its keys stay locked).
    private func hold(_ results: [SagaID: Result<Int, SagaError>]) -> [SagaID: Result<Int, SagaError>] {
        for (id, result) in results { if case .failure = result { end(id, .inDoubt) } }
        return results
    }

    /// Fences sagas in one transaction on a fresh connection (or `connection`, opened for the
    /// purpose), once the sessions their transactions ran in are gone. nil when the database
    /// cannot be reached, a session cannot be seen gone (or a hook refused): none of them is
    /// decided.
    private func fence(_ ids: [SagaID], ending sessions: [SQLSession], phase: SagaPhase, on connection: Result<any SQLConnection, any Error>? = nil) -> [SagaID: FenceDecision]? {
        let what = ids.count == 1 ? "\(ids[0])" : "\(ids.count) sagas"
        do {
            let conn = try (connection ?? Result { try sql.connect() }).get()
            defer { conn.close() }
            for id in ids { try hook(.resolve, id, phase: phase) }
            if !sessions.isEmpty {
                let left = try conn.endSessions(sessions)
                if !left.isEmpty { throw SessionsStillThere(sessions: left) }
            }
            let decisions = try conn.fence(ids, owner: owner)
            logger.notice("resolved by fencing: \(decisions.values.filter { $0 == .committed }.count) committed, \(decisions.values.filter { $0 == .aborted }.count) aborted (\(what))")
            return decisions
        } catch {
            logger.warning("cannot resolve \(what): \(error)")
            stopIfClaimLost(error)
            return nil
        }
    }

    // MARK: - Recovery

    /// Resolves every saga still `prepared` in the journal (other than those running in this
    /// process): a fencing insert decides each; committed ones are recorded, failed ones are
    /// compensated. Idempotent: running it twice, or after a crash inside it, changes nothing
    /// the second time. Then collects garbage.
    @discardableResult
    public func recover() throws(SagaError) -> RecoveryReport {
        if state.withLock({ $0.closed }) { throw .misuse(.closed) }
        if let reason = state.withLock({ $0.stopped }) { throw .stopped(reason: reason) }
        return try recover(atOpen: false)
    }

    /// - Parameter journal: the journal as already read at open; nil reads it now.
    private func recover(atOpen: Bool, journal: [(key: Bytes, value: Bytes)]? = nil) throws(SagaError) -> RecoveryReport {
        try recoveryLock.withLock { () throws(SagaError) -> RecoveryReport in try recoverLocked(atOpen: atOpen, journal: journal) }
    }

    private func recoverLocked(atOpen: Bool, journal: [(key: Bytes, value: Bytes)]?) throws(SagaError) -> RecoveryReport {
        var report = RecoveryReport()
        let entries: [(key: Bytes, value: Bytes)]
        if let journal {
            entries = journal
        } else {
            do { entries = try kv.journalEntries() } catch {
                throw .stopped(reason: "cannot read the journal: \(error)")
            }
        }
        var journaled: Set<SagaID> = []
        var pending: [JournalRecord] = []
        for (key, value) in entries {
            guard let id = JournalRecord.saga(fromKey: key) else { continue }
            journaled.insert(id)
            let record: JournalRecord
            do {
                record = try JournalRecord(decoding: value)
                guard record.saga == id else {
                    throw JournalRecord.DecodingError(reason: "record names \(record.saga) but is stored under \(id)")
                }
            } catch {
                report.problems.append(.journalCorrupt(saga: id, key: key, reason: "\(error)"))
                continue
            }
            switch record.state {
            case .committed, .compensated:
                if atOpen { state.withLock { $0.finished.append(id); $0.recentlyFinished.insert(id) } }
            case .prepared:
                if !atOpen {
                    // Running or finished in this process: not recovery's to decide.
                    let mine = state.withLock { s in (s.active.contains(id) && !s.inDoubt.contains(id)) || s.recentlyFinished.contains(id) }
                    if mine { continue }
                    // It may have finished since the scan: a fresh read tells.
                    guard let fresh = try? kv.journalGet(key), let now = try? JournalRecord(decoding: fresh), now.state == .prepared else { continue }
                }
                pending.append(record)
            }
        }
        resolve(pending, adoptLocks: atOpen, into: &report)
        if atOpen { removeOrphanMarkers(keeping: journaled) }
        do { _ = try collectGarbage() } catch { logger.warning("garbage collection after recovery failed: \(error)") }
        return report
    }

    /// Decides prepared sagas in chunks: one fencing transaction per chunk, then one synced
    /// batch compensates every aborted saga of the chunk. Committed ones need no write.
    ///
    /// A committed saga's record stays `prepared` until garbage collection, so an older record
    /// can share keys with a newer one: the newer saga took those locks only after the older
    /// one had finished, so the older one is committed and the keys are the newer one's.
    /// Newest first, each saga adopts the locks of its keys that no newer saga holds.
    private func resolve(_ records: [JournalRecord], adoptLocks: Bool, into report: inout RecoveryReport) {
        var candidates: [JournalRecord] = []
        for record in records.sorted(by: { $0.saga > $1.saga }) {
            let id = record.saga
            if adoptLocks {
                let conflicts = locks.adopt(record.entries.map(\.key), for: id)
                if let (key, holder) = conflicts.first(where: { $0.1 < id }) {
                    report.problems.append(.lockTimeout(saga: id, keys: [key], heldBy: [holder]))
                    continue
                }
            }
            state.withLock { s in
                s.active.insert(id)
                s.inDoubt.insert(id)
            }
            candidates.append(record)
        }
        // The sessions the sagas ran in end first, all at once (pooled connections: a few
        // sessions name many records). A saga whose session cannot be seen gone stays in doubt.
        let stuck = endSessions(Set(candidates.compactMap(\.session)))
        if !stuck.isEmpty {
            let held = candidates.filter { $0.session.map { stuck.contains($0) } ?? false }
            report.inDoubt += held.map(\.saga)
            candidates.removeAll { $0.session.map { stuck.contains($0) } ?? false }
        }
        for start in stride(from: 0, to: candidates.count, by: Self.recoveryChunk) {
            let chunk = Array(candidates[start..<min(start + Self.recoveryChunk, candidates.count)])
            guard let decisions = fence(chunk.map(\.saga), ending: [], phase: .recovery) else {
                report.inDoubt += chunk.map(\.saga)
                continue
            }
            var aborted: [JournalRecord] = []
            for record in chunk {
                switch decisions[record.saga] {
                case .committed?:
                    finishCommitted(record.saga, phase: .recovery, log: logger)
                    report.committed.append(record.saga)
                case .aborted?:
                    aborted.append(record)
                case nil:
                    report.inDoubt.append(record.saga)
                }
            }
            for (id, result) in compensate(aborted, phase: .recovery).sorted(by: { $0.key < $1.key }) {
                switch result {
                case .success: report.compensated.append(id)
                case .failure(let error): report.problems.append(error)
                }
            }
        }
    }

    /// Ends `sessions` on a fresh connection; returns those that could not be seen gone (all of
    /// them when the database cannot be reached).
    private func endSessions(_ sessions: Set<SQLSession>) -> Set<SQLSession> {
        guard !sessions.isEmpty else { return [] }
        do {
            let conn = try sql.connect()
            defer { conn.close() }
            let left = try conn.endSessions(Array(sessions))
            if !left.isEmpty { logger.warning("\(SessionsStillThere(sessions: left)); their sagas stay in doubt") }
            return left
        } catch {
            logger.warning("cannot end the sessions of the sagas to recover: \(error); they stay in doubt")
            return sessions
        }
    }

    /// Sessions that did not go within the backend's wait after `KILL`: a COMMIT sent on one
    /// may still land, so its sagas are not decided.
    struct SessionsStillThere: Error, CustomStringConvertible {
        let sessions: Set<SQLSession>
        var description: String {
            "the old SQL session(s) \(sessions.map { String($0.id) }.sorted().joined(separator: ", ")) are still there after KILL; a COMMIT sent on one may still land"
        }
    }

    /// Sagas decided by one fencing transaction during recovery.
    static let recoveryChunk = 500

    /// A marker may outlive its journal record (a crash between the two GC steps). At open,
    /// before any saga runs, a marker with no record belongs to a finished saga.
    private func removeOrphanMarkers(keeping journaled: Set<SagaID>) {
        do {
            let conn = try pool.take().connection
            defer { pool.giveBack(conn) }
            let orphans = try conn.markerIDs(instance: instance).filter { !journaled.contains($0) }
            if !orphans.isEmpty {
                try conn.deleteMarkers(orphans, owner: owner)
                logger.debug("removed \(orphans.count) orphan marker row(s)")
            }
        } catch {
            logger.warning("orphan marker cleanup failed: \(error)")
            stopIfClaimLost(error)
        }
    }

    // MARK: - Garbage collection

    /// Removes the journal records and marker rows of finished sagas, in the only safe order:
    /// first the journal records, synced; then their markers. Returns how many sagas were
    /// collected. Runs by itself every ``Configuration/gcThreshold`` finished sagas.
    @discardableResult
    public func collectGarbage() throws(SagaError) -> Int {
        try gcLock.withLock { () throws(SagaError) -> Int in
            let ids = state.withLock { s -> [SagaID] in
                defer { s.finished.removeAll() }
                return s.finished
            }
            if !ids.isEmpty {
                do {
                    try hook(.gcJournal, nil, phase: .gc)
                    var batch = KVWriteBatch()
                    for id in ids { batch.delete(JournalRecord.key(for: id), in: .journal) }
                    try kv.write(batch, sync: true)
                    state.withLock { s in for id in ids { s.recentlyFinished.remove(id) } }
                } catch {
                    state.withLock { $0.finished.insert(contentsOf: ids, at: 0) }
                    let reason = "deleting finished journal records failed: \(error)"
                    // A failed KV write: the store may hold part of it (see `execute`).
                    if !(error is InjectedFault) { stop(reason) }
                    throw .stopped(reason: reason)
                }
                state.withLock { $0.markersToDelete.append(contentsOf: ids) }
            }
            let markers = state.withLock { s -> [SagaID] in
                defer { s.markersToDelete.removeAll() }
                return s.markersToDelete
            }
            guard !markers.isEmpty else { return 0 }
            do {
                try hook(.gcMarkers, nil, phase: .gc)
                let conn = try pool.take().connection
                defer { pool.giveBack(conn) }
                try conn.deleteMarkers(markers, owner: owner)
            } catch {
                state.withLock { $0.markersToDelete.append(contentsOf: markers) }
                stopIfClaimLost(error)
                throw .sqlFailed(saga: nil, step: .gcMarkers, underlying: error)
            }
            return markers.count
        }
    }

    // MARK: - Hooks

    private func hook(_ step: SagaStep, _ id: SagaID?, phase: SagaPhase = .run) throws {
        try configuration.hooks?.reached(step, phase: phase, saga: id)
    }
}
