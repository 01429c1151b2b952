import Logging

// Deciding sagas whose COMMIT outcome is unknown: ending old sessions, fencing, and recovery of
// every prepared saga at open or on demand (see <doc:Protocol>).

extension SagaCoordinator {
    /// Resolves every saga still `prepared` in the journal (other than those running in this
    /// process): a fencing insert decides each; committed ones are recorded, failed ones are
    /// compensated. Idempotent: running it twice, or after a crash inside it, changes nothing
    /// the second time. Then collects garbage.
    @discardableResult
    public func recover() throws(SagaError) -> RecoveryReport {
        if book.withLock({ $0.closed }) { throw .misuse(.closed) }
        if let reason = book.withLock({ $0.stopped }) { throw .stopped(reason: reason) }
        let report = try recover(atOpen: false)
        metrics.recovered(report)
        return report
    }

    /// - Parameter journal: the journal as already read at open; nil reads it now.
    func recover(atOpen: Bool, journal: [(key: Bytes, value: Bytes)]? = nil) throws(SagaError) -> RecoveryReport {
        try probed { () throws(SagaError) -> RecoveryReport in
            try recoveryLock.withLock { () throws(SagaError) -> RecoveryReport in try recoverLocked(atOpen: atOpen, journal: journal) }
        }
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
                // Redo records live in marker rows only.
                guard record.state != .redo else { throw JournalRecord.DecodingError(reason: "a redo record in the journal") }
            } catch {
                report.problems.append(.journalCorrupt(saga: id, key: key, reason: "\(error)"))
                continue
            }
            switch record.state {
            case .committed, .compensated, .redo:
                if atOpen { book.withLock { $0.foundFinished(id) } }
            case .prepared:
                if !atOpen {
                    // Running or finished in this process: not recovery's to decide.
                    let mine = book.withLock { $0.isOwnedHere(id) }
                    if mine { continue }
                    // It may have finished since the scan: a fresh read tells.
                    guard let fresh = try? kv.journalGet(key), let now = try? JournalRecord(decoding: fresh), now.state == .prepared else { continue }
                }
                pending.append(record)
            }
        }
        resolve(pending, adoptLocks: atOpen, into: &report)
        if !atOpen { resolveRedoPending(into: &report) }
        if atOpen { removeOrphanMarkers(keeping: journaled) }
        do { _ = try collectGarbage() } catch { logger.warning("garbage collection after recovery failed: \(error)") }
        return report
    }

    /// When a saga recovery finds prepared counts as in doubt since, on this process's clock:
    /// when it was prepared, from its record (format 3, wall-clock milliseconds), so that the
    /// in-doubt age goes on across restarts; now when the record does not say.
    static func inDoubtSince(preparedAt: UInt64?, now: ContinuousClock.Instant = .now) -> ContinuousClock.Instant {
        guard let preparedAt, preparedAt > 0 else { return now }
        let wallNow = JournalRecord.now()
        return now - .milliseconds(Int64(clamping: wallNow > preparedAt ? wallNow - preparedAt : 0))
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
            updateBook { $0.heldInDoubt(id, key: record.callerKey, at: Self.inDoubtSince(preparedAt: record.preparedAt)) }
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
                    let log = SagaLog(logger, saga: record.saga)
                    finishCommitted(record.saga, phase: .recovery, log: log)
                    log.notice("recovery: saga \(record.saga.rawValue) committed (its marker row is there); its KV writes stay: \(SagaLog.keys(record.entries.map(\.key)))")
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
    /// before any saga runs, a marker with no record belongs to a finished saga. The committed
    /// ones are recorded in the outcome log first, synced (a saga that wrote no KV key has no
    /// record at all, and may never have been collected).
    private func removeOrphanMarkers(keeping journaled: Set<SagaID>) {
        do {
            let conn = try pool.take().connection
            defer { pool.giveBack(conn) }
            let orphans = try markers.ids(instance: instance, on: conn).filter { !journaled.contains($0) }
            if !orphans.isEmpty {
                let committed = try markers.committed(among: orphans, instance: instance, on: conn)
                if !committed.isEmpty {
                    try gcLock.withLock {
                        var batch = KVWriteBatch()
                        let change = try outcomeChange(committed: committed, into: &batch)
                        try kv.write(batch, sync: true)
                        outcomes.written(change)
                    }
                }
                try markers.deleteInTransaction(orphans, owner: owner, on: conn)
                logger.debug("removed \(orphans.count) orphan marker row(s)")
            }
        } catch {
            logger.warning("orphan marker cleanup failed: \(error)")
            stopIfClaimLost(error)
        }
    }

    /// Fences sagas in one transaction on a fresh connection (or `connection`, opened for the
    /// purpose), once the sessions their transactions ran in are gone. A fence that fails for a
    /// transient reason (a lost connection, a server that went away: on a cluster, the node it
    /// reached died) is run again on a fresh connection, which reaches another server of the
    /// database if it has several; fencing twice is harmless, since a decision counts only once
    /// its own transaction committed. nil when the database cannot be reached, a session cannot
    /// be seen gone (or a hook refused): none of them is decided.
    func fence(_ ids: [SagaID], ending sessions: [SQLSession], phase: SagaPhase, on connection: Result<any SQLConnection, any Error>? = nil) -> [SagaID: FenceDecision]? {
        let what = ids.count == 1 ? "\(ids[0])" : "\(ids.count) sagas"
        var connection = connection
        var hooksRan = false
        for attempt in 1...Self.fenceConnectionAttempts {
            do {
                let conn = try (connection ?? Result { try sql.connect() }).get()
                connection = nil
                defer { conn.close() }
                if !hooksRan {
                    hooksRan = true
                    for id in ids { try hook(.resolve, id, phase: phase) }
                }
                if !sessions.isEmpty {
                    let left = try conn.endSessions(sessions)
                    if !left.isEmpty { throw SessionsStillThere(sessions: left) }
                }
                let decisions = try markers.fenceInTransaction(ids, owner: owner, on: conn)
                logger.notice("resolved by fencing: \(decisions.values.filter { $0 == .committed }.count) committed, \(decisions.values.filter { $0 == .aborted }.count) aborted (\(what))")
                return decisions
            } catch where attempt < Self.fenceConnectionAttempts && hooksRan && (error as? any TransientClassifiable)?.isTransient == true {
                connection = nil
                logger.notice("fencing \(what) failed: \(error); fencing again on a fresh connection")
            } catch {
                logger.warning("cannot resolve \(what): \(error)")
                stopIfClaimLost(error)
                return nil
            }
        }
        return nil
    }

    /// How many connections one fence tries before its sagas stay in doubt.
    static let fenceConnectionAttempts = 3
}
