import Foundation
import MySQLBackend
import Saga
import SagaFaultKit
import SagaTestKit
import Testing

/// The guarantee on a real 3-node MariaDB Galera cluster, where COMMIT fails in ways a single
/// server never shows: a conflict with a write certified first on another node (1213 at
/// COMMIT), a fencing insert that does not wait for a saga's open transaction on another node,
/// nodes killed or hung under a saga. Tests that kill or pause nodes start a cluster of their
/// own; the others use the suite's shared one (`SAGA_GALERA_URL`).
@Suite("Galera cluster", .serialized)
struct GaleraTests {
    // MARK: URLs with several servers

    @Test func urlWithSeveralHosts() throws {
        let url = try MySQLURL("mysql://u:p%40ss@127.0.0.1:3411,db2:3412,[::1]:3413,db4/app")
        #expect(url.endpoints == [
            .init(host: "127.0.0.1", port: 3411), .init(host: "db2", port: 3412),
            .init(host: "::1", port: 3413), .init(host: "db4", port: 3306),
        ])
        #expect(url.user == "u" && url.password == "p@ss" && url.database == "app")
        #expect(url.host == "127.0.0.1" && url.port == 3411, "host and port are the first server's")
        #expect(url.description == "mysql://u:***@127.0.0.1:3411,db2:3412,[::1]:3413,db4:3306/app")
        #expect(try MySQLURL(url.description.replacingOccurrences(of: "***", with: "p")).endpoints == url.endpoints)
        var single = url
        single.port = 5000
        #expect(single.endpoints == [.init(host: "127.0.0.1", port: 5000)], "setting the port leaves one server")

        func problem(_ s: String) -> String {
            do { _ = try MySQLURL(s); return "accepted" } catch { return "\(error)" }
        }
        #expect(problem("mysql://u:p@h1:3306,/db").contains("\"\" in the list of hosts"))
        #expect(problem("mysql://u:p@h1:3306,h2:99999/db").contains("\"h2:99999\""))
        #expect(problem("mysql://u:p@h1,h2:x/db").contains("\"h2:x\""))
        #expect(problem("mysql://u:p@h1,h2/db?socket=/s").contains("a socket goes with one server"))
        #expect(problem("mysql://u:secret@h1,h2/").contains("no database name"))
        #expect(!problem("mysql://u:secret@h1,h2/").contains("secret"), "the password is never in a message")
    }

    /// A dead port first, then a cluster node: the connection goes to the node. All dead: the
    /// error names every server and why.
    @Test func connectsToTheFirstServerThatAnswers() throws {
        let cluster = try MySQLURL(try SharedGalera.url())
        let dead = MySQLURL.Endpoint(host: "127.0.0.1", port: UInt32(try freePort()))
        var url = cluster
        url.endpoints = [dead, cluster.endpoints[1]]
        let conn = try MySQLDatabase(url: url).openConnection()
        defer { conn.close() }
        #expect(conn.endpoint == cluster.endpoints[1])
        #expect(try conn.query("SELECT @@wsrep_on", []).first?[0].int64 == 1)

        let otherDead = MySQLURL.Endpoint(host: "127.0.0.1", port: UInt32(try freePort()))
        url.endpoints = [dead, otherDead]
        do {
            _ = try MySQLDatabase(url: url)
            Issue.record("connected to no server")
        } catch {
            #expect("\(error)".contains("no server of") && "\(error)".contains("\(dead)") && "\(error)".contains("\(otherDead)"), "\(error)")
        }
    }

    // MARK: Conflicts between nodes

    /// Another session on another node updates the saga's row and commits first: the saga's
    /// COMMIT is rolled back by certification (1213), the KV side is compensated, nothing is in
    /// doubt.
    @Test func certificationConflictIsCompensated() throws {
        let env = try MySQLEnvironment(serverURL: try SharedGalera.url())
        defer { env.destroy() }
        try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES ('c', 0)")
        try env.kvSet([("c", "c0")])
        let node2 = { var url = env.directURL; url.endpoints = [url.endpoints[1]]; return url }()
        // The conflicting write commits on node 2 while the saga's transaction on node 1 is open.
        let conflicted = LockedBox<Int>()
        let hooks = RunAt(.commit) {
            guard let other = try? MySQLDatabase(url: node2).openConnection() else { return }
            defer { other.close() }
            conflicted.value = try? other.execute("UPDATE saga_test SET v = 7 WHERE k = 'c'", [])
        }
        let c = try env.coordinator(.init(hooks: hooks))
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("UPDATE saga_test SET v = 1 WHERE k = 'c'", [])
                try saga.kv.put("c", "c1")
            }
        }
        #expect(conflicted.value == 1, "the other node's update ran and committed")
        guard case .commitFailed(_, let underlying, let restored) = error else {
            Issue.record("expected commitFailed, got \(error)")
            return
        }
        #expect((underlying as? MySQLError)?.isRolledBackConflict == true, "\(underlying)")
        #expect(restored == 1)
        #expect(error.nothingWritten && error.isRetryable, "rolled back by a conflict: worth running again")
        #expect(try env.kvGet("c") == "c0", "KV compensated")
        #expect(try env.row("c") == 7, "the other node's write won")
        #expect(c.inDoubt.isEmpty)
        #expect(try env.markers().isEmpty, "no marker committed")
    }

    /// The race that matters: the saga's `INSERT marker; COMMIT` on node 1 against a fence of
    /// the same saga on node 2, started with random delays, 200 times. Every time exactly one
    /// COMMIT wins, and the decision each side took matches the marker row on all three nodes.
    @Test func commitAgainstFenceOnAnotherNode() throws {
        let cluster = try SharedGalera.url()
        let env = try MySQLEnvironment(serverURL: cluster)
        defer { env.destroy() }
        var nodes: [MySQLURL] = []
        for endpoint in env.directURL.endpoints {
            var url = env.directURL
            url.endpoints = [endpoint]
            nodes.append(url)
        }
        let databases = try nodes.map { try MySQLDatabase(url: $0) }
        let markers = MarkerTable.Statements(for: databases[0])
        let instance = InstanceID(UInt64.random(in: 1...UInt64(Int64.max)))
        let owner = MarkerOwner(instance: instance, claim: 42)
        do {
            let conn = try databases[0].connect()
            defer { conn.close() }
            #expect(try markers.claim(instance, accepting: [], claim: owner.claim, on: conn) == nil)
        }
        let seed = UInt64(ProcessInfo.processInfo.environment["SAGA_TEST_SEED"] ?? "") ?? UInt64.random(in: 1...UInt64.max)
        print("commitAgainstFenceOnAnotherNode: seed \(seed) (set SAGA_TEST_SEED to repeat)")
        var rng = SplitMix64(seed: seed)
        var sagaWon = 0, fenceWon = 0, unconfirmed = 0
        for round in 1...200 {
            let id = SagaID(UInt64(round))
            let sagaConn = try databases[0].connect()
            let fenceConn = try databases[1].connect()
            defer { sagaConn.close(); fenceConn.close() }
            try sagaConn.begin()
            try sagaConn.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text("r\(round)")])
            let sagaDelay = UInt32.random(in: 0...3_000, using: &rng)
            let fenceDelay = UInt32.random(in: 0...3_000, using: &rng)
            let commit = LockedBox<Outcome>()
            let handedOver = UncheckedBox(sagaConn)
            let sagaSide = Thread {
                usleep(sagaDelay)
                commit.value = Outcome(markers.commit(insertingMarker: id, owner: owner, on: handedOver.value))
            }
            sagaSide.start()
            usleep(fenceDelay)
            let decision: FenceDecision
            do {
                decision = try #require(try markers.fenceInTransaction([id], owner: owner, on: fenceConn)[id])
            } catch {
                Issue.record("round \(round): the fence failed: \(error)")
                while commit.value == nil { usleep(1_000) }
                continue
            }
            while commit.value == nil { usleep(1_000) }
            let committed: Bool
            switch commit.value! {
            case .committed: committed = true
            case .failed(let e):
                committed = false
                #expect(e?.isRolledBackConflict == true || e?.code == 1062, "round \(round): \(e.map { "\($0)" } ?? "not a MySQLError")")
            case .unknown(let e):
                // Only a success the marker row did not confirm (a transaction the cluster aborted
                // unseen): the fence's decision is the outcome, checked against every node below.
                #expect(e.contains("reported success, but its marker row reads"), "round \(round): the saga's COMMIT outcome is unknown on a live node: \(e)")
                committed = decision == .committed
                unconfirmed += 1
            }
            #expect(decision == (committed ? .committed : .aborted), "round \(round): COMMIT \(committed ? "won" : "lost") but the fence decided \(decision)")
            if committed { sagaWon += 1 } else { fenceWon += 1 }
            // Every node holds the row the decision stands for; the saga's own row only if it won.
            for (n, node) in databases.enumerated() {
                let conn = try node.openConnection()
                defer { conn.close() }
                try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
                let status = try conn.query("SELECT status FROM saga_markers WHERE instance = ? AND saga_id = ?",
                                            [.integer(Int64(bitPattern: instance.rawValue)), .integer(Int64(round))]).first?[0].string
                #expect(status == (committed ? "committed" : "aborted"), "round \(round), node \(n + 1): \(status ?? "no row")")
                let body = try conn.query("SELECT COUNT(*) FROM saga_test WHERE k = ?", [.text("r\(round)")]).first?[0].int64
                #expect(body == (committed ? 1 : 0), "round \(round), node \(n + 1): the saga's own write")
            }
        }
        print("commitAgainstFenceOnAnotherNode: 200 rounds, the saga's COMMIT won \(sagaWon), the fence won \(fenceWon); \(unconfirmed) success(es) of COMMIT not confirmed by the marker row, decided by the fence")
        #expect(sagaWon + fenceWon == 200)
    }

    // MARK: Nodes killed and hung

    enum KillMoment: String, CaseIterable, CustomTestStringConvertible {
        case beforeCommit, duringCommit, afterCommit
        var testDescription: String { rawValue }
    }

    /// `kill -9` of the node the saga's connection uses, before its COMMIT is sent, while it
    /// is on its way (forwarded, no reply), or right after it succeeded. The client goes on on
    /// a surviving node (the fence there decides an unknown outcome); the killed node rejoins;
    /// then the three nodes hold identical marker tables and the stores agree.
    @Test(arguments: KillMoment.allCases)
    func nodeKilled(_ moment: KillMoment) throws {
        let cluster = try GaleraCluster()
        defer { cluster.stop() }
        let env = try MySQLEnvironment(serverURL: cluster.url)
        defer { env.destroy() }
        try env.kvSet([("k", "k0")])
        let hooks: any SagaHooks
        switch moment {
        case .beforeCommit: hooks = RunAt(.commit) { try? cluster.kill9(1) }
        case .duringCommit: hooks = RunAt(.commit) { env.proxy.arm(.afterForwarding { try? cluster.kill9(1) }) }
        case .afterCommit: hooks = RunAt(.committed) { try? cluster.kill9(1) }
        }
        let c = try env.coordinator(.init(hooks: hooks))
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('k', 1)", [])
                try saga.kv.put("k", "k1")
            }
        }
        // The proxy kills the node from its own thread, after it forwarded the COMMIT.
        for _ in 0..<600 where cluster.pid(1) != nil { usleep(50_000) }
        #expect(cluster.pid(1) == nil, "node 1 was killed")
        switch (moment, result) {
        case (.afterCommit, .success): break
        case (.beforeCommit, .failure(.commitFailed)): break
        case (.duringCommit, .success), (.duringCommit, .failure(.commitFailed)): break
        default: Issue.record("\(moment): unexpected result \(result)")
        }
        #expect(c.inDoubt.isEmpty, "decided on a surviving node")
        // The stores agree while node 1 is down...
        let committed = try env.row("k") == 1
        #expect(try env.kvGet("k") == (committed ? "k1" : "k0"), "KV agrees with SQL (committed: \(committed))")
        // ...and after it rejoined, on every node.
        try cluster.restart(1)
        try expectIdenticalNodes(cluster, database: env.database, markersFor: committed ? "committed" : nil)
        for n in GaleraCluster.nodes {
            #expect(try value(of: "k", on: n, of: cluster, database: env.database) == (committed ? 1 : nil), "node \(n)")
        }
        c.close()
        let again = try env.coordinator()
        defer { again.close() }
        #expect(again.inDoubt.isEmpty)
        #expect(try env.kvGet("k") == (committed ? "k1" : "k0"))
    }

    /// A hung node (`SIGSTOP`) under a saga's COMMIT: the client's read timeout ends the wait,
    /// the saga is decided on another node, and nothing hangs; after `SIGCONT` the node
    /// rejoins and every node agrees.
    @Test func hungNodeTimesOut() throws {
        let cluster = try GaleraCluster()
        defer { cluster.stop() }
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(2)
        configuration.readTimeout = .seconds(6)
        let env = try MySQLEnvironment(serverURL: cluster.url, configuration: configuration)
        defer { env.destroy() }
        try env.kvSet([("h", "h0")])
        let c = try env.coordinator(.init(hooks: RunAt(.commit) { cluster.pause(1) }))
        let started = ContinuousClock.now
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('h', 1)", [])
                try saga.kv.put("h", "h1")
            }
        }
        let took = ContinuousClock.now - started
        print("hungNodeTimesOut: the saga returned after \(took): \(result)")
        // A hang detector, not a timing claim: the read timeout is 6 s.
        #expect(took < .seconds(120), "the saga returned instead of hanging")
        switch result {
        case .success, .failure(.commitFailed), .failure(.inDoubt): break
        default: Issue.record("unexpected result \(result)")
        }
        // A second saga goes to another node meanwhile.
        try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('h2', 2)", [])
            try saga.kv.put("h2", "x")
        }
        cluster.resume(1)
        try cluster.waitSynced(1)
        if !c.inDoubt.isEmpty { _ = try c.recover() }
        #expect(c.inDoubt.isEmpty)
        let committed = try env.row("h") == 1
        #expect(try env.kvGet("h") == (committed ? "h1" : "h0"), "KV agrees with SQL (committed: \(committed))")
        #expect(try env.kvGet("h2") == "x" && env.row("h2") == 2)
        try expectIdenticalNodes(cluster, database: env.database, markersFor: nil)
        for n in GaleraCluster.nodes {
            #expect(try value(of: "h", on: n, of: cluster, database: env.database) == (committed ? 1 : nil), "node \(n)")
        }
    }

    // MARK: Helpers

    /// A ``CommitResult`` as a value that can cross threads.
    enum Outcome: Sendable {
        case committed, failed(MySQLError?), unknown(String)
        init(_ result: CommitResult) {
            switch result {
            case .committed: self = .committed
            case .failed(let e): self = .failed(e as? MySQLError)
            case .unknown(let e): self = .unknown("\(e)")
            }
        }
    }

    /// The marker tables of the three nodes are identical (read with causal reads, so each
    /// node has applied everything certified before); with `markersFor`, non-empty.
    private func expectIdenticalNodes(_ cluster: GaleraCluster, database: String, markersFor status: String?) throws {
        var tables: [[String]] = []
        for n in GaleraCluster.nodes {
            let conn = try nodeConnection(n, of: cluster, database: database)
            defer { conn.close() }
            tables.append(try conn.query("SELECT instance, saga_id, status FROM saga_markers ORDER BY instance, saga_id", [])
                .map { "\($0[0].int64 ?? -1)/\($0[1].int64 ?? -1)/\($0[2].string ?? "")" })
        }
        #expect(tables[0] == tables[1] && tables[1] == tables[2], "marker tables differ between nodes: \(tables)")
        if let status { #expect(tables[0].contains { $0.hasSuffix("/" + status) } || tables[0].isEmpty, "\(tables[0])") }
    }

    private func value(of key: String, on n: Int, of cluster: GaleraCluster, database: String) throws -> Int64? {
        let conn = try nodeConnection(n, of: cluster, database: database)
        defer { conn.close() }
        return try conn.query("SELECT v FROM saga_test WHERE k = ?", [.text(key)]).first?[0].int64
    }

    private func nodeConnection(_ n: Int, of cluster: GaleraCluster, database: String) throws -> MySQLConnection {
        var url = try MySQLURL(cluster.nodeURL(n))
        url.database = database
        let conn = try MySQLDatabase(url: url).openConnection()
        try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
        return conn
    }

    private func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        guard bound else { throw TestSetupError("no free port") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}

/// Runs `action` when a saga (in a caller's run) reaches `step`.
struct RunAt: SagaHooks {
    let step: SagaStep
    let action: @Sendable () -> Void
    init(_ step: SagaStep, _ action: @escaping @Sendable () -> Void) { self.step = step; self.action = action }
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == self.step, phase == .run { action() }
    }
}
