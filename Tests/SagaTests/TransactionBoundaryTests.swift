import Foundation
import MySQLBackend
import RocksDBBackend
import SagaFaultKit
@testable import Saga
import SagaTestKit
import SQLiteBackend
import Testing

/// The saga owns its SQL transaction and its connection: a body cannot end the transaction
/// unseen, and cannot leave session state on a connection that goes back to the pool.
@Suite("Transaction boundaries and pooled connections", .serialized)
struct TransactionBoundaryTests {
    struct Boom: Error {}

    /// Transaction control hidden behind comments, lower case or MySQL's executable comments
    /// is refused before it runs, like the plain forms; savepoints are not transaction control.
    @Test func transactionControlIsRecognizedThroughComments() {
        for sql in ["COMMIT", " commit;", "/* next unit */ BEGIN", "/*M! BEGIN */", "/*!40000 BEGIN */", "# c\nBEGIN",
                    "-- settle\nCOMMIT", "START TRANSACTION", "ROLLBACK", "rollback work", "END"] {
            #expect(TransactionState.statementControlsTransaction(sql), "\(sql.debugDescription) controls the transaction")
            #expect(TransactionState.statementMayCommit(sql))
        }
        for sql in ["ROLLBACK TO SAVEPOINT a", "ROLLBACK TRANSACTION TO SAVEPOINT a", "rollback work to a", "SAVEPOINT a",
                    "RELEASE SAVEPOINT a", "/* x */ INSERT INTO t VALUES (1)", "INSERT INTO t VALUES ('COMMIT')", "SELECT 1 -- COMMIT", "UPDATE begin_table SET x = 1"] {
            #expect(!TransactionState.statementControlsTransaction(sql), "\(sql.debugDescription) does not")
            #expect(!TransactionState.statementMayCommit(sql), "\(sql.debugDescription) cannot commit")
        }
        for sql in ["CALL p()", "LOCK TABLES t WRITE", "SET autocommit=1", "CREATE TABLE t (x INT)", "PRAGMA locking_mode=EXCLUSIVE"] {
            #expect(TransactionState.statementMayCommit(sql), "\(sql.debugDescription) may commit or change the session")
        }
    }

    /// MariaDB accepts BEGIN behind a comment over the prepared-statement protocol: it commits
    /// the saga's writes and opens a new transaction. It used to run, and the saga then said
    /// "nothing written" (retryable) about a committed row.
    @Test(arguments: ["/* next unit */ BEGIN", "/*M! BEGIN */", "# c\nBEGIN"])
    func mysqlDisguisedBeginIsRefused(_ begin: String) throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('b', 1)", [])
                try saga.sql.execute(begin, [])
                try saga.kv.put("b", "b1")
            }
        }
        guard case .misuse(.transactionControl(begin)) = error else { Issue.record("expected misuse(.transactionControl), got \(error)"); return }
        #expect(try env.row("b") == nil && env.kvGet("b") == nil, "nothing written")
    }

    /// A procedure that commits and opens a new transaction: the saga is still "in a
    /// transaction", but not its own. The savepoint marked before the CALL is gone: poisoned.
    @Test func mysqlProcedureThatCommitsPoisonsTheSaga() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.sqlExecute("CREATE PROCEDURE settle() BEGIN COMMIT; START TRANSACTION; END")
        try env.kvSet([("p", "p0")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(300)))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('p', 1)", [])
                try saga.sql.execute("CALL settle()", [])
                try saga.kv.put("p", "p1")
            }
        }
        guard case .transactionEndedByStatement(_, "CALL settle()", _) = error else { Issue.record("expected transactionEndedByStatement, got \(error)"); return }
        #expect(try env.row("p") == 1, "the procedure committed the row")
        #expect(try env.kvGet("p") == "p0", "KV never written")
        #expect(try env.markers().isEmpty && env.journal().isEmpty)
        // A procedure that leaves the transaction alone is fine.
        try env.sqlExecute("CREATE PROCEDURE touch() BEGIN UPDATE saga_test SET v = v + 1 WHERE k = 'p'; END")
        try c.run { saga in
            try saga.sql.execute("CALL touch()", [])
            try saga.kv.put("p", "p2")
        }
        #expect(try env.row("p") == 2 && env.kvGet("p") == "p2")
    }

    /// `LOCK TABLES` commits (the saga is poisoned) and keeps a table lock on the session:
    /// the connection must not go back to the pool holding it.
    @Test func mysqlSessionStateIsNotPooled() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('l', 1)", [])
                _ = try? saga.sql.execute("LOCK TABLES saga_test WRITE", [])
            }
        }
        guard case .transactionEndedByStatement = error else { Issue.record("expected transactionEndedByStatement, got \(error)"); return }
        let other = try env.mysql.openConnection()
        defer { other.close() }
        try other.execute("SET SESSION lock_wait_timeout = 1", [])
        #expect(throws: Never.self, "a reader outside the saga is not blocked by a lock left on a pooled connection") {
            _ = try other.query("SELECT v FROM saga_test WHERE k = 'l'", [])
        }
        // `SET autocommit=0` in a body stays with the session too: the next saga must get a
        // connection in the server's default mode.
        _ = try c.run { saga in try saga.sql.execute("SET autocommit=0", []) }
        let mode = try c.run { saga in try saga.sql.query("SELECT @@autocommit", []).first?[0].int64 }
        #expect(mode == 1, "the next saga's connection is fresh")
        withExtendedLifetime(c) {}
    }

    /// A body's `PRAGMA locking_mode=EXCLUSIVE` stays with the SQLite connection: pooled, it
    /// would lock every other connection out of the file, the coordinator's fences included.
    @Test func sqliteSessionStateIsNotPooled() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('x', 1)", [])
            _ = try saga.sql.query("PRAGMA locking_mode=EXCLUSIVE", [])
            try saga.kv.put("x", "1")
        }
        _ = try c.run { saga in try saga.sql.execute("UPDATE saga_test SET v = 2 WHERE k = 'x'", []) }
        #expect(throws: Never.self, "a connection opened after the saga") { _ = try env.sqlQuery("SELECT v FROM saga_test") }
        withExtendedLifetime(c) {}
    }

    /// The forward batch lands but the store reports an error: compensated, and the
    /// coordinator stops like after any failed KV write (it used to go on).
    @Test func aKVWriteThatFailedAfterLandingStopsTheCoordinator() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let kv = FailAfterWriting(env.kv)
        let c = try SagaCoordinator(kv: kv, sql: env.sql)
        kv.armed = true
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('w', 1)", [])
                try saga.kv.put("w", "w1")
            }
        }
        guard case .commitFailed = error else { Issue.record("expected commitFailed, got \(error)"); return }
        #expect(try env.row("w") == nil && env.kvGet("w") == nil, "compensated")
        let next = Result { () throws(SagaError) in try c.run { saga in try saga.kv.put("other", "x") } }
        guard case .failure(.stopped) = next else { Issue.record("the next saga got \(next) instead of stopped"); return }
    }

    /// Garbage collection and recovery on demand beside running sagas: nothing lost, and
    /// ThreadSanitizer (scripts/tsan.sh) reports nothing (a `Locked<()>` used to be reported).
    @Test func gcAndRecoveryBesideRunningSagas() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .seconds(10), gcThreshold: 5))
        let group = DispatchGroup()
        let failures = LockedBox<String>()
        for t in 0..<2 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                for i in 0..<30 {
                    do {
                        try c.run { saga in
                            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("t\(t)-\(i)"), .integer(Int64(i))])
                            try saga.kv.put("t\(t)-\(i)", "\(i)")
                        }
                    } catch { failures.value = "\(error)" }
                }
            }
        }
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            for _ in 0..<30 {
                do {
                    try c.collectGarbage()
                    try c.recover()
                } catch { failures.value = "\(error)" }
            }
        }
        group.wait()
        #expect(failures.value == nil, "\(failures.value ?? "")")
        for t in 0..<2 {
            for i in 0..<30 { #expect(try env.row("t\(t)-\(i)") == Int64(i) && env.kvGet("t\(t)-\(i)") == "\(i)") }
        }
        #expect(c.inDoubt.isEmpty)
    }
}

/// Passes every call to a real store; when armed, the next batch that holds a journal record
/// lands and then reports an error (a store that applied the batch but failed after).
final class FailAfterWriting: KVStore, @unchecked Sendable {
    struct WriteReportedFailure: Error {}
    let inner: any KVStore
    private let lock = NSLock()
    private var isArmed = false
    var armed: Bool {
        get { lock.withLock { isArmed } }
        set { lock.withLock { isArmed = newValue } }
    }
    init(_ inner: any KVStore) { self.inner = inner }
    func multiGet(_ keys: [Bytes]) throws -> [Bytes?] { try inner.multiGet(keys) }
    func journalGet(_ key: Bytes) throws -> Bytes? { try inner.journalGet(key) }
    func journalEntries() throws -> [(key: Bytes, value: Bytes)] { try inner.journalEntries() }
    func write(_ batch: KVWriteBatch, sync: Bool) throws {
        try inner.write(batch, sync: sync)
        let hasRecord = batch.operations.contains { if case .put(.journal, _, _) = $0 { true } else { false } }
        if hasRecord, lock.withLock({ () -> Bool in defer { isArmed = false }; return isArmed }) { throw WriteReportedFailure() }
    }
}
