// Redo mode (see <doc:Protocol>, "Redo mode"): the after-images ride in the SQL transaction, in
// the saga's marker row; COMMIT is the decision and the only synced write; the KV batch is
// written after it, unsynced, before the keys are released. A checkpoint makes the applied
// batches durable and deletes their rows; recovery at open replays the rows above the watermark.
// Begin and body are the forward path's own (SagaCoordinator+Running.swift).

extension SagaCoordinator {
    /// A saga of this process whose COMMIT outcome is still unknown: what applying it needs.
    struct RedoPending: Sendable {
        let sequence: UInt64
        let writes: [(key: Bytes, image: Bytes?)]
        let session: SQLSession?
    }

    /// The redo state machine: begin, body, redo row and commit, then one of the three outcomes
    /// of COMMIT.
    func executeRedo<T>(_ id: SagaID, key: Bytes?, _ body: (Saga) throws -> T) throws(SagaError) -> T {
        let log = SagaLog(logger, saga: id)

        // 1. Begin.
        let conn = try begin(id)
        let session = conn.session

        // 2. Body (3. locks are taken as keys are touched).
        let saga = Saga(id: id, connection: conn, context: SagaContext(kv: kv, locks: locks, lockTimeout: configuration.lockTimeout))
        try insertCallerKey(key, of: saga, on: conn)
        let value = try runBody(body, of: saga, on: conn)

        // 4. The redo row: the after-images, encoded, and the sequence, taken while the saga
        // holds every one of its locks.
        let writes = saga.writes
        let record = try redoRecord(saga, writes, on: conn)
        let sequence = redoLog.take()

        // 5. Marker (the redo row) and 6. Commit: the decision point.
        let outcome = commitRedo(id, key: key, sequence: sequence, record: record, on: conn)

        // 7. The outcome, and 8. apply.
        switch outcome {
        case .committed:
            giveBack(conn, after: saga)
            apply(id, writes, sequence: sequence, phase: .run, log: log)
            return value
        case .failed(let error):
            // Nothing reached the KV store: nothing to undo.
            log.debug("COMMIT failed: \(error); nothing was written")
            if error.requiresReopen { stop("the SQL database failed I/O at COMMIT of \(id): \(error)") }
            stopIfClaimLost(error)
            giveBack(conn, after: saga)
            end(id, .notCommitted(sequence: sequence))
            throw .commitFailed(saga: id, underlying: error, restoredKeys: 0)
        case .unknown(let error) where error.requiresReopen:
            conn.close()
            stop("the SQL database failed I/O at COMMIT of \(id): \(error)")
            holdRedo(id, RedoPending(sequence: sequence, writes: writes, session: session))
            log.error("COMMIT failed with an I/O error: \(error); stopped, recovery after reopening decides")
            throw .inDoubt(saga: id, underlying: error)
        case .unknown(let error):
            log.notice("COMMIT outcome unknown: \(error); fencing")
            let fenceConnection = Result { try sql.connect(replacing: conn) }
            switch fence([id], ending: session.map { [$0] } ?? [], phase: .run, on: fenceConnection)?[id] {
            case .committed:
                apply(id, writes, sequence: sequence, phase: .run, log: log)
                return value
            case .aborted:
                end(id, .notCommitted(sequence: sequence, fenced: true))
                throw .commitFailed(saga: id, underlying: error, restoredKeys: 0)
            case nil:
                holdRedo(id, RedoPending(sequence: sequence, writes: writes, session: session))
                throw .inDoubt(saga: id, underlying: error)
            }
        }
    }

    // MARK: 4. The redo row

    /// The saga's after-images as a `redo` journal record, refused when over
    /// ``Configuration/maxRecordSize`` (nothing written, the transaction rolled back).
    private func redoRecord(_ saga: Saga, _ writes: [(key: Bytes, image: Bytes?)], on conn: any SQLConnection) throws(SagaError) -> Bytes {
        let entries = writes.map { JournalRecord.Entry(key: $0.key, preImage: nil, afterImage: $0.image) }
        let encoded = JournalRecord(saga: saga.id, state: .redo, entries: entries).encoded()
        // The row must also fit one statement of the database (MySQL's max_allowed_packet),
        // with room for the rest of the insert.
        let limit = min(configuration.maxRecordSize, markers.dialect.maxStatementBytes.map { $0 - Self.statementOverhead } ?? .max)
        if encoded.count > limit {
            abandon(saga, conn)
            throw .misuse(.sagaTooLarge(size: encoded.count, limit: limit))
        }
        return encoded
    }

    /// Room left in a statement for the insert's text and its other values.
    static let statementOverhead = 4096

    // MARK: 5. Marker and 6. Commit

    /// The redo row and `COMMIT`. A failure before COMMIT was sent is a proved failure.
    private func commitRedo(_ id: SagaID, key: Bytes?, sequence: UInt64, record: Bytes, on conn: any SQLConnection) -> CommitResult {
        do {
            try hook(.marker, id)
            // The last moment cancellation is honoured: after COMMIT, the saga finishes.
            try throwIfCancelled(id)
            guard conn.isInTransaction else { throw TransactionEnded() }
            if let key { try markers.touchKey(key, at: JournalRecord.now(), on: conn) }
            try hook(.commit, id)
            return markers.commit(insertingRedo: id, sequence: sequence, record: record, owner: owner, on: conn)
        } catch {
            if conn.isInTransaction { try? conn.rollback() }
            return .failed(error)
        }
    }

    // MARK: 8. Apply

    /// Writes a committed saga's after-images to the KV store, not synced, then releases its
    /// keys. A failed write (or a hook refusing the step) leaves the saga committed in SQL and
    /// not in KV: the coordinator stops, the keys stay locked, and recovery at the next open
    /// replays the row.
    func apply(_ id: SagaID, _ writes: [(key: Bytes, image: Bytes?)], sequence: UInt64, phase: SagaPhase, log: SagaLog) {
        do {
            try hook(.committed, id, phase: phase)
            var batch = KVWriteBatch()
            for w in writes { batch.set(w.key, to: w.image) }
            if !batch.isEmpty { try kv.write(batch, sync: false) }
        } catch {
            stop("the KV store failed to apply committed saga \(id): \(error); reopening replays it")
            log.error("COMMIT succeeded but applying it to the KV store failed: \(error); stopped, the next open replays it")
            end(id, .inDoubt)
            return
        }
        do { try hook(.applied, id, phase: phase) } catch {
            log.warning("hook failure after applying \(id) ignored: \(error)")
        }
        end(id, .applied(sequence: sequence))
    }

    /// Keeps an undecided saga's keys locked and its sequence outstanding, for ``recover()``.
    private func holdRedo(_ id: SagaID, _ pending: RedoPending) {
        redoPending.withLock { $0[id] = pending }
        end(id, .inDoubt)
    }

    // MARK: Checkpoint

    /// Makes the watermark durable (one synced KV write), then deletes the redo rows at or
    /// below it. Rows go only once the watermark that covers them is durable. Runs under
    /// `gcLock`, from garbage collection (by itself once ``Configuration/checkpointEvery``
    /// sagas applied) and after replay.
    ///
    /// The rows of sagas applied in this process go by id; `byRange` (at open, when no saga
    /// runs) deletes every row at or below the watermark, replayed ones included.
    ///
    /// The watermark's batch also records that the sagas whose rows go committed (``OutcomeLog``):
    /// those applied in this process, and `replayed` at open.
    func checkpointLocked(phase: SagaPhase, byRange: Bool = false, replayed: [SagaID] = []) throws(SagaError) {
        let (watermark, advanced) = redoLog.watermark
        guard advanced else { return }
        let applied = redoLog.takeApplied(upTo: watermark)
        do {
            try hook(.checkpoint, nil, phase: phase)
            var batch = KVWriteBatch()
            batch.put(RedoLog.watermarkKey, RedoLog.encode(watermark), in: .journal)
            let change = try outcomeChange(committed: applied + replayed, into: &batch)
            try kv.write(batch, sync: true)
            outcomes.written(change)
        } catch {
            redoLog.putBack(applied, sequence: watermark)
            let reason = "writing the redo watermark failed: \(error)"
            // A failed KV write: the store may hold part of it (see `prepare`).
            if !(error is InjectedFault) { stop(reason) }
            throw .stopped(reason: reason)
        }
        redoLog.checkpointed(watermark)
        do {
            try hook(.checkpointed, nil, phase: phase)
            let conn = try pool.take().connection
            defer { pool.giveBack(conn) }
            if byRange {
                try markers.deleteRedo(upTo: watermark, owner: owner, on: conn)
            } else {
                try markers.deleteInTransaction(applied, owner: owner, on: conn)
            }
        } catch {
            // The rows stay; the next checkpoint deletes them with its own (and the next open
            // every row at or below the durable watermark).
            redoLog.putBack(applied, sequence: watermark)
            stopIfClaimLost(error)
            throw .sqlFailed(saga: nil, step: .checkpointed, underlying: error)
        }
    }

    // MARK: Recovery

    /// At open, before any saga runs: every redo row above the durable watermark, replayed in
    /// sequence order (after-images are absolute, so replaying a suffix again is harmless),
    /// then a checkpoint. No COMMIT of an earlier open can still land: its marker insert checks
    /// the instance's claim, which this open has moved (and a transaction that read the old
    /// claim held it locked until it ended).
    func replayRedoRows(into report: inout RecoveryReport) throws(SagaError) {
        let durable: UInt64
        do { durable = try RedoLog.durableWatermark(in: kv) } catch let e as SagaError { throw e } catch {
            throw .stopped(reason: "cannot read the redo watermark: \(error)")
        }
        var watermark = durable
        var highest: UInt64 = durable
        do {
            let conn = try pool.take().connection
            defer { pool.giveBack(conn) }
            while true {
                let rows = try markers.redoRows(instance: instance, above: watermark, limit: Self.replayChunk, on: conn)
                guard let last = rows.last else { break }
                try hook(.replay, nil, phase: .recovery)
                var batch = KVWriteBatch()
                for row in rows {
                    for e in row.record.entries { batch.set(e.key, to: e.afterImage) }
                }
                if !batch.isEmpty { try kv.write(batch, sync: false) }
                report.replayed += rows.map(\.saga)
                for row in rows {
                    SagaLog(logger, saga: row.saga).notice("recovery: saga \(row.saga.rawValue) committed; its after-images written again from its redo row: \(SagaLog.keys(row.record.entries.map(\.key)))")
                }
                watermark = last.sequence
            }
            highest = max(watermark, try markers.maxSequence(instance: instance, on: conn) ?? 0)
        } catch let e as SagaError {
            throw e
        } catch let damaged as MarkerTable.Statements.DamagedRedoRow {
            throw .journalCorrupt(saga: damaged.saga, key: [], reason: damaged.description)
        } catch {
            throw .stopped(reason: "cannot replay the redo rows: \(error)")
        }
        redoLog.restart(after: highest, durable: durable)
        if !report.replayed.isEmpty {
            logger.notice("replayed \(report.replayed.count) committed saga(s) from their redo rows")
        }
        // Rows at or below a durable watermark (a crash between the watermark and the
        // deletion) go now; the replayed ones once the new watermark is durable.
        do {
            if watermark > durable {
                try gcLock.withLock { () throws(SagaError) in try checkpointLocked(phase: .recovery, byRange: true, replayed: report.replayed) }
            } else if highest > 0 {
                let conn = try pool.take().connection
                defer { pool.giveBack(conn) }
                try markers.deleteRedo(upTo: durable, owner: owner, on: conn)
            }
        } catch {
            logger.warning("the checkpoint after replay failed: \(error); the rows stay for the next one")
        }
    }

    /// Redo rows read and replayed as one KV batch.
    static let replayChunk = 500

    /// Decides this process's redo sagas whose COMMIT outcome was unknown: committed ones are
    /// applied, the others let go.
    func resolveRedoPending(into report: inout RecoveryReport) {
        let pending = redoPending.withLock { $0 }
        guard !pending.isEmpty else { return }
        let ids = pending.keys.sorted()
        guard let decisions = fence(ids, ending: Array(Set(pending.values.compactMap(\.session))), phase: .recovery) else {
            report.inDoubt += ids
            return
        }
        for id in ids {
            guard let p = pending[id], let decision = decisions[id] else { report.inDoubt.append(id); continue }
            redoPending.withLock { _ = $0.removeValue(forKey: id) }
            switch decision {
            case .committed:
                let log = SagaLog(logger, saga: id)
                apply(id, p.writes, sequence: p.sequence, phase: .recovery, log: log)
                log.notice("recovery: saga \(id.rawValue) committed; its after-images written: \(SagaLog.keys(p.writes.map(\.key)))")
                report.committed.append(id)
            case .aborted:
                end(id, .notCommitted(sequence: p.sequence, fenced: true))
                SagaLog(logger, saga: id).notice("recovery: saga \(id.rawValue) not committed (fenced); nothing of it reached the KV store: \(SagaLog.keys(p.writes.map(\.key)))")
                report.compensated.append(id)
            }
        }
    }
}
