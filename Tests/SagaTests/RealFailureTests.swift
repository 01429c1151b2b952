import SagaFaultKit
import CFsyncFaults
import Foundation
import RocksDBBackend
import Saga
import SagaTestKit
import SQLiteBackend
import Testing

/// Failures made by real stores: no mock stands in for RocksDB or SQLite here. Faults are
/// injected around them (an fsync interposer, SQLite's VFS) and are process-global, so these
/// tests run one at a time.
@Suite("Real failures", .serialized)
struct RealFailureTests {
    /// RocksDB's WAL fsync fails (EIO) while writing the forward batch: nothing is committed
    /// on either side, and after reopening (RocksDB may replay the batch it could not sync)
    /// recovery undoes whatever landed.
    @Test func rocksDBSyncFailureCommitsNothing() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("k", "k0")])
        var c: SagaCoordinator? = try env.coordinator()
        saga_fault_fsync_arm(env.dir + "/kv/", 1, 1)
        let error = try expectSagaError {
            try c?.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('k', 1)", [])
                try saga.kv.put("k", "k1")
            }
        }
        saga_fault_fsync_disarm()
        #expect(saga_fault_fsync_failures() >= 1, "the fsync of RocksDB's WAL failed for real")
        guard case .kvWriteFailed(_, let underlying) = error else { Issue.record("expected kvWriteFailed, got \(error)"); return }
        #expect("\(underlying)".contains("IO error"), "RocksDB's own error: \(underlying)")
        #expect(try env.row("k") == nil, "SQL rolled back")
        #expect(try env.markers().isEmpty, "no marker")
        // The failed write may still be on disk: the coordinator refuses to go on until reopened.
        let stopped = try expectSagaError { try c?.run { saga in try saga.kv.put("other", "x") } }
        guard case .stopped = stopped else { Issue.record("expected stopped, got \(stopped)"); return }
        c = nil
        try env.reopen()
        c = try env.coordinator()
        #expect(try env.kvGet("k") == "k0", "after reopen and recovery the KV side is as before")
        #expect(try env.undecided().isEmpty, "nothing left undecided")
        // And the node goes on.
        try c?.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('k', 2)", [])
            try saga.kv.put("k", "k2")
        }
        #expect(try env.row("k") == 2 && env.kvGet("k") == "k2")
    }

    /// The documented way back from `stopped` (Operating a node, "Reopening after stopped"),
    /// step by step: 1. shut the coordinator down (or close it and let running sagas end); 2.
    /// close the KV store (and the SQL database object, if it is to be reopened too); 3. open
    /// the stores again; 4. open a coordinator on them: its recovery decides what was in
    /// flight, and `recoveryAtOpen` says what it decided. Each step out of order is refused.
    @Test func reopenAfterStoppedInTheDocumentedOrder() async throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("r", "r0")])
        let c = try env.coordinator()
        saga_fault_fsync_arm(env.dir + "/kv/", 1, 1)
        let error = try await expectSagaErrorAsync {
            try await c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('r', 1)", [])
                try saga.kv.put("r", "r1")
            }
        }
        saga_fault_fsync_disarm()
        guard case .kvWriteFailed = error else { Issue.record("expected kvWriteFailed, got \(error)"); return }
        let stopped = try await expectSagaErrorAsync { try await c.run { saga in try saga.kv.put("other", "x") } }
        guard case .stopped = stopped else { Issue.record("expected stopped, got \(stopped)"); return }
        // Out of order: a new coordinator on the same store object before the old one is closed.
        #expect { try env.coordinator() } throws: { ($0 as? SagaError).map { if case .misuse(.storeInUse) = $0 { true } else { false } } ?? false }
        // 1. Shut the stopped coordinator down: nothing is written (its store failed a write).
        await c.shutdown()
        // Out of order: a second RocksDB handle on the directory while the first is open.
        #expect(throws: (any Error).self) { try RocksDBStore(path: env.dir + "/kv") }
        // 2. and 3. Close the stores and open them again.
        try env.reopen()
        // 4. A new coordinator: recovery at open decides the saga the failed write left.
        let d = try env.coordinator()
        defer { d.close() }
        #expect(d.recoveryAtOpen.isClean, "\(d.recoveryAtOpen)")
        #expect(try env.kvGet("r") == "r0" && env.row("r") == nil, "the failed saga left nothing in either store")
        #expect(try env.undecided().isEmpty)
        try await d.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('r', 2)", [])
            try saga.kv.put("r", "r2")
        }
        #expect(try env.row("r") == 2 && env.kvGet("r") == "r2", "the node goes on")
    }

    /// SQLite's fsync fails during COMMIT (SQLITE_IOERR_FSYNC): the saga stays in doubt and the
    /// coordinator stops, without fencing on top of a file that failed an fsync. After closing and
    /// reopening both stores, recovery decides it by the marker and the stores agree.
    @Test func sqliteFsyncFailureAtCommitIsResolvedAfterReopening() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("s", "s0")])
        let noFence = StepTrigger(.fail, at: .resolve, phase: .run)
        var c: SagaCoordinator? = try env.coordinator(.init(hooks: CombinedHooks([FailSyncAtCommit(pathPrefix: env.sqlitePath), noFence])))
        let error = try expectSagaError {
            try c?.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('s', 1)", [])
                try saga.kv.put("s", "s1")
            }
        }
        SQLiteFaults.disarm()
        guard case .inDoubt(let id, let underlying) = error else { Issue.record("expected inDoubt, got \(error)"); return }
        #expect((underlying as? SQLiteError)?.extendedCode == 1034, "SQLITE_IOERR_FSYNC at COMMIT: \(underlying)")
        #expect(try env.journal()[id]?.state == .prepared)
        // An fsync failure is never continued past: nothing runs until the stores are reopened.
        let stopped = try expectSagaError { try c?.run { saga in try saga.kv.put("other", "x") } }
        guard case .stopped = stopped else { Issue.record("expected stopped, got \(stopped)"); return }
        c = nil
        try env.reopen()
        c = try env.coordinator()
        #expect(c?.inDoubt.isEmpty == true)
        let committed = try env.row("s") == 1
        #expect(try env.kvGet("s") == (committed ? "s1" : "s0"), "KV agrees with SQL (committed: \(committed))")
        #expect(try !env.undecided().contains(id), "decided")
    }

    /// The disk fills up while SQLite writes the COMMIT: the saga fails, KV is compensated.
    @Test func sqliteDiskFullAtCommitIsCompensated() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("f", "f0")])
        let c = try env.coordinator(.init(hooks: FullDiskAtCommit(pathPrefix: env.sqlitePath)))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('f', 1)", [])
                try saga.kv.put("f", "f1")
            }
        }
        SQLiteFaults.disarm()
        guard case .commitFailed(_, let underlying, let restored) = error else { Issue.record("expected commitFailed, got \(error)"); return }
        #expect((underlying as? SQLiteError)?.primaryCode == 13, "SQLITE_FULL: \(underlying)")
        #expect(restored == 1)
        #expect(try env.row("f") == nil && env.kvGet("f") == "f0", "both stores as before")
    }

    /// An unknown outcome on SQLite while another saga is queued for the database: the failed
    /// connection is closed, the queued saga gets the database and waits for one of the first
    /// saga's keys. The fence must not queue behind it (it used to: both waited until a timeout,
    /// and the first saga was left in doubt with the database reachable).
    @Test func aFenceKeepsTheSagasTurnAtTheDatabase() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("g", "g0")])
        let second = SecondSagaAtCommit(pathPrefix: env.sqlitePath)
        let c = try env.coordinator(.init(lockTimeout: .seconds(5), hooks: second))
        second.coordinator = c
        let start = ContinuousClock.now
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('g', 1)", [])
                try saga.kv.put("g", "g1")
            }
        }
        let elapsed = ContinuousClock.now - start
        SQLiteFaults.disarm()
        second.done.wait()
        guard case .commitFailed(_, let underlying, 1) = error else { Issue.record("expected commitFailed with one key restored, got \(error)"); return }
        #expect((underlying as? SQLiteError)?.primaryCode == 13, "SQLITE_FULL at COMMIT: \(underlying)")
        #expect(elapsed < .seconds(3), "decided at once, not after a timeout: \(elapsed)")
        #expect(second.result == "ok", "the queued saga then committed: \(second.result ?? "nil")")
        #expect(try env.kvGet("g") == "g2" && env.row("g") == 2)
        #expect(c.inDoubt.isEmpty)
    }

    /// At the first saga's COMMIT: starts a second saga (it queues for the database, then
    /// wants key `g`), then makes the COMMIT fail with SQLITE_FULL (SQLite ends the
    /// transaction itself: unknown outcome, fenced).
    final class SecondSagaAtCommit: SagaHooks, @unchecked Sendable {
        let pathPrefix: String
        let done = DispatchSemaphore(value: 0)
        private let lock = NSLock()
        private var started = false
        private var outcome: String?
        nonisolated(unsafe) weak var coordinator: SagaCoordinator?
        init(pathPrefix: String) { self.pathPrefix = pathPrefix }
        var result: String? { lock.withLock { outcome } }

        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            if step == .resolve {
                SQLiteFaults.disarm()
                // The writer queued behind the failed COMMIT gets every chance to take the
                // database before the fence (it did, before the fence kept the saga's turn).
                Thread.sleep(forTimeInterval: 0.3)
            }
            guard step == .commit, let c = coordinator, lock.withLock({ () -> Bool in defer { started = true }; return !started }) else { return }
            Thread.detachNewThread { [self] in
                let r: String
                do {
                    try c.run { saga in
                        _ = try saga.kv.get("g")
                        try saga.kv.put("g", "g2")
                        try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('g', 2)", [])
                    }
                    r = "ok"
                } catch {
                    r = "\(error)"
                }
                lock.withLock { outcome = r }
                done.signal()
            }
            Thread.sleep(forTimeInterval: 0.3)  // the second saga is queued for the database
            SQLiteFaults.arm(.diskFull, persistent: true, pathPrefix: pathPrefix)
        }
    }

    /// The compensating batch fails to sync: the store may hold part of it, so the coordinator
    /// stops (it went on before), and recovery after reopening finishes the compensation.
    @Test func aFailedCompensationWriteStopsTheCoordinator() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("cw", "c0")])
        var c: SagaCoordinator? = try env.coordinator(.init(hooks: FailKVSyncAt(step: .compensate, kvDir: env.dir + "/kv/")))
        let error = try expectSagaError {
            try c?.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('cw', 1)", [])
                try saga.kv.put("cw", "c1")
                try env.arrangeCommitFailure(in: saga)
            }
        }
        saga_fault_fsync_disarm()
        guard case .compensationFailedAfterCommit(_, _, .compensationFailed) = error else { Issue.record("expected compensationFailedAfterCommit(compensationFailed), got \(error)"); return }
        let next = try expectSagaError { try c?.run { saga in try saga.kv.put("other", "x") } }
        guard case .stopped(let reason) = next else { Issue.record("expected stopped, got \(next)"); return }
        #expect(reason.contains("compensating write"), "\(reason)")
        c = nil
        try env.reopen()
        c = try env.coordinator()
        #expect(try env.kvGet("cw") == "c0" && env.row("cw") == nil, "recovery finished the compensation")
        #expect(c?.inDoubt.isEmpty == true)
    }

    /// Deleting finished journal records fails to sync: the coordinator stops, as for any
    /// failed KV write.
    @Test func aFailedGCJournalWriteStopsTheCoordinator() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        var c: SagaCoordinator? = try env.coordinator(.init(hooks: FailKVSyncAt(step: .gcJournal, kvDir: env.dir + "/kv/"), gcThreshold: 1))
        try c?.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('gc', 1)", [])
            try saga.kv.put("gc", "g1")
        }
        saga_fault_fsync_disarm()
        let next = try expectSagaError { try c?.run { saga in try saga.kv.put("other", "x") } }
        guard case .stopped(let reason) = next else { Issue.record("expected stopped, got \(next)"); return }
        #expect(reason.contains("journal records"), "\(reason)")
        c = nil
        try env.reopen()
        c = try env.coordinator()
        #expect(try env.kvGet("gc") == "g1" && env.row("gc") == 1, "the committed saga stays")
        #expect(try env.undecided().isEmpty)
    }

    /// Arms the fsync interposer for the RocksDB directory when a step is reached (once).
    final class FailKVSyncAt: SagaHooks, @unchecked Sendable {
        let step: SagaStep
        let kvDir: String
        private let lock = NSLock()
        private var fired = false
        init(step: SagaStep, kvDir: String) { self.step = step; self.kvDir = kvDir }
        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            guard step == self.step, lock.withLock({ () -> Bool in defer { fired = true }; return !fired }) else { return }
            saga_fault_fsync_arm(kvDir, 1, 1)
        }
    }

    struct FullDiskAtCommit: SagaHooks {
        let pathPrefix: String
        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            if step == .commit, phase == .run { SQLiteFaults.arm(.diskFull, persistent: true, pathPrefix: pathPrefix) }
            if step == .resolve { SQLiteFaults.disarm() }
        }
    }
}
