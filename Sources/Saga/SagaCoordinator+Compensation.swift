import Logging

// Undoing the KV side of sagas whose COMMIT failed or was fenced off (see <doc:Protocol>):
// compensation restores pre-images only where the store still holds the saga's after-image.

extension SagaCoordinator {
    /// Undoes a saga whose COMMIT failed (`commitError`). On success the saga is finished;
    /// when compensation cannot be done, the saga stays prepared, its keys stay locked, and the
    /// error carries both the COMMIT's error and why the undo stopped.
    func compensateOrHold(_ id: SagaID, _ record: JournalRecord?, after commitError: any Error, log: SagaLog) throws(SagaError) -> Int {
        // Nothing reached the KV store (a saga that only read keys): nothing to undo, but its
        // locks must go all the same.
        guard let record else {
            end(id, .finished(committed: false))
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
    func compensate(_ records: [JournalRecord], phase: SagaPhase) -> [SagaID: Result<Int, SagaError>] {
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
        var undone: [(SagaID, Int, [Bytes])] = []
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
            undone.append((record.saga, restores.count, restores.map(\.0)))
        }
        if !undone.isEmpty {
            do { try kv.write(batch, sync: true) } catch {
                // The store may hold part of the batch: nothing runs on top of it until a
                // reopen lets recovery decide.
                if !(error is InjectedFault) { stop("the KV store failed the compensating write of \(undone.map { "\($0.0)" }.joined(separator: ", ")): \(error)") }
                for (id, _, _) in undone { results[id] = .failure(.compensationFailed(saga: id, underlying: error)) }
                return hold(results)
            }
        }
        for (id, restored, keys) in undone {
            do { try hook(.compensated, id, phase: phase) } catch {
                logger.warning("hook failure after compensation of \(id) ignored: \(error)")
            }
            let why = phase == .run ? "its COMMIT failed" : "recovery found it not committed"
            SagaLog(logger, saga: id).notice("saga \(id.rawValue) undone (\(why)): \(restored == 0 ? "no key needed restoring" : "restored the pre-images of \(SagaLog.keys(keys))")")
            end(id, .finished(committed: false))
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
}
