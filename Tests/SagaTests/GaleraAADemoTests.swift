import SagaFaultKit
import Foundation
import MySQLBackend
import Saga
import Testing

/// `aa-demo` with its SQL side on a 3-node Galera cluster, through the multi-host URL: its
/// connections go to node 1, the first of the URL. Node 1 is killed (`kill -9`) while a saga
/// has its transaction open on it, or right after the aa-demo process itself was killed, and
/// restarted later; the node ends with the same state digest as the same trigger stream on
/// SQLite, and the three nodes hold the same rows. Each test starts a cluster of its own (it
/// kills nodes) and stops it in a `defer`. The kills happen at protocol steps (the child pauses
/// itself or crashes there), never after a delay.
@Suite("aa-demo on a Galera cluster: node kills", .serialized)
struct GaleraAADemoTests {
    static let triggers = "40"

    /// The digest of the same 40-trigger stream, uninterrupted, on SQLite.
    static let referenceDigest: String = {
        do {
            let dir = try SQLiteEnvironment.makeTempDir("galera-aa-ref")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let run = try TimedDemo.run(["run", "--data", dir, "--triggers", triggers, "--seed", CrashTests.seed], timeout: 300)
            guard run.exitCode == 0 else { return "reference run failed: \(run.tail)" }
            return try TimedDemo.verify(["--data", dir]).digest
        } catch {
            return "reference run failed: \(error)"
        }
    }()

    /// The node pauses at its 10th COMMIT, the saga's transaction open on node 1; node 1 is
    /// killed, and the COMMIT goes to a dead server: outcome unknown, the fence runs on node 2
    /// and aborts the saga, whose KV writes are undone; the trigger is retried on node 2. At
    /// its 25th COMMIT (its transaction open on node 2) node 1 is restarted and rejoins: the
    /// three marker tables are the same, the fence's `aborted` row among them. The queue ends
    /// with SQLite's digest, and the three nodes hold the same rows in every table.
    @Test func nodeKilledUnderAnOpenSagaThenRejoined() throws {
        let cluster = try GaleraCluster()
        defer { cluster.stop() }
        let db = try GaleraDemoDatabase(cluster, "aa_node_kill")
        let dir = try SQLiteEnvironment.makeTempDir("galera-aa")
        defer { try? FileManager.default.removeItem(atPath: dir) }

        var openBeforeKill: [Int: Int] = [:], openAfterKill: [Int: Int] = [:]
        var markersAfterRejoin: [[String]] = []
        let run = try TimedDemo.run(
            ["run", "--data", dir, "--sql", db.url, "--triggers", Self.triggers, "--seed", CrashTests.seed,
             "--pause-at", "run:commit", "--pause-occurrences", "10,25"],
            timeout: 600
        ) { pause in
            if pause == 1 {
                for n in GaleraCluster.nodes { openBeforeKill[n] = try db.openTransactions(on: n) }
                try cluster.kill9(1)
            } else {
                for n in [2, 3] { openAfterKill[n] = try db.openTransactions(on: n) }
                try cluster.restart(1)
                markersAfterRejoin = try GaleraCluster.nodes.map { try db.rows(of: "saga_markers", on: $0) }
            }
        }
        #expect(run.exitCode == 0, "the node finished the queue: \(run.tail)")
        #expect(run.pauses == 2, "paused at both COMMITs: \(run.tail)")
        #expect(openBeforeKill == [1: 1, 2: 0, 3: 0], "the paused saga's transaction was open on node 1 when it was killed: \(openBeforeKill)")
        #expect(openAfterKill == [2: 1, 3: 0], "then the node's sagas ran on node 2: \(openAfterKill)")
        // On a cluster node the marker insert and COMMIT go in two round trips: the insert sent
        // to the killed node fails, a known failure (nothing to fence); if it had gone out and
        // only COMMIT's reply were lost, the outcome would be unknown and a fence on another
        // node would abort it.
        let fenced = run.stderr.contains("COMMIT outcome unknown")
        if fenced {
            #expect(run.stderr.contains("resolved by fencing: 0 committed, 1 aborted"), "the fence on another node aborted it: \(run.tail)")
        }
        #expect(run.stdout.contains("KV compensated"), "its KV writes were undone before the retry: \(run.tail)")

        #expect(markersAfterRejoin.count == 3 && Set(markersAfterRejoin).count == 1,
                "the rejoined node 1 holds the same markers as nodes 2 and 3: \(markersAfterRejoin.map(\.count))")
        let markers = markersAfterRejoin.first ?? []
        #expect(markers.filter { $0.contains("'aborted'") }.count == (fenced ? 1 : 0), "the fence's row, if it fenced: \(markers)")
        #expect(markers.filter { $0.contains("'committed'") }.count == 23, "the sagas of the first 24 COMMITs but the fenced one: \(markers)")

        let verify = try TimedDemo.verify(["--data", dir, "--sql", db.url])
        #expect(verify.agree, "\(verify.output)")
        #expect(verify.digest == Self.referenceDigest, "the same state as the stream on SQLite")
        try db.expectSameRowsOnEveryNode()
    }

    /// The aa-demo process is killed at a step around COMMIT (after a COMMIT that failed on a
    /// killed connection, as on a single MariaDB server), then node 1, which its connections
    /// used, is killed too: `aa-demo recover` runs on node 2, where a COMMIT certified through
    /// node 1 must be found (the fence reads causally) and one that never reached it is
    /// fenced. Then node 1 rejoins and the node finishes the queue with SQLite's digest.
    @Test(arguments: ["prepared", "marker", "commit", "committed"])
    func processKilledThenItsNodeKilledThenRecovered(_ step: String) throws {
        let cluster = try GaleraCluster()
        defer { cluster.stop() }
        let db = try GaleraDemoDatabase(cluster, "aa_crash")
        let dir = try SQLiteEnvironment.makeTempDir("galera-aa-crash")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let location = ["--data", dir, "--sql", db.url]
        let base = ["run"] + location + ["--triggers", CrashTests.triggers, "--seed", CrashTests.seed]

        let crashed = try TimedDemo.run(base + ["--fail-commit-at", "2", "--fail-mode", "kill", "--crash-at", step, "--crash-occurrence", "4"], timeout: 300)
        #expect(crashed.killed, "aa-demo reached \(step) and killed itself: \(crashed.tail)")
        try cluster.kill9(1)

        let recovered = try TimedDemo.run(["recover"] + location, timeout: 300)
        #expect(recovered.exitCode == 0, "recovery on the nodes left decides every saga: \(recovered.tail)")
        let afterRecovery = try TimedDemo.verify(location)
        #expect(afterRecovery.agree, "KV and SQL agree after recovery: \(afterRecovery.output)")

        try cluster.restart(1)
        let finish = try TimedDemo.run(base, timeout: 300)
        #expect(finish.exitCode == 0, "\(finish.tail)")
        let verify = try TimedDemo.verify(location)
        #expect(verify.agree, "\(verify.output)")
        #expect(verify.digest == CrashTests.referenceDigest, "the same state as the SQLite node's uninterrupted run")
        try db.expectSameRowsOnEveryNode()
    }
}

/// A fresh database of the example on a test's own cluster, and what the tests read on each
/// node alone.
struct GaleraDemoDatabase {
    let cluster: GaleraCluster
    let name: String
    /// The multi-host URL of the database.
    let url: String
    static let tables = ["saga_markers", "saga_markers_instances", "aa_balances", "aa_responses", "aa_triggers", "demo_meta"]

    init(_ cluster: GaleraCluster, _ tag: String) throws {
        self.cluster = cluster
        name = tag + "_" + UUID().uuidString.prefix(8).lowercased()
        let admin = try MySQLDatabase(url: cluster.url).openConnection()
        defer { admin.close() }
        try admin.execute("CREATE DATABASE \(name)", [])
        guard let slash = cluster.url.lastIndex(of: "/") else { throw TestSetupError("bad cluster URL \(cluster.url)") }
        url = cluster.url[..<slash] + "/" + name
    }

    /// A connection to node `n` alone, in the cluster's own database (a connection in this
    /// one would create its marker table, a DDL that aborts the transactions open on it):
    /// the tables are named with the database.
    private func connect(_ n: Int, causal: Bool) throws -> MySQLConnection {
        let conn = try MySQLDatabase(url: cluster.nodeURL(n)).openConnection()
        // Reads wait until the node has applied every write the cluster committed before them.
        if causal { try conn.execute("SET SESSION wsrep_sync_wait = 1", []) }
        return conn
    }

    /// InnoDB transactions open on node `n` in sessions of the test user in this database.
    func openTransactions(on n: Int) throws -> Int {
        let conn = try connect(n, causal: false)
        defer { conn.close() }
        return Int(try conn.query("""
            SELECT COUNT(*) FROM information_schema.INNODB_TRX t
            JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id
            WHERE p.DB = ? AND p.USER = 'saga'
            """, [.text(name)]).first?[0].int64 ?? -1)
    }

    /// Every row of `table` on node `n`, in key order, one string per row.
    func rows(of table: String, on n: Int) throws -> [String] {
        let conn = try connect(n, causal: true)
        defer { conn.close() }
        return try conn.query("SELECT * FROM \(name).\(table) ORDER BY 1, 2", []).map { row in
            row.values.map { "\($0)" }.joined(separator: " ")
        }
    }

    func expectSameRowsOnEveryNode(sourceLocation: SourceLocation = #_sourceLocation) throws {
        for table in Self.tables {
            let perNode = try GaleraCluster.nodes.map { try rows(of: table, on: $0) }
            #expect(Set(perNode).count == 1, "\(table): the same rows on the three nodes (\(perNode.map(\.count)) rows)", sourceLocation: sourceLocation)
        }
    }
}
