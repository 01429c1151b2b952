import SagaFaultKit
import Foundation
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend
import Testing

/// `aa-demo run` never spins (issue 9): a failure that can only repeat stops the node with a
/// non-zero exit naming the trigger; a lock held by a saga in doubt runs recovery, and stops the
/// node naming the saga when recovery cannot decide it. Each test runs the real executable with
/// a deadline, so that a node that loops fails the test instead of hanging it.
@Suite("aa-demo: no endless retries", .serialized)
struct AADemoRetryTests {
    static let triggers = CrashTests.triggers
    static let seed = CrashTests.seed

    /// A state value the AA cannot decode makes its body throw on every attempt. The node
    /// retries it once, then exits 3 naming the trigger and the error, within a few seconds and
    /// after a handful of saga ids; nothing is written.
    @Test func bodyFailureThatRepeatsStopsTheNode() throws {
        let node = try AADemoNode.sqlite("aa-body")
        defer { node.destroy() }
        let (mci, unit, address) = try node.seedOnly()
        try node.kvPut("st\n\(address)\nbalance", "n\nxyz")

        let r = try TimedDemo.run(node.runArguments(), timeout: 30)
        #expect(!r.timedOut, "aa-demo run stopped by itself (it was killed after \(r.seconds) s: it loops); \(r.tail)")
        #expect(r.exitCode == 3, "exit 3: the AA's body fails every time (\(r.tail))")
        #expect(r.seconds < 10, "within a few seconds, took \(r.seconds) s")
        #expect(r.stderr.contains("mci=\(mci)") && r.stderr.contains(unit), "names the trigger: \(r.stderr)")
        #expect(r.stderr.contains("is not a number: \"n\\nxyz\""), "names the error: \(r.stderr)")
        #expect(r.sagaIDs.count <= 3, "a bounded number of saga ids: \(r.sagaIDs.count) used")
        #expect(try node.queued() == Int(Self.triggers)!, "nothing was processed")
        #expect(try node.kvGet("st\n\(address)\nbalance") == "n\nxyz", "the bad value is left as it was")
    }

    /// A saga left in doubt by recovery at open (its fencing insert refused once) holds the
    /// keys of the next trigger. Retrying cannot help; the node runs recovery, which now
    /// decides the saga, and finishes the queue with the uninterrupted run's state.
    @Test(arguments: AADemoNode.Backend.allCases)
    func lockHeldBySagaInDoubtRunsRecovery(_ backend: AADemoNode.Backend) throws {
        let node = try AADemoNode.make(backend, "aa-doubt")
        defer { node.destroy() }
        try node.crashWithSagaPrepared()
        try node.refuseFencing(.once)

        let r = try TimedDemo.run(node.runArguments(), timeout: 60)
        #expect(!r.timedOut, "aa-demo run stopped by itself (killed after \(r.seconds) s: it loops); \(r.tail)")
        #expect(r.exitCode == 0, "recovery on demand decided the saga and the queue was finished: \(r.tail)")
        let held = r.stdout.split(separator: "\n").first { $0.contains("in doubt; running recovery") }
        #expect(held != nil, "it ran recovery for the saga holding the keys: \(r.stdout)")
        #expect(r.stdout.contains("still in doubt: saga#"), "recovery at open left a saga in doubt: \(r.stdout)")
        #expect(r.sagaIDs.count <= Int(Self.triggers)! + 5, "no spinning: \(r.sagaIDs.count) saga ids")
        let v = try node.verify()
        #expect(v.agree, "\(v.output)")
        #expect(v.digest == CrashTests.referenceDigest, "the same state as an uninterrupted run")
    }

    /// The same, but the SQL database keeps refusing to fence: recovery cannot decide the saga,
    /// so the node exits 2 naming it instead of retrying the trigger forever. `aa-demo recover`
    /// says the same; once fencing works again, recovery decides and the queue finishes.
    @Test(arguments: AADemoNode.Backend.allCases)
    func lockHeldBySagaThatStaysInDoubtStopsTheNode(_ backend: AADemoNode.Backend) throws {
        let node = try AADemoNode.make(backend, "aa-stuck")
        defer { node.destroy() }
        try node.crashWithSagaPrepared()
        try node.refuseFencing(.always)

        let r = try TimedDemo.run(node.runArguments(), timeout: 60)
        #expect(!r.timedOut, "aa-demo run stopped by itself (killed after \(r.seconds) s: it loops); \(r.tail)")
        #expect(r.exitCode == 2, "exit 2: a saga stays in doubt (\(r.tail))")
        let stuck = r.stdout.split(separator: "\n").first { $0.contains("still in doubt: ") }
            .flatMap { $0.split(separator: " ").last.map(String.init) }
        #expect(stuck != nil, "recovery at open named the saga in doubt: \(r.stdout)")
        if let stuck {
            #expect(r.stderr.contains("cannot decide \(stuck)"), "the exit message names \(stuck): \(r.stderr)")
        }
        #expect(r.seconds < 40, "took \(r.seconds) s")
        #expect(r.sagaIDs.count <= 5, "no spinning: \(r.sagaIDs.count) saga ids")

        let rec = try TimedDemo.run(["recover"] + node.location, timeout: 60)
        #expect(rec.exitCode == 2, "recover exits 2 while the saga stays in doubt: \(rec.tail)")
        #expect(rec.stdout.contains("1 saga(s) prepared in the journal"), "says what recovery found: \(rec.stdout)")
        if let stuck { #expect(rec.stderr.contains(stuck), "names \(stuck): \(rec.stderr)") }

        try node.refuseFencing(.never)
        let fixed = try TimedDemo.run(["recover"] + node.location, timeout: 60)
        #expect(fixed.exitCode == 0, "\(fixed.tail)")
        #expect(fixed.stdout.contains("1 compensated"), "recovery compensated the saga: \(fixed.stdout)")
        let finish = try TimedDemo.run(node.runArguments(), timeout: 60)
        #expect(finish.exitCode == 0, "\(finish.tail)")
        #expect(try node.verify().digest == CrashTests.referenceDigest)
    }
}

/// `--unprotected` keeps one connection for the node, like the coordinator's pool, instead of
/// opening one per trigger: a timing of the two paths compares the commit sequences only.
@Suite("aa-demo: connections", .serialized)
struct AADemoConnectionTests {
    @Test(arguments: [false, true])
    func bothPathsKeepTheirConnections(_ unprotected: Bool) throws {
        let node = try AADemoNode.sqlite("aa-conn")
        defer { node.destroy() }
        // A COMMIT that fails (deferred foreign key) must not cost a connection either.
        let r = try TimedDemo.run(node.runArguments(triggers: "40") + ["--fail-commit-at", "5"] + (unprotected ? ["--unprotected"] : []), timeout: 60)
        #expect(r.exitCode == 0, "\(r.tail)")
        #expect(r.stdout.contains("SQL connections opened: 2\n"), "the admin connection and one for the triggers: \(r.stdout.split(separator: "\n").last ?? "")")
    }

    /// Counted by the server: every connection MariaDB accepted for the node's database, from
    /// its general query log. Both paths open the same few (the backend's check of the URL,
    /// the admin connection, the one the triggers run on), however many triggers there are;
    /// the protected node one more, its instance hold (`GET_LOCK` on a connection of its own).
    @Test func unprotectedOpensAsFewConnectionsAsProtectedOnMariaDB() throws {
        let admin = try MySQLDatabase(url: try MySQLURL(try SharedMariaDB.url())).openConnection()
        defer { admin.close() }
        let before = try admin.query("SELECT @@global.general_log, @@global.log_output", [])
        try admin.execute("SET GLOBAL log_output = 'TABLE'", [])
        try admin.execute("SET GLOBAL general_log = 1", [])
        var connects: [Bool: Int64] = [:]
        for unprotected in [true, false] {
            let node = try AADemoNode.make(.mysql, "aa-conn-my")
            defer { node.destroy() }
            let r = try TimedDemo.run(node.runArguments(triggers: "40") + (unprotected ? ["--unprotected"] : []), timeout: 60)
            #expect(r.exitCode == 0, "\(r.tail)")
            connects[unprotected] = try admin.query(
                "SELECT COUNT(*) FROM mysql.general_log WHERE command_type = 'Connect' AND argument LIKE ?",
                [.text("% on \(node.database ?? "") %")]).first?[0].int64 ?? -1
        }
        try admin.execute("SET GLOBAL general_log = \(before.first?[0].int64 ?? 0)", [])
        try admin.execute("SET GLOBAL log_output = ?", [before.first?[1] ?? .text("FILE")])
        #expect((connects[true] ?? -9) + 1 == connects[false], "unprotected \(connects[true] ?? -1), protected \(connects[false] ?? -1) connections (one more: the instance hold)")
        #expect((connects[true] ?? 99) <= 3, "a few connections for 40 triggers, not one per trigger: \(connects[true] ?? -1)")
    }
}

/// One aa-demo node in a temporary directory, its SQL side in SQLite or in a fresh database on
/// the shared MariaDB server.
struct AADemoNode {
    enum Backend: String, CaseIterable, Sendable, CustomStringConvertible {
        case sqlite, mysql
        var description: String { rawValue }
    }

    let dir: String
    let sqlURL: String?
    let database: String?
    let server: MySQLURL?

    static func sqlite(_ tag: String) throws -> AADemoNode {
        AADemoNode(dir: try SQLiteEnvironment.makeTempDir(tag), sqlURL: nil, database: nil, server: nil)
    }

    static func make(_ backend: Backend, _ tag: String) throws -> AADemoNode {
        guard backend == .mysql else { return try sqlite(tag) }
        let server = try MySQLURL(try SharedMariaDB.url())
        let database = "aa_demo_" + UUID().uuidString.prefix(8).lowercased()
        let admin = try MySQLDatabase(url: server).openConnection()
        defer { admin.close() }
        try admin.execute("CREATE DATABASE \(database)", [])
        var url = server
        url.database = database
        let sql = "mysql://\(url.user):\(url.password)@\(url.host):\(url.port)/\(database)"
        return AADemoNode(dir: try SQLiteEnvironment.makeTempDir(tag), sqlURL: sql, database: database, server: url)
    }

    var location: [String] { ["--data", dir] + (sqlURL.map { ["--sql", $0] } ?? []) }

    func runArguments(triggers: String = CrashTests.triggers) -> [String] {
        ["run"] + location + ["--triggers", triggers, "--seed", CrashTests.seed]
    }

    func destroy() {
        if let server, let database, let admin = try? MySQLDatabase(url: server).openConnection() {
            _ = try? admin.execute("DROP DATABASE IF EXISTS \(database)", [])
            admin.close()
        }
        try? FileManager.default.removeItem(atPath: dir)
    }

    func sql() throws -> any SQLConnection {
        if let server { return try MySQLDatabase(url: server).openConnection() }
        return try SQLiteDatabase(path: dir + "/ledger.sqlite").openConnection()
    }

    /// Seeds the queue and dies before the first saga; returns the head of the queue.
    func seedOnly() throws -> (mci: Int64, unit: String, address: String) {
        let r = try TimedDemo.run(runArguments() + ["--crash-at", "begin"], timeout: 60)
        guard r.killed else { throw TestSetupError("aa-demo did not die at the first saga: \(r.tail)") }
        let conn = try sql()
        defer { conn.close() }
        guard let row = try conn.query("SELECT mci, unit, address FROM aa_triggers ORDER BY mci LIMIT 1", []).first,
              let mci = row[0].int64, let unit = row[1].string, let address = row[2].string else {
            throw TestSetupError("no trigger queued")
        }
        return (mci, unit, address)
    }

    /// Dies with the 4th trigger's saga prepared: its KV writes and journal record are durable,
    /// its SQL transaction never committed. GC after every saga leaves it the only record.
    func crashWithSagaPrepared() throws {
        let r = try TimedDemo.run(runArguments() + ["--gc-every", "1", "--crash-at", "prepared", "--crash-occurrence", "4"], timeout: 60)
        guard r.killed else { throw TestSetupError("aa-demo did not die at prepared: \(r.tail)") }
    }

    enum Refusal {
        /// Refuse the fencing of recovery at open, not the one of recovery on demand when the
        /// next trigger's lock wait (5 s) has timed out.
        case once
        case always
        case never
    }

    /// Makes fencing inserts (status 'aborted') into the marker table fail to decide, as if the
    /// SQL database could not be reached for them. Markers of committing sagas are untouched.
    /// SQLite: the trigger skips the row (RAISE(IGNORE)), so the fence finds no marker; its
    /// fence runs in a transaction that is rolled back, so `once` is a deadline 4.5 s away:
    /// recovery at open comes before it unless the node takes over 4.5 s to start, and recovery
    /// on demand after it, since the lock wait alone lasts 5 s from after the open. MariaDB:
    /// the trigger SIGNALs; `once` counts in a non-transactional table (Aria), whose update
    /// survives the failed insert.
    func refuseFencing(_ refusal: Refusal) throws {
        let conn = try sql()
        defer { conn.close() }
        if sqlURL == nil {
            try conn.execute("CREATE TABLE IF NOT EXISTS test_fence_refusals (until REAL NOT NULL)", [])
            try conn.execute("""
                CREATE TRIGGER IF NOT EXISTS test_refuse_fence BEFORE INSERT ON saga_markers
                WHEN NEW.status = 'aborted' AND (SELECT max(until) FROM test_fence_refusals) > julianday('now')
                BEGIN SELECT RAISE(IGNORE); END
                """, [])
            try conn.execute("DELETE FROM test_fence_refusals", [])
            switch refusal {
            case .once: try conn.execute("INSERT INTO test_fence_refusals VALUES (julianday('now') + 4.5 / 86400.0)", [])
            case .always: try conn.execute("INSERT INTO test_fence_refusals VALUES (julianday('now') + 1000)", [])
            case .never: break
            }
        } else {
            try conn.execute("CREATE TABLE IF NOT EXISTS test_fence_refusals (n INT NOT NULL) ENGINE=Aria TRANSACTIONAL=0", [])
            try conn.execute("""
                CREATE TRIGGER IF NOT EXISTS test_refuse_fence BEFORE INSERT ON saga_markers FOR EACH ROW
                IF NEW.status = 'aborted' AND (SELECT n FROM test_fence_refusals) > 0 THEN
                    UPDATE test_fence_refusals SET n = n - 1;
                    SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'test: fencing refused';
                END IF
                """, [])
            try conn.execute("DELETE FROM test_fence_refusals", [])
            let times: Int64 = switch refusal { case .once: 1; case .always: 1_000_000; case .never: 0 }
            try conn.execute("INSERT INTO test_fence_refusals (n) VALUES (?)", [.integer(times)])
        }
    }

    func queued() throws -> Int {
        let conn = try sql()
        defer { conn.close() }
        return Int(try conn.query("SELECT COUNT(*) FROM aa_triggers", []).first?[0].int64 ?? -1)
    }

    func kvPut(_ key: String, _ value: String) throws {
        let kv = try RocksDBStore(path: dir + "/kv")
        defer { kv.close() }
        var batch = KVWriteBatch()
        batch.set(Bytes(key.utf8), to: Bytes(value.utf8))
        try kv.write(batch, sync: true)
    }

    func kvGet(_ key: String) throws -> String? {
        let kv = try RocksDBStore(path: dir + "/kv")
        defer { kv.close() }
        return try kv.get(Bytes(key.utf8)).map { String(decoding: $0, as: UTF8.self) }
    }

    func verify() throws -> Demo.Verification { try TimedDemo.verify(location) }
}

/// Runs `aa-demo` (or another executable of the package, `executable`) with a deadline: past it
/// the child is SIGKILLed and the result says so.
enum TimedDemo {
    struct Result {
        let exitCode: Int32
        let killed: Bool
        let timedOut: Bool
        let seconds: Double
        let stdout: String
        let stderr: String
        /// How many times the child paused itself (`--pause-at`).
        var pauses = 0
        /// The distinct saga ids the output names.
        var sagaIDs: Set<Substring> {
            Set((stdout + stderr).matches(of: /saga#[0-9]+/).map { $0.output })
        }
        /// The end of both outputs, for messages.
        var tail: String {
            "exit \(exitCode)\(timedOut ? " (killed at the deadline)" : ""), stdout: …\(stdout.suffix(600)) stderr: …\(stderr.suffix(600))"
        }
    }

    /// - Parameter onPause: for a child run with `--pause-at`: called with 1, 2 ... each time
    ///   the child stops itself (`SIGSTOP`); the child then gets `SIGCONT`. If it throws, the
    ///   child is killed and the error rethrown.
    static func run(_ arguments: [String], executable: String = Demo.executable, timeout: Double,
                    onPause: ((Int) throws -> Void)? = nil) throws -> Result {
        let tmp = FileManager.default.temporaryDirectory
        let out = tmp.appendingPathComponent("aa-out-\(UUID().uuidString)").path
        let err = tmp.appendingPathComponent("aa-err-\(UUID().uuidString)").path
        defer {
            try? FileManager.default.removeItem(atPath: out)
            try? FileManager.default.removeItem(atPath: err)
        }
        let start = ContinuousClock.now
        let pid = try spawnProcess(executable, arguments, stdoutPath: out, stderrPath: err)
        var status: Int32 = 0
        var timedOut = false
        var pauses = 0
        while true {
            let rc = waitpid(pid, &status, WNOHANG | WUNTRACED)
            if rc == pid, status & 0xFF == 0x7F {  // stopped, not ended
                pauses += 1
                do { try onPause?(pauses) } catch {
                    kill(pid, SIGKILL)
                    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
                    throw error
                }
                kill(pid, SIGCONT)
                continue
            }
            if rc == pid { break }
            if rc < 0 && errno != EINTR { throw TestSetupError("waitpid failed: errno \(errno)") }
            if !timedOut, (ContinuousClock.now - start).seconds > timeout {
                timedOut = true
                kill(pid, SIGKILL)
            }
            usleep(20_000)
        }
        let seconds = (ContinuousClock.now - start).seconds
        let signaled = (status & 0x7F) != 0
        return Result(
            exitCode: signaled ? 128 + (status & 0x7F) : (status >> 8) & 0xFF,
            killed: signaled && (status & 0x7F) == SIGKILL && !timedOut,
            timedOut: timedOut, seconds: seconds,
            stdout: (try? String(contentsOfFile: out, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOfFile: err, encoding: .utf8)) ?? "",
            pauses: pauses)
    }
}

extension TimedDemo {
    /// `aa-demo verify` with these location arguments.
    static func verify(_ location: [String]) throws -> Demo.Verification {
        let r = try run(["verify"] + location, timeout: 60)
        let digest = r.stdout.split(separator: "\n").first { $0.hasPrefix("digest ") }.map { String($0.dropFirst(7)) } ?? "none"
        return Demo.Verification(agree: r.exitCode == 0, digest: digest, output: r.stdout + r.stderr)
    }
}

extension Duration {
    fileprivate var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
