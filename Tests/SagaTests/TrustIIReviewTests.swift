import Foundation
import MySQLBackend
import RocksDBBackend
@testable import Saga
import SagaFaultKit
import SagaTestKit
import SQLiteBackend
import Testing

/// Findings of an adversarial review of the issue-10 changes, each failing on a80e274.
@Suite("Trust II: review of the fixes", .serialized)
struct TrustIIReviewTests {
    /// Two journals written before instance ids (each has an id ceiling, no m:instance) on one
    /// SQL database: both are instance 0. The second to open is refused before it reads or
    /// deletes a marker row (on a80e274 it deleted A's committed marker as an orphan, and A's
    /// restart then undid a committed saga: KV a = nil, SQL row a = 1).
    @Test(arguments: ["sqlite", "mariadb"])
    func twoLegacyJournalsShareInstanceZero(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let statusType = backend == "sqlite" ? "TEXT" : "ENUM('committed', 'aborted')"
        _ = try env.sqlExecute("DROP TABLE saga_markers")
        _ = try env.sqlExecute("CREATE TABLE saga_markers (saga_id BIGINT NOT NULL PRIMARY KEY, status \(statusType) NOT NULL)")
        func legacyStore(_ tag: String) throws -> (String, RocksDBStore) {
            let dir = try SQLiteEnvironment.makeTempDir(tag)
            let kv = try RocksDBStore(path: dir + "/kv")
            var b = KVWriteBatch()
            b.put(IDLease.ceilingKey, IDLease.encode(1), in: .journal)   // an old node that had opened once
            try kv.write(b, sync: true)
            return (dir, kv)
        }
        let (dirA, kvA0) = try legacyStore("legacyA")
        var kvA = kvA0
        let (dirB, kvB) = try legacyStore("legacyB")
        defer { kvA.close(); kvB.close(); try? FileManager.default.removeItem(atPath: dirA); try? FileManager.default.removeItem(atPath: dirB) }
        let sqlB: any SQLDatabase = backend == "sqlite" ? try SQLiteDatabase(path: (env as! SQLiteEnvironment).sqlitePath) : try MySQLDatabase(url: (env as! MySQLEnvironment).directURL)

        var a: SagaCoordinator? = try SagaCoordinator(kv: kvA, sql: env.sql)
        let idA = try a!.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            try saga.kv.put("a", "1")
            return saga.id
        }
        print("A: \(a!.instance) committed \(idA)")
        // While A runs, B is refused by A's hold on the instance.
        let whileRunning = try expectSagaError { try SagaCoordinator(kv: kvB, sql: sqlB) }
        guard case .misuse(.instanceInUse(.legacy)) = whileRunning else {
            Issue.record("expected B to be refused with instanceInUse while A runs, got \(whileRunning)"); return
        }
        // A stops; B is refused all the same, by the claim.
        a = nil
        let refusal = try expectSagaError { try SagaCoordinator(kv: kvB, sql: sqlB) }
        guard case .misuse(.instanceClaimedByAnotherJournal(.legacy)) = refusal else {
            Issue.record("expected B to be refused with instanceClaimedByAnotherJournal, got \(refusal)"); return
        }
        #expect("\(refusal)".contains("two journals share one instance id"), "\(refusal)")
        let markers = try env.sqlQuery("SELECT instance, saga_id, status FROM saga_markers").map { "\($0.values)" }
        #expect(markers.count == 1, "A's marker is untouched: \(markers)")
        // A restarts (process restart).
        a = nil
        kvA.close()
        kvA = try RocksDBStore(path: dirA + "/kv")
        a = try SagaCoordinator(kv: kvA, sql: env.sql)
        let kvValue = try kvA.get(Bytes("a".utf8)).map { String(decoding: $0, as: UTF8.self) }
        print("after A's restart: SQL row a = \(String(describing: try env.row("a"))), KV a = \(kvValue ?? "nil")")
        #expect(kvValue == "1", "A's saga \(idA) was reported committed and its SQL row is there")
    }

    /// A node's KV store copied (a snapshot to bootstrap another node) and opened on the same
    /// database: the copy has the same instance and claim. Whichever opens second after the
    /// other has opened is refused, so the two never take turns deleting each other's markers.
    @Test(arguments: ["sqlite", "mariadb"])
    func aCopiedKVStoreAndItsOriginalNeverShareTheInstance(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        var a: SagaCoordinator? = try env.coordinator()
        try a?.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            try saga.kv.put("a", "1")
        }
        a = nil
        let source = (env as? SQLiteEnvironment)?.dir ?? (env as! MySQLEnvironment).dir
        try env.reopen()  // flushes nothing new; the copy is taken with the store closed below
        let copyDir = try SQLiteEnvironment.makeTempDir("saga-copy")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        (env.kv as? RocksDBStore)?.close()
        try FileManager.default.copyItem(atPath: source + "/kv", toPath: copyDir + "/kv")
        try env.reopen()
        let copy = try RocksDBStore(path: copyDir + "/kv")
        defer { copy.close() }
        // The copy opens first (a new node bootstrapped from the snapshot): it takes the claim.
        let sqlCopy: any SQLDatabase = backend == "sqlite" ? try SQLiteDatabase(path: (env as! SQLiteEnvironment).sqlitePath) : try MySQLDatabase(url: (env as! MySQLEnvironment).directURL)
        let c = try SagaCoordinator(kv: copy, sql: sqlCopy)
        c.close()
        // The original restarts: refused, nothing of the database touched.
        let refusal = try expectSagaError { try env.coordinator() }
        guard case .misuse(.instanceClaimedByAnotherJournal) = refusal else { Issue.record("expected instanceClaimedByAnotherJournal, got \(refusal)"); return }
        #expect(try env.kvGet("a") == "1" && env.row("a") == 1)
    }
}

/// Fails COMMIT (before it is sent) and the compensation of saga 1 in the run phase only.
private struct FailCommitAndUndoOfFirst: SagaHooks {
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard phase == .run, saga == SagaID(1) else { return }
        if step == .commit || step == .compensate { throw InjectedFault(step: step, phase: phase) }
    }
}

extension TrustIIReviewTests {
    /// A saga whose COMMIT failed (proved) gives its connection back to the pool; if its
    /// compensation then stops, it stays in doubt with that connection's session in its record.
    /// recover() later KILLs that session: by then it is another saga's live connection.
    @Test func recoveryKillsAPooledConnectionInUse() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let sql = try MySQLDatabase(url: env.directURL)
        let c = try SagaCoordinator(kv: env.kv, sql: sql, configuration: .init(hooks: FailCommitAndUndoOfFirst(), poolSize: 1))
        var firstConn: Int64 = 0
        do {
            try c.run { saga in
                firstConn = try saga.sql.query("SELECT CONNECTION_ID()", [])[0][0].int64!
                _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('one', 1)", [])
                try saga.kv.put("one", "1")
            }
        } catch { print("saga 1: \(error)") }
        print("in doubt: \(c.inDoubt)")
        do {
            try c.run { saga in
                let mine = try saga.sql.query("SELECT CONNECTION_ID()", [])[0][0].int64!
                print("saga 2 runs on connection \(mine) (saga 1 ran on \(firstConn))")
                _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('two', 2)", [])
                let report = try c.recover()   // e.g. an operator's periodic recover(), from any thread
                print("recover(): \(report)")
                #expect(report.compensated == [SagaID(1)])
                _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('two-b', 2)", [])
                try saga.kv.put("two", "2")
            }
            print("saga 2 committed")
        } catch {
            print("saga 2 failed: \(error)")
            Issue.record("saga 2 was killed by recovery: \(error)")
        }
    }
}

extension TrustIIReviewTests {
    /// Another process holds SQLite's write lock. A saga's BEGIN on a pooled connection waits
    /// the busy timeout and fails; the coordinator closes that connection and tries the next
    /// pooled one, waiting again: the wait is (pooled connections + 1) x busyTimeout, and the
    /// pool is emptied.
    @Test func sqliteBusyBeginIsRetriedOnEveryPooledConnection() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        var config = SQLiteDatabase.Configuration()
        config.busyTimeout = .milliseconds(300)
        let sql = try SQLiteDatabase(path: env.sqlitePath, configuration: config)
        let c = try SagaCoordinator(kv: env.kv, sql: sql, configuration: .init(poolSize: 8))
        // Fill the pool: 8 sagas at once, each on a connection of its own.
        DispatchQueue.concurrentPerform(iterations: 8) { i in
            _ = try? c.run { saga in
                _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text("p\(i)")])
                Thread.sleep(forTimeInterval: 0.05)
            }
        }
        // Another process's writer (a connection of another database object: its own gate).
        let other = try SQLiteDatabase(path: env.sqlitePath).openConnection()
        try other.execute("BEGIN IMMEDIATE", [])
        let start = ContinuousClock.now
        do {
            try c.run { saga in _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('x', 1)", []) }
        } catch { print("saga: \(error)") }
        let waited = ContinuousClock.now - start
        try other.execute("ROLLBACK", [])
        other.close()
        print("busyTimeout 300 ms; the saga waited \(waited)")
        #expect(waited < .milliseconds(600), "busyTimeout 300 ms, waited \(waited): BEGIN was retried on another pooled connection")
    }
}

extension TrustIIReviewTests {
    @Test(arguments: ["sqlite", "mariadb"])
    func concurrentMigrationOfAnOldTable(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let statusType = backend == "sqlite" ? "TEXT" : "ENUM('committed', 'aborted')"
        var failures: [String] = []
        for round in 0..<20 {
            _ = try env.sqlExecute("DROP TABLE saga_markers")
            _ = try env.sqlExecute("CREATE TABLE saga_markers (saga_id BIGINT NOT NULL PRIMARY KEY, status \(statusType) NOT NULL)")
            _ = try env.sqlExecute("INSERT INTO saga_markers (saga_id, status) VALUES (5, 'committed'), (3, 'aborted')")
            let dbs: [any SQLDatabase] = try (0..<3).map { _ in
                backend == "sqlite" ? try SQLiteDatabase(path: (env as! SQLiteEnvironment).sqlitePath) as any SQLDatabase : try MySQLDatabase(url: (env as! MySQLEnvironment).directURL) as any SQLDatabase
            }
            let errors = Locked<[String]>([])
            DispatchQueue.concurrentPerform(iterations: 3) { i in
                do {
                    let conn = try dbs[i].connect()
                    defer { conn.close() }
                    try conn.ensureMarkerTable()
                } catch { errors.withLock { $0.append("round \(round) opener \(i): \(error)") } }
            }
            failures += errors.withLock { $0 }
            let rows = try env.sqlQuery("SELECT instance, saga_id, status FROM saga_markers ORDER BY saga_id").map { "\($0.values)" }
            if rows.count != 2 { failures.append("round \(round): rows \(rows)") }
        }
        for f in failures.prefix(5) { print(f) }
        #expect(failures.isEmpty, "\(failures.count) failures")
    }
}

extension TrustIIReviewTests {
    /// A user-level lock taken by a plain SELECT in a saga body survives COMMIT and goes back
    /// to the pool with the connection.
    @Test func getLockInBodyLeaksIntoThePool() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let c = try SagaCoordinator(kv: env.kv, sql: try MySQLDatabase(url: env.directURL))
        let conn = try c.run { saga in
            _ = try saga.sql.query("SELECT GET_LOCK('ha_review', 0)", [])
            try saga.kv.put("g", "1")
            return try saga.sql.query("SELECT CONNECTION_ID()", [])[0][0].int64!
        }
        let holder = try env.sqlQuery("SELECT IS_USED_LOCK('ha_review')").first?[0].int64
        print("saga ran on \(conn); after it committed, lock 'ha_review' is held by \(String(describing: holder))")
        #expect(holder == nil)
        c.close()
    }
}

// MARK: - Second review: the claim's crash safety, hot copies, close()

/// A KV store that fails one chosen synced journal write of the instance record (the n-th).
private final class FailNthInstanceWrite: KVStore, @unchecked Sendable {
    let base: any KVStore
    let failAt: Int
    private let count = Locked(0)
    init(_ base: any KVStore, failAt: Int) { self.base = base; self.failAt = failAt }
    struct Refused: Error {}
    func multiGet(_ keys: [Bytes]) throws -> [Bytes?] { try base.multiGet(keys) }
    func write(_ batch: KVWriteBatch, sync: Bool) throws {
        let touchesInstance = batch.operations.contains { if case .put(.journal, let k, _) = $0 { k == InstanceID.journalKey } else { false } }
        if touchesInstance {
            let n = count.withLock { c -> Int in c += 1; return c }
            if n == failAt { throw Refused() }
        }
        try base.write(batch, sync: sync)
    }
    func journalGet(_ key: Bytes) throws -> Bytes? { try base.journalGet(key) }
    func journalEntries() throws -> [(key: Bytes, value: Bytes)] { try base.journalEntries() }
}

extension TrustIIReviewTests {
    /// kill -9 after the SQL claim committed and before the journal made the pending claim
    /// current: the journal holds (current c, pending p1), the table p1. The next open writes
    /// a NEW pending p2 over p1, then accepts only {c, p2}: refused forever.
    @Test(arguments: ["sqlite", "mariadb"])
    func crashBetweenSQLClaimAndFinalJournalWrite(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        var c: SagaCoordinator? = try env.coordinator()
        try c!.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            try saga.kv.put("a", "1")
        }
        let instance = c!.instance
        c!.close(); c = nil
        // What the next open did before the kill: pending written (synced), SQL claim committed.
        var rec = try InstanceRecord(decoding: env.kv.journalGet(InstanceID.journalKey)!)
        print("journal before: current \(rec.current) pending \(rec.pending); table: \(try env.sqlQuery("SELECT instance, claim FROM saga_markers_instances").map { "\($0.values)" })")
        rec.pending = [4242]
        try rec.store(in: env.kv)
        _ = try env.sqlExecute("UPDATE saga_markers_instances SET claim = 4242 WHERE instance = ?", [.integer(Int64(bitPattern: instance.rawValue))])
        try env.reopen()
        do {
            let r = try env.coordinator()
            print("reopened fine as \(r.instance)")
            r.close()
        } catch {
            Issue.record("the store's own journal is refused after a crash inside the claim: \(error)")
        }
    }

    /// No crash needed: the last instance-record write of an open fails once (a transient KV
    /// error); the open throws. Every later open is refused.
    @Test func transientFailureOfTheFinalInstanceWrite() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        var c: SagaCoordinator? = try env.coordinator()
        c!.close(); c = nil
        // writes at this open: #1 pending, #2 current
        do {
            let bad = try SagaCoordinator(kv: FailNthInstanceWrite(env.kv, failAt: 2), sql: env.sql)
            bad.close()
            Issue.record("expected the open to fail")
        } catch { print("open with the failing write: \(error)") }
        for attempt in 1...2 {
            do {
                let r = try env.coordinator()
                print("attempt \(attempt): opened")
                r.close()
            } catch {
                Issue.record("attempt \(attempt): refused after a transient write failure: \(error)")
            }
        }
    }
}

/// Loses the reply to the saga's COMMIT (run phase) and refuses the fence that would decide it:
/// the saga stays in doubt.
struct LoseReplyThenNoFence: SagaHooks {
    let proxy: MySQLProxy
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard phase == .run else { return }
        if step == .commit { proxy.arm(.loseReply) }
        if step == .resolve { throw InjectedFault(step: step, phase: phase) }
    }
}

extension TrustIIReviewTests {
    /// A snapshot of a RUNNING node's KV store (a checkpoint to bootstrap another node) opened
    /// on the same database while the original still runs: the claim is only checked at open,
    /// so the copy is accepted (it holds the table's current claim), and its orphan removal
    /// deletes the original's committed marker of a saga in doubt. The original's recover()
    /// then fences that saga as aborted and undoes a committed saga.
    @Test func hotCopyOpenedWhileTheOriginalRuns() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let a = try SagaCoordinator(kv: env.kv, sql: env.sql, configuration: .init(hooks: LoseReplyThenNoFence(proxy: env.proxy)))
        // The snapshot, taken now (after A opened): its journal as it is.
        let copyDir = try SQLiteEnvironment.makeTempDir("hot-copy")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        let copy = try RocksDBStore(path: copyDir + "/kv")
        defer { copy.close() }
        var b = KVWriteBatch()
        for (k, v) in try env.kv.journalEntries() { b.put(k, v, in: .journal) }
        try copy.write(b, sync: true)

        do {
            try a.run { saga in
                _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
                try saga.kv.put("a", "1")
            }
        } catch { print("A's saga: \(error)") }
        print("A in doubt: \(a.inDoubt); markers: \(try env.markers())")
        // The copy opens (the new node) while A still runs: refused by A's hold.
        let refused = try expectSagaError { try SagaCoordinator(kv: copy, sql: try MySQLDatabase(url: env.directURL)) }
        guard case .misuse(.instanceInUse) = refused else { Issue.record("expected instanceInUse, got \(refused)"); return }
        #expect(try env.markers().count == 1, "nothing of A's touched")
        // Had the hold been lost (a server restart drops it; here: a database without holds),
        // the copy would open and claim the instance:
        do {
            let c = try SagaCoordinator(kv: copy, sql: WithoutHolds(try MySQLDatabase(url: env.directURL)))
            print("copy opened as \(c.instance) (A is \(a.instance)); markers now: \(try env.markers())")
            c.close()
        } catch { print("copy refused: \(error)") }
        do {
            let report = try a.recover()
            print("A.recover(): \(report)")
        } catch { print("A.recover() threw: \(error)") }
        let kvA = try env.kvGet("a"), sqlA = try env.row("a")
        print("KV a = \(kvA ?? "nil"), SQL a = \(sqlA.map(String.init) ?? "nil")")
        #expect((kvA == "1") == (sqlA == 1), "the two stores disagree")
        // The original finds its claim gone at its first marker write after the copy opened:
        // it stops instead of deciding, and its next open is refused.
        let next = Result { () throws(SagaError) in try a.run { saga in try saga.kv.put("z", "1") } }
        guard case .failure(.stopped(let reason)) = next else { Issue.record("expected the original to have stopped, got \(next)"); return }
        #expect(reason.contains("claimed by another journal"), "\(reason)")
        a.close()
    }
}

extension TrustIIReviewTests {
    /// A real kill -9 inside the claim: aa-demo's second start goes through a proxy that
    /// forwards the claim's COMMIT to the server and then SIGKILLs the process before the
    /// reply reaches it (so the journal never makes the claim current). The third start,
    /// straight to the server, must open.
    @Test func sigkillAfterTheSQLClaimCommitted() throws {
        let node = try AADemoNode.make(.mysql, "hb-claim")
        defer { node.destroy() }
        let first = try TimedDemo.run(node.runArguments(), timeout: 120)
        print("first run: exit \(first.exitCode)")
        let url = node.server!
        let proxy = try MySQLProxy(targetHost: "127.0.0.1", targetPort: UInt16(url.port))
        let proxied = "mysql://\(url.user):\(url.password)@127.0.0.1:\(proxy.port)/\(node.database!)"
        let child = Locked<pid_t>(0)
        proxy.arm(.afterForwarding { kill(child.withLock { $0 }, SIGKILL); usleep(300_000) })
        let args = ["run", "--data", node.dir, "--sql", proxied, "--triggers", CrashTests.triggers, "--seed", CrashTests.seed]
        let pid = try spawnProcess(Demo.executable, args, stdoutPath: "/dev/null", stderrPath: "/dev/null")
        child.withLock { $0 = pid }
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
        print("second run: signal \(status & 0x7F) exit \((status >> 8) & 0xFF), proxy fired \(proxy.firedCount)")
        let conn = try node.sql()
        print("table after the kill: \(try conn.query("SELECT instance, claim FROM saga_markers_instances", []).map { "\($0.values)" })")
        conn.close()
        let third = try TimedDemo.run(node.runArguments(), timeout: 120)
        print("third run: \(third.tail)")
        #expect(third.exitCode == 0)
    }
}

extension TrustIIReviewTests {
    /// close() while a saga runs: the saga's connection goes back into the pool after
    /// close() emptied it, and stays open (a live server session) for as long as the closed
    /// coordinator object lives. Meanwhile close() has released the store, and a second
    /// coordinator opens on the same journal while the first one's saga is still running.
    @Test func closeWhileASagaRuns() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let c = try SagaCoordinator(kv: env.kv, sql: try MySQLDatabase(url: env.directURL))
        func sessions() throws -> Int64 {
            try env.sqlQuery("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = ? AND ID <> CONNECTION_ID()", [.text(env.database)])[0][0].int64!
        }
        let inBody = DispatchSemaphore(value: 0), proceed = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do {
                try c.run { saga in
                    _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
                    try saga.kv.put("a", "1")
                    inBody.signal()
                    proceed.wait()
                }
                print("saga committed")
            } catch { print("saga: \(error)") }
            done.signal()
        }
        inBody.wait()
        c.close()
        var second: SagaCoordinator?
        var secondOpened = false
        do { second = try SagaCoordinator(kv: env.kv, sql: try MySQLDatabase(url: env.directURL)); secondOpened = true; print("a second coordinator opened on the same journal while the first one's saga runs") } catch { print("second refused: \(error)") }
        proceed.signal()
        done.wait()
        second?.close()
        second = nil
        Thread.sleep(forTimeInterval: 0.3)
        let left = try sessions()
        print("server sessions of this database after close(), saga done, coordinator still referenced: \(left)")
        #expect(!secondOpened, "two coordinators on one journal")
        #expect(left == 0, "connections leaked past close()")
        _ = c
    }
}

/// A database that holds no instance (as a backend without holds, or after the server dropped
/// the hold's connection): only the instance claims keep journals apart.
final class WithoutHolds: SQLDatabase {
    let base: any SQLDatabase
    init(_ base: any SQLDatabase) { self.base = base }
    func connect() throws -> any SQLConnection { try base.connect() }
    func connect(replacing failed: any SQLConnection) throws -> any SQLConnection { try base.connect(replacing: failed) }
    func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { NoInstanceHold() }
    var markerTable: String { base.markerTable }
    var dialect: SQLDialect { base.dialect }
}
