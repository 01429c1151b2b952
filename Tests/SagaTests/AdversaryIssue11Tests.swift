import Foundation
import MySQLBackend
import RocksDBBackend
@testable import Saga
import SagaFaultKit
import SagaTestKit
import SQLiteBackend
import Testing

/// A database wrapper written the way the compiler asks for it. `holdInstance` and
/// `connect(replacing:)` used to have defaults (hold nothing; close and connect), so a wrapper
/// that forwarded only what the compiler demanded silently held nothing: a copy of the node's
/// KV store opened beside it and stopped it (aa-demo's own `CountingDatabase` did that). They
/// have no default now: the compiler asks for them, and a forwarding wrapper keeps the hold.
class ForwardingWhatTheCompilerAsks: SQLDatabase, @unchecked Sendable {
    let base: any SQLDatabase
    init(_ base: any SQLDatabase) { self.base = base }
    func connect() throws -> any SQLConnection { try base.connect() }
    func connect(replacing failed: any SQLConnection) throws -> any SQLConnection { try base.connect(replacing: failed) }
    func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { try base.holdInstance(instance) }
    var markerTable: String { base.markerTable }
    var dialect: SQLDialect { base.dialect }
}

/// Cancels the task the saga runs in once the forward KV batch is durable (`.prepared`).
private final class CancelAfterKVBatch: SagaHooks, @unchecked Sendable {
    let armed = Locked(true)
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == .prepared, phase == .run, armed.withLock({ a in defer { a = false }; return a }) { withUnsafeCurrentTask { $0?.cancel() } }
    }
}

@Suite("Adversary issue 11", .serialized)
struct AdversaryIssue11Tests {
    // MARK: Finding: wrappers silently dropped the instance hold

    /// The instance hold is what refuses a second coordinator (a copy of this node's KV store)
    /// while this one runs. A wrapper that forwarded only what the compiler demanded got the
    /// protocol's default `holdInstance` (holds nothing): the copy opened, claimed the
    /// instance, and the healthy original was stopped at its next saga. Now the compiler asks
    /// for the hold, and through a wrapper the copy is refused and the original goes on.
    @Test(arguments: ["sqlite", "mariadb"])
    func throughAWrapperACopyIsStillRefused(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let a = try SagaCoordinator(kv: env.kv, sql: ForwardingWhatTheCompilerAsks(env.sql))
        defer { a.close() }
        try a.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            try saga.kv.put("a", "1")
        }
        let copyDir = try SQLiteEnvironment.makeTempDir("adv11-copy")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        let copy = try journalCopy(of: env.kv, into: copyDir)
        defer { copy.close() }
        // The same wrapper around the same database, on the copy: must be refused while A runs.
        let opened = Result { () throws(SagaError) in try SagaCoordinator(kv: copy, sql: ForwardingWhatTheCompilerAsks(env.sql)) }
        if case .success(let b) = opened { b.close() }
        let next = Result { () throws(SagaError) in try a.run { saga in try saga.kv.put("b", "1") } }
        print("[\(backend)] copy's open: \(opened.map { _ in "opened" }); A's next saga: \(next)")
        guard case .failure(.misuse(.instanceInUse)) = opened else {
            Issue.record("the copy opened beside the running original (no instance hold through the wrapper); A's next saga: \(next)")
            return
        }
        guard case .success = next else { Issue.record("the original was disturbed: \(next)"); return }
    }

    // MARK: Finding: BIGINT UNSIGNED past Int64.max decodes as a negative number

    /// `fetchRows` hands an unsigned 64-bit column over as `.integer(Int64(bitPattern:))`; the
    /// new `SQLValueConvertible` decoders promise to be "strict where a value would be lost",
    /// yet decode 18446744073709551615 as -1 without a word.
    @Test func unsignedBigintPastInt64MaxIsMisread() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.sqlExecute("CREATE TABLE adv_u (id INT PRIMARY KEY, n BIGINT UNSIGNED NOT NULL)")
        try env.sqlExecute("INSERT INTO adv_u VALUES (1, 18446744073709551615), (2, 9223372036854775808)")
        let rows = try env.sqlQuery("SELECT n FROM adv_u ORDER BY id")
        let asInt = rows.map { row in Result { try row.decode("n", as: Int.self) } }
        let asInt64 = rows.map { row in Result { try row.decode("n", as: Int64.self) } }
        print("BIGINT UNSIGNED values \(rows.map { $0[0] }); as Int \(asInt); as Int64 \(asInt64); SQLValue.int64 \(rows.map { $0[0].int64 as Any })")
        for (i, r) in asInt.enumerated() {
            if case .success(let v) = r { Issue.record("row \(i + 1): an unsigned value past Int64.max decoded as Int \(v)") }
        }
    }

    // MARK: Finding: Date does not round-trip through its own encodings

    /// `Date` was stored in KV as seconds since 1970 while it keeps seconds since 2001:
    /// converting to 1970 and back added 978307200 and subtracted it again in Double
    /// arithmetic, which rounds, so a date read back was not the one written. KV now stores the
    /// seconds since 2001 themselves: every date reads back equal.
    @Test func dateRoundTripsThroughKV() throws {
        let dates = [Date(timeIntervalSinceReferenceDate: 0.1), Date(timeIntervalSinceReferenceDate: 800_000_000.123), Date(timeIntervalSinceReferenceDate: 1.5e-7)]
        for d in dates {
            let kv = try Date(kvEncoded: d.kvEncoded())
            #expect(kv == d, "KV: wrote \(d.timeIntervalSinceReferenceDate), read \(kv.timeIntervalSinceReferenceDate)")
        }
    }

    /// The SQL half is text at millisecond precision (what SQLite's date functions and
    /// `DATETIME(3)` take), read back through seconds since 1970: equal to the written date to
    /// within half a millisecond, not bit for bit (documented).
    @Test func dateRoundTripsThroughSQLTextToTheMillisecond() throws {
        for d in [Date(timeIntervalSinceReferenceDate: 0.1), Date(timeIntervalSince1970: 1_700_000_000.123), Date(timeIntervalSinceReferenceDate: 800_000_000.1234)] {
            let sql = try Date(sqlValue: d.sqlValue)
            #expect(abs(sql.timeIntervalSince(d)) <= 0.0005, "SQL: wrote \(d.timeIntervalSinceReferenceDate) (\(d.sqlValue)), read \(sql.timeIntervalSinceReferenceDate)")
        }
    }

    // MARK: Probes that hold (kept as regression tests)

    /// SQLite: the claim moved while A runs (a copy opened through a database without holds); A's
    /// marker insert fails NOT NULL, which is InstanceClaimLost; A compensates and stops.
    @Test func claimLostAtTheMarkerInsertOnSQLite() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let a = try env.coordinator()
        defer { a.close() }
        let copyDir = try SQLiteEnvironment.makeTempDir("adv11-claim")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        let copy = try journalCopy(of: env.kv, into: copyDir)
        defer { copy.close() }
        // A database that holds no instance (on purpose: `WithoutHolds`), so the copy opens.
        let b = try SagaCoordinator(kv: copy, sql: WithoutHolds(try SQLiteDatabase(path: env.sqlitePath)))
        b.close()
        let r = Result { () throws(SagaError) in
            try a.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
                try saga.kv.put("a", "1")
            }
        }
        guard case .failure(.commitFailed(_, let why, _)) = r, why is InstanceClaimLost else { Issue.record("expected commitFailed(InstanceClaimLost), got \(r)"); return }
        #expect(try env.kvGet("a") == nil && env.row("a") == nil)
        let next = Result { () throws(SagaError) in try a.run { saga in try saga.kv.put("b", "1") } }
        guard case .failure(.stopped) = next else { Issue.record("expected A stopped, got \(next)"); return }
    }

    /// A body's own NOT NULL violation (its own statement, caught or not) is the body's error:
    /// it is never taken for a lost claim, and the coordinator keeps running.
    @Test(arguments: ["sqlite", "mariadb"])
    func bodyNotNullViolationIsNotAClaimLoss(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let c = try env.coordinator()
        defer { c.close() }
        // Thrown out of the body.
        let r = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.kv.put("x", "1")
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('x', NULL)", [])
            }
        }
        guard case .failure(.bodyFailed) = r else { Issue.record("expected bodyFailed, got \(r)"); return }
        // Caught inside the body: the saga goes on and commits.
        try c.run { saga in
            _ = try? saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('y', NULL)", [])
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('y', 2)", [])
            try saga.kv.put("y", "2")
        }
        #expect(try env.row("y") == 2 && env.kvGet("y") == "2")
    }

    /// Cancelled after the forward KV batch: the saga commits, and its locks are released.
    @Test func cancelledAfterTheKVBatchCommits() async throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .seconds(2), hooks: CancelAfterKVBatch()))
        defer { c.close() }
        let task = Task {
            try await c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('c', 1)", [])
                try saga.kv.put("c", "1")
            }
        }
        let r = await task.result
        #expect(task.isCancelled, "the hook cancelled the saga's task after its KV batch")
        if case .failure(let e) = r { Issue.record("cancelled after the KV batch, the saga still failed: \(e)") }
        #expect(try env.row("c") == 1 && env.kvGet("c") == "1")
        // The key is free again (no lock left behind), without the hook.
        let d = Result { () throws(SagaError) in try c.run { saga in try saga.kv.put("c", "2") } }
        if case .failure(let e) = d { Issue.record("key still locked: \(e)") }
    }

    /// More async sagas than threads, `close()` from another thread while most are queued:
    /// the running ones finish, the queued ones are refused (closed), nothing hangs, the
    /// coordinator's threads are gone afterwards and no key stays locked.
    @Test func closeWhileAsyncSagasAreQueued() async throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        // One thread: the first saga holds it in its body until close() has run, and the other
        // eleven are queued (or not yet started) when it does, whatever the machine's load. (With
        // two threads the second saga waited at SQLite's BEGIN for the first, and under
        // ThreadSanitizer on a loaded machine that wait could pass the busy timeout.)
        let c = try env.coordinator(.init(asyncThreads: 1))
        let entered = Locked(0)
        let gate = DispatchSemaphore(value: 0)
        let tasks = (0..<12).map { i in Task { await Self.queuedSaga(c, i, entered: entered, gate: gate) } }
        let deadline = ContinuousClock.now + .seconds(20)
        while entered.withLock({ $0 }) < 1, ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(5)) }
        #expect(entered.withLock { $0 } == 1, "one saga in its body")
        await withCheckedContinuation { (k: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread { c.close(); k.resume() }
        }
        gate.signal()
        var outcomes: [String] = []
        for t in tasks { outcomes.append(await t.value) }
        print("outcomes: \(outcomes.sorted())")
        let ok = outcomes.filter { $0 == "ok" }.count, closed = outcomes.filter { $0 == "closed" }.count
        #expect(ok == 1 && closed == 11, "the running saga finishes, the queued ones are refused: \(outcomes)")
        // The last saga to end shuts the pool down from one of its threads: they exit on their own.
        for _ in 0..<300 where c.ownPool?.liveThreads != 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(c.ownPool?.liveThreads == 0)
        // The store is let go: a new coordinator opens and every key is free.
        let d = try env.coordinator(.init(lockTimeout: .milliseconds(500)))
        defer { d.close() }
        try await d.run { saga in for k in 0..<3 { try saga.kv.put("q\(k)", "x") } }
    }

    static func queuedSaga(_ c: SagaCoordinator, _ i: Int, entered: Locked<Int>, gate: DispatchSemaphore) async -> String {
        do {
            try await c.run { saga in
                entered.withLock { $0 += 1 }
                _ = gate.wait(timeout: .now() + 20)
                try saga.kv.put("q\(i % 3)", "\(i)")
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("q\(i)"), .integer(Int64(i))])
            }
            return "ok"
        } catch {
            if case .misuse(.closed) = error { return "closed" }
            return "\(error)"
        }
    }
}
