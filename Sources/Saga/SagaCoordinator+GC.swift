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
            if !ids.isEmpty {
                do {
                    try hook(.gcJournal, nil, phase: .gc)
                    var batch = KVWriteBatch()
                    for id in ids { batch.delete(JournalRecord.key(for: id), in: .journal) }
                    try kv.write(batch, sync: true)
                    book.withLock { $0.collected(ids) }
                } catch {
                    book.withLock { $0.notCollected(ids) }
                    let reason = "deleting finished journal records failed: \(error)"
                    // A failed KV write: the store may hold part of it (see `execute`).
                    if !(error is InjectedFault) { stop(reason) }
                    throw .stopped(reason: reason)
                }
            }
            let done = book.withLock { $0.takeMarkersToDelete() }
            guard !done.isEmpty else { return 0 }
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
            return done.count
        }
    }
}
