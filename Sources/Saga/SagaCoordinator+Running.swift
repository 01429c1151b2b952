import Logging

// Running one saga: the forward path of the protocol, top to bottom, one named step at a time
// (see <doc:Protocol>). Compensation, fencing and recovery live in their own files.

extension SagaCoordinator {
    @TaskLocal static var running: [RunningSaga] = []
    struct RunningSaga: Sendable { let coordinator: ObjectIdentifier; let saga: SagaID }

    /// Runs one saga: `body` executes SQL through `saga.sql` and stages KV writes through
    /// `saga.kv`; when it returns, the KV writes and the SQL transaction commit together or
    /// not at all. Returns what `body` returned.
    ///
    /// Blocking: call it from a thread of your own, not from Swift's cooperative pool (from
    /// async code, use the async `run(_:)`). Called inside a task, it honours the task's
    /// cancellation until the KV batch is written (``SagaError/cancelled(saga:)``); outside any
    /// task `Task.isCancelled` is false, and it is never cancelled.
    ///
    /// - Parameter body: the saga's work: SQL through `saga.sql`, KV through `saga.kv`.
    /// - Parameter key: the caller's idempotency key (a request id), or nil. A key that a
    ///   committed saga holds is refused before the body runs with
    ///   ``SagaError/alreadyCommitted(key:saga:)``, and two runs of one key at once commit at
    ///   most once: the key's row (in `<markerTable>_keys`) is inserted first in the saga's
    ///   transaction and commits if and only if the saga does. ``outcome(ofKey:)`` answers
    ///   later whether it committed. Kept for ``Configuration/outcomeRetention``; 1 to
    ///   ``maxCallerKeyBytes`` bytes of UTF-8 (``SagaError/Misuse/emptyCallerKey``,
    ///   ``SagaError/Misuse/callerKeyTooLarge(size:limit:)``). See <doc:Outcomes>.
    @available(*, noasync, message: "it blocks the thread: from async code, call the async run(key:_:) (in top-level code, from an async function)")
    @discardableResult
    public func run<T>(key: String? = nil, _ body: (Saga) throws -> T) throws(SagaError) -> T {
        let probe = SagaProbe(self, saga: tracer)
        do {
            let value = try probe.bind { () throws(SagaError) -> T in try runProbed(key: key, body, probe) }
            probe.end(sagaThrew: nil)
            return value
        } catch {
            probe.end(sagaThrew: error)
            throw error
        }
    }

    /// `run`, watched by `probe` (bound as the task-local ``probe``).
    private func runProbed<T>(key: String?, _ body: (Saga) throws -> T, _ probe: SagaProbe) throws(SagaError) -> T {
        let callerKey = try Self.callerKey(key)
        if let outer = Self.running.first(where: { $0.coordinator == ObjectIdentifier(self) }) {
            throw .misuse(.nestedSaga(outer.saga))
        }
        try book.withLock { b throws(SagaError) in try b.enter() }
        defer { if book.withLock({ $0.leave() }) { finishClosing() } }
        if let reason = book.withLock({ $0.stopped }) { throw .stopped(reason: reason) }
        let id: SagaID
        do { id = try ids.next { id in book.withLock { $0.began(id, key: callerKey) } } } catch {
            stop("cannot persist the saga id lease: \(error)")
            throw .stopped(reason: "cannot persist the saga id lease: \(error)")
        }
        probe.identify(id)
        defer { book.withLock { $0.left(id) } }
        do {
            return try Self.$running.withValue(Self.running + [RunningSaga(coordinator: ObjectIdentifier(self), saga: id)]) {
                try execute(id, key: callerKey, body)
            }
        } catch let e as SagaError {
            throw e
        } catch {
            preconditionFailure("execute only throws SagaError, got \(error)")
        }
    }

    /// The saga state machine: begin, body, prepare, marker and commit, then one of the three
    /// outcomes of COMMIT.
    private func execute<T>(_ id: SagaID, key: Bytes?, _ body: (Saga) throws -> T) throws(SagaError) -> T {
        if configuration.mode == .redo { return try executeRedo(id, key: key, body) }
        let log = SagaLog(logger, saga: id)

        // 1. Begin.
        let conn = try begin(id)
        // The server session the transaction runs in: a COMMIT sent on it may arrive late, so
        // it must be seen gone before an unknown outcome is decided (after a crash too).
        let session = conn.session

        // 2. Body (3. locks are taken as keys are touched).
        let saga = Saga(id: id, connection: conn, context: SagaContext(kv: kv, locks: locks, lockTimeout: configuration.lockTimeout))
        try insertCallerKey(key, of: saga, on: conn)
        let value = try runBody(body, of: saga, on: conn)

        // 4. Prepare: the forward writes and the `prepared` record, in one synced batch.
        let prepared = try prepare(saga, key: key, session: session, on: conn, log: log)

        // 5. Marker, and 6. Commit: the decision point.
        let outcome = commit(id, key: key, prepared: prepared, on: conn)

        // 7. The outcome.
        switch outcome {
        case .committed:
            giveBack(conn, after: saga)
            finishCommitted(id, phase: .run, log: log)
            return value
        case .failed(let error):
            try compensateFailedCommit(saga, prepared.record, error: error, on: conn, log: log)
        case .unknown(let error) where error.requiresReopen:
            try stopAtFailedCommitIO(id, prepared.record, error: error, on: conn, log: log)
        case .unknown(let error):
            try decideUnknownCommit(id, prepared.record, error: error, session: session, on: conn, log: log)
            return value
        }
    }

    // MARK: 1. Begin

    /// A connection with a transaction begun on it. A pooled connection that BEGIN finds lost
    /// is closed and the next one tried (the server may have closed it while it sat idle;
    /// nothing of a saga had run on it). Any other failure (a busy database, a lost new
    /// connection) is the saga's: retrying it on every pooled connection would only multiply
    /// the wait.
    func begin(_ id: SagaID) throws(SagaError) -> any SQLConnection {
        try throwIfCancelled(id)
        do {
            try hook(.begin, id)
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
        } catch {
            throw .sqlFailed(saga: id, step: .begin, underlying: error)
        }
    }

    // MARK: The caller's key

    /// The largest caller key, in bytes of UTF-8 (the key column is `VARBINARY(255)`).
    public static let maxCallerKeyBytes = 255

    /// `key` as bytes, refused when empty or over ``maxCallerKeyBytes``.
    static func callerKey(_ key: String?) throws(SagaError) -> Bytes? {
        guard let key else { return nil }
        let bytes = Bytes(key.utf8)
        if bytes.isEmpty { throw .misuse(.emptyCallerKey) }
        if bytes.count > maxCallerKeyBytes { throw .misuse(.callerKeyTooLarge(size: bytes.count, limit: maxCallerKeyBytes)) }
        return bytes
    }

    /// The key's row, first in the saga's transaction: a key a committed saga holds is refused
    /// before any work (the transaction rolled back, nothing written); a key an open
    /// transaction holds waits for it (on a cluster, whichever COMMIT is certified first wins).
    func insertCallerKey(_ key: Bytes?, of saga: Saga, on conn: any SQLConnection) throws(SagaError) {
        guard let key else { return }
        do {
            try markers.insertKey(key, saga: saga.id, owner: owner, createdAt: JournalRecord.now(), on: conn)
        } catch {
            var holder: SagaID?
            if markers.dialect.isDuplicateKey(error) {
                // A locking read sees the newest committed row, in the same transaction.
                holder = (try? markers.keyRow(key, locking: true, on: conn))??.saga
            }
            saga.ended = true
            abandon(saga, conn)
            if let holder { throw .alreadyCommitted(key: String(decoding: key, as: UTF8.self), saga: holder) }
            throw .sqlFailed(saga: saga.id, step: .begin, underlying: error)
        }
    }

    // MARK: 2. Body

    /// Runs the body. On any failure the SQL transaction is rolled back and the locks go:
    /// nothing was written.
    func runBody<T>(_ body: (Saga) throws -> T, of saga: Saga, on conn: any SQLConnection) throws(SagaError) -> T {
        do {
            try throwIfCancelled(saga.id)
            let value = try body(saga)
            saga.ended = true
            // The body may have caught the statement's error: the saga stays poisoned.
            if let poison = saga.poison { throw poison.error(saga: saga.id) }
            try hook(.body, saga.id)
            return value
        } catch {
            saga.ended = true
            abandon(saga, conn)
            throw classifyBodyError(error, saga: saga)
        }
    }

    private func classifyBodyError(_ error: any Error, saga: Saga) -> SagaError {
        if let poison = saga.poison { return poison.error(saga: saga.id) }
        if error is CancellationError { return .cancelled(saga: saga.id) }
        if let e = error as? SagaError {
            switch e {
            case .lockTimeout, .deadlock, .misuse, .transactionLost, .transactionEndedByStatement, .cancelled: return e
            default: break
            }
        }
        return .bodyFailed(saga: saga.id, underlying: error)
    }

    // MARK: 4. Prepare

    /// What prepare left for the decision: the saga's journal record (nil when it wrote no
    /// key), and a KV failure after which the batch was found durable all the same.
    struct Prepared {
        var record: JournalRecord?
        var kvFailure: (any Error)?
    }

    /// Takes the pre-images (the body's own reads of the keys, locked since; one multi-get for
    /// keys it wrote without reading), then writes the forward writes and the `prepared`
    /// record in one synced batch. A saga that wrote no key writes nothing.
    ///
    /// A saga with a caller key writes its record even when it wrote no key: the record carries
    /// the key, so that an undecided saga's key is known to be undecided, after a crash too.
    private func prepare(_ saga: Saga, key: Bytes?, session: SQLSession?, on conn: any SQLConnection, log: SagaLog) throws(SagaError) -> Prepared {
        let id = saga.id
        let writes = saga.writes
        var prepared = Prepared()
        guard !writes.isEmpty || key != nil else { return prepared }
        do {
            let pre = try saga.preImages(of: writes)
            let entries = zip(writes, pre).map { JournalRecord.Entry(key: $0.key, preImage: $1, afterImage: $0.image) }
            let record = JournalRecord(saga: id, state: .prepared, entries: entries, session: session, preparedAt: JournalRecord.now(), callerKey: key)
            let encoded = record.encoded()
            if encoded.count > configuration.maxRecordSize {
                throw SagaError.misuse(.sagaTooLarge(size: encoded.count, limit: configuration.maxRecordSize))
            }
            var batch = KVWriteBatch()
            for w in writes { batch.set(w.key, to: w.image) }
            batch.put(JournalRecord.key(for: id), encoded, in: .journal)
            try hook(.prepare, id)
            // The last moment cancellation is honoured: after the batch, the saga finishes.
            try throwIfCancelled(id)
            book.withLock { $0.prepared(id) }
            prepared.record = record
            try kv.write(batch, sync: true)
        } catch {
            // A synced batch is atomic: either it is durable or not. If the store says it
            // failed but the record is readable, it landed: compensate. Otherwise nothing
            // landed in this process, and if it reaches disk later, recovery on reopen fences
            // the saga (no marker) and undoes it.
            if let misuse = error as? SagaError {
                abandon(saga, conn)
                throw misuse
            }
            let landed = prepared.record != nil && ((try? kv.journalGet(JournalRecord.key(for: id))) ?? nil) != nil
            // An injected fault stops before the write; a real failure may have left the batch
            // on disk (RocksDB replays an unsynced WAL record): nothing more runs on top of
            // the store until a reopen (a compensation, if any, is this saga's last write).
            if !(error is InjectedFault) { stop("the KV store failed a write of \(id): \(error)") }
            guard landed else {
                abandon(saga, conn)
                log.error("KV write failed, SQL rolled back: \(error)")
                throw .kvWriteFailed(saga: id, underlying: error)
            }
            log.error("KV write reported failure but the batch is durable; compensating: \(error)")
            prepared.kvFailure = error
        }
        return prepared
    }

    // MARK: 5. Marker and 6. Commit

    /// Inserts the marker row and commits, in one round trip where the backend can. A failure
    /// before COMMIT was sent is a proved failure: the transaction is rolled back.
    private func commit(_ id: SagaID, key: Bytes?, prepared: Prepared, on conn: any SQLConnection) -> CommitResult {
        do {
            if let kvFailure = prepared.kvFailure { throw kvFailure }
            if prepared.record != nil { try hook(.prepared, id) }
            try hook(.marker, id)
            // A transaction that ended under us must never be "continued": in autocommit mode
            // the marker would commit on its own.
            guard conn.isInTransaction else { throw TransactionEnded() }
            if let key { try markers.touchKey(key, at: JournalRecord.now(), on: conn) }
            try hook(.commit, id)
            return markers.commit(insertingMarker: id, owner: owner, on: conn)
        } catch {
            // COMMIT was never sent, so the transaction cannot commit.
            if conn.isInTransaction { try? conn.rollback() }
            return .failed(error)
        }
    }

    // MARK: 7. The outcome of COMMIT

    /// COMMIT failed, as the database proves: undo the KV side, then throw `commitFailed`.
    private func compensateFailedCommit(_ saga: Saga, _ record: JournalRecord?, error: any Error, on conn: any SQLConnection, log: SagaLog) throws(SagaError) -> Never {
        // An expected outcome (a deferred constraint, a deadlock at COMMIT): the caller hears
        // of it as an error, so it is no warning.
        log.debug("COMMIT failed: \(error); compensating")
        // Proved failed, so undoing the KV side is right even after an I/O error; but nothing
        // runs on top of a store that failed a write until it is reopened.
        defer {
            if error.requiresReopen { stop("the SQL database failed I/O at COMMIT of \(saga.id): \(error)") }
            stopIfClaimLost(error)
        }
        let restored: Int
        do throws(SagaError) { restored = try compensateOrHold(saga.id, record, after: error, log: log) } catch let undo {
            // The saga stays prepared, and its record names this connection's session, which
            // recovery ends before it decides: closed, never lent to another saga that the
            // KILL would then hit.
            conn.close()
            throw undo
        }
        giveBack(conn, after: saga)
        throw .commitFailed(saga: saga.id, underlying: error, restoredKeys: restored)
    }

    /// An fsync or write failed inside COMMIT. The database's own files decide the outcome,
    /// and only after a reopen (its log may replay the transaction or not): never fence or
    /// continue on top of them in this process.
    private func stopAtFailedCommitIO(_ id: SagaID, _ record: JournalRecord?, error: any Error, on conn: any SQLConnection, log: SagaLog) throws(SagaError) -> Never {
        conn.close()
        stop("the SQL database failed I/O at COMMIT of \(id): \(error)")
        if record == nil { book.withLock { $0.undecidedWithoutRecord(id) } }
        end(id, record != nil ? .inDoubt : .abandoned)
        log.error("COMMIT failed with an I/O error: \(error); stopped, recovery after reopening decides")
        throw .inDoubt(saga: id, underlying: error)
    }

    /// The outcome is unknown. Never assume a rollback: close the failed connection (SQLite
    /// recovers its journal), then decide with a fencing insert on a fresh connection that
    /// keeps the saga's turn at the database (it still holds its keys), once the old session
    /// is gone: its COMMIT may still be on the way. Returns when the saga committed.
    private func decideUnknownCommit(_ id: SagaID, _ record: JournalRecord?, error: any Error, session: SQLSession?, on conn: any SQLConnection, log: SagaLog) throws(SagaError) {
        log.notice("COMMIT outcome unknown: \(error); fencing")
        let fenceConnection = Result { try sql.connect(replacing: conn) }
        switch fence([id], ending: session.map { [$0] } ?? [], phase: .run, on: fenceConnection)?[id] {
        case .committed:
            finishCommitted(id, phase: .run, log: log)
        case .aborted:
            let restored = try compensateOrHold(id, record, after: error, log: log)
            throw .commitFailed(saga: id, underlying: error, restoredKeys: restored)
        case nil:
            if record == nil { book.withLock { $0.undecidedWithoutRecord(id) } }
            end(id, record != nil ? .inDoubt : .abandoned)
            throw .inDoubt(saga: id, underlying: error)
        }
    }

    /// Cancellation of the task the saga runs in (`Task.isCancelled`: false outside any task,
    /// so a saga run from a thread of one's own is never cancelled). Checked before BEGIN,
    /// before the body and right before the forward KV batch is written, never after it: a
    /// saga cancelled in time is rolled back with nothing written anywhere.
    func throwIfCancelled(_ id: SagaID) throws(SagaError) {
        if Task.isCancelled { throw .cancelled(saga: id) }
    }

    // MARK: Endings

    /// Rolls back a saga that wrote nothing to the KV store, releases its locks and returns the
    /// connection (closed instead when the rollback failed: the server then rolls back).
    func abandon(_ saga: Saga, _ conn: any SQLConnection) {
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
    func giveBack(_ conn: any SQLConnection, after saga: Saga) {
        if saga.ranSessionStatement { conn.close() } else { pool.giveBack(conn) }
    }

    /// How a saga leaves the coordinator. Every terminal path goes through ``end(_:_:)``: the
    /// one place that releases a saga's locks or keeps them.
    enum Ending {
        /// Committed or compensated: locks released, the journal record collected later (and
        /// the outcome recorded then).
        case finished(committed: Bool)
        /// Prepared and undecided (or not undoable): keys stay locked until recovery.
        case inDoubt
        /// Nothing of it is in the KV store: locks released, nothing to collect.
        case abandoned
        /// Redo mode: committed and its after-images written to the KV store; locks released,
        /// its row deleted by a checkpoint.
        case applied(sequence: UInt64)
        /// Redo mode: not committed, nothing written; locks released. `fenced`: its `aborted`
        /// marker row is collected like a finished saga's.
        case notCommitted(sequence: UInt64, fenced: Bool = false)
    }

    func end(_ id: SagaID, _ ending: Ending) {
        switch ending {
        case .finished(let committed):
            let due = updateBook { $0.finished(id, committed: committed, gcThreshold: configuration.gcThreshold) }
            locks.releaseAll(id)
            if due {
                do { _ = try collectGarbage() } catch { logger.warning("garbage collection failed: \(error)") }
            }
        case .inDoubt:
            updateBook { $0.heldInDoubt(id) }
        case .abandoned:
            updateBook { $0.abandoned(id) }
            locks.releaseAll(id)
        case .applied(let sequence), .notCommitted(let sequence, _):
            updateBook { $0.abandoned(id) }
            locks.releaseAll(id)
            var applied: SagaID?
            if case .applied = ending { applied = id }
            if case .notCommitted(_, true) = ending { book.withLock { $0.collected([id]) } }
            if redoLog.settle(sequence, applied: applied, every: configuration.checkpointEvery, interval: configuration.checkpointInterval) {
                do { _ = try collectGarbage() } catch { logger.warning("checkpoint failed: \(error)") }
            }
        }
    }

    /// Committed. No journal write: the marker row proves the outcome, and garbage collection
    /// deletes the `prepared` record (a separate write here would cost a WAL append per saga
    /// and split RocksDB's group commits of synced batches).
    func finishCommitted(_ id: SagaID, phase: SagaPhase, log: SagaLog) {
        do { try hook(.committed, id, phase: phase) } catch {
            log.warning("hook failure after COMMIT of \(id) ignored: \(error)")
        }
        end(id, .finished(committed: true))
    }
}
