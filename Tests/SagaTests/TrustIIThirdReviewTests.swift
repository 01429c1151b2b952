import Foundation
import MySQLBackend
import RocksDBBackend
@testable import Saga
import SagaFaultKit
import SagaTestKit
import SQLiteBackend
import Testing

/// An SQL database that cannot be reached (open fails after the pending claim was written).
private final class Unreachable: SQLDatabase, @unchecked Sendable {
    struct Down: Error {}
    func connect() throws -> any SQLConnection { throw Down() }
    func connect(replacing failed: any SQLConnection) throws -> any SQLConnection { throw Down() }
    func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { NoInstanceHold() }
    var markerTable: String { "saga_markers" }
    var dialect: SQLDialect { SQLDialect(insertIgnore: "INSERT OR IGNORE", lockingRead: "") { _ in false } }
}

/// Findings and probes of a third review of the issue-10 fixes.
@Suite("Trust II: third review", .serialized)
struct TrustIIThirdReviewTests {
    /// An open while the SQL database is down leaves the journal with a pending claim. A copy
    /// of the (stopped) store taken then shares the pending claim: the original and the copy
    /// are both accepted, and the copy's orphan removal deletes the original's committed marker.
    @Test func copyOfAJournalWithAPendingClaim() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        var c: SagaCoordinator? = try env.coordinator()
        c!.close(); c = nil
        // The node restarts while the database is unreachable: the open fails.
        do { _ = try SagaCoordinator(kv: env.kv, sql: Unreachable()); Issue.record("expected failure") } catch { print("open with the DB down: \(error)") }
        let rec = try InstanceRecord(decoding: env.kv.journalGet(InstanceID.journalKey)!)
        print("journal: current \(rec.current) pending \(rec.pending)")
        // A cold copy of the stopped node's KV store (to bootstrap another node).
        env.rocks.close()
        let copyDir = try SQLiteEnvironment.makeTempDir("pending-copy")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        try FileManager.default.copyItem(atPath: env.dir + "/kv", toPath: copyDir + "/kv")
        try env.reopen()
        // The original comes back and commits a saga (its record stays until GC).
        var a: SagaCoordinator? = try env.coordinator(.init(gcThreshold: 1000))
        let idA = try a!.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            try saga.kv.put("a", "1")
            return saga.id
        }
        print("A committed \(idA); markers: \(try env.markers())")
        // A stops (a crash: no GC ran), then the copy opens on the same database: it knows the
        // pending claim, but A's open moved the table to a value of its own.
        a = nil
        let copy = try RocksDBStore(path: copyDir + "/kv")
        defer { copy.close() }
        let refusal = try expectSagaError { try SagaCoordinator(kv: copy, sql: try SQLiteDatabase(path: env.sqlitePath)) }
        guard case .misuse(.instanceClaimedByAnotherJournal) = refusal else { Issue.record("expected the copy to be refused by the claim, got \(refusal)"); return }
        #expect(try env.markers().count == 1, "A's marker untouched")
        // A restarts.
        try env.reopen()
        do { a = try env.coordinator() } catch { print("A refused at restart: \(error)") }
        let kv = try env.kvGet("a"), row = try env.row("a")
        print("KV a = \(kv ?? "nil"), SQL a = \(row.map(String.init) ?? "nil")")
        #expect((kv == "1") == (row == 1), "the two stores disagree")
        a?.close()
    }
}

/// The journal of `kv` copied into a fresh RocksDB store (a copy of a node's KV store).
func journalCopy(of kv: any KVStore, into dir: String) throws -> RocksDBStore {
    let copy = try RocksDBStore(path: dir + "/kv")
    var b = KVWriteBatch()
    for (k, v) in try kv.journalEntries() { b.put(k, v, in: .journal) }
    try copy.write(b, sync: true)
    return copy
}

extension TrustIIThirdReviewTests {
    /// MariaDB: the marker insert and COMMIT travel in one packet. With the claim gone, the
    /// insert fails (NULL status): nothing of the saga may be committed, KV is compensated.
    @Test func claimLostAtTheMarkerInsertOnMariaDB() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let a = try SagaCoordinator(kv: env.kv, sql: try MySQLDatabase(url: env.directURL))
        let copyDir = try SQLiteEnvironment.makeTempDir("hc3-copy")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        let copy = try journalCopy(of: env.kv, into: copyDir)
        defer { copy.close() }
        // A's hold refuses the copy; without one (lost with its connection), the copy claims.
        #expect(throws: SagaError.self) { _ = try SagaCoordinator(kv: copy, sql: try MySQLDatabase(url: env.directURL)) }
        let c = try SagaCoordinator(kv: copy, sql: WithoutHolds(try MySQLDatabase(url: env.directURL)))
        c.close()
        let r = Result { () throws(SagaError) in
            try a.run { saga in
                _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
                try saga.kv.put("a", "1")
            }
        }
        print("A's saga: \(r)")
        guard case .failure(.commitFailed(_, let why, _)) = r, why is InstanceClaimLost else { Issue.record("expected commitFailed(InstanceClaimLost), got \(r)"); return }
        let kvA = try env.kvGet("a"), sqlA = try env.row("a")
        print("KV a = \(kvA ?? "nil"), SQL a = \(sqlA.map(String.init) ?? "nil"), markers \(try env.markers())")
        #expect(kvA == nil && sqlA == nil)
        // Transactions of this test's database only: other suites share the server.
        let open = try env.sqlQuery("""
            SELECT COUNT(*) FROM information_schema.INNODB_TRX t JOIN information_schema.PROCESSLIST p
            ON t.trx_mysql_thread_id = p.ID WHERE p.DB = ?
            """, [.text(env.database)])[0][0].int64!
        #expect(open == 0, "no transaction left open: \(open)")
        let next = Result { () throws(SagaError) in try a.run { saga in try saga.kv.put("b", "1") } }
        guard case .failure(.stopped) = next else { Issue.record("expected A stopped, got \(next)"); return }
        a.close()
    }

    /// Sagas on a few shared keys, with COMMIT replies lost at random, while another thread
    /// runs recover() and collectGarbage() in a loop. Every saga checks, under its locks, that
    /// the two stores agree; at the end (after a reopen) they must agree on every key.
    @Test(arguments: [UInt64(11), 12])
    func gcAndRecoverBesideSagasWithLostReplies(_ seed: UInt64) throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let keys = (0..<6).map { "k\($0)" }
        for k in keys {
            try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES (?, 0)", [.text(k)])
        }
        try env.kvSet(keys.map { ($0, "0") })
        let c = try env.coordinator(.init(lockTimeout: .seconds(20), gcThreshold: 3, poolSize: 4))
        env.proxy.loseRepliesAtRandom(oneIn: 5, seed: seed)
        let stats = Locked([String: (ok: Int, doubt: Int, failed: Int)]())
        let mismatches = Locked([String]())
        let stop = Locked(false)
        let group = DispatchGroup()
        for t in 0..<4 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                var rng = SplitMix64(seed: seed &* 31 &+ UInt64(t))
                for _ in 0..<50 {
                    let k = keys[Int(rng.below(keys.count))]
                    let r = Result { () throws(SagaError) in
                        try c.run { saga in
                            let sqlV = try saga.sql.query("SELECT v FROM saga_test WHERE k = ? FOR UPDATE", [.text(k)]).first?[0].int64 ?? -1
                            let kvV = try saga.kv.get(k).map { Int64(String(decoding: $0, as: UTF8.self)) ?? -2 } ?? -3
                            if sqlV != kvV { mismatches.withLock { $0.append("\(k): SQL \(sqlV) KV \(kvV) in \(saga.id)") } }
                            _ = try saga.sql.execute("UPDATE saga_test SET v = ? WHERE k = ?", [.integer(sqlV + 1), .text(k)])
                            try saga.kv.put(k, String(sqlV + 1))
                        }
                    }
                    stats.withLock { s in
                        var e = s[k] ?? (ok: 0, doubt: 0, failed: 0)
                        switch r {
                        case .success: e.ok += 1
                        case .failure(.inDoubt): e.doubt += 1
                        case .failure: e.failed += 1
                        }
                        s[k] = e
                    }
                }
            }
        }
        group.enter()
        Thread.detachNewThread {
            defer { group.leave() }
            while !stop.withLock({ $0 }) {
                do { let rep = try c.recover(); if !rep.isClean || !rep.committed.isEmpty || !rep.compensated.isEmpty { print("recover(): \(rep)") } } catch { print("recover() threw \(error)") }
                do { _ = try c.collectGarbage() } catch { print("gc threw \(error)") }
                usleep(2_000)
            }
        }
        // Workers first, then the maintenance thread.
        while stats.withLock({ $0.values.reduce(0) { $0 + $1.ok + $1.doubt + $1.failed } }) < 200 { usleep(50_000) }
        stop.withLock { $0 = true }
        group.wait()
        env.proxy.loseRepliesAtRandom(oneIn: nil)
        print("in doubt at the end: \(c.inDoubt); proxy fired \(env.proxy.firedCount); stats \(stats.withLock { $0 })")
        c.close()
        try env.reopen()
        let r = try env.coordinator()
        for k in keys {
            let kv = try env.kvGet(k), sql = try env.row(k)
            let s = stats.withLock { $0[k] } ?? (ok: 0, doubt: 0, failed: 0)
            print("\(k): KV \(kv ?? "nil") SQL \(sql.map(String.init) ?? "nil") ok \(s.ok) doubt \(s.doubt) failed \(s.failed)")
            #expect(kv == sql.map(String.init), "\(k) diverged")
            if let v = sql { #expect(Int(v) >= s.ok && Int(v) <= s.ok + s.doubt, "\(k): value \(v) vs ok \(s.ok) doubt \(s.doubt)") }
        }
        #expect(mismatches.withLock { $0 }.isEmpty, "\(mismatches.withLock { $0 })")
        r.close()
    }
}

extension TrustIIThirdReviewTests {
    /// A saga left in doubt (its COMMIT landed, the reply was lost, the fence refused); the
    /// process ends; the MariaDB server is killed and restarted (quickly, as a supervisor
    /// does). Recovery must not KILL the connection that now carries the old session's id.
    @Test(arguments: [false, true])
    func recoveryAfterTheServerRestarted(_ slow: Bool) throws {
        let server = try MariaDBServer()
        defer { server.stop() }
        let url = try MySQLURL(server.url)
        let proxy = try MySQLProxy(targetHost: "127.0.0.1", targetPort: UInt16(url.port))
        let proxied = "mysql://\(url.user):\(url.password)@127.0.0.1:\(proxy.port)/\(url.database)"
        let admin = try MySQLDatabase(url: url).openConnection()
        try admin.execute(conformanceTableDDL + " ENGINE=InnoDB", [])
        func start(_ c: MySQLConnection) throws -> Int64 { try c.query("SELECT UNIX_TIMESTAMP() - VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'UPTIME'", [])[0][0].int64 ?? -1 }
        let start1 = try start(admin)
        admin.close()
        let dir = try SQLiteEnvironment.makeTempDir("hc3-restart")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var kv = try RocksDBStore(path: dir + "/kv")
        var c: SagaCoordinator? = try SagaCoordinator(kv: kv, sql: try MySQLDatabase(url: proxied), configuration: .init(hooks: LoseReplyThenNoFence(proxy: proxy)))
        let r = Result { () throws(SagaError) in try c!.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            try saga.kv.put("a", "1")
        } }
        let rec = try kv.journalEntries().compactMap { e in JournalRecord.saga(fromKey: e.key).flatMap { _ in try? JournalRecord(decoding: e.value) } }.first
        print("saga: \(r); session in the record: \(String(describing: rec?.session))")
        c!.close(); c = nil
        kv.close()
        server.kill9()
        if slow { sleep(4) }
        try server.start()
        // Other clients reconnect; one of them gets the old session's id.
        var victims: [MySQLConnection] = []
        let oldID = Int64(rec?.session?.id ?? 0)
        var victim: MySQLConnection?
        let others = try MySQLDatabase(url: url)
        for _ in 0..<(Int(oldID) + 10) {
            let v = try others.openConnection()
            victims.append(v)
            if Int64(v.connectionID) == oldID { victim = v; break }
        }
        let start2 = try start(victims[0])
        print("server start before \(start1), after \(start2); victim with id \(oldID): \(victim != nil)")
        kv = try RocksDBStore(path: dir + "/kv")
        defer { kv.close() }
        let c2 = try SagaCoordinator(kv: kv, sql: try MySQLDatabase(url: url))
        let alive = (try? victim?.query("SELECT 1", [])) != nil
        let kvA = try kv.get(Bytes("a".utf8)).map { String(decoding: $0, as: UTF8.self) }
        let sqlConn = try MySQLDatabase(url: url).openConnection()
        let sqlA = try sqlConn.query("SELECT v FROM saga_test WHERE k = 'a'", []).first?[0].int64
        sqlConn.close()
        print("after recovery: victim alive \(alive); KV a = \(kvA ?? "nil"), SQL a = \(sqlA.map(String.init) ?? "nil")")
        #expect(victim != nil, "a connection got the old session's id \(oldID): the scenario happened")
        #expect(alive, "recovery killed another client's connection that reused the old session id")
        #expect((kvA == "1") == (sqlA == 1))
        c2.close()
        victims.forEach { $0.close() }
    }
}

extension TrustIIThirdReviewTests {
    /// A snapshot of a running node (data + journal), opened on the same database after the
    /// original committed one more saga: the copy is accepted (it holds the table's claim) and
    /// becomes the instance's owner, but its KV store lacks that saga's writes while SQL has
    /// them; its orphan removal deletes the saga's marker.
    @Test func hotCopyTakesOverWithAStaleKVStore() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let a = try env.coordinator(.init(gcThreshold: 1000))
        try a.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('x', 1)", [])
            try saga.kv.put("x", "1")
        }
        // The snapshot (a checkpoint of the running node).
        let copyDir = try SQLiteEnvironment.makeTempDir("hc3-hot")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        let copy = try RocksDBStore(path: copyDir + "/kv")
        defer { copy.close() }
        var b = KVWriteBatch()
        for (k, v) in try env.rocks.scan() { b.put(k, v) }
        for (k, v) in try env.kv.journalEntries() { b.put(k, v, in: .journal) }
        try copy.write(b, sync: true)
        // The original commits one more saga.
        let s2 = try a.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('y', 1)", [])
            try saga.kv.put("y", "1")
            return saga.id
        }
        print("A committed \(s2); markers \(try env.markers())")
        // While A runs, its hold refuses the copy: it never owns the instance with a stale KV.
        let refusal = try expectSagaError { try SagaCoordinator(kv: copy, sql: try SQLiteDatabase(path: env.sqlitePath)) }
        guard case .misuse(.instanceInUse) = refusal else { Issue.record("expected instanceInUse, got \(refusal)"); return }
        #expect(try env.markers().count == 2, "A's markers untouched")
        a.close()
    }
}

extension TrustIIThirdReviewTests {
    /// Two nodes (own KV stores, own SQLiteDatabase objects as two processes would have) on one
    /// SQLite file, sagas on both at once, 1 in 4 COMMITs failing (deferred FK), one node
    /// reopened in the middle. Each node's keys must agree between its KV and SQL.
    @Test func twoNodesOneSQLiteFile() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let dirB = try SQLiteEnvironment.makeTempDir("hc3-b")
        defer { try? FileManager.default.removeItem(atPath: dirB) }
        let kvB = try RocksDBStore(path: dirB + "/kv")
        defer { kvB.close() }
        var cfg = SQLiteDatabase.Configuration()
        cfg.busyTimeout = .seconds(20)
        let sqlA = try SQLiteDatabase(path: env.sqlitePath, configuration: cfg)
        let sqlB = try SQLiteDatabase(path: env.sqlitePath, configuration: cfg)
        var a = try SagaCoordinator(kv: env.kv, sql: sqlA, configuration: .init(gcThreshold: 5))
        let b = try SagaCoordinator(kv: kvB, sql: sqlB, configuration: .init(gcThreshold: 7))
        @Sendable func work(_ c: SagaCoordinator, _ node: String, _ n: Int, seed: UInt64) -> Int {
            var rng = SplitMix64(seed: seed)
            var ok = 0
            for i in 0..<n {
                let k = "\(node)\(rng.below(5))"
                let fail = rng.below(4) == 0
                do {
                    try c.run { saga in
                        let cur = try saga.sql.query("SELECT v FROM saga_test WHERE k = ?", [.text(k)]).first?[0].int64 ?? 0
                        _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v", [.text(k), .integer(cur + 1)])
                        try saga.kv.put(k, String(cur + 1))
                        if fail { _ = try saga.sql.execute("INSERT INTO fault_probe (ref) VALUES ('none-\(i)')", []) }
                    }
                    ok += 1
                } catch {}
            }
            return ok
        }
        let group = DispatchGroup()
        for (c, node, seed) in [(a, "a", UInt64(1)), (b, "b", UInt64(2))] {
            for t in 0..<2 {
                group.enter()
                Thread.detachNewThread { _ = work(c, node, 40, seed: seed * 10 + UInt64(t)); group.leave() }
            }
        }
        group.wait()
        a.close()
        try env.reopen()
        a = try SagaCoordinator(kv: env.kv, sql: try SQLiteDatabase(path: env.sqlitePath, configuration: cfg))
        group.enter()
        Thread.detachNewThread { _ = work(b, "b", 40, seed: 99); group.leave() }
        _ = work(a, "a", 40, seed: 98)
        group.wait()
        for node in ["a", "b"] {
            let kv: any KVStore = node == "a" ? env.kv : kvB
            for i in 0..<5 {
                let k = "\(node)\(i)"
                let kvV = try kv.get(Bytes(k.utf8)).map { String(decoding: $0, as: UTF8.self) }
                let sqlV = try env.row(k)
                #expect(kvV == sqlV.map(String.init), "\(k): KV \(kvV ?? "nil") SQL \(String(describing: sqlV))")
            }
        }
        print("rows: \(try env.sqlQuery("SELECT k, v FROM saga_test ORDER BY k").map { "\($0.values)" })")
        print("markers by instance: \(try env.sqlQuery("SELECT instance, COUNT(*) FROM saga_markers GROUP BY instance").map { "\($0.values)" })")
        a.close(); b.close()
    }
}

extension TrustIIThirdReviewTests {
    /// A copy opens (its claim UPDATE waits for the S locks of A's marker inserts) while A runs
    /// sagas on 3 threads. Every saga of A reported committed must be in both stores, every
    /// other one in neither.
    @Test func copyOpensWhileSagasHoldTheClaimRow() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let a = try SagaCoordinator(kv: env.kv, sql: try MySQLDatabase(url: env.directURL), configuration: .init(gcThreshold: 1000))
        let copyDir = try SQLiteEnvironment.makeTempDir("hc3-race")
        defer { try? FileManager.default.removeItem(atPath: copyDir) }
        let copy = try journalCopy(of: env.kv, into: copyDir)
        defer { copy.close() }
        let results = Locked([String: Bool]())
        let group = DispatchGroup()
        for t in 0..<3 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                for i in 0..<60 {
                    let k = "t\(t)-\(i)"
                    var ok = true
                    do {
                        try a.run { saga in
                            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text(k)])
                            try saga.kv.put(k, "1")
                        }
                    } catch { ok = false }
                    results.withLock { $0[k] = ok }
                }
            }
        }
        usleep(300_000)
        let t0 = ContinuousClock.now
        do {
            let c = try SagaCoordinator(kv: copy, sql: try MySQLDatabase(url: env.directURL))
            print("copy opened in \(ContinuousClock.now - t0)")
            c.close()
        } catch { print("copy open failed after \(ContinuousClock.now - t0): \(error)") }
        group.wait()
        var bad: [String] = []
        for (k, ok) in results.withLock({ $0 }) {
            let kv = try env.kvGet(k), sql = try env.row(k)
            if ok ? (kv != "1" || sql != 1) : (kv != nil || sql != nil) { bad.append("\(k) ok=\(ok) KV=\(kv ?? "nil") SQL=\(String(describing: sql))") }
        }
        print("committed \(results.withLock { $0.values.filter { $0 }.count }) of \(results.withLock { $0.count }); in doubt \(a.inDoubt)")
        #expect(bad.isEmpty, "\(bad)")
        a.close()
    }
}
