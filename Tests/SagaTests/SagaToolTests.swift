import SagaFaultKit
import Foundation
import MySQLBackend
import RocksDBBackend
@testable import Saga
import SagaTestKit
import SQLiteBackend
import Testing

/// The `saga` operator tool (issue 14), run as a real process on real stores, its `--json`
/// output parsed. Each test leaves a node in a state an operator meets (sagas in doubt behind a
/// dead database, hundreds of pending sagas after a SIGKILL, a damaged record, a foreign write,
/// a node still running) and checks what the tool says, its exit code, and what it changes.
@Suite("saga tool", .serialized)
struct SagaToolTests {
    /// A saga left in doubt because the MariaDB server died at its COMMIT. While the server is
    /// down, `status` shows it in doubt with its keys, age and why, and `recover` exits 1
    /// deciding nothing; once the server is back, `status` says recovery will fence, `recover`
    /// compensates it and exits 0, and the KV side is as before the saga.
    @Test func inDoubtWhileTheDatabaseIsDownThenRecovered() throws {
        let server = try MariaDBServer()
        defer { server.stop() }
        let env = try MySQLEnvironment(serverURL: server.url)
        defer { env.destroy() }
        try env.kvSet([("st\nADDR\nbalance", "n\n100")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(300), hooks: KillServerAt(step: .commit, server: server)))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('balance', 105)", [])
                try saga.kv.put("st\nADDR\nbalance", "n\n105")
                try saga.kv.put("st\nADDR\ncount", "n\n1")
            }
        }
        guard case .inDoubt(let id, _) = error else { Issue.record("expected inDoubt, got \(error)"); return }
        c.close()
        env.rocks.close()
        let u = env.directURL
        let location = ["--kv", env.dir + "/kv", "--sql", "mysql://\(u.user):\(u.password)@\(u.host):\(u.port)/\(env.database)"]
        let output = ReadmeOutput(redacting: u.password)

        let down = try SagaToolProcess.run(["status", "--json"] + location)
        output.add(["status", "--json"] + location, "the MariaDB server is down", down)
        #expect(down.exitCode == 1, "exit 1: needs attention (\(down.tail))")
        let status = try SagaToolProcess.json(down)
        #expect((status["database"] as? [String: Any])?["reachable"] as? Bool == false)
        #expect(status["needsAttention"] as? Bool == true)
        #expect(status["pending"] as? Int == 1)
        let doubt = status["inDoubt"] as? [[String: Any]] ?? []
        #expect(doubt.count == 1, "one saga in doubt: \(doubt)")
        if let saga = doubt.first {
            #expect(saga["saga"] as? UInt64 == id.rawValue)
            #expect(saga["verdict"] as? String == "databaseUnreachable")
            #expect((saga["reason"] as? String)?.hasPrefix("database unreachable: ") == true, "\(saga)")
            let keys = (saga["keys"] as? [[String: Any]] ?? []).compactMap { $0["text"] as? String }
            #expect(Set(keys) == ["st\nADDR\nbalance", "st\nADDR\ncount"], "the saga's keys: \(keys)")
            let age = saga["ageSeconds"] as? Double
            #expect(age != nil && age! >= 0 && age! < 3600, "an age from preparedAt: \(String(describing: age))")
            #expect(saga["preparedAt"] is String)
        }
        #expect(status["oldestInDoubtAgeSeconds"] is Double)

        let text = try SagaToolProcess.run(["status"] + location)
        output.add(["status"] + location, "the same, as text", text)
        #expect(text.exitCode == 1)
        #expect(text.stdout.contains("database: UNREACHABLE") && text.stdout.contains("\(id)"), "\(text.stdout)")

        let stuck = try SagaToolProcess.run(["recover", "--json"] + location)
        output.add(["recover", "--json"] + location, "the server still down", stuck)
        #expect(stuck.exitCode == 1, "exit 1 while the database is down: \(stuck.tail)")
        let stuckReport = try SagaToolProcess.json(stuck)
        #expect(stuckReport["inDoubt"] as? [UInt64] == [id.rawValue])
        #expect(stuckReport["clean"] as? Bool == false)
        #expect(stuckReport["compensated"] as? [UInt64] == [])

        let resolveDown = try SagaToolProcess.run(["resolve", "\(id.rawValue)", "--json"] + location)
        #expect(resolveDown.exitCode == 1, "resolve decides nothing without the database: \(resolveDown.tail)")
        let resolveReport = try SagaToolProcess.json(resolveDown)
        #expect(resolveReport["outcome"] as? String == "held")
        #expect((resolveReport["database"] as? [String: Any])?["reachable"] as? Bool == false, "says why: \(resolveReport)")
        let resolveText = try SagaToolProcess.run(["resolve", "\(id.rawValue)"] + location)
        #expect(resolveText.exitCode == 1 && resolveText.stdout.contains("database unreachable") && resolveText.stdout.contains("stay in doubt"), "\(resolveText.stdout)")

        try server.start()
        let back = try SagaToolProcess.json(try SagaToolProcess.run(["status", "--json"] + location))
        #expect((back["database"] as? [String: Any])?["reachable"] as? Bool == true)
        let undecided = (back["inDoubt"] as? [[String: Any]])?.first
        #expect(undecided?["verdict"] as? String == "undecided")
        #expect((undecided?["reason"] as? String)?.hasPrefix("no marker: COMMIT outcome undecided, recovery will fence") == true)

        let recovered = try SagaToolProcess.run(["recover"] + location)
        output.add(["recover"] + location, "the server back", recovered)
        #expect(recovered.exitCode == 0, "\(recovered.tail)")
        #expect(recovered.stdout.contains("recovery: 0 committed, 1 compensated, 0 in doubt"), "\(recovered.stdout)")
        let after = try SagaToolProcess.run(["status", "--json"] + location)
        output.add(["status", "--json"] + location, "after recovery", after)
        #expect(after.exitCode == 0, "\(after.tail)")
        #expect((try SagaToolProcess.json(after))["pending"] as? Int == 0)
        let kv = try RocksDBStore(path: env.dir + "/kv")
        defer { kv.close() }
        #expect(try kv.get(Bytes("st\nADDR\nbalance".utf8)) == Bytes("n\n100".utf8), "the saga's KV writes were undone")
        #expect(try kv.get(Bytes("st\nADDR\ncount".utf8)) == nil)
        output.save()
    }

    /// aa-demo SIGKILLed at its 300th saga with garbage collection not yet due: 299 sagas
    /// committed awaiting GC, one undecided. `status` counts them and changes nothing;
    /// `verify-journal` is clean, then reports a record with a flipped byte (exit 1); `recover`
    /// decides the 299 others and refuses to guess past it (exit 1); with the record back,
    /// `recover` decides it too, and both stores agree.
    @Test func hundredsOfPendingSagasAfterSIGKILL() throws {
        let dir = try SQLiteEnvironment.makeTempDir("saga-tool-kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let crash = try TimedDemo.run(["run", "--data", dir, "--triggers", "400", "--seed", CrashTests.seed, "--crash-at", "prepared", "--crash-occurrence", "300"], timeout: 600)
        try #require(crash.killed, "aa-demo died at its 300th saga: \(crash.tail)")
        let location = ["--kv", dir + "/kv", "--sql", dir + "/ledger.sqlite"]
        let before = try NodeSnapshot(dir)

        let statusRun = try SagaToolProcess.run(["status", "--json"] + location)
        #expect(statusRun.exitCode == 1, "one saga is undecided: \(statusRun.tail)")
        let status = try SagaToolProcess.json(statusRun)
        #expect(status["pending"] as? Int == 300)
        #expect((status["journal"] as? [String: Int])?["prepared"] == 300)
        #expect((status["markers"] as? [String: Int]) == ["committed": 299, "aborted": 0, "redo": 0])
        #expect((status["committedAwaitingGC"] as? [UInt64])?.count == 299)
        let doubt = status["inDoubt"] as? [[String: Any]] ?? []
        #expect(doubt.count == 1 && doubt.first?["verdict"] as? String == "undecided", "\(doubt)")
        let undecided = doubt.first?["saga"] as? UInt64 ?? 0
        let inspect = try SagaToolProcess.run(["inspect", "\(undecided)"] + location)
        #expect(inspect.exitCode == 1 && inspect.stdout.contains("recovery would: no marker"), "\(inspect.stdout)")
        #expect(try NodeSnapshot(dir) == before, "status and inspect changed nothing in either store")

        let clean = try SagaToolProcess.run(["verify-journal", "--json", "--kv", dir + "/kv"])
        #expect(clean.exitCode == 0, "\(clean.tail)")
        let cleanReport = try SagaToolProcess.json(clean)
        #expect(cleanReport["checked"] as? Int ?? 0 >= 300)
        #expect((cleanReport["damaged"] as? [Any])?.isEmpty == true)

        // One byte of saga 150's record flipped.
        let victim = SagaID(150)
        let original = try withKV(dir) { kv in try kv.journalGet(JournalRecord.key(for: victim)) }
        let good = try #require(original, "saga 150 has a record")
        var bad = good
        bad[20] ^= 0xFF
        try withKV(dir) { kv in
            var batch = KVWriteBatch()
            batch.put(JournalRecord.key(for: victim), bad, in: .journal)
            try kv.write(batch, sync: true)
        }
        let damaged = try SagaToolProcess.run(["verify-journal", "--json", "--kv", dir + "/kv"])
        #expect(damaged.exitCode == 1, "non-zero with a damaged record: \(damaged.tail)")
        let list = try SagaToolProcess.json(damaged)["damaged"] as? [[String: Any]] ?? []
        #expect(list.count == 1 && list.first?["saga"] as? UInt64 == 150, "\(list)")
        #expect((list.first?["reason"] as? String)?.contains("checksum mismatch") == true, "\(list)")
        let text = try SagaToolProcess.run(["verify-journal", "--kv", dir + "/kv"])
        #expect(text.exitCode == 1 && text.stdout.contains("1 damaged") && text.stdout.contains("saga#150"), "\(text.stdout)")
        let withDamage = try SagaToolProcess.json(try SagaToolProcess.run(["status", "--json"] + location))
        #expect((withDamage["journal"] as? [String: Int])?["damaged"] == 1)
        // Recovery decides every other saga, then refuses to open past the damaged record.
        let refused = try SagaToolProcess.run(["recover"] + location)
        #expect(refused.exitCode == 1 && refused.stderr.contains("damaged"), "recovery refuses to guess: \(refused.tail)")
        let leftRun = try SagaToolProcess.run(["status", "--json"] + location)
        let left = try SagaToolProcess.json(leftRun)
        #expect(leftRun.exitCode == 1, "the damaged record needs attention: \(leftRun.tail)")
        #expect((left["journal"] as? [String: Int]) == ["prepared": 0, "committed": 0, "compensated": 0, "damaged": 1], "\(left)")
        #expect((left["markers"] as? [String: Int]) == ["committed": 1, "aborted": 0, "redo": 0], "only saga 150's marker is left: \(left)")

        try withKV(dir) { kv in
            var batch = KVWriteBatch()
            batch.put(JournalRecord.key(for: victim), good, in: .journal)
            try kv.write(batch, sync: true)
        }
        let recovered = try SagaToolProcess.run(["recover", "--json"] + location)
        #expect(recovered.exitCode == 0, "\(recovered.tail)")
        let report = try SagaToolProcess.json(recovered)
        #expect(report["committed"] as? [UInt64] == [150], "the restored record's saga, committed: \(report)")
        #expect(report["compensated"] as? [UInt64] == [])
        #expect(report["inDoubt"] as? [UInt64] == [] && report["clean"] as? Bool == true)
        let after = try SagaToolProcess.run(["status", "--json"] + location)
        let afterStatus = try SagaToolProcess.json(after)
        #expect(after.exitCode == 0 && afterStatus["pending"] as? Int == 0, "\(after.tail)")
        #expect(try SagaToolProcess.run(["verify-journal", "--kv", dir + "/kv"]).exitCode == 0)
        let gc = try SagaToolProcess.run(["gc", "--json"] + location)
        let gcReport = try SagaToolProcess.json(gc)
        #expect(gc.exitCode == 0 && gcReport["journalRecordsLeft"] as? Int == 0, "\(gc.tail)")
        let v = try TimedDemo.verify(["--data", dir])
        #expect(v.agree, "both stores agree after the tool's recovery: \(v.output)")
    }

    /// While a coordinator holds the stores (here, in the test process), every command refuses
    /// with exit 3 and says a running node holds them; a copy of the KV store is refused by the
    /// instance the SQL database holds. Once the coordinator is closed, the tool works.
    @Test func refusesStoresARunningNodeHolds() throws {
        let dir = try SQLiteEnvironment.makeTempDir("saga-tool-live")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let rocks = try RocksDBStore(path: dir + "/kv")
        defer { rocks.close() }
        let sqlite = try SQLiteDatabase(path: dir + "/db.sqlite")
        let c = try SagaCoordinator(kv: rocks, sql: sqlite)
        try c.run { saga in try saga.kv.put("k", "v") }
        let location = ["--kv", dir + "/kv", "--sql", dir + "/db.sqlite"]

        for command in [["status"], ["inspect", "1"], ["recover"], ["resolve", "1"], ["gc"], ["verify-journal"]] {
            let r = try SagaToolProcess.run(command + location)
            #expect(r.exitCode == 3, "\(command[0]): exit 3 (\(r.tail))")
            #expect(r.stderr.contains("the KV store at \(dir)/kv is open in another process (a running node): stop it first"), "\(command[0]): \(r.stderr)")
        }
        let json = try SagaToolProcess.run(["status", "--json"] + location)
        let object = try SagaToolProcess.json(json)
        #expect(object["exitCode"] as? Int == 3 && (object["error"] as? String)?.contains("open in another process") == true, "\(object)")

        // A copy of the KV store, on the same database: the instance is held.
        try FileManager.default.copyItem(atPath: dir + "/kv", toPath: dir + "/kv-copy")
        let copy = try SagaToolProcess.run(["recover", "--kv", dir + "/kv-copy", "--sql", dir + "/db.sqlite"])
        #expect(copy.exitCode == 3, "\(copy.tail)")
        #expect(copy.stderr.contains("is held by a running coordinator on this SQL database"), "\(copy.stderr)")
        try FileManager.default.removeItem(atPath: dir + "/kv-copy")

        c.close()
        rocks.close()
        let free = try SagaToolProcess.run(["status"] + location)
        #expect(free.exitCode == 0 && free.stdout.contains("nothing needs attention"), "\(free.tail)")
    }

    /// A foreign write stops a compensation: `inspect` shows the record with printable values
    /// as text and binary ones as hex, the current values, and that recovery would hold it;
    /// `resolve` keeps it held until the key is repaired, then finishes the undo.
    @Test func inspectAndResolveAForeignWrite() throws {
        let dir = try SQLiteEnvironment.makeTempDir("saga-tool-foreign")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let binaryKey: Bytes = [0x00, 0x01, 0xFE]
        let location = ["--kv", dir + "/kv", "--sql", dir + "/db.sqlite"]
        let id: SagaID
        do {
            let rocks = try RocksDBStore(path: dir + "/kv")
            defer { rocks.close() }
            let sqlite = try SQLiteDatabase(path: dir + "/db.sqlite")
            let conn = try sqlite.openConnection()
            try conn.execute("CREATE TABLE parent (id TEXT PRIMARY KEY)", [])
            try conn.execute("CREATE TABLE probe (ref TEXT REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)", [])
            conn.close()
            var batch = KVWriteBatch()
            batch.put(Bytes("f".utf8), Bytes("pre".utf8))
            batch.put(binaryKey, [0xFF, 0x00])
            try rocks.write(batch, sync: true)
            let c = try SagaCoordinator(kv: rocks, sql: sqlite, configuration: .init(hooks: WriteBehindCompensation(kv: rocks)))
            let error = try expectSagaError {
                try c.run { saga in
                    try saga.kv.put("f", "post")
                    try saga.kv.put(binaryKey, [0xDE, 0xAD, 0x00])
                    // A deferred foreign key: COMMIT fails, proved by SQLite.
                    try saga.sql.execute("INSERT INTO probe (ref) VALUES ('none')", [])
                }
            }
            guard case .compensationFailedAfterCommit(let s, _, .foreignWrite) = error else {
                Issue.record("expected a foreign write, got \(error)")
                return
            }
            id = s
            c.close()
        }

        let inspect = try SagaToolProcess.run(["inspect", "\(id.rawValue)", "--json"] + location)
        #expect(inspect.exitCode == 1, "held: \(inspect.tail)")
        let record = try SagaToolProcess.json(inspect)
        #expect(record["verdict"] as? String == "foreignWrite")
        #expect((record["recoveryWould"] as? String)?.contains("written behind the saga") == true)
        #expect(record["marker"] is NSNull, "COMMIT failed: no marker row")
        let keys = record["keys"] as? [[String: Any]] ?? []
        let printable = keys.first { ($0["key"] as? [String: Any])?["text"] as? String == "f" }
        #expect(value(printable?["preImage"]) == Value("pre", "707265"))
        #expect(value(printable?["afterImage"]) == Value("post", "706f7374"))
        #expect(value(printable?["current"]) == Value("foreign", "666f726569676e"))
        #expect(printable?["currentMatches"] as? String == "neither")
        let binary = keys.first { ($0["key"] as? [String: Any])?["hex"] as? String == "0001fe" }
        #expect(binary != nil && value(binary?["key"]) == Value(nil, "0001fe"), "binary key as hex, text null: \(keys)")
        #expect(value(binary?["preImage"]) == Value(nil, "ff00"))
        #expect(value(binary?["afterImage"]) == Value(nil, "dead00"))
        #expect(binary?["currentMatches"] as? String == "afterImage")
        let text = try SagaToolProcess.run(["inspect", "\(id.rawValue)"] + location)
        #expect(text.stdout.contains("\"foreign\"") && text.stdout.contains("0x0001fe") && text.stdout.contains("0xdead00") && text.stdout.contains("NEITHER"), "\(text.stdout)")

        let held = try SagaToolProcess.run(["resolve", "\(id.rawValue)", "--json"] + location)
        #expect(held.exitCode == 1, "still held before the repair: \(held.tail)")
        #expect(try SagaToolProcess.json(held)["outcome"] as? String == "held")
        let status = try SagaToolProcess.json(try SagaToolProcess.run(["status", "--json"] + location))
        let entry = (status["inDoubt"] as? [[String: Any]])?.first
        #expect(entry?["verdict"] as? String == "foreignWrite" && entry?["marker"] as? String == "aborted", "fenced by the recovery of resolve, still held: \(String(describing: entry))")

        // The repair: the key back to the saga's after-image (recovery then restores the pre-image).
        try withKV(dir) { kv in
            var batch = KVWriteBatch()
            batch.put(Bytes("f".utf8), Bytes("post".utf8))
            try kv.write(batch, sync: true)
        }
        let resolved = try SagaToolProcess.run(["resolve", "\(id.rawValue)", "--json"] + location)
        #expect(resolved.exitCode == 0, "\(resolved.tail)")
        #expect(try SagaToolProcess.json(resolved)["outcome"] as? String == "compensated")
        let restored = try withKV(dir) { kv in (try kv.get(Bytes("f".utf8)), try kv.get(binaryKey)) }
        #expect(restored.0 == Bytes("pre".utf8) && restored.1 == [0xFF, 0x00], "both keys back to their pre-images: \(restored)")
        #expect(try SagaToolProcess.run(["status"] + location).exitCode == 0)
    }

    /// A node whose backend names its marker table otherwise: `--table` reads it; without it the
    /// tool finds no such table and says the database could not be read (exit 1).
    @Test func customMarkerTable() throws {
        let dir = try SQLiteEnvironment.makeTempDir("saga-tool-table")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        do {
            let rocks = try RocksDBStore(path: dir + "/kv")
            defer { rocks.close() }
            var config = SQLiteDatabase.Configuration()
            config.markerTable = "node_markers"
            let c = try SagaCoordinator(kv: rocks, sql: try SQLiteDatabase(path: dir + "/db.sqlite", configuration: config))
            try c.run { saga in try saga.kv.put("k", "v") }
            c.close()
        }
        let location = ["--kv", dir + "/kv", "--sql", dir + "/db.sqlite"]
        let named = try SagaToolProcess.run(["status", "--json", "--table", "node_markers"] + location)
        #expect(named.exitCode == 0, "\(named.tail)")
        let status = try SagaToolProcess.json(named)
        #expect(status["table"] as? String == "node_markers" && (status["database"] as? [String: Any])?["reachable"] as? Bool == true, "\(status)")
        let unnamed = try SagaToolProcess.run(["status", "--json"] + location)
        #expect(unnamed.exitCode == 1, "\(unnamed.tail)")
        let error = (try SagaToolProcess.json(unnamed)["database"] as? [String: Any])?["error"] as? String
        #expect(error?.contains("no such table: saga_markers") == true, "\(String(describing: error))")
    }

    /// `status` on a KV directory that holds no store, or an SQLite path with no file, is an
    /// error (exit 2) and creates neither.
    @Test func missingStoresAreErrorsAndNotCreated() throws {
        let dir = try SQLiteEnvironment.makeTempDir("saga-tool-missing")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try SagaToolProcess.run(["status", "--kv", dir + "/nokv", "--sql", dir + "/no.sqlite"])
        #expect(r.exitCode == 2 && r.stderr.contains("cannot open the KV store"), "\(r.tail)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/nokv"))
        _ = try RocksDBStore(path: dir + "/kv")  // an empty store, closed at once
        let noSQL = try SagaToolProcess.run(["recover", "--kv", dir + "/kv", "--sql", dir + "/no.sqlite"])
        #expect(noSQL.exitCode == 2 && noSQL.stderr.contains("no SQLite database at"), "\(noSQL.tail)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/no.sqlite"))
    }
}

/// `NodeInspection` without a process: an older committed saga whose key a newer prepared saga
/// wrote since is not a foreign write (aa-demo left exactly this when its database died: the
/// tool first called it one); a value neither saga wrote is, for the newer saga.
extension SagaToolTests {
    @Test(arguments: [false, true])
    func aKeyOfANewerSagaIsNotAForeignWrite(foreign: Bool) throws {
        let dir = try SQLiteEnvironment.makeTempDir("saga-inspect")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kv = try RocksDBStore(path: dir + "/kv")
        defer { kv.close() }
        let k = Bytes("k".utf8)
        var batch = KVWriteBatch()
        batch.put(JournalRecord.key(for: SagaID(1)), JournalRecord(saga: SagaID(1), state: .prepared, entries: [.init(key: k, preImage: nil, afterImage: Bytes("b".utf8))], preparedAt: 1000).encoded(), in: .journal)
        batch.put(JournalRecord.key(for: SagaID(2)), JournalRecord(saga: SagaID(2), state: .prepared, entries: [.init(key: k, preImage: Bytes("b".utf8), afterImage: Bytes("c".utf8))], preparedAt: 2000).encoded(), in: .journal)
        batch.put(k, Bytes((foreign ? "z" : "c").utf8))
        try kv.write(batch, sync: true)

        let node = try NodeInspection.read(kv: kv, sql: .failure(TestSetupError("down")), markerTable: "saga_markers", now: 5000)
        #expect(node.pending.map(\.saga) == [SagaID(1), SagaID(2)])
        #expect(node.pending.first?.keys.first?.match == .newerSaga)
        #expect(node.pending.first?.verdict == .databaseUnreachable)
        #expect(node.pending.last?.keys.first?.match == (foreign ? .neither : .afterImage))
        #expect(node.pending.last?.verdict == (foreign ? .foreignWrite : .databaseUnreachable))
        #expect(node.oldestInDoubtAgeMilliseconds == 4000)
        #expect(node.needsAttention)
    }
}

/// A KV value as the tool's JSON gives it: `{"text", "hex"}`.
private struct Value: Equatable {
    let text: String?
    let hex: String
    init(_ text: String?, _ hex: String) { self.text = text; self.hex = hex }
}

private func value(_ any: Any?) -> Value? {
    guard let object = any as? [String: Any], let hex = object["hex"] as? String else { return nil }
    return Value(object["text"] as? String, hex)
}

private func withKV<T>(_ dir: String, _ body: (RocksDBStore) throws -> T) throws -> T {
    let kv = try RocksDBStore(path: dir + "/kv")
    defer { kv.close() }
    return try body(kv)
}

/// Writes "foreign" to key `f` behind the coordinator when compensation starts (once).
final class WriteBehindCompensation: SagaHooks, @unchecked Sendable {
    let kv: RocksDBStore
    private let done = NSLock()
    private var fired = false
    init(kv: RocksDBStore) { self.kv = kv }
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard step == .compensate, phase == .run, done.withLock({ !fired && { fired = true; return true }() }) else { return }
        var batch = KVWriteBatch()
        batch.put(Bytes("f".utf8), Bytes("foreign".utf8))
        try kv.write(batch, sync: true)
    }
}

/// Everything both stores of an aa-demo node hold: journal, data, and the SQL tables that
/// matter, for "changed nothing".
struct NodeSnapshot: Equatable {
    let journal: [[UInt8]]
    let data: [[UInt8]]
    let markers: [SQLRow]
    let instances: [SQLRow]

    init(_ dir: String) throws {
        let kv = try RocksDBStore(path: dir + "/kv")
        defer { kv.close() }
        journal = try kv.journalEntries().map { $0.key + [0xFF] + $0.value }
        data = try kv.scan().map { $0.key + [0xFF] + $0.value }
        let conn = try SQLiteDatabase.openReadOnly(path: dir + "/ledger.sqlite")
        defer { conn.close() }
        markers = try conn.query("SELECT * FROM saga_markers ORDER BY instance, saga_id", [])
        instances = try conn.query("SELECT * FROM saga_markers_instances", [])
    }
}

/// Runs the `saga` executable built next to the test binary.
enum SagaToolProcess {
    static var executable: String {
        URL(fileURLWithPath: Demo.executable).deletingLastPathComponent().appendingPathComponent("saga").path
    }

    static func run(_ arguments: [String]) throws -> TimedDemo.Result {
        let r = try TimedDemo.run(arguments, executable: executable, timeout: 300)
        if r.timedOut { throw TestSetupError("saga \(arguments.first ?? "") did not finish: \(r.tail)") }
        return r
    }

    /// The JSON object a `--json` run printed.
    static func json(_ r: TimedDemo.Result) throws -> [String: Any] {
        guard let object = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else {
            throw TestSetupError("not a JSON object: \(r.stdout)")
        }
        return object
    }
}

/// Real output of the tool for the README, written to `SAGA_TOOL_README_OUTPUT` when that is set.
final class ReadmeOutput: @unchecked Sendable {
    private var text = ""
    private let secret: String
    init(redacting secret: String) { self.secret = secret }

    /// One run: the exact command line (the password redacted), when, its exit code and stdout.
    func add(_ arguments: [String], _ when: String, _ r: TimedDemo.Result) {
        func redact(_ s: String) -> String { secret.isEmpty ? s : s.replacingOccurrences(of: ":\(secret)@", with: ":***@") }
        let command = redact((["saga"] + arguments).map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " "))
        text += "### \(when)\n\n```\n$ \(command)\n\(redact(r.stdout))```\n\nexit \(r.exitCode)\n\n"
    }

    func save() {
        guard let path = ProcessInfo.processInfo.environment["SAGA_TOOL_README_OUTPUT"] else { return }
        try? text.write(toFile: path, atomically: true, encoding: .utf8)
    }
}
