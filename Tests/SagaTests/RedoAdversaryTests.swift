import Foundation
import MySQLBackend
@testable import Saga
import SagaFaultKit
import SagaTestKit
import Testing

/// An outside review of redo mode (commit 4fb6841): attacks on "a saga is committed iff its SQL
/// transaction committed; after any crash, failed or unknown COMMIT and power loss of the KV
/// store, KV holds exactly the after-images of committed sagas in commit order", on real
/// stores. Tests named `attackFailed...` are attacks that did not break it (kept as coverage);
/// the others fail on 4fb6841 and show the broken outcome.
@Suite("Redo adversary", .serialized)
struct RedoAdversaryTests {
    // MARK: - Helpers

    static func redo(_ env: any HarnessEnvironment) -> ModeEnvironment { ModeEnvironment(env, mode: .redo) }

    static func redoRows(_ env: any HarnessEnvironment) throws -> [(saga: Int64, seq: Int64)] {
        let instance = Int64(bitPattern: try SagaCoordinator.instance(in: env.kv).rawValue)
        return try env.sqlQuery("SELECT saga_id, seq FROM saga_markers WHERE instance = ? AND seq IS NOT NULL ORDER BY seq", [.integer(instance)])
            .map { ($0[0].int64 ?? -1, $0[1].int64 ?? -1) }
    }

    static func durableWatermark(_ env: any HarnessEnvironment) throws -> UInt64 {
        try RedoLog.durableWatermark(in: env.kv)
    }

    // MARK: - Many threads, same keys, checkpoints all along, then a crash and a power loss

    /// Counters incremented by many threads (a read-modify-write of a KV key, and an SQL row
    /// carrying the new value), every fifth saga failing at COMMIT, a checkpoint after every
    /// saga and `collectGarbage()` from another thread all along. Then the coordinator is
    /// dropped (no close: no final checkpoint), every key a row above the durable watermark
    /// names is overwritten (what a power loss may do to unsynced batches), and the stores
    /// reopened: each counter must equal the number of committed increments, and the SQL rows
    /// of one counter must hold 1...n exactly once each (no lost update, no replay out of order).
    static func counters(_ base: any HarnessEnvironment, threads: Int, perThread: Int, failing: Bool) throws {
        let env = redo(base)
        defer { env.destroy() }
        let keys = 4
        // The coordinator lives only in this closure: leaving it is the crash (no close, no
        // last checkpoint).
        try { () throws in
        let coordinator = try env.coordinator(.init(lockTimeout: .seconds(20), checkpointEvery: 1))
        let stop = TestShared(false)
        let gc = Thread {
            while !stop.value { _ = try? coordinator.collectGarbage(); usleep(200) }
        }
        gc.start()
        let errors = TestShared(0)
        let group = DispatchGroup()
        for t in 0..<threads {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                for i in 0..<perThread {
                    let key = "ctr\((t + i) % keys)"
                    let fail = failing && (t * perThread + i) % 5 == 4
                    do {
                        try coordinator.run { saga in
                            let n = Int(String(decoding: try saga.kv.get(key) ?? Array("0".utf8), as: UTF8.self)) ?? -1000
                            try saga.kv.put(key, "\(n + 1)")
                            try saga.kv.put("own\(t)-\(i)", "x")
                            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("\(key):\(UUID().uuidString)"), .integer(Int64(n + 1))])
                            if fail { try env.arrangeCommitFailure(in: saga) }
                        }
                    } catch {
                        if !fail { errors.add(1); print("counters: unexpected \(error)") }
                    }
                }
            }
        }
        group.wait()
        stop.value = true
        while !gc.isFinished { usleep(1000) }
        #expect(errors.value == 0, "sagas that should have committed failed")
        #expect(coordinator.inDoubt.isEmpty)
        }()
        let watermark = try durableWatermark(env)
        let instance = Int64(bitPattern: try SagaCoordinator.instance(in: env.kv).rawValue)
        var lost: Set<String> = []
        for row in try env.sqlQuery("SELECT redo FROM saga_markers WHERE instance = ? AND seq > ?", [.integer(instance), .integer(Int64(watermark))]) {
            guard case .blob(let bytes) = row[0] else { continue }
            for e in try JournalRecord(decoding: bytes).entries { lost.insert(String(decoding: e.key, as: UTF8.self)) }
        }
        try env.kvSet(lost.map { ($0, "lost") })
        try env.reopen()
        let reopened = try env.coordinator()
        defer { reopened.close() }
        for k in 0..<keys {
            let values = try env.sqlQuery("SELECT v FROM saga_test WHERE k LIKE ?", [.text("ctr\(k):%")]).compactMap { $0[0].int64 }.sorted()
            #expect(values == (0..<values.count).map { Int64($0 + 1) }, "ctr\(k): SQL holds each value once, no lost update: \(values.prefix(20))...")
            #expect(try env.kvGet("ctr\(k)") == (values.isEmpty ? nil : "\(values.count)"), "ctr\(k): KV holds the last committed value (\(values.count))")
        }
        for t in 0..<threads {
            for i in 0..<perThread {
                let fail = failing && (t * perThread + i) % 5 == 4
                #expect(try env.kvGet("own\(t)-\(i)") == (fail ? nil : "x"), "own\(t)-\(i)")
            }
        }
    }

    /// Attack that failed to break it (SQLite): see ``counters(_:threads:perThread:failing:)``.
    @Test func attackFailedCountersUnderConcurrentCheckpointsSQLite() throws {
        try Self.counters(try SQLiteHarness().makeEnvironment(), threads: 6, perThread: 40, failing: true)
    }

    /// Attack that failed to break it (MariaDB, real concurrency: sagas on disjoint keys
    /// overlap, failed ones are killed connections resolved by fencing).
    @Test func attackFailedCountersUnderConcurrentCheckpointsMariaDB() throws {
        try Self.counters(try MySQLHarness().makeEnvironment(), threads: 6, perThread: 40, failing: true)
    }

    // MARK: - A saga with no KV writes

    /// Attack that failed to break it: a saga that writes SQL only still gets a redo row
    /// (with no entries), holds no watermark back and is collected by the checkpoint.
    @Test func attackFailedSagaWithoutKVWrites() throws {
        let env = Self.redo(try SQLiteHarness().makeEnvironment())
        defer { env.destroy() }
        let c = try env.coordinator(.init(checkpointEvery: 1_000_000, checkpointInterval: .seconds(3600)))
        try c.run { saga in try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('n', 1)", []) }
        try c.run { saga in _ = try saga.kv.get("n") }
        try c.run { saga in try saga.kv.put("n", "1") }
        #expect(try Self.redoRows(env).count == 3)
        try c.collectGarbage()
        #expect(try Self.redoRows(env).isEmpty)
        #expect(try Self.durableWatermark(env) == 3)
        c.close()
    }

    // MARK: - Late COMMITs and in-doubt sagas on MariaDB

    static func mysqlRedo(readTimeout: Duration = .seconds(120)) throws -> (MySQLEnvironment, ModeEnvironment) {
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(2)
        configuration.readTimeout = readTimeout
        let base = try MySQLEnvironment(serverURL: try SharedMariaDB.url(), configuration: configuration)
        return (base, ModeEnvironment(base, mode: .redo))
    }

    /// Fires `action` at the first COMMIT of a saga only.
    final class Once: SagaHooks, @unchecked Sendable {
        let step: SagaStep
        let action: @Sendable () -> Void
        let done = TestShared(false)
        init(_ step: SagaStep, _ action: @escaping @Sendable () -> Void) { self.step = step; self.action = action }
        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            if step == self.step, phase == .run, !done.value { done.value = true; action() }
        }
    }

    /// Attack that failed to break it: the saga's `INSERT redo row; COMMIT` packet is held in
    /// a network partition; the client times out, the fence cannot connect, the saga is in
    /// doubt. The coordinator is closed, the partition heals (the packet still held), the
    /// stores are reopened (the claim moves) and a new saga writes the same key. Then the held
    /// packet reaches the server, late: the claim check in the row insert refuses it, so the
    /// old saga never commits and the new value stays.
    @Test func attackFailedLateCommitAfterReopenIsRefusedByTheClaim() throws {
        let (base, env) = try Self.mysqlRedo(readTimeout: .seconds(2))
        defer { base.proxy.release(); env.destroy() }
        try env.kvSet([("late", "l0")])
        let c = try env.coordinator(.init(hooks: Once(.commit) { base.proxy.arm(.hold) }))
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('late', 1)", [])
                try saga.kv.put("late", "l1")
            }
        }
        guard case .failure(.inDoubt) = result else { Issue.record("expected inDoubt, got \(result)"); return }
        #expect(try env.kvGet("late") == "l0")
        c.close()
        base.proxy.heal()
        try env.reopen()
        let c2 = try env.coordinator()
        try c2.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('late2', 2)", [])
            try saga.kv.put("late", "l2")
        }
        base.proxy.release()
        for _ in 0..<50 where base.proxy.heldRepliesArrived == 0 { usleep(100_000) }
        usleep(300_000)
        #expect(try env.row("late") == nil, "the late COMMIT of the previous open must not commit")
        #expect(try env.markers().values.filter { $0 == "committed" }.count <= 1)
        c2.close()
        try env.reopen()
        let c3 = try env.coordinator()
        #expect(try env.kvGet("late") == "l2")
        c3.close()
    }

    /// Attack that failed to break it: the same held packet, but the partition heals while the
    /// first coordinator still runs; `recover()` ends the held session, fences (aborted), the
    /// aborted row is garbage-collected, and only then the packet arrives: its session is gone.
    @Test func attackFailedLateCommitAfterRecoverAndGC() throws {
        let (base, env) = try Self.mysqlRedo(readTimeout: .seconds(2))
        defer { base.proxy.release(); env.destroy() }
        try env.kvSet([("late", "l0")])
        let c = try env.coordinator(.init(hooks: Once(.commit) { base.proxy.arm(.hold) }))
        defer { c.close() }
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('late', 1)", [])
                try saga.kv.put("late", "l1")
            }
        }
        guard case .failure(.inDoubt) = result else { Issue.record("expected inDoubt, got \(result)"); return }
        base.proxy.heal()
        let report = try c.recover()
        #expect(c.inDoubt.isEmpty, "\(report)")
        try c.collectGarbage()
        let left = try env.markers()
        #expect(left.isEmpty, "the aborted row is collected: \(left)")
        base.proxy.release()
        for _ in 0..<20 where base.proxy.heldRepliesArrived == 0 { usleep(100_000) }
        usleep(300_000)
        #expect(try env.row("late") == nil, "the late COMMIT must not land after the aborted row is gone")
        try c.run { saga in try saga.kv.put("late", "l2") }
        #expect(try env.kvGet("late") == "l2")
    }

    /// Attack that failed to break it: a COMMIT whose reply is lost (committed), and a fence
    /// that cannot run (a hook refuses it): in doubt, key locked, KV untouched. `recover()` at
    /// runtime applies it, the watermark moves past it, its row goes; and the same after a
    /// close and reopen instead (replay).
    @Test func attackFailedInDoubtCommittedRedoSagaIsAppliedByRecoverOrReopen() throws {
        for viaReopen in [false, true] {
            let (base, env) = try Self.mysqlRedo()
            defer { env.destroy() }
            try env.kvSet([("d", "d0")])
            let c = try env.coordinator(.init(hooks: CombinedHooks([LoseCommitReply(proxy: base.proxy), StepTrigger(.fail, at: .resolve, phase: .run)]),
                                              checkpointEvery: 1))
            let result = Result { () throws(SagaError) in
                try c.run { saga in
                    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('d', 1)", [])
                    try saga.kv.put("d", "d1")
                }
            }
            guard case .failure(.inDoubt) = result else { Issue.record("expected inDoubt, got \(result)"); return }
            #expect(try env.row("d") == 1, "the lost reply's COMMIT did commit")
            #expect(try env.kvGet("d") == "d0", "not applied while in doubt")
            // Another saga meanwhile (disjoint key): applied, but the watermark stays below
            // the one in doubt.
            try c.run { saga in try saga.kv.put("e", "e1") }
            #expect(try Self.durableWatermark(env) == 0, "the saga in doubt holds the watermark back")
            if viaReopen {
                c.close()
                try env.reopen()
                let c2 = try env.coordinator()
                #expect(try env.kvGet("d") == "d1", "replayed at open")
                #expect(try Self.redoRows(env).isEmpty)
                c2.close()
            } else {
                let report = try c.recover()
                #expect(report.committed.count == 1, "\(report)")
                #expect(try env.kvGet("d") == "d1", "applied by recover()")
                #expect(c.inDoubt.isEmpty)
                try c.collectGarbage()
                #expect(try Self.redoRows(env).isEmpty)
                #expect(try Self.durableWatermark(env) == 2)
                try c.run { saga in try saga.kv.put("d", "d2") }
                c.close()
                try env.reopen()
                let c2 = try env.coordinator()
                #expect(try env.kvGet("d") == "d2")
                c2.close()
            }
        }
    }

    // MARK: - Switching modes with leftovers

    /// Attack that failed to break it (SQLite): redo mode commits a saga whose KV apply fails
    /// (stopped, row left); the next open is in compensate mode (it replays the row), runs
    /// compensate sagas on the same key, crashes with one prepared and uncommitted; the next
    /// open is in redo mode again: the prepared one is undone, the replayed row is not
    /// replayed a second time over the compensate-mode value.
    @Test func attackFailedModeSwitchWithLeftoversOfEach() throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        try env.kvSet([("m", "m0")])
        var c: SagaCoordinator? = try SagaCoordinator(kv: env.kv, sql: env.sql, configuration: .init(hooks: StepTrigger(.fail, at: .committed, phase: .run), mode: .redo))
        try c?.run { saga in try saga.kv.put("m", "redo1"); try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('m1', 1)", []) }
        #expect(try env.kvGet("m") == "m0")
        c = nil
        try env.reopen()
        c = try SagaCoordinator(kv: env.kv, sql: env.sql, configuration: .init(mode: .compensate))
        #expect(try env.kvGet("m") == "redo1", "compensate mode replays redo leftovers")
        try c?.run { saga in try saga.kv.put("m", "comp2") }
        // A compensate saga that crashes after prepare, before COMMIT (the hook fails at the
        // marker: compensated at once), and one left prepared by a failing compensation.
        c = nil
        try env.reopen()
        c = try SagaCoordinator(kv: env.kv, sql: env.sql, configuration: .init(hooks: StepTrigger(.fail, at: .compensate, phase: .run), mode: .compensate))
        _ = try? c?.run { saga in try saga.kv.put("m", "comp3-uncommitted"); try env.arrangeCommitFailure(in: saga) }
        #expect(try env.kvGet("m") == "comp3-uncommitted", "left prepared: compensation refused by the hook")
        c = nil
        try env.reopen()
        c = try SagaCoordinator(kv: env.kv, sql: env.sql, configuration: .init(mode: .redo))
        #expect(try env.kvGet("m") == "comp2", "the uncommitted compensate saga is undone, the old redo row not replayed again")
        try c?.run { saga in try saga.kv.put("m", "redo4") }
        c = nil
        try env.reopen()
        c = try SagaCoordinator(kv: env.kv, sql: env.sql, configuration: .init(mode: .redo))
        #expect(try env.kvGet("m") == "redo4")
        c?.close()
    }

    // MARK: - A huge saga on MariaDB

    /// A saga with one 9 MB KV value, far under `maxRecordSize` (1 GiB by default): compensate
    /// mode commits it (the value goes to RocksDB, the marker row is a few bytes). Redo mode
    /// carries the after-images in the marker row, inlined as a hex literal into the
    /// `INSERT ...; COMMIT` text query: 18 MB of text, over MariaDB's default
    /// `max_allowed_packet` (16 MB). Seen on 4fb6841: `commitFailed` with MySQL error 1153
    /// ("Got a packet bigger than 'max_allowed_packet'"), whose description embeds the whole
    /// statement: an error of 18,874,870 characters (also logged). Redo mode's real limit on
    /// MariaDB is about max_allowed_packet / 2, not maxRecordSize. Expected: committed as in
    /// compensate mode, or refused up front with `misuse(.sagaTooLarge)` naming the limit,
    /// nothing written.
    @Test func hugeSagaOnMariaDBCommitsOrIsRefusedClearly() throws {
        // 9 MB commits in redo mode too: the after-images go bound, in binary (as hex in the
        // statement's text they took 18 MB, over max_allowed_packet's 16 MB, and the error
        // carried all 18.9 million characters of the statement).
        let value = [UInt8](repeating: 0x61, count: 9 << 20)
        let env = Self.redo(try MySQLHarness().makeEnvironment())
        defer { env.destroy() }
        let c = try env.coordinator()
        defer { c.close() }
        try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('big', 1)", [])
            try saga.kv.put(Array("big".utf8), value)
        }
        #expect(try env.kv.get(Array("big".utf8))?.count == value.count)
        #expect(try env.row("big") == 1)
        // Over max_allowed_packet: refused before COMMIT, naming the limit, nothing written.
        // Two values of 9 MB (each under the 16 MB value limit), 18 MB together.
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('bigger', 1)", [])
                try saga.kv.put(Array("bigger".utf8), value)
                try saga.kv.put(Array("bigger2".utf8), value)
            }
        }
        guard case .misuse(.sagaTooLarge(let size, let limit)) = error else {
            Issue.record("expected sagaTooLarge, got \("\(error)".prefix(300))")
            return
        }
        #expect(size > 18 << 20 && limit < 16 << 20, "size \(size), limit \(limit)")
        #expect("\(error)".count < 1000, "a short message: \("\(error)".count) characters")
        #expect(try env.row("bigger") == nil && env.kv.get(Array("bigger".utf8)) == nil, "nothing written")
    }
}
