import SagaFaultKit
import Foundation
import MySQLBackend
import Saga
import SagaTestKit
import Testing

/// MariaDB's own ways for COMMIT to fail, each on a real server.
@Suite("MariaDB failures", .serialized)
struct MySQLFailureTests {
    /// `KILL CONNECTION` from another session right before COMMIT: COMMIT fails (2013/2006),
    /// the fencing insert finds the transaction rolled back, the KV writes are undone.
    /// DDL commits the open transaction implicitly (even when the DDL itself then fails): what
    /// the saga wrote before may be committed. The saga is poisoned with an error that says so,
    /// never reported "nothing written", and its KV side is never written.
    @Test(arguments: ["CREATE TABLE ddl_probe (x INT)", "CREATE TABLE saga_test (x INT)"])
    func ddlInTheBodyPoisonsTheSaga(_ ddl: String) throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.kvSet([("ddl", "d0")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(300)))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('ddl', 1)", [])
                try saga.kv.put("ddl", "d1")
                _ = try? saga.sql.execute(ddl, [])
            }
        }
        guard case .transactionEndedByStatement(_, let statement, _) = error else { Issue.record("expected transactionEndedByStatement, got \(error)"); return }
        #expect(statement == ddl)
        #expect(!error.isRetryable)
        // The implicit commit took the saga's SQL write with it; the KV side must not follow it.
        #expect(try env.row("ddl") == 1, "the implicit commit committed the row")
        #expect(try env.kvGet("ddl") == "d0", "KV never written")
        #expect(try env.markers().isEmpty && env.journal().isEmpty)
    }

    @Test func killedConnectionAtCommitIsCompensated() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.kvSet([("k", "k0")])
        let connection = LockedBox<Int64>()
        let killer = KillAtCommit(env: env, connection: connection)
        let c = try env.coordinator(.init(hooks: killer))
        let error = try expectSagaError {
            try c.run { saga in
                connection.value = try saga.sql.query("SELECT CONNECTION_ID()", []).first?[0].int64
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('k', 1)", [])
                try saga.kv.put("k", "k1")
            }
        }
        guard case .commitFailed(let id, let underlying, let restored) = error else { Issue.record("expected commitFailed, got \(error)"); return }
        let code = (underlying as? MySQLError)?.code
        #expect(code == 2013 || code == 2006, "COMMIT found the connection killed: \(underlying)")
        #expect(restored == 1)
        #expect(try env.row("k") == nil && env.kvGet("k") == "k0", "both stores as before")
        #expect(try env.markers()[id] == "aborted", "the fencing insert holds the id")
    }

    struct KillAtCommit: SagaHooks {
        let env: MySQLEnvironment
        let connection: LockedBox<Int64>
        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            if step == .commit, phase == .run, let id = connection.value { try env.killConnection(id) }
        }
    }

    /// The proxy forwards COMMIT and drops the server's OK: the client sees 2013 although the
    /// transaction committed. The fencing insert finds the saga's own marker: committed, the KV
    /// writes stay, and the caller gets the body's result.
    @Test func lostCommitReplyIsResolvedAsCommitted() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.kvSet([("r", "r0")])
        let c = try env.coordinator(.init(hooks: LoseCommitReply(proxy: env.proxy)))
        let value = try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('r', 1)", [])
            try saga.kv.put("r", "r1")
            return "done"
        }
        #expect(env.proxy.firedCount == 1, "the reply of one COMMIT was lost")
        #expect(value == "done")
        #expect(try env.row("r") == 1 && env.kvGet("r") == "r1", "committed on both sides")
        #expect(c.inDoubt.isEmpty)
    }

    /// A connection names its session: its connection id and when the server started. Ending
    /// sessions kills the ones of this run of the server and waits until they are gone; a
    /// session of another run (its id may now be someone else's) and an unknown id are left
    /// alone; the caller's own session is never killed.
    @Test func endSessionsKillsOnlySessionsOfThisServerRun() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let victim = try MySQLDatabase(url: env.directURL).openConnection()
        defer { victim.close() }
        let killer = try MySQLDatabase(url: env.directURL).openConnection()
        defer { killer.close() }
        guard let session = victim.session, let own = killer.session else { Issue.record("no session"); return }
        let now = try killer.query("SELECT UNIX_TIMESTAMP()", []).first?[0].int64 ?? 0
        #expect(session.serverStart > 1_700_000_000 && Int64(session.serverStart) <= now, "server start \(session.serverStart)")
        #expect(session.serverStart.distance(to: own.serverStart).magnitude <= 1, "both connections see the same start")
        #expect(session.client != 0 && session.client != own.client, "each session names its client address")
        #expect(try killer.endSessions([
            SQLSession(id: session.id, serverStart: session.serverStart + 60, client: session.client),  // another server run
            SQLSession(id: session.id, serverStart: session.serverStart, client: session.client ^ 1),   // the id reused by another client
            SQLSession(id: 4_000_000_000, serverStart: session.serverStart), own,
        ]).isEmpty)
        #expect(try victim.query("SELECT 1", []).count == 1, "a session of another server run or another client is not killed")
        #expect(try killer.query("SELECT 1", []).count == 1, "the caller's own session is not killed")
        #expect(try killer.endSessions([session]).isEmpty)
        let listed = try killer.query("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = ?", [.integer(Int64(session.id))]).first?[0].int64
        #expect(listed == 0, "gone from the process list when endSessions returns")
        #expect(throws: MySQLError.self, "the killed session is gone") { _ = try victim.query("SELECT 1", []) }
    }

    /// The fencing insert waits while the old transaction is still open on the server, and
    /// decides by how that transaction ends.
    @Test(arguments: [true, false])
    func fenceWaitsForTheOpenTransaction(_ commits: Bool) throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let id = SagaID(424_242)
        let old = try env.mysql.openConnection()
        defer { old.close() }
        let owner = MarkerOwner(instance: InstanceID(7), claim: 77)
        let markers = MarkerTable.Statements(for: env.mysql)
        #expect(try markers.claim(owner.instance, accepting: [], claim: owner.claim, on: old) == nil)
        try old.begin()
        try markers.insertCommitted(id, owner: owner, on: old)
        let decided = LockedBox<String>()
        let done = DispatchSemaphore(value: 0)
        let url = env.directURL
        Thread.detachNewThread {
            do {
                let fresh = try MySQLDatabase(url: url).openConnection()
                defer { fresh.close() }
                decided.value = (try markers.fenceInTransaction([id], owner: owner, on: fresh)[id]).map { "\($0)" } ?? "none"
            } catch {
                decided.value = "error: \(error)"
            }
            done.signal()
        }
        #expect(done.wait(timeout: .now() + 0.7) == .timedOut, "the fence waits while the old transaction is open")
        #expect(decided.value == nil)
        if commits {
            guard case .committed = old.commit() else { Issue.record("old commit failed"); return }
        } else {
            try old.rollback()
        }
        #expect(done.wait(timeout: .now() + 10) == .success)
        #expect(decided.value == (commits ? "committed" : "aborted"))
        // Fenced: the old transaction's id can never commit later.
        if !commits {
            try old.begin()
            #expect(throws: MySQLError.self) { try markers.insertCommitted(id, owner: owner, on: old) }
            try old.rollback()
        }
    }

    /// A real deadlock between the saga and another connection, with the saga as InnoDB's
    /// victim (1213): the server rolled the whole transaction back, so the saga refuses every
    /// later statement and commits nothing, not even its marker.
    @Test func deadlockVictimIsPoisoned() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES ('a', 0), ('b', 0)")
        for i in 0..<200 { try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES (?, 0)", [.text("f\(i)")]) }
        let other = try env.mysql.openConnection()
        defer { other.close() }
        let c = try env.coordinator()
        let sagaHoldsA = DispatchSemaphore(value: 0), otherHoldsB = DispatchSemaphore(value: 0)
        let statementError = LockedBox<String>(), afterwards = LockedBox<String>(), outcome = LockedBox<String>()
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            do {
                try c.run { saga in
                    try saga.sql.execute("UPDATE saga_test SET v = v + 1 WHERE k = 'a'", [])
                    try saga.kv.put("dl", "written")
                    sagaHoldsA.signal()
                    otherHoldsB.wait()
                    do {
                        try saga.sql.execute("UPDATE saga_test SET v = v + 1 WHERE k = 'b'", [])  // waits, then 1213
                    } catch {
                        statementError.value = "\(error)"
                    }
                    // A careless body goes on after the error: refused.
                    do {
                        try saga.sql.execute("UPDATE saga_test SET v = v + 100 WHERE k = 'f1'", [])
                    } catch {
                        afterwards.value = "\(error)"
                    }
                }
                outcome.value = "committed"
            } catch {
                outcome.value = "\(error)"
            }
            done.signal()
        }
        sagaHoldsA.wait()
        try other.begin()
        try other.execute("UPDATE saga_test SET v = v + 1 WHERE k LIKE 'f%'", [])  // the heavier transaction
        try other.execute("UPDATE saga_test SET v = v + 1 WHERE k = 'b'", [])
        otherHoldsB.signal()
        Thread.sleep(forTimeInterval: 0.3)
        try other.execute("UPDATE saga_test SET v = v + 1 WHERE k = 'a'", [])  // closes the cycle
        guard case .committed = other.commit() else { Issue.record("the other transaction should commit"); return }
        #expect(done.wait(timeout: .now() + 30) == .success)
        #expect(statementError.value?.contains("1213") == true, "the saga was the deadlock victim: \(statementError.value ?? "no error")")
        #expect(afterwards.value?.contains("ended under the saga") == true, "later statements refused: \(afterwards.value ?? "ran")")
        #expect(outcome.value?.contains("ended under the saga") == true, "the saga reports transactionLost: \(outcome.value ?? "")")
        #expect(try env.row("a") == 1 && env.row("b") == 1, "only the other transaction's updates")
        #expect(try env.row("f1") == 1, "the statement after the deadlock never ran")
        #expect(try env.markers().isEmpty, "no marker committed")
        #expect(try env.kvGet("dl") == nil, "KV untouched")
    }

    /// Bad URLs, wrong passwords and missing databases fail at open and say which.
    @Test func openErrorsNameTheProblem() throws {
        let good = try MySQLURL(try SharedMariaDB.url())
        func message(_ url: String) -> String {
            do { _ = try MySQLDatabase(url: url); return "opened" } catch { return "\(error)" }
        }
        #expect(message("postgres://u:p@h/db").contains("scheme must be mysql://"))
        #expect(message("mysql://u:p@127.0.0.1:3306/").contains("no database"))
        #expect(message("mysql://@127.0.0.1/db").contains("no user"))
        #expect(message("not a url at all").contains("invalid MySQL URL"))
        let wrongPassword = message("mysql://\(good.user):wrong@127.0.0.1:\(good.port)/\(good.database)")
        #expect(wrongPassword.contains("wrong user or password"), "\(wrongPassword)")
        #expect(!wrongPassword.contains("wrong@"), "the password is not echoed")
        let missing = message("mysql://\(good.user):\(good.password)@127.0.0.1:\(good.port)/no_such_db")
        #expect(missing.contains("database \"no_such_db\" does not exist"), "\(missing)")
        let noServer = message("mysql://\(good.user):\(good.password)@127.0.0.1:1/\(good.database)")
        #expect(noServer.contains("no server reachable at 127.0.0.1:1"), "\(noServer)")
    }

    /// Debian's MariaDB is built with Galera support: a standalone server (no wsrep provider
    /// loaded) reports the status `wsrep_ready` OFF. It is no cluster node, and it is ready:
    /// connecting must not take it for a cluster node that is not synced (error 1047, which
    /// refused every connection to a standalone server).
    @Test func standaloneServerIsNoClusterNodeAndIsReady() throws {
        let db = try MySQLDatabase(url: try SharedMariaDB.url())
        #expect(!db.isClusterNode)
        let conn = try db.openConnection()
        defer { conn.close() }
        let provider = try conn.query("SHOW GLOBAL STATUS LIKE 'wsrep_provider_name'", []).first?[1].string ?? ""
        #expect(provider.isEmpty, "the test needs a server without a wsrep provider")
    }

    /// Values round-trip through prepared statements, never spliced into SQL.
    @Test func valuesRoundTrip() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let conn = try env.mysql.openConnection()
        defer { conn.close() }
        try conn.execute("CREATE TABLE vals (i BIGINT, u BIGINT UNSIGNED, d DOUBLE, t TEXT, b BLOB, n INT)", [])
        let tricky = "x'); DROP TABLE vals; -- ü"
        try conn.execute("INSERT INTO vals VALUES (?, ?, ?, ?, ?, ?)",
                         [.integer(-42), .integer(Int64.max), .real(2.5), .text(tricky), .blob([0, 255, 1]), .null])
        let row = try #require(try conn.query("SELECT i, u, d, t, b, n FROM vals", []).first)
        #expect(row.values == [.integer(-42), .integer(Int64.max), .real(2.5), .text(tricky), .blob([0, 255, 1]), .null])
        #expect(row["t"] == .text(tricky))
        #expect(throws: MySQLUsageError.self) { try conn.execute("INSERT INTO vals (i) VALUES (?)", []) }
    }
}

/// Tests that kill the server: each has a server of its own.
@Suite("MariaDB server killed", .serialized)
struct MySQLServerKillTests {
    /// `kill -9` of the server between the KV write and COMMIT: COMMIT fails, the fencing
    /// insert cannot reach the server, the saga stays in doubt with its keys locked. After a
    /// restart, recovery resolves it and both stores agree.
    @Test func serverKilledBeforeCommitThenRecovered() throws {
        let server = try MariaDBServer()
        defer { server.stop() }
        let env = try MySQLEnvironment(serverURL: server.url)
        defer { env.destroy() }
        try env.kvSet([("s", "s0")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(300), hooks: KillServerAt(step: .commit, server: server)))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('s', 1)", [])
                try saga.kv.put("s", "s1")
            }
        }
        guard case .inDoubt(let id, _) = error else { Issue.record("expected inDoubt, got \(error)"); return }
        #expect(c.inDoubt == [id])
        #expect(try env.journal()[id]?.state == .prepared, "still prepared")
        try server.start()
        // Its keys stay locked until it is resolved.
        let blocked = try expectSagaError { try c.run { saga in try saga.kv.put("s", "other") } }
        guard case .lockTimeout = blocked else { Issue.record("expected lockTimeout, got \(blocked)"); return }
        let report = try c.recover()
        #expect(report.compensated == [id] && report.isClean, "\(report)")
        #expect(try env.row("s") == nil && env.kvGet("s") == "s0", "never committed: KV restored")
        #expect(c.inDoubt.isEmpty)
    }

    /// `kill -9` of the server while COMMIT is on its way (the proxy forwards it, then kills
    /// the server before any reply). Whether InnoDB made it durable or not, after a restart
    /// recovery makes the KV side agree.
    @Test func serverKilledDuringCommitThenRecovered() throws {
        let server = try MariaDBServer()
        defer { server.stop() }
        let env = try MySQLEnvironment(serverURL: server.url)
        defer { env.destroy() }
        try env.kvSet([("s", "s0")])
        let c = try env.coordinator(.init(hooks: KillServerDuringCommit(proxy: env.proxy, server: server)))
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('s', 1)", [])
                try saga.kv.put("s", "s1")
            }
        }
        #expect(env.proxy.firedCount == 1)
        if case .failure(let e) = result, case .inDoubt = e {} else { Issue.record("expected inDoubt, got \(result)") }
        try server.restartOnNewPort()
        env.proxy.retarget(port: UInt16(server.port))
        let report = try c.recover()
        #expect(report.isClean && report.committed.count + report.compensated.count == 1, "\(report)")
        let committed = try env.row("s") == 1
        #expect(try env.kvGet("s") == (committed ? "s1" : "s0"), "KV agrees with SQL (committed: \(committed))")
        // And a coordinator opened afresh finds nothing left to do.
        try env.reopen()
        let again = try env.coordinator()
        #expect(again.inDoubt.isEmpty)
        #expect(try env.kvGet("s") == (committed ? "s1" : "s0"))
    }

    /// A lock wait timeout on a server with `innodb_rollback_on_timeout`: the server rolls the
    /// whole transaction back (1205), the backend asks the server, and the saga is poisoned.
    @Test func lockWaitTimeoutWithRollbackPoisons() throws {
        let server = try MariaDBServer(extraArguments: ["--innodb-rollback-on-timeout", "--innodb-lock-wait-timeout=1"])
        defer { server.stop() }
        let env = try MySQLEnvironment(serverURL: server.url)
        defer { env.destroy() }
        try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES ('a', 0), ('b', 0)")
        let blocker = try env.mysql.openConnection()
        defer { blocker.close() }
        try blocker.begin()
        try blocker.execute("UPDATE saga_test SET v = 99 WHERE k = 'b'", [])
        let c = try env.coordinator()
        let first = LockedBox<String>()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("UPDATE saga_test SET v = 1 WHERE k = 'a'", [])
                do { try saga.sql.execute("UPDATE saga_test SET v = 1 WHERE k = 'b'", []) } catch { first.value = "\(error)" }
                try saga.kv.put("t", "x")
            }
        }
        try blocker.rollback()
        #expect(first.value?.contains("1205") == true, "\(first.value ?? "no error")")
        guard case .transactionLost = error else { Issue.record("expected transactionLost, got \(error)"); return }
        #expect(try env.row("a") == 0, "the server rolled back the first update; nothing committed")
        #expect(try env.kvGet("t") == nil)
        #expect(try env.markers().isEmpty)
    }
}

struct KillServerAt: SagaHooks {
    let step: SagaStep
    let server: MariaDBServer
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == self.step, phase == .run { server.kill9() }
    }
}

struct KillServerDuringCommit: SagaHooks {
    let proxy: MySQLProxy
    let server: MariaDBServer
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == .commit, phase == .run {
            let server = self.server
            proxy.arm(.afterForwarding { server.kill9() })
        }
    }
}

/// A value shared between a test and the threads or hooks it starts.
final class LockedBox<T: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: T?
    var value: T? {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}
