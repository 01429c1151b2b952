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

    struct FullDiskAtCommit: SagaHooks {
        let pathPrefix: String
        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            if step == .commit, phase == .run { SQLiteFaults.arm(.diskFull, persistent: true, pathPrefix: pathPrefix) }
            if step == .resolve { SQLiteFaults.disarm() }
        }
    }
}
