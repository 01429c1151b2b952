import Foundation
import Saga

/// One case of the conformance suite.
public struct ConformanceCase: Sendable, CustomStringConvertible {
    public let name: String
    public let run: @Sendable (any HarnessEnvironment) throws -> Void
    public var description: String { name }
}

/// The conformance suite: the guarantees of Saga's Protocol article, checked against real stores through the
/// protocols only. Every SQL backend runs all of it, unchanged.
public enum ConformanceSuite {
    public static let cases: [ConformanceCase] = [
        ConformanceCase(name: "a committed saga is in both stores", run: committedSagaIsInBothStores),
        ConformanceCase(name: "reads see the saga's own staged writes", run: readsSeeOwnWrites),
        ConformanceCase(name: "a throwing body writes nothing", run: throwingBodyWritesNothing),
        ConformanceCase(name: "a failed COMMIT is compensated", run: failedCommitIsCompensated),
        ConformanceCase(name: "a failed KV write commits nothing", run: failedKVWriteCommitsNothing),
        ConformanceCase(name: "a foreign write stops compensation", run: foreignWriteStopsCompensation),
        ConformanceCase(name: "recovery keeps a committed prepared saga", run: recoveryKeepsCommitted),
        ConformanceCase(name: "recovery compensates an uncommitted prepared saga", run: recoveryCompensatesUncommitted),
        ConformanceCase(name: "recovery is idempotent", run: recoveryIsIdempotent),
        ConformanceCase(name: "an unresolvable outcome stays in doubt until recovery", run: unresolvableOutcomeStaysInDoubt),
        ConformanceCase(name: "a transaction ended under the saga poisons it", run: lostTransactionPoisonsSaga),
        ConformanceCase(name: "saga ids are never reused", run: idsAreNeverReused),
        ConformanceCase(name: "garbage collection deletes journal first, then markers", run: garbageCollectionOrder),
        ConformanceCase(name: "misuse is refused and writes nothing", run: misuseIsRefused),
        ConformanceCase(name: "deadlocks and lock timeouts roll back", run: deadlocksRollBack),
        ConformanceCase(name: "concurrent sagas match a model", run: concurrentSagasMatchModel),
        ConformanceCase(name: "a failure injected at every step leaves the stores agreeing", run: failureAtEveryStep),
        ConformanceCase(name: "a saga that only reads releases its locks when COMMIT fails", run: readOnlyFailedCommitReleasesLocks),
        ConformanceCase(name: "a statement that ends the transaction poisons the saga", run: statementEndingTransactionPoisons),
        ConformanceCase(name: "handles that escape the body throw sagaEnded", run: escapedHandlesThrow),
    ] + lifecycleCases + pendingCounts.map { n in
        ConformanceCase(name: "recovery decides \(n) pending saga(s)") { try recoveryDecidesPending($0, count: n) }
    } + outcomeCases

    /// The suite in redo mode: every case but those of compensation's own mechanism, and redo
    /// mode's own. (Recovery of compensate mode's records stays: a journal left by either mode
    /// is recovered whichever mode opens it.)
    public static let redoCases: [ConformanceCase] = cases.filter { !compensateOnly.contains($0.name) } + redoOwnCases

    /// Pending sagas at open, around the chunk sizes of recovery (256 ids a statement, 500 a
    /// fencing transaction) and at a scale a node reaches with rare garbage collection.
    public static let pendingCounts = [1, 2, 91, 255, 256, 257, 500, 501, 10_000]

    // MARK: Cases

    static func committedSagaIsInBothStores(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        let result = try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("a"), .integer(1)])
            try saga.kv.put("a", "one")
            try saga.kv.put(Bytes([0x00, 0xFF, 0x10]), Bytes([0x00, 0x01]))  // raw bytes, not text
            return 42
        }
        try check(result == 42, "run returns the body's value")
        try check(try env.row("a") == 1, "SQL row committed")
        try check(try env.kvGet("a") == "one", "KV write applied")
        try check(try env.kv.get(Bytes([0x00, 0xFF, 0x10])) == Bytes([0x00, 0x01]), "raw bytes kept as they are")
        try check(try env.undecided().isEmpty, "the journal leaves nothing undecided")
        try check(try env.markers().values.allSatisfy { $0 == "committed" }, "marker committed")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
    }

    static func readsSeeOwnWrites(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("r", "before")])
        let c = try env.coordinator()
        try c.run { saga in
            try check(try saga.kv.get("r") == Bytes("before".utf8), "read sees the store")
            try saga.kv.put("r", "mine")
            try check(try saga.kv.get("r") == Bytes("mine".utf8), "read sees the staged put")
            try saga.kv.delete("r")
            try check(try saga.kv.get("r") == nil, "read sees the staged delete")
            try check(try env.kvGet("r") == "before", "nothing touches the store during the body")
            try saga.kv.put("r", "final")
        }
        try check(try env.kvGet("r") == "final", "last staged write wins")
    }

    static func throwingBodyWritesNothing(_ env: any HarnessEnvironment) throws {
        struct Boom: Error {}
        try env.kvSet([("t", "old")])
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("t"), .integer(1)])
                try saga.kv.put("t", "new")
                throw Boom()
            }
        }
        guard case .bodyFailed(_, let underlying) = error, underlying is Boom else {
            throw ConformanceFailure(description: "expected bodyFailed(Boom), got \(error)")
        }
        try check(error.nothingWritten, "a body failure wrote nothing")
        try check(!error.isRetryable, "the body's own error is not transient: retrying would throw it again")
        try check(try env.row("t") == nil, "SQL rolled back")
        try check(try env.kvGet("t") == "old", "KV untouched")
        try check(try env.journal().isEmpty, "no journal record")
        // The keys were released: another saga can take them at once.
        try c.run { saga in try saga.kv.put("t", "again") }
        try check(try env.kvGet("t") == "again", "locks released")
    }

    static func failedCommitIsCompensated(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("x", "x0"), ("y", "y0")])
        try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("x"), .integer(10)])
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("UPDATE saga_test SET v = v + 5 WHERE k = ?", [.text("x")])
                try saga.kv.put("x", "x1")
                try saga.kv.delete("y")
                try saga.kv.put("z", "z1")  // absent before: its pre-image is "absent"
                try env.arrangeCommitFailure(in: saga)
            }
        }
        guard case .commitFailed(let id, _, let restored) = error else {
            throw ConformanceFailure(description: "expected commitFailed, got \(error)")
        }
        // Redo mode never wrote the KV side: nothing to restore, and no journal record.
        let redo = env.mode == .redo
        try check(restored == (redo ? 0 : 3), "\(redo ? "no" : "three") keys restored, got \(restored)")
        try check(error.nothingWritten, "compensated: nothing written")
        try check(try env.row("x") == 10, "SQL unchanged")
        try check(try env.kvGet("x") == "x0", "x restored")
        try check(try env.kvGet("y") == "y0", "deleted y restored")
        try check(try env.kvGet("z") == nil, "z, absent before, deleted again")
        try check(try env.journal()[id]?.state == (redo ? nil : .compensated), "journal says compensated (redo mode: no record)")
        try check(try env.markers()[id] != "committed", "no committed marker")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
        // Retrying works and commits.
        try c.run { saga in
            try saga.sql.execute("UPDATE saga_test SET v = v + 5 WHERE k = ?", [.text("x")])
            try saga.kv.put("x", "x1")
        }
        try check(try env.row("x") == 15 && env.kvGet("x") == "x1", "the retry commits on both sides")
    }

    static func failedKVWriteCommitsNothing(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("k", "k0")])
        let trigger = StepTrigger(.fail, at: .prepare)
        let c = try env.coordinator(.init(hooks: trigger))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("k"), .integer(1)])
                try saga.kv.put("k", "k1")
            }
        }
        guard case .kvWriteFailed = error else { throw ConformanceFailure(description: "expected kvWriteFailed, got \(error)") }
        try check(try env.row("k") == nil, "SQL rolled back")
        try check(try env.kvGet("k") == "k0", "KV unchanged")
        try check(try env.journal().isEmpty, "no journal record")
        try check(try env.markers().isEmpty, "no marker")
    }

    static func foreignWriteStopsCompensation(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("f", "pre")])
        // A writer behind the coordinator's back, right before compensation reads the key.
        let sneak = ForeignWriter(env: env, key: "f", value: "foreign")
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(200), hooks: sneak))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.kv.put("f", "post")
                try env.arrangeCommitFailure(in: saga)
            }
        }
        // The error carries both: why COMMIT failed, and why the undo stopped.
        guard case .compensationFailedAfterCommit(let id, let commitError, .foreignWrite(_, let key, let pre, let post, let current)) = error else {
            throw ConformanceFailure(description: "expected compensationFailedAfterCommit(foreignWrite), got \(error)")
        }
        try check("\(error)".contains("\(commitError)") && "\(error)".contains("written behind the saga"), "the message names the COMMIT's error and the foreign write: \(error)")
        try check(key == Bytes("f".utf8) && pre == Bytes("pre".utf8) && post == Bytes("post".utf8) && current == Bytes("foreign".utf8),
                  "the error names the key and the three values: \(error)")
        try check(!error.isRetryable, "not retryable")
        try check(c.inDoubt == [id], "saga left prepared and in doubt")
        try check(try env.journal()[id]?.state == .prepared, "journal record still prepared")
        try check(try env.kvGet("f") == "foreign", "nothing guessed: the foreign value stays")
        // Its keys stay locked.
        let blocked = try expectSagaError { try c.run { saga in _ = try saga.kv.get("f") } }
        guard case .lockTimeout(_, _, let holders) = blocked, holders == [id] else {
            throw ConformanceFailure(description: "expected lockTimeout held by \(id), got \(blocked)")
        }
        // Repaired by hand to the after-image, recovery finishes the compensation.
        try env.kvSet([("f", "post")])
        let report = try c.recover()
        try check(report.compensated == [id] && report.isClean, "recovery compensates after the repair: \(report)")
        try check(try env.kvGet("f") == "pre", "pre-image restored")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
    }

    /// Writes a KV key directly when compensation is about to start (once).
    final class ForeignWriter: SagaHooks, @unchecked Sendable {
        let env: any HarnessEnvironment
        let key: String, value: String
        private let lock = NSLock()
        private var done = false
        init(env: any HarnessEnvironment, key: String, value: String) { self.env = env; self.key = key; self.value = value }
        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            guard step == .compensate, lock.withLock({ () -> Bool in defer { done = true }; return !done }) else { return }
            try env.kvSet([(key, value)])
        }
    }

    /// Writes what a crashed process leaves behind after step 4: the forward writes and the
    /// `prepared` record, durable; optionally the committed SQL transaction with its marker.
    static func leavePrepared(_ env: any HarnessEnvironment, id: SagaID, committed: Bool) throws {
        let pre = try env.kv.multiGet([Bytes("p".utf8), Bytes("q".utf8)])
        let record = JournalRecord(saga: id, state: .prepared, entries: [
            .init(key: Bytes("p".utf8), preImage: pre[0], afterImage: Bytes("p1".utf8)),
            .init(key: Bytes("q".utf8), preImage: pre[1], afterImage: nil),
        ])
        var batch = KVWriteBatch()
        batch.put(Bytes("p".utf8), Bytes("p1".utf8))
        batch.delete(Bytes("q".utf8))
        batch.put(JournalRecord.key(for: id), record.encoded(), in: .journal)
        try env.kv.write(batch, sync: true)
        if committed {
            let conn = try env.sql.connect()
            defer { conn.close() }
            try conn.begin()
            try conn.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("p"), .integer(1)])
            try insertMarkerRow(id, instance: try SagaCoordinator.instance(in: env.kv), on: conn)
            guard case .committed = conn.commit() else { throw ConformanceFailure(description: "set-up commit failed") }
        }
    }

    static func recoveryKeepsCommitted(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("p", "p0"), ("q", "q0")])
        let id = SagaID(1_000_000)
        try leavePrepared(env, id: id, committed: true)
        let c = try env.coordinator()
        try check(try env.kvGet("p") == "p1" && env.kvGet("q") == nil, "committed saga's KV writes kept")
        try check(try env.row("p") == 1, "SQL committed")
        try check(try !env.undecided().contains(id), "decided")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
        let next = try c.run { $0.id }
        try check(next > id, "new ids start past the recovered one (\(next) > \(id))")
    }

    static func recoveryCompensatesUncommitted(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("p", "p0"), ("q", "q0")])
        let id = SagaID(7)
        try leavePrepared(env, id: id, committed: false)
        let c = try env.coordinator()
        try check(try env.kvGet("p") == "p0" && env.kvGet("q") == "q0", "pre-images restored")
        try check(try env.row("p") == nil, "no SQL row")
        try check(try env.markers()[id] == nil || env.markers()[id] == "aborted", "fenced with an aborted marker (or collected)")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
    }

    static func recoveryIsIdempotent(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("p", "p0")])
        try leavePrepared(env, id: SagaID(5), committed: false)
        try leavePreparedCommittedOther(env)
        let first = try snapshot(env)
        var c: SagaCoordinator? = try env.coordinator()
        let afterFirst = try snapshot(env)
        try check(afterFirst != first, "recovery changed something the first time")
        try check(try c?.recover().committed.isEmpty == true, "a second pass finds nothing to do")
        try check(try snapshot(env) == afterFirst, "second pass changes nothing")
        c = nil
        try env.reopen()
        _ = try env.coordinator()
        try check(try snapshot(env) == afterFirst, "reopening changes nothing")
    }

    static func leavePreparedCommittedOther(_ env: any HarnessEnvironment) throws {
        let id = SagaID(6)
        let record = JournalRecord(saga: id, state: .prepared, entries: [.init(key: Bytes("o".utf8), preImage: nil, afterImage: Bytes("o1".utf8))])
        var batch = KVWriteBatch()
        batch.put(Bytes("o".utf8), Bytes("o1".utf8))
        batch.put(JournalRecord.key(for: id), record.encoded(), in: .journal)
        try env.kv.write(batch, sync: true)
        let conn = try env.sql.connect()
        defer { conn.close() }
        try conn.begin()
        try insertMarkerRow(id, instance: try SagaCoordinator.instance(in: env.kv), on: conn)
        guard case .committed = conn.commit() else { throw ConformanceFailure(description: "set-up commit failed") }
    }

    /// Data of both stores (not the journal, which GC may trim).
    static func snapshot(_ env: any HarnessEnvironment) throws -> [String] {
        var out: [String] = []
        for k in ["p", "q", "o"] { out.append("kv \(k)=\(try env.kvGet(k) ?? "<absent>")") }
        for row in try env.sqlQuery("SELECT k, v FROM saga_test ORDER BY k") { out.append("sql \(row.values)") }
        return out
    }

    static func unresolvableOutcomeStaysInDoubt(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("d", "d0")])
        // COMMIT's outcome is unknown for real, and the fencing insert cannot reach the
        // database (once).
        let noFence = StepTrigger(.fail, at: .resolve, phase: .run)
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(200), hooks: CombinedHooks([env.unknownCommitHooks(), noFence])))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("d"), .integer(1)])
                try saga.kv.put("d", "d1")
            }
        }
        guard case .inDoubt(let id, _) = error else { throw ConformanceFailure(description: "expected inDoubt, got \(error)") }
        try check(c.inDoubt == [id], "listed in doubt")
        if env.mode == .compensate { try check(try env.journal()[id]?.state == .prepared, "still prepared") }
        let blocked = try expectSagaError { try c.run { saga in try saga.kv.put("d", "other") } }
        switch blocked {
        case .lockTimeout:
            // The keys stay locked; recovery on demand resolves the saga.
            let report = try c.recover()
            try check(report.isClean && report.committed.count + report.compensated.count == 1, "recovery resolves it: \(report)")
            try check(c.inDoubt.isEmpty, "nothing in doubt")
        case .stopped:
            // The database failed I/O inside COMMIT (SQLite): nothing runs, recovery on demand
            // included, until the stores are reopened; recovery at open resolves the saga.
            let refused = try expectSagaError { try c.recover() }
            guard case .stopped = refused else { throw ConformanceFailure(description: "recovery on a stopped coordinator: \(refused)") }
            c.close()
            try env.reopen()
            let reopened = try env.coordinator()
            try check(reopened.inDoubt.isEmpty, "nothing in doubt after reopening")
            try check(try !env.undecided().contains(id), "decided")
        default:
            throw ConformanceFailure(description: "keys stay locked (or the coordinator stops); got \(blocked)")
        }
        let committed = try env.row("d") == 1
        try check(try env.kvGet("d") == (committed ? "d1" : "d0"), "both stores agree after recovery")
    }

    /// Recovery on demand; when the coordinator stopped (an I/O error inside COMMIT), close it,
    /// reopen the stores and let recovery at open decide, as a restarted process would.
    static func recoverOrReopen(_ c: SagaCoordinator, _ env: any HarnessEnvironment) throws -> (SagaCoordinator, RecoveryReport) {
        switch Result(catching: { () throws(SagaError) in try c.recover() }) {
        case .success(let report):
            return (c, report)
        case .failure(.stopped):
            c.close()
            try env.reopen()
            let reopened = try env.coordinator()
            return (reopened, try reopened.recover())
        case .failure(let error):
            throw error
        }
    }

    static func lostTransactionPoisonsSaga(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("l", "l0")])
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("l"), .integer(1)])
                try saga.kv.put("l", "l1")
                // The transaction ends under the saga, unseen by any check of statement text.
                _ = try? env.endTransactionUnseen(in: saga)
                // Would autocommit on its own if it ran:
                _ = try? saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("l2"), .integer(2)])
            }
        }
        // Ended by something the saga did not see: it cannot know it was not a commit.
        guard case .transactionEndedByStatement = error else { throw ConformanceFailure(description: "expected transactionEndedByStatement, got \(error)") }
        try check(!error.isRetryable, "not retryable")
        try check(try env.row("l2") == nil, "no SQL row autocommitted after the end")
        try check(try env.kvGet("l") == "l0", "KV untouched")
        try check(try env.markers().isEmpty, "no marker committed")
    }

    static func idsAreNeverReused(_ env: any HarnessEnvironment) throws {
        var c: SagaCoordinator? = try env.coordinator()
        let first = try c?.run { saga in try saga.kv.put("i", "1"); return saga.id }
        c = nil
        try env.reopen()
        c = try env.coordinator()
        let second = try c?.run { saga in try saga.kv.put("i", "2"); return saga.id }
        guard let first, let second else { throw ConformanceFailure(description: "no ids") }
        try check(second > first, "id after restart (\(second)) is past the one before (\(first))")
        // A marker with a larger id than anything journaled (a KV store restored from an old
        // backup) pushes the lease past it too.
        c = nil
        try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, ?, 'committed')",
                           [.integer(Int64(try SagaCoordinator.instance(in: env.kv).rawValue)), .integer(Int64(second.rawValue) + 500_000)])
        // Another instance's markers (a second node on the same database) move nothing.
        try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, ?, 'committed')",
                           [.integer(Int64(try SagaCoordinator.instance(in: env.kv).rawValue ^ 1)), .integer(Int64(second.rawValue) + 900_000)])
        try env.reopen()
        c = try env.coordinator()
        let third = try c?.run { saga in try saga.kv.put("i", "3"); return saga.id }
        try check((third?.rawValue ?? 0) > second.rawValue + 500_000, "lease starts past the marker table's largest id")
        try check((third?.rawValue ?? 0) < second.rawValue + 900_000, "another instance's marker ids do not move the lease (\(third.map { "\($0)" } ?? "none"))")
    }

    static func garbageCollectionOrder(_ env: any HarnessEnvironment) throws {
        // Markers stay when the second GC step fails: a marker may outlive its record, never
        // the other way round. The next open removes the orphans.
        let failMarkers = StepTrigger(.fail, at: .gcMarkers, repeats: true)
        var c: SagaCoordinator? = try env.coordinator(.init(hooks: failMarkers, gcThreshold: 1_000_000))
        for i in 0..<20 { try c?.run { saga in try saga.kv.put("g\(i)", "\(i)") } }
        try check(try env.journal().count == 20 && env.markers().count == 20, "20 records and markers before GC")
        do { try c?.collectGarbage(); throw ConformanceFailure(description: "GC should have failed at gcMarkers") } catch is SagaError {}
        try check(try env.journal().isEmpty, "journal records deleted first")
        try check(try env.markers().count == 20, "markers outlive their records")
        c = nil
        try env.reopen()
        c = try env.coordinator(.init(gcThreshold: 8))
        try check(try env.markers().isEmpty, "orphan markers removed at open")
        // Running GC keeps both small.
        for i in 0..<50 { try c?.run { saga in try saga.kv.put("g\(i)", "x") } }
        try check(try env.journal().count < 8 && env.markers().count < 8, "journal and markers stay below the threshold")
    }

    static func misuseIsRefused(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        func expectMisuse(_ expected: SagaError.Misuse, _ body: @escaping (Saga) throws -> Void) throws {
            let e = try expectSagaError { try c.run(body) }
            guard case .misuse(let m) = e, m == expected else { throw ConformanceFailure(description: "expected misuse \(expected), got \(e)") }
        }
        try expectMisuse(.emptyKey) { try $0.kv.put(Bytes(), Bytes("v".utf8)) }
        try expectMisuse(.emptyKey) { _ = try $0.kv.get(Bytes()) }
        let reserved: Bytes = [0x00, 0x73, 0x61, 0x67, 0x61, 0x00, 0x01]
        try expectMisuse(.reservedKey(reserved)) { try $0.kv.put(reserved, Bytes("v".utf8)) }
        try expectMisuse(.keyTooLarge(size: 20_000, limit: 16_384)) { try $0.kv.put(Bytes(repeating: 1, count: 20_000), Bytes()) }
        var escaped: Saga?
        try c.run { saga in escaped = saga }
        do {
            try escaped?.kv.put("late", "write")
            throw ConformanceFailure(description: "a write after the saga ended must throw")
        } catch SagaError.misuse(.sagaEnded) {}
        let nested = try expectSagaError { try c.run { _ in try c.run { _ in 1 } } }
        guard case .misuse(.nestedSaga) = nested else {
            throw ConformanceFailure(description: "expected a nested-saga misuse, got \(nested)")
        }
        try check(try env.kvGet("late") == nil, "nothing written by misuse")
        try check(try env.undecided().isEmpty, "no saga left undecided")
        c.close()
        let closed = try expectSagaError { try c.run { _ in 1 } }
        guard case .misuse(.closed) = closed else { throw ConformanceFailure(description: "expected closed, got \(closed)") }
    }

    static func deadlocksRollBack(_ env: any HarnessEnvironment) throws {
        // Two sagas lock k1 and k2 in opposite orders. Where the database runs writers one at a
        // time, the second cannot start before the first completes: both commit. Elsewhere one
        // is refused with a deadlock error naming the key, and the other commits.
        let c = try env.coordinator(.init(lockTimeout: .seconds(10)))
        let group = DispatchGroup()
        let results = Results()
        for (first, second) in [("k1", "k2"), ("k2", "k1")] {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                do {
                    try c.run { saga in
                        _ = try saga.kv.get(first)
                        try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text(first)])
                        Thread.sleep(forTimeInterval: 0.2)
                        try saga.kv.put(second, first)
                    }
                    results.add("ok")
                } catch let error as SagaError {
                    // A deadlock victim wrote nothing and may well succeed next time.
                    results.add(error.isRetryable && error.nothingWritten ? "\(error)" : "NOT RETRYABLE: \(error)")
                } catch {
                    results.add("\(error)")
                }
            }
        }
        group.wait()
        let outcomes = results.all
        try check(!outcomes.contains { $0.hasPrefix("NOT RETRYABLE") }, "a deadlock is retryable: \(outcomes)")
        let committed = outcomes.filter { $0 == "ok" }.count
        if env.serializesWriters {
            try check(committed == 2, "both sagas commit one after the other: \(outcomes)")
        } else {
            try check(committed == 1, "one saga commits: \(outcomes)")
            try check(outcomes.contains { $0.contains("deadlock") && ($0.contains("k1") || $0.contains("k2")) },
                      "the other gets a deadlock error naming the key: \(outcomes)")
        }
        let rows = try env.sqlQuery("SELECT k FROM saga_test ORDER BY k").compactMap { $0[0].string }
        let kvWinner = try [env.kvGet("k1"), env.kvGet("k2")]
        try check(rows.count == committed, "one SQL row per committed saga: \(rows)")
        try check(kvWinner.compactMap { $0 }.count == committed, "one KV write per committed saga: \(kvWinner)")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
    }

    static func concurrentSagasMatchModel(_ env: any HarnessEnvironment) throws {
        // Several threads add to overlapping counters on both sides; ~1 in 5 COMMITs fails for
        // real. Every committed saga must be counted once on both sides, no failed one at all.
        let c = try env.coordinator(.init(lockTimeout: .seconds(30)))
        let counters = ["c0", "c1", "c2"]
        for k in counters { try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES (?, 0)", [.text(k)]) }
        let model = Results()
        let group = DispatchGroup()
        for t in 0..<4 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                var rng = UInt64(t + 1) &* 0x9E37_79B9_7F4A_7C15
                for _ in 0..<25 {
                    rng = rng &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                    let a = counters[Int(rng >> 33) % 3], b = counters[Int(rng >> 40) % 3]
                    let fail = (rng >> 50) % 5 == 0
                    do {
                        try c.run { saga in
                            for k in Set([a, b]).sorted() {
                                let n = Int(String(decoding: try saga.kv.get(k) ?? Bytes("0".utf8), as: UTF8.self)) ?? -1_000_000
                                try saga.kv.put(k, "\(n + 1)")
                                try saga.sql.execute("UPDATE saga_test SET v = v + 1 WHERE k = ?", [.text(k)])
                            }
                            if fail { try env.arrangeCommitFailure(in: saga) }
                        }
                        for k in Set([a, b]) { model.add(k) }
                    } catch let e as SagaError where e.nothingWritten {
                        // rolled back or compensated: counts for nothing
                    } catch {
                        model.add("unexpected: \(error)")
                    }
                }
            }
        }
        group.wait()
        let counts = model.all
        try check(!counts.contains { $0.hasPrefix("unexpected") }, "no unexpected error: \(counts.filter { $0.hasPrefix("unexpected") })")
        for k in counters {
            let expected = counts.filter { $0 == k }.count
            let kvValue = try env.kvGet(k), sqlValue = try env.row(k)
            try check(kvValue.flatMap { Int($0) } ?? 0 == expected, "KV \(k) = \(kvValue ?? "nil"), model \(expected)")
            try check(sqlValue == Int64(expected), "SQL \(k) = \(sqlValue.map(String.init) ?? "nil"), model \(expected)")
        }
        try check(c.inDoubt.isEmpty, "nothing in doubt")
    }

    static func failureAtEveryStep(_ env: any HarnessEnvironment) throws {
        for (n, step) in SagaStep.steps(of: env.mode).enumerated() {
            let key = "e\(n)"
            try env.kvSet([(key, "before")])
            // Compensation only follows a failed COMMIT, fencing an unknown one.
            let failCommit = step == .compensate || step == .compensated
            let unknownCommit = step == .resolve
            var hooks: [any SagaHooks] = [StepTrigger(.fail, at: step)]
            if unknownCommit { hooks.insert(env.unknownCommitHooks(), at: 0) }
            let c = try env.coordinator(.init(hooks: CombinedHooks(hooks), gcThreshold: 1, checkpointEvery: 1))
            var outcome = "committed"
            do {
                try c.run { saga in
                    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text(key)])
                    try saga.kv.put(key, "after")
                    if failCommit { try env.arrangeCommitFailure(in: saga) }
                }
            } catch {
                outcome = "\(error)"
            }
            let (recovered, report) = try recoverOrReopen(c, env)
            try check(report.isClean && recovered.inDoubt.isEmpty, "step \(step): recovery resolves everything: \(report)")
            let sqlHas = try env.row(key) != nil
            let kvHas = try env.kvGet(key) == "after"
            try check(sqlHas == kvHas, "step \(step): both stores agree (SQL \(sqlHas), KV \(kvHas)); outcome: \(outcome)")
            try check(try env.kvGet(key) == (kvHas ? "after" : "before"), "step \(step): KV holds one of the two images")
            try check(try env.undecided().isEmpty, "step \(step): nothing left undecided")
            // Redo mode: a failed apply (at committed) is replayed; replay is only reached at
            // an open with rows to replay.
            let expectCommitted: Set<SagaStep> = [.committed, .gcJournal, .gcMarkers, .applied, .checkpoint, .checkpointed, .replay]
            try check(sqlHas == expectCommitted.contains(step) || step == .resolve,
                      "step \(step): committed only where the failure comes after COMMIT (outcome: \(outcome))")
            recovered.close()
        }
    }

    static func readOnlyFailedCommitReleasesLocks(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("ro", "r0")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(300)))
        let error = try expectSagaError {
            try c.run { saga in
                _ = try saga.kv.get("ro")  // locks the key, writes nothing
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('ro', 1)", [])
                try env.arrangeCommitFailure(in: saga)
            }
        }
        guard case .commitFailed(_, _, let restored) = error else { throw ConformanceFailure(description: "expected commitFailed, got \(error)") }
        try check(restored == 0, "nothing to restore")
        // The retry the error invites must get the lock at once.
        try c.run { saga in
            try saga.kv.put("ro", "r1")
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('ro', 2)", [])
        }
        try check(try env.kvGet("ro") == "r1" && env.row("ro") == 2, "the retry committed")
        try check(c.inDoubt.isEmpty, "nothing in doubt")
    }

    static func statementEndingTransactionPoisons(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("ec", "e0")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(300)))
        // Plain transaction control is refused before it runs: the saga goes on unharmed.
        try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('ec', 1)", [])
            try saga.kv.put("ec", "e1")
            for statement in ["COMMIT", "commit;", "ROLLBACK", "BEGIN", "START TRANSACTION", "END"] {
                do {
                    try saga.sql.execute(statement, [])
                    throw ConformanceFailure(description: "`\(statement)` ran inside a saga")
                } catch SagaError.misuse(.transactionControl(statement)) {}
            }
        }
        try check(try env.row("ec") == 1 && env.kvGet("ec") == "e1", "the saga committed normally")
        // A statement that ends the transaction in a way no text check sees: poisoned.
        var after: Result<Int, any Error>?
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('ec2', 2)", [])
                try saga.kv.put("ec", "e2")
                _ = try? env.endTransactionUnseen(in: saga)  // the body swallows any error
                // Would autocommit on its own if it ran:
                after = Result { try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('ec3', 3)", []) }
            }
        }
        guard case .transactionEndedByStatement = error else {
            throw ConformanceFailure(description: "expected transactionEndedByStatement, got \(error)")
        }
        try check(!error.isRetryable, "not retryable: the SQL part may be committed")
        try check("\(error)".contains("may be committed"), "says the SQL part may be committed: \(error)")
        if case .success = after { throw ConformanceFailure(description: "a statement ran after the transaction ended") }
        try check(try env.row("ec3") == nil, "nothing autocommitted after it")
        try check(try env.row("ec2") == 2, "the statement did commit the saga's SQL write")
        try check(try env.kvGet("ec") == "e1", "KV side never written")
        try check(try env.markers().count == 1, "no marker for the poisoned saga")
        try c.run { saga in try saga.kv.put("ec", "e4") }  // the lock was released
        try check(try env.kvGet("ec") == "e4", "the key is free")
    }

    static func escapedHandlesThrow(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        var kv: SagaKV?
        var sql: SagaSQL?
        try c.run { saga in
            kv = saga.kv
            sql = saga.sql
        }
        for (what, attempt) in [
            ("kv.put", { () throws in try kv?.put("late", "x") }),
            ("kv.get", { () throws in _ = try kv?.get("late") }),
            ("sql.execute", { () throws in _ = try sql?.execute("INSERT INTO saga_test (k, v) VALUES ('late', 1)", []) }),
        ] {
            do {
                try attempt()
                throw ConformanceFailure(description: "\(what) after the saga ended must throw")
            } catch SagaError.misuse(.sagaEnded) {}
        }
        try check(try env.kvGet("late") == nil && env.row("late") == nil, "nothing written")
    }

    /// Leaves `count` sagas prepared, as a node killed with garbage collection far off would:
    /// each wrote key `pN` (pre-image `aN`) and `qN` (absent before); the even ones committed in
    /// SQL (a row and the marker), the odd ones did not.
    static func recoveryDecidesPending(_ env: any HarnessEnvironment, count: Int) throws {
        func key(_ p: String, _ i: Int) -> Bytes { Bytes("\(p)\(i)".utf8) }
        var before = KVWriteBatch()
        for i in 0..<count { before.put(key("p", i), key("a", i)) }
        try env.kv.write(before, sync: true)
        var batch = KVWriteBatch()
        for i in 0..<count {
            let id = SagaID(UInt64(1_000 + i))
            batch.put(key("p", i), key("b", i))
            batch.put(key("q", i), key("c", i))
            let record = JournalRecord(saga: id, state: .prepared, entries: [
                .init(key: key("p", i), preImage: key("a", i), afterImage: key("b", i)),
                .init(key: key("q", i), preImage: nil, afterImage: key("c", i)),
            ])
            batch.put(JournalRecord.key(for: id), record.encoded(), in: .journal)
        }
        try env.kv.write(batch, sync: true)
        let conn = try env.sql.connect()
        defer { conn.close() }
        try conn.begin()
        for i in stride(from: 0, to: count, by: 2) {
            try conn.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("p\(i)"), .integer(Int64(i))])
            try insertMarkerRow(SagaID(UInt64(1_000 + i)), instance: try SagaCoordinator.instance(in: env.kv), on: conn)
        }
        guard case .committed = conn.commit() else { throw ConformanceFailure(description: "set-up commit failed") }

        let c = try env.coordinator()
        try check(c.inDoubt.isEmpty, "\(count) pending: nothing left in doubt (\(c.inDoubt.count))")
        try check(try env.undecided().isEmpty, "\(count) pending: nothing undecided")
        func state() throws -> [String] {
            let p = try env.kv.multiGet((0..<count).map { key("p", $0) })
            let q = try env.kv.multiGet((0..<count).map { key("q", $0) })
            return zip(p, q).map { "\($0.map { String(decoding: $0, as: UTF8.self) } ?? "-")/\($1.map { String(decoding: $0, as: UTF8.self) } ?? "-")" }
        }
        let first = try state()
        let rows = Set(try env.sqlQuery("SELECT k FROM saga_test").compactMap { $0[0].string })
        for i in 0..<count {
            let committed = i % 2 == 0
            try check(rows.contains("p\(i)") == committed, "saga \(i): SQL row \(committed ? "kept" : "absent")")
            let expected = committed ? "b\(i)/c\(i)" : "a\(i)/-"
            try check(first[i] == expected, "saga \(i) of \(count): KV \(first[i]), expected \(expected)")
        }
        let again = try c.recover()
        try check(again.committed.isEmpty && again.compensated.isEmpty && again.isClean, "a second recovery finds nothing: \(again)")
        c.close()
        try env.reopen()
        let reopened = try env.coordinator()
        try check(reopened.inDoubt.isEmpty && (try state()) == first, "reopening changes nothing")
        reopened.close()
    }

    final class Results: @unchecked Sendable {
        private let lock = NSLock()
        private var items: [String] = []
        func add(_ s: String) { lock.withLock { items.append(s) } }
        var all: [String] { lock.withLock { items } }
    }
}
