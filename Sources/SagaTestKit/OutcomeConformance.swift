import Foundation
import Saga

// Outcomes you can look up (run(key:), outcome(ofKey:), outcome(of:)): every backend, both modes.

extension ConformanceSuite {
    static let outcomeCases: [ConformanceCase] = [
        ConformanceCase(name: "outcomes: a key that committed is refused, the work applied once", run: keyRunsOnce),
        ConformanceCase(name: "outcomes: two concurrent runs of one key commit once", run: concurrentKeyCommitsOnce),
        ConformanceCase(name: "outcomes: a failed COMMIT leaves the key free", run: failedCommitFreesKey),
        ConformanceCase(name: "outcomes: an undecided key is unknown until recovery decides it", run: undecidedKeyIsUnknown),
        ConformanceCase(name: "outcomes: outcome(of:) outlives the marker row, then expires", run: outcomeOutlivesMarker),
        ConformanceCase(name: "outcomes: a bad key is refused and writes nothing", run: badKeyIsRefused),
        ConformanceCase(name: "outcomes: a committed key survives close and reopen", run: keySurvivesReopen),
        ConformanceCase(name: "outcomes: a saga that wrote only SQL keeps its outcome once its marker is gone", run: sqlOnlySagaKeepsOutcome),
    ]

    /// What `outcome(ofKey:)` says, for messages.
    static func keyOutcome(_ c: SagaCoordinator, _ key: String) -> String {
        switch Result(catching: { () throws(SagaError) in try c.outcome(ofKey: key) }) {
        case .success(let o): "\(o)"
        case .failure(let e): "\(e)"
        }
    }

    /// The caller-key rows: key → saga id.
    static func keyRows(_ env: any HarnessEnvironment) throws -> [String: SagaID] {
        var out: [String: SagaID] = [:]
        for row in try env.sqlQuery("SELECT caller_key, saga_id FROM saga_markers_keys") {
            guard case .blob(let key) = row[0], let id = row[1].int64 else { continue }
            out[String(decoding: key, as: UTF8.self)] = SagaID(UInt64(id))
        }
        return out
    }

    /// The body of a request: adds 1 to the SQL row and to the KV counter of `name`.
    static func increment(_ name: String) -> (Saga) throws -> Void {
        { saga in
            let current = try saga.kv.get(name).map { Int(String(decoding: $0, as: UTF8.self)) ?? -1 } ?? 0
            try saga.kv.put(name, "\(current + 1)")
            if try saga.sql.execute("UPDATE saga_test SET v = v + 1 WHERE k = ?", [.text(name)]) == 0 {
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text(name)])
            }
        }
    }

    static func keyRunsOnce(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        var ran = 0
        let first = try c.run(key: "req-1") { saga -> SagaID in
            ran += 1
            try increment("once")(saga)
            return saga.id
        }
        let error = try expectSagaError {
            try c.run(key: "req-1") { saga in
                ran += 1
                try increment("once")(saga)
            }
        }
        guard case .alreadyCommitted(let key, let holder) = error else {
            throw ConformanceFailure(description: "expected alreadyCommitted, got \(error)")
        }
        try check(key == "req-1" && holder == first, "the error names the key and the saga that holds it: \(error)")
        try check(ran == 1, "the second body never ran (ran \(ran) times)")
        try check(error.nothingWritten && !error.isRetryable, "nothing written, not retryable")
        let (row, value) = (try env.row("once"), try env.kvGet("once"))
        try check(row == 1, "SQL applied once: \(String(describing: row))")
        try check(value == "1", "KV applied once: \(String(describing: value))")
        try check(try keyRows(env) == ["req-1": first], "one key row, the first saga's")
        try check(c.outcome(ofKey: "req-1") == .committed(first), "outcome(ofKey:) says committed")
        try check(c.outcome(of: first) == .committed(first), "outcome(of:) says committed")
        // Another key runs.
        try c.run(key: "req-2", increment("once"))
        try check(try env.row("once") == 2 && env.kvGet("once") == "2", "another key runs")
        // A run without a key writes no key row.
        try c.run(increment("once"))
        try check(try keyRows(env).count == 2, "a run without a key writes no key row")
        c.close()
    }

    static func concurrentKeyCommitsOnce(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        let results = Results()
        let start = DispatchSemaphore(value: 0)
        let group = DispatchGroup()
        for n in 0..<2 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                start.wait()
                // On a cluster the loser of a race at COMMIT is rolled back whole (retryable);
                // run again, as a caller would, and it is refused then.
                for _ in 0..<5 {
                    do throws(SagaError) {
                        try c.run(key: "race") { saga in
                            try increment("race")(saga)
                            Thread.sleep(forTimeInterval: 0.02)
                        }
                        results.add("committed")
                        return
                    } catch let error where error.isRetryable {
                        continue
                    } catch .alreadyCommitted {
                        results.add("refused")
                        return
                    } catch {
                        results.add("\(n): \(error)")
                        return
                    }
                }
                results.add("\(n): still retryable after 5 attempts")
            }
        }
        start.signal(); start.signal()
        group.wait()
        try check(results.all.sorted() == ["committed", "refused"], "exactly one commits, the other is refused: \(results.all)")
        try check(try env.row("race") == 1, "SQL applied once")
        try check(try env.kvGet("race") == "1", "KV applied once")
        try check(try keyRows(env).count == 1, "one key row")
        c.close()
    }

    static func failedCommitFreesKey(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("fk", "0")])
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run(key: "fail-once") { saga in
                try increment("fk")(saga)
                try env.arrangeCommitFailure(in: saga)
            }
        }
        guard case .commitFailed(let failed, _, _) = error else { throw ConformanceFailure(description: "expected commitFailed, got \(error)") }
        try check(c.outcome(ofKey: "fail-once") == .notCommitted, "the key is not committed: \(keyOutcome(c, "fail-once"))")
        try check(c.outcome(of: failed) == .notCommitted, "the saga is not committed: \(c.outcome(of: failed))")
        try check(try keyRows(env).isEmpty, "no key row")
        try check(try env.row("fk") == nil && env.kvGet("fk") == "0", "nothing of it in either store")
        let retried = try c.run(key: "fail-once") { saga -> SagaID in
            try increment("fk")(saga)
            return saga.id
        }
        try check(c.outcome(ofKey: "fail-once") == .committed(retried), "the retry commits")
        try check(try env.row("fk") == 1 && env.kvGet("fk") == "1", "applied once")
        c.close()
    }

    static func undecidedKeyIsUnknown(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("uk", "0")])
        // COMMIT's outcome is unknown for real, and the fencing insert cannot reach the
        // database (once).
        let noFence = StepTrigger(.fail, at: .resolve, phase: .run)
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(200), hooks: CombinedHooks([env.unknownCommitHooks(), noFence])))
        let error = try expectSagaError { try c.run(key: "doubt", increment("uk")) }
        guard case .inDoubt(let id, _) = error else { throw ConformanceFailure(description: "expected inDoubt, got \(error)") }
        try check(c.outcome(ofKey: "doubt") == .unknown(.inDoubt), "the key is unknown while in doubt: \(keyOutcome(c, "doubt"))")
        try check(c.outcome(of: id) == .unknown(.inDoubt), "the saga is unknown while in doubt: \(c.outcome(of: id))")
        if env.mode == .compensate { try check(try env.journal()[id]?.callerKey == Bytes("doubt".utf8), "the prepared record carries the key") }
        let (decider, report) = try recoverOrReopen(c, env)
        try check(decider.inDoubt.isEmpty, "decided: \(report)")
        let committed = try env.row("uk") == 1
        try check(try env.kvGet("uk") == (committed ? "1" : "0"), "both stores agree")
        let expected: SagaOutcome = committed ? .committed(id) : .notCommitted
        try check(decider.outcome(ofKey: "doubt") == expected, "the key's outcome matches the stores: \(keyOutcome(decider, "doubt")), SQL row \(committed)")
        try check(decider.outcome(of: id) == expected, "the saga's outcome matches the stores: \(decider.outcome(of: id))")
        // Run again with the key: refused if it committed, applied (once) if not.
        let again = Result { () throws(SagaError) in try decider.run(key: "doubt", increment("uk")) }
        if committed {
            guard case .failure(.alreadyCommitted(_, id)) = again else { throw ConformanceFailure(description: "expected alreadyCommitted, got \(again)") }
        } else {
            _ = try again.get()
        }
        try check(try env.row("uk") == 1 && env.kvGet("uk") == "1", "applied exactly once in the end")
        decider.close()
    }

    static func outcomeOutlivesMarker(_ env: any HarnessEnvironment) throws {
        // Long enough that the checks within it cannot be overtaken on a loaded machine.
        let retention = Duration.milliseconds(1500)
        let c = try env.coordinator(.init(gcThreshold: 1, outcomeRetention: retention))
        let committed = try c.run(key: "kept") { saga -> SagaID in
            try increment("ol")(saga)
            return saga.id
        }
        let failed = try expectSagaError {
            try c.run { saga in
                try increment("ol")(saga)
                try env.arrangeCommitFailure(in: saga)
            }
        }.saga!
        let thrown = try expectSagaError { try c.run { saga in try saga.kv.put("ol-b", "x"); throw ConformanceFailure(description: "the body's own") } }.saga!
        try c.collectGarbage()
        try c.collectGarbage()
        try check(try env.markers()[committed] == nil, "garbage collection deleted the committed marker")
        try check(try env.journal()[committed] == nil, "and its journal record")
        try check(c.outcome(of: committed) == .committed(committed), "outcome(of:) after GC: \(c.outcome(of: committed))")
        try check(c.outcome(of: failed) == .notCommitted, "a compensated saga: \(c.outcome(of: failed))")
        try check(c.outcome(of: thrown) == .notCommitted, "a saga whose body threw: \(c.outcome(of: thrown))")
        try check(c.outcome(ofKey: "kept") == .committed(committed), "the key's row is kept")
        try check(c.outcome(of: SagaID(thrown.rawValue + 1000)) == .unknown(.notIssued), "an id not issued yet")
        // Across a reopen, still within the retention.
        c.close()
        try env.reopen()
        let reopened = try env.coordinator(.init(gcThreshold: 1, outcomeRetention: retention))
        try check(reopened.outcome(of: committed) == .committed(committed), "after reopening: \(reopened.outcome(of: committed))")
        try check(reopened.outcome(of: failed) == .notCommitted, "after reopening, compensated: \(reopened.outcome(of: failed))")
        // Past the retention: the next collection prunes.
        Thread.sleep(forTimeInterval: 1.7)
        try reopened.run(increment("ol"))
        try reopened.collectGarbage()
        try check(reopened.outcome(of: committed) == .unknown(.expired), "expired: \(reopened.outcome(of: committed))")
        try check(reopened.outcome(of: failed) == .unknown(.expired), "expired: \(reopened.outcome(of: failed))")
        try check(try keyRows(env).isEmpty, "the key's row is pruned")
        try check(reopened.outcome(ofKey: "kept") == .notCommitted, "a key past the retention is forgotten")
        try reopened.run(key: "kept") { _ in }
        try check(try keyRows(env).count == 1, "and runs again")
        reopened.close()
    }

    static func badKeyIsRefused(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        var ran = false
        for (key, expected) in [("", SagaError.Misuse.emptyCallerKey),
                                (String(repeating: "é", count: 128), .callerKeyTooLarge(size: 256, limit: SagaCoordinator.maxCallerKeyBytes))] {
            let error = try expectSagaError { try c.run(key: key) { saga in ran = true; try increment("bad")(saga) } }
            guard case .misuse(let m) = error, m == expected else { throw ConformanceFailure(description: "expected misuse \(expected), got \(error)") }
            try check("\(error)".contains(key.isEmpty ? "empty" : "256 bytes"), "the error names the problem: \(error)")
            let lookup = Result { () throws(SagaError) in try c.outcome(ofKey: key) }
            guard case .failure(.misuse(expected)) = lookup else { throw ConformanceFailure(description: "outcome(ofKey:) refuses it too: \(lookup)") }
        }
        // The longest key is fine.
        try c.run(key: String(repeating: "k", count: SagaCoordinator.maxCallerKeyBytes)) { _ in }
        try check(!ran, "no body ran for a bad key")
        try check(try env.row("bad") == nil && env.kvGet("bad") == nil, "nothing written")
        try check(try keyRows(env).count == 1, "only the longest key has a row")
        c.close()
    }

    static func keySurvivesReopen(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        let id = try c.run(key: "durable") { saga -> SagaID in
            try increment("dr")(saga)
            return saga.id
        }
        c.close()
        try env.reopen()
        let reopened = try env.coordinator()
        try check(reopened.outcome(ofKey: "durable") == .committed(id), "committed after reopening")
        try check(reopened.outcome(of: id) == .committed(id), "by id too")
        let error = try expectSagaError { try reopened.run(key: "durable", increment("dr")) }
        guard case .alreadyCommitted(_, id) = error else { throw ConformanceFailure(description: "expected alreadyCommitted, got \(error)") }
        try check(try env.row("dr") == 1 && env.kvGet("dr") == "1", "applied once")
        reopened.close()
    }

    static func sqlOnlySagaKeepsOutcome(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator()
        // No KV key, no caller key: no journal record, only the marker; closed before any
        // garbage collection.
        let id = try c.run { saga -> SagaID in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('sq', 1)", [])
            return saga.id
        }
        try check(c.outcome(of: id) == .committed(id), "committed by its marker: \(c.outcome(of: id))")
        c.close()
        try env.reopen()
        // The open removes markers without a journal record, and collects garbage.
        let reopened = try env.coordinator()
        try reopened.collectGarbage()
        try check(try env.markers()[id] == nil, "its marker is gone")
        try check(reopened.outcome(of: id) == .committed(id), "still committed after the marker went: \(reopened.outcome(of: id))")
        reopened.close()
    }
}
