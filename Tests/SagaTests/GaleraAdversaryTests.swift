import Foundation
import MySQLBackend
import Saga
import SagaFaultKit
import SagaTestKit
import Testing

/// An outside review of the Galera support: ways the cluster breaks "a saga is in both stores
/// or in neither" that the cluster tests do not try.
@Suite("Galera adversary", .serialized)
struct GaleraAdversaryTests {
    /// A network partition between the application and node 1 (node 1 stays in the cluster,
    /// it only cannot be reached from the client) while the saga's `INSERT marker; COMMIT`
    /// packet is on its way. The client's read times out: unknown outcome. The fence runs on
    /// node 2; `endSessions` cannot reach node 1 and skips it, so the old session is never
    /// ended; the fence's `aborted` row wins; the KV half is compensated; the caller is told
    /// `commitFailed`. Garbage collection then deletes the journal record and the `aborted`
    /// row. The partition heals and the packet reaches node 1, whose session is still open:
    /// the marker insert finds no row, the write set certifies, and the saga's SQL half
    /// commits, after the caller was told it failed and the KV half was undone.
    ///
    /// On one server the session would have been KILLed (or the fence would have failed and
    /// the saga stayed in doubt). PROTOCOL.md: "on Galera, locks do not span nodes, so there
    /// keep `aborted` rows longer than any session can live". The code deletes them at once.
    @Test func lateCommitOnUnreachableNodeAfterFenceAndGC() throws {
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(2)
        configuration.readTimeout = .seconds(2)
        let env = try MySQLEnvironment(serverURL: try SharedGalera.url(), configuration: configuration)
        defer { env.proxy.release(); env.destroy() }
        try env.kvSet([("p", "p0")])
        let c = try env.coordinator(.init(hooks: RunAt(.commit) { env.proxy.arm(.hold) }))
        defer { c.close() }
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('p', 1)", [])
                try saga.kv.put("p", "p1")
            }
        }
        print("lateCommitOnUnreachableNodeAfterFenceAndGC: the saga returned \(result)")
        guard case .failure(.commitFailed) = result else {
            // In doubt would be the safe answer: nothing to check then.
            if case .failure(.inDoubt) = result { return }
            Issue.record("unexpected result \(result)")
            return
        }
        #expect(try env.kvGet("p") == "p0", "the KV half was compensated")
        // Garbage collection, as it runs every gcThreshold sagas (or after recover()).
        let collected = try c.collectGarbage()
        print("lateCommitOnUnreachableNodeAfterFenceAndGC: garbage collection removed \(collected) marker row(s)")
        // Node 1 is in the cluster all along: it applies the fence's insert and the delete,
        // as it would during any partition that lasts longer than a replication round trip.
        // (Checked with a causal read straight to node 1, so the late packet below never
        // races the delete's replication.)
        var node1 = env.directURL
        node1.endpoints = [env.directURL.endpoints[0]]
        let direct = try MySQLDatabase(url: node1).openConnection()
        defer { direct.close() }
        try direct.execute("SET SESSION wsrep_sync_wait = 7", [])
        let rowsOnNode1 = try direct.query("SELECT status FROM saga_markers", []).map { $0[0].string ?? "?" }
        print("lateCommitOnUnreachableNodeAfterFenceAndGC: marker rows on node 1 before the late packet: \(rowsOnNode1)")
        // The partition heals: the held packet reaches node 1, on the session nobody ended.
        env.proxy.release()
        // Either node 1 answers the late COMMIT (an error: the `aborted` row is there), or the
        // fence ended the held session on node 1 (reached through the address node 1
        // advertises to the cluster) and the packet finds it gone. Both must leave no write.
        for _ in 0..<100 where env.proxy.heldRepliesArrived == 0 { usleep(100_000) }  // a hang guard
        print("lateCommitOnUnreachableNodeAfterFenceAndGC: \(env.proxy.heldRepliesArrived == 1 ? "node 1 answered the late COMMIT" : "the late COMMIT found its session ended")")
        for n in 0..<3 {
            var url = env.directURL
            url.endpoints = [env.directURL.endpoints[n]]
            let conn = try MySQLDatabase(url: url).openConnection()
            defer { conn.close() }
            try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
            let v = try conn.query("SELECT v FROM saga_test WHERE k = 'p'", []).first?[0].int64
            let marker = try conn.query("SELECT status FROM saga_markers", []).first?[0].string
            #expect(v == nil, "node \(n + 1): the saga was reported failed and its KV half compensated, yet its SQL write is committed (marker \(marker ?? "none"))")
        }
        #expect(try env.kvGet("p") == "p0")
    }

    /// The brief's variant with a real hung node: `SIGSTOP` of node 1 with the saga's
    /// `INSERT marker; COMMIT` sent to it, the fence and compensation on node 2, garbage
    /// collection, then `SIGCONT`. Whatever the node does when it wakes up (the cluster has
    /// evicted it meanwhile), the saga's SQL write must not appear.
    @Test func lateCommitOnHungNodeAfterFenceAndGC() throws {
        let cluster = try GaleraCluster()
        defer { cluster.stop() }
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(1)
        configuration.readTimeout = .seconds(1)
        let env = try MySQLEnvironment(serverURL: cluster.url, configuration: configuration)
        defer { env.destroy() }
        try env.kvSet([("h", "h0")])
        let c = try env.coordinator(.init(hooks: RunAt(.commit) { cluster.pause(1) }))
        defer { c.close() }
        let started = ContinuousClock.now
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('h', 1)", [])
                try saga.kv.put("h", "h1")
            }
        }
        print("lateCommitOnHungNodeAfterFenceAndGC: the saga returned after \(ContinuousClock.now - started): \(result)")
        if case .failure(.commitFailed) = result {
            #expect(try env.kvGet("h") == "h0")
            let collected = try c.collectGarbage()
            print("lateCommitOnHungNodeAfterFenceAndGC: garbage collection removed \(collected) marker row(s) after \(ContinuousClock.now - started)")
        }
        cluster.resume(1)
        try cluster.waitSynced(1)
        if !c.inDoubt.isEmpty { _ = try c.recover() }
        let kv = try env.kvGet("h")
        for n in GaleraCluster.nodes {
            var url = try MySQLURL(cluster.nodeURL(n))
            url.database = env.database
            let conn = try MySQLDatabase(url: url).openConnection()
            defer { conn.close() }
            try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
            let v = try conn.query("SELECT v FROM saga_test WHERE k = 'h'", []).first?[0].int64
            #expect((v == 1) == (kv == "h1"), "node \(n): SQL \(v.map(String.init) ?? "no row"), KV \(kv ?? "absent"), saga \(result)")
        }
    }

    /// A node taken out of rotation the way Galera's documentation says to drain one for
    /// maintenance, `SET GLOBAL wsrep_reject_queries = ALL`: it still answers the handshake,
    /// `SELECT UNIX_TIMESTAMP()` and `SHOW STATUS` (and reports `wsrep_ready` ON), but every
    /// statement on a table fails with 1047. The connection check takes it for a ready node,
    /// so with it first in the URL the database cannot even be opened (the marker table's
    /// `CREATE TABLE` gets 1047), every saga fails, and a fence there leaves sagas in doubt,
    /// although nodes 2 and 3 are healthy. README: "a node cut off from the cluster, or one
    /// that refuses more connections is skipped".
    @Test func nodeRejectingQueriesIsSkipped() throws {
        let cluster = try GaleraCluster()  // its own: node 1's global settings change
        defer { cluster.stop() }
        let url = try MySQLURL(cluster.url)
        var node1 = url
        node1.endpoints = [url.endpoints[0]]
        let admin = try MySQLDatabase(url: node1).openConnection()
        defer {
            _ = try? admin.execute("SET GLOBAL wsrep_reject_queries = NONE", [])
            admin.close()
        }
        try admin.execute("SET GLOBAL wsrep_reject_queries = ALL", [])
        let opened = Result { try MySQLDatabase(url: url) }
        guard case .success(let db) = opened else {
            Issue.record("the database cannot be opened although nodes 2 and 3 are ready: \(opened)")
            return
        }
        let conn = try db.openConnection()
        defer { conn.close() }
        #expect(conn.endpoint != url.endpoints[0], "a connection went to the node that rejects every query")
        #expect(Result { try conn.query("SELECT COUNT(*) FROM saga_markers", []) }.isSuccess, "a statement on a table works")
    }

    /// Node 1 leaves the primary component (`gmcast.isolate=1`: it stays reachable to the
    /// client) between the saga's body and its `INSERT marker; COMMIT`. Whatever COMMIT
    /// answers on a non-primary node, the saga's outcome must match the rows once node 1 has
    /// rejoined.
    @Test func commitOnNodeThatLeftThePrimaryComponent() throws {
        let cluster = try GaleraCluster()  // its own: node 1 leaves the primary component
        defer { cluster.stop() }
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(2)
        configuration.readTimeout = .seconds(6)
        let env = try MySQLEnvironment(serverURL: cluster.url, configuration: configuration)
        defer { env.destroy() }
        var node1 = env.directURL
        node1.endpoints = [env.directURL.endpoints[0]]
        let admin = try MySQLDatabase(url: node1).openConnection()
        defer {
            _ = try? admin.execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'", [])
            admin.close()
        }
        func clusterStatus() -> String {
            (try? admin.query("SHOW STATUS LIKE 'wsrep_cluster_status'", []))?.first?[1].string ?? "?"
        }
        try env.kvSet([("i", "i0")])
        let isolatedURL = node1
        let c = try env.coordinator(.init(hooks: RunAt(.commit) {
            guard let side = try? MySQLDatabase(url: isolatedURL).openConnection() else { return }
            defer { side.close() }
            _ = try? side.execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'", [])
            for _ in 0..<600 where (try? side.query("SHOW STATUS LIKE 'wsrep_cluster_status'", []))?.first?[1].string == "Primary" { usleep(50_000) }
        }))
        defer { c.close() }
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('i', 1)", [])
                try saga.kv.put("i", "i1")
            }
        }
        print("commitOnNodeThatLeftThePrimaryComponent: node 1 \(clusterStatus()); the saga returned \(result)")
        _ = try? c.collectGarbage()
        try admin.execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'", [])
        for _ in 0..<1200 {
            let synced = (try? admin.query("SHOW STATUS LIKE 'wsrep_local_state_comment'", []))?.first?[1].string == "Synced"
            if synced && clusterStatus() == "Primary" { break }
            usleep(50_000)
        }
        if !c.inDoubt.isEmpty { _ = try c.recover() }
        #expect(c.inDoubt.isEmpty)
        let kv = try env.kvGet("i")
        switch result {
        case .success: #expect(kv == "i1")
        case .failure(.commitFailed): #expect(kv == "i0")
        default: break
        }
        for n in 0..<3 {
            var url = env.directURL
            url.endpoints = [env.directURL.endpoints[n]]
            let conn = try MySQLDatabase(url: url).openConnection()
            defer { conn.close() }
            try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
            let v = try conn.query("SELECT v FROM saga_test WHERE k = 'i'", []).first?[0].int64
            #expect((v == 1) == (kv == "i1"), "node \(n + 1): SQL \(v.map(String.init) ?? "no row"), KV \(kv ?? "absent"), saga \(result)")
        }
    }

    /// A server that completes the TCP handshake but never sends its greeting (a hung node:
    /// the kernel accepts for it). README: "a new connection waits `connectTimeout` (5 s) for
    /// it before trying the next server". With readTimeout long (as by default, 120 s, sized
    /// for a fencing insert's lock wait), the wait must still be about connectTimeout.
    @Test func hungServerDelaysAConnectByConnectTimeoutOnly() throws {
        let cluster = try MySQLURL(try SharedGalera.url())
        // A listening socket nobody accepts on: connect succeeds, the greeting never comes.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && listen(fd, 16) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        try #require(ok)
        var url = cluster
        url.endpoints = [.init(host: "127.0.0.1", port: UInt32(UInt16(bigEndian: addr.sin_port))), cluster.endpoints[1]]
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(2)
        configuration.readTimeout = .seconds(40)
        let started = ContinuousClock.now
        let conn = try MySQLDatabase(url: url, configuration: configuration).openConnection()
        defer { conn.close() }
        let took = ContinuousClock.now - started
        print("hungServerDelaysAConnectByConnectTimeoutOnly: two connects took \(took)")
        #expect(conn.endpoint == cluster.endpoints[1])
        // Two connects (open, then openConnection), each past the hung server: about 4 s if
        // connectTimeout bounds the handshake, 80 s if the read timeout does.
        #expect(took < .seconds(30), "a hung server held each new connection for the read timeout, not connectTimeout: \(took)")
    }

    /// Node 1 leaves the primary component but stays reachable (a partition between the
    /// database nodes, not between the application and node 1). New connections skip it (it
    /// reports wsrep_ready OFF), but the coordinator's pooled connections to it are still
    /// lent: a ping answers, and `START TRANSACTION` fails with 1047. The saga fails
    /// (`sqlFailed` at begin, not `isRetryable`), one per pooled connection (up to
    /// `poolSize`, 16), although nodes 2 and 3 are healthy; BEGIN on a pooled connection that
    /// was found lost is retried on another, one that is not ready is not.
    @Test func pooledConnectionsToANodeThatLeftAreNotReused() throws {
        let cluster = try GaleraCluster()  // its own: node 1 leaves the primary component
        defer { cluster.stop() }
        let env = try MySQLEnvironment(serverURL: cluster.url)
        defer { env.destroy() }
        var node1 = env.directURL
        node1.endpoints = [env.directURL.endpoints[0]]
        let admin = try MySQLDatabase(url: node1).openConnection()
        defer {
            _ = try? admin.execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=0'", [])
            for _ in 0..<1200 {
                let synced = (try? admin.query("SHOW STATUS LIKE 'wsrep_local_state_comment'", []))?.first?[1].string == "Synced"
                let primary = (try? admin.query("SHOW STATUS LIKE 'wsrep_cluster_status'", []))?.first?[1].string == "Primary"
                if synced && primary { break }
                usleep(50_000)
            }
            admin.close()
        }
        let c = try env.coordinator()
        defer { c.close() }
        try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('before', 1)", [])
            try saga.kv.put("before", "1")
        }
        try admin.execute("SET GLOBAL wsrep_provider_options = 'gmcast.isolate=1'", [])
        for _ in 0..<600 where (try? admin.query("SHOW STATUS LIKE 'wsrep_cluster_status'", []))?.first?[1].string == "Primary" { usleep(50_000) }
        #expect((try? admin.query("SHOW STATUS LIKE 'wsrep_cluster_status'", []))?.first?[1].string == "non-Primary")
        var succeeded = 0
        var errors: [String] = []
        for n in 1...3 {
            do {
                try c.run { saga in
                    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("after\(n)"), .integer(Int64(n))])
                    try saga.kv.put("after\(n)", "\(n)")
                }
                succeeded += 1
            } catch {
                errors.append("\(error) (retryable: \(error.isRetryable))")
            }
        }
        print("pooledConnectionsToANodeThatLeftAreNotReused: \(succeeded) of 3 succeeded; \(errors)")
        // A pooled connection found lost at BEGIN is closed and the next one tried; one whose
        // node left the primary component is as useless, and nothing of the saga ran.
        #expect(succeeded == 3, "sagas went to the node that left the primary component: \(errors)")
    }

    /// The same partition on one plain MariaDB server (the old behaviour must hold): the
    /// fence cannot reach the server, so the saga stays in doubt, keys locked; once the
    /// network is back, `recover()` ends the old session first, then fences; the late packet
    /// then finds its session gone.
    @Test func lateCommitAfterPartitionOnOneServer() throws {
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(2)
        configuration.readTimeout = .seconds(2)
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url(), configuration: configuration)
        defer { env.proxy.release(); env.destroy() }
        try env.kvSet([("s", "s0")])
        let c = try env.coordinator(.init(hooks: RunAt(.commit) { env.proxy.arm(.hold) }))
        defer { c.close() }
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('s', 1)", [])
                try saga.kv.put("s", "s1")
            }
        }
        guard case .failure(.inDoubt) = result else {
            Issue.record("one server out of reach: expected in doubt, got \(result)")
            return
        }
        env.proxy.heal()
        let report = try c.recover()
        print("lateCommitAfterPartitionOnOneServer: \(report)")
        _ = try c.collectGarbage()
        env.proxy.release()
        #expect(c.inDoubt.isEmpty)
        let kv = try env.kvGet("s")
        let sql = try env.row("s")
        #expect((sql == 1) == (kv == "s1"), "SQL \(sql.map(String.init) ?? "no row"), KV \(kv ?? "absent")")
    }

    /// The brief's scenario with a real hung node that the cluster does not evict soon:
    /// `SIGSTOP` of node 1 with the saga's `INSERT marker; COMMIT` sent to it, on a cluster
    /// whose `evs.suspect_timeout` is 60 s. Held, and why: while a member of the view is
    /// silent, the whole cluster stalls (the fence's causal wait and COMMIT on node 2 cannot
    /// get through group communication), so the fence fails and the saga stays in doubt;
    /// after `SIGCONT`, recovery decides it. (With the default 2 s timeouts, node 1 is evicted
    /// first; its late packet then meets a non-primary node: 1047.) The partition between the
    /// application and node 1 (``lateCommitOnUnreachableNodeAfterFenceAndGC()``) is the case
    /// that stalls nothing.
    @Test func lateCommitOnStalledNodeAfterFenceAndGC() throws {
        let cluster = try GaleraCluster(evictAfter: 60)
        defer { cluster.stop() }
        var configuration = MySQLDatabase.Configuration()
        configuration.connectTimeout = .seconds(1)
        configuration.readTimeout = .seconds(1)
        let env = try MySQLEnvironment(serverURL: cluster.url, configuration: configuration)
        defer { env.destroy() }
        try env.kvSet([("z", "z0")])
        let c = try env.coordinator(.init(hooks: RunAt(.commit) { cluster.pause(1) }))
        defer { c.close() }
        let result = Result { () throws(SagaError) in
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('z', 1)", [])
                try saga.kv.put("z", "z1")
            }
        }
        print("lateCommitOnStalledNodeAfterFenceAndGC: the saga returned \(result)")
        if case .failure(.commitFailed) = result {
            #expect(try env.kvGet("z") == "z0")
            _ = try c.collectGarbage()
        }
        cluster.resume(1)
        try cluster.waitSynced(1)
        // The resumed node has read the packet once it answers a query on the same socket
        // order; wait for its session to end or commit (a hang guard, not a timing claim).
        var node1 = try MySQLURL(cluster.nodeURL(1))
        node1.database = env.database
        let probe = try MySQLDatabase(url: node1).openConnection()
        defer { probe.close() }
        for _ in 0..<300 {
            let busy = try probe.query("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = ? AND COMMAND <> 'Sleep' AND ID <> CONNECTION_ID()", [.text(env.database)]).first?[0].int64 ?? 0
            if busy == 0 { break }
            usleep(100_000)
        }
        if !c.inDoubt.isEmpty { _ = try c.recover() }
        let kv = try env.kvGet("z")
        for n in GaleraCluster.nodes {
            var url = try MySQLURL(cluster.nodeURL(n))
            url.database = env.database
            let conn = try MySQLDatabase(url: url).openConnection()
            defer { conn.close() }
            try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
            let v = try conn.query("SELECT v FROM saga_test WHERE k = 'z'", []).first?[0].int64
            #expect((v == 1) == (kv == "z1"), "node \(n): SQL \(v.map(String.init) ?? "no row"), KV \(kv ?? "absent"), saga \(result)")
        }
    }

    /// Two fences of the same saga, on nodes 2 and 3, against the saga's `INSERT marker;
    /// COMMIT` on node 1, with seeded random delays, 300 rounds. Invariant checked every round:
    /// a COMMIT that returned success must have committed (marker `committed`, body row there).
    ///
    /// On 586250a it fails in about one run in three: the saga's one-round-trip
    /// `INSERT marker; COMMIT` returns success although the transaction was brute-force
    /// aborted by the fence's replicated insert (the fence's `aborted` row is on every node,
    /// the body's row on none). For the coordinator that is a saga reported committed whose
    /// KV half stays written and whose SQL half is gone. The abort lands between the two
    /// statements of one packet; the COMMIT then ends an already rolled-back transaction.
    /// (Also seen: a fence's locking read answered by nothing until the read timeout.)
    ///
    /// `SAGA_TEST_SEED` repeats the delays, not the interleaving.
    @Test func twoFencesOnTwoNodesAgainstTheCommit() throws {
        let env = try MySQLEnvironment(serverURL: try SharedGalera.url())
        defer { env.destroy() }
        var configuration = MySQLDatabase.Configuration()
        configuration.readTimeout = .seconds(5)
        let databases = try env.directURL.endpoints.map { endpoint -> MySQLDatabase in
            var url = env.directURL
            url.endpoints = [endpoint]
            return try MySQLDatabase(url: url, configuration: configuration)
        }
        let markers = MarkerTable.Statements(for: databases[0])
        let owner = MarkerOwner(instance: InstanceID(UInt64.random(in: 1...UInt64(Int64.max))), claim: 7)
        do {
            let conn = try databases[0].connect()
            defer { conn.close() }
            #expect(try markers.claim(owner.instance, accepting: [], claim: owner.claim, on: conn) == nil)
        }
        let seed = UInt64(ProcessInfo.processInfo.environment["SAGA_TEST_SEED"] ?? "") ?? UInt64.random(in: 1...UInt64.max)
        print("twoFencesOnTwoNodesAgainstTheCommit: seed \(seed) (set SAGA_TEST_SEED to repeat)")
        var rng = SplitMix64(seed: seed)
        var tally: [String: Int] = [:]
        for round in 1...300 {
            let id = SagaID(UInt64(round))
            let sagaConn = try databases[0].connect()
            defer { sagaConn.close() }
            try sagaConn.begin()
            try sagaConn.execute("INSERT INTO saga_test (k, v) VALUES (?, 1)", [.text("f\(round)")])
            let delays = (0..<3).map { _ in UInt32.random(in: 0...3_000, using: &rng) }
            let commit = LockedBox<GaleraTests.Outcome>()
            let handedOver = UncheckedBox(sagaConn)
            let sagaSide = Thread {
                usleep(delays[0])
                commit.value = GaleraTests.Outcome(markers.commit(insertingMarker: id, owner: owner, on: handedOver.value))
            }
            let fenceB = LockedBox<String>()
            let connB = UncheckedBox(try databases[2].connect())
            let connA = try databases[1].connect()
            defer { connA.close() }
            let otherFence = Thread {
                usleep(delays[2])
                let conn = connB.value
                defer { conn.close() }
                do { fenceB.value = "\(try markers.fenceInTransaction([id], owner: owner, on: conn)[id].map { "\($0)" } ?? "none")" } catch { fenceB.value = "error \(error)" }
            }
            sagaSide.start()
            otherFence.start()
            usleep(delays[1])
            let fenceA: String
            do {
                fenceA = "\(try markers.fenceInTransaction([id], owner: owner, on: connA)[id].map { "\($0)" } ?? "none")"
            } catch { fenceA = "error \(error)" }
            while commit.value == nil || fenceB.value == nil { usleep(1_000) }
            let conn = try databases[0].openConnection()
            defer { conn.close() }
            try conn.execute("SET SESSION wsrep_sync_wait = 7", [])
            let status = try conn.query("SELECT status FROM saga_markers WHERE instance = ? AND saga_id = ?",
                                        [.integer(Int64(bitPattern: owner.instance.rawValue)), .integer(Int64(round))]).first?[0].string
            let body = try conn.query("SELECT COUNT(*) FROM saga_test WHERE k = ?", [.text("f\(round)")]).first?[0].int64
            let expected = status == "committed" ? "committed" : "aborted"
            #expect((body == 1) == (status == "committed"), "round \(round): body \(body ?? -1), marker \(status ?? "none")")
            for (name, decision) in [("fence A", fenceA), ("fence B", fenceB.value!)] where !decision.hasPrefix("error") {
                #expect(decision == expected, "round \(round): \(name) decided \(decision), the rows say \(expected)")
            }
            if case .committed = commit.value! {
                #expect(status == "committed" && body == 1, "round \(round): the saga's COMMIT returned success, but the marker is \(status ?? "none") and the body row \(body == 1 ? "is there" : "is not")")
            }
            for (name, decision) in [("fence A", fenceA), ("fence B", fenceB.value!)] where decision.hasPrefix("error") {
                print("twoFencesOnTwoNodesAgainstTheCommit: round \(round), \(name): \(decision)")
            }
            tally["\(expected) A:\(fenceA.prefix(9)) B:\(fenceB.value!.prefix(9))", default: 0] += 1
        }
        print("twoFencesOnTwoNodesAgainstTheCommit: \(tally)")
    }

    // MARK: URLs

    /// "The password is never in a message": a password with a character that ends the
    /// authority when not percent-encoded (`/`, `?`, `#`) makes the URL invalid, and the
    /// error then quotes the URL with the password in clear (the redaction re-parses the URL
    /// it could not parse and gives up).
    @Test func passwordNeverInURLErrors() {
        for s in ["mysql://u:p/wsecret@h1,h2/db", "mysql://u:p/wsecret@h1/db", "mysql://u:pa#secret@h1,h2/db",
                  "mysql://u:pa?secret@h1/db", "mysql://u:pa?secret@h1,h2:3306/db"] {
            do {
                _ = try MySQLURL(s)
                Issue.record("accepted \(s)")
            } catch {
                #expect(!"\(error)".contains("secret"), "the password is in the message: \(error)")
            }
        }
    }

    /// The host list is parsed by hand: an IPv6 address without brackets or a second port
    /// must be refused, not turned into host ":" port 1 or host "h2:3306" port 7. A single
    /// bracketed IPv6 host must come out as the list's does (without brackets: the client
    /// library resolves "::1", not "[::1]").
    @Test func hostListEdgeCases() {
        #expect((try? MySQLURL("mysql://u:p@::1,h2/db")) == nil, "\((try? MySQLURL("mysql://u:p@::1,h2/db"))?.endpoints ?? [])")
        #expect((try? MySQLURL("mysql://u:p@h1,h2:3306:7/db")) == nil, "\((try? MySQLURL("mysql://u:p@h1,h2:3306:7/db"))?.endpoints ?? [])")
        #expect((try? MySQLURL("mysql://u:p@[::1]:3307/db"))?.endpoints == [.init(host: "::1", port: 3307)],
                "\((try? MySQLURL("mysql://u:p@[::1]:3307/db"))?.endpoints ?? [])")
        #expect((try? MySQLURL("mysql://u:p@[::1]:3307,h2/db"))?.endpoints == [.init(host: "::1", port: 3307), .init(host: "h2", port: 3306)])
    }
}

extension Result {
    var isSuccess: Bool { if case .success = self { true } else { false } }
}
