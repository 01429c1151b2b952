// Garbage collection: finished sagas' journal records first (synced), then their marker rows
// (see <doc:Protocol>).

extension SagaCoordinator {
    /// Removes the journal records and marker rows of finished sagas, in the only safe order:
    /// first the journal records, synced; then their markers. In redo mode, first a checkpoint:
    /// the watermark, synced, then the redo rows at or below it. Returns how many sagas were
    /// collected. Runs by itself every ``Configuration/gcThreshold`` finished sagas.
    @discardableResult
    public func collectGarbage() throws(SagaError) -> Int {
        let collected = try probed { () throws(SagaError) -> Int in try collectGarbageLocked() }
        metrics.collected(collected)
        return collected
    }

    private func collectGarbageLocked() throws(SagaError) -> Int {
        try gcLock.withLock { () throws(SagaError) -> Int in
            // Redo mode: the checkpoint (watermark, then the redo rows below it).
            if configuration.mode == .redo { try checkpointLocked(phase: .gc) }
            let ids = book.withLock { $0.takeFinished() }
            do {
                // The outcomes of the committed ones are recorded (and those past the retention
                // pruned) in the batch that deletes the records: before their markers go.
                var batch = KVWriteBatch()
                for id in ids { batch.delete(JournalRecord.key(for: id), in: .journal) }
                let change = try outcomeChange(committed: book.withLock { $0.committed(among: ids) }, into: &batch)
                if !ids.isEmpty { try hook(.gcJournal, nil, phase: .gc) }
                if !ids.isEmpty || !change.isEmpty { try kv.write(batch, sync: true) }
                outcomes.written(change)
                book.withLock { $0.collected(ids) }
            } catch {
                book.withLock { $0.notCollected(ids) }
                let reason = "deleting finished journal records failed: \(error)"
                // A failed KV write: the store may hold part of it (see `execute`).
                if !(error is InjectedFault) { stop(reason) }
                throw .stopped(reason: reason)
            }
            let done = book.withLock { $0.takeMarkersToDelete() }
            if !done.isEmpty {
                do {
                    try hook(.gcMarkers, nil, phase: .gc)
                    let conn = try pool.take().connection
                    defer { pool.giveBack(conn) }
                    try markers.deleteInTransaction(done, owner: owner, on: conn)
                } catch {
                    book.withLock { $0.markersNotDeleted(done) }
                    stopIfClaimLost(error)
                    throw .sqlFailed(saga: nil, step: .gcMarkers, underlying: error)
                }
            }
            pruneCallerKeysIfDue()
            return done.count
        }
    }

    /// The retention in milliseconds.
    var outcomeRetentionMilliseconds: UInt64 {
        let c = configuration.outcomeRetention.components
        return UInt64(c.seconds) * 1000 + UInt64(c.attoseconds / 1_000_000_000_000_000)
    }

    /// Adds to `batch` the outcome bits of `committed`, and the floor and pruning of outcomes
    /// past the retention (never past a saga whose outcome may still be recorded). Applied to
    /// the ``OutcomeLog`` by `outcomes.written(_:)` once the batch is durable.
    func outcomeChange(committed: [SagaID], into batch: inout KVWriteBatch) throws -> OutcomeLog.Change {
        let (unsettled, highest) = book.withLock { ($0.lowestUnsettled, $0.highestIssued) }
        // Redo mode: sagas applied, their rows not yet checkpointed.
        let bound = min(unsettled, redoLog.lowestApplied ?? .max)
        return try outcomes.record(committed, now: JournalRecord.now(), retention: outcomeRetentionMilliseconds,
                                   settledBelow: bound, highestIssued: highest, into: &batch)
    }

    /// Deletes this instance's caller-key rows older than the retention, at most every
    /// quarter of it (and at least once a minute while garbage collection runs). A failure
    /// only keeps the rows longer.
    private func pruneCallerKeysIfDue() {
        let now = JournalRecord.now()
        let retention = outcomeRetentionMilliseconds
        let due = keyPruning.withLock { last in
            guard now >= last &+ min(retention / 4, 60_000) else { return false }
            last = now
            return true
        }
        guard due, now > retention else { return }
        do {
            let conn = try pool.take().connection
            defer { pool.giveBack(conn) }
            let pruned = try markers.pruneKeys(createdBefore: now - retention, owner: owner, on: conn)
            if pruned > 0 { logger.debug("pruned \(pruned) caller key(s) past the outcome retention") }
        } catch {
            logger.warning("pruning caller keys past the outcome retention failed: \(error); they stay until the next collection")
            stopIfClaimLost(error)
        }
    }
}
