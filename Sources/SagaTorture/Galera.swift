import Foundation
import MySQLBackend
import SagaFaultKit

/// The Galera backend's own faults: kill -9 of a cluster node (the one the workload's
/// connections go to, or another) while sagas run on every node, the workload going on on the
/// two survivors, then the node's rejoin, still under load. Every worker tries the nodes in an
/// order of its own (its proxy, which loses COMMIT replies, stands in front of the first; the
/// other two follow it in its URL), and another writer on a third node makes sagas lose
/// certification (1213). Every check waits for the three nodes to be synced and compares their
/// copies of the site's database (marker tables included) row by row.
extension Campaign {
    /// A permutation of the nodes, drawn from the seed.
    func nodeOrder() -> [Int] {
        var nodes = GaleraCluster.nodes
        for i in stride(from: nodes.count - 1, to: 0, by: -1) { nodes.swapAt(i, rng.below(i + 1)) }
        return nodes
    }

    /// The worker's arguments for another writer of the site's hot accounts on `node` (on a
    /// cluster only).
    func otherWriter(_ site: NodeSite, on node: Int?) throws -> [String] {
        guard backend == .galera, let node, let url = try site.withNodeOrder([node]).mysqlURL else { return [] }
        return ["--conflict-url", url]
    }

    /// A new site's database and tables are made through one node: waits until every node has
    /// them (a worker may connect to any node first).
    func waitUntilEveryNodeHas(_ site: NodeSite) throws {
        for url in site.serverURLs {
            var lastError = ""
            var seen = false
            for _ in 0..<300 where !seen {
                do {
                    let conn = try MySQLDatabase(url: url).openConnection()
                    defer { conn.close() }
                    try conn.execute("SET SESSION wsrep_sync_wait = 1", [])
                    _ = try conn.query("SELECT COUNT(*) FROM tt_accounts", [])
                    seen = true
                } catch {
                    lastError = "\(error)"
                    usleep(100_000)
                }
            }
            if !seen { throw TortureError("the site's tables did not reach \(url.split(separator: "@").last ?? ""): \(lastError)") }
        }
    }

    /// Waits until every node answers and is synced with the cluster; nil when they are, else
    /// what is wrong.
    func waitEveryNodeSynced() -> String? {
        guard let cluster else { return "no cluster" }
        for n in GaleraCluster.nodes {
            do { try cluster.waitSynced(n) } catch { return "\(error)" }
        }
        return nil
    }

    /// Adds what the nodes' conflict counters (failed certifications, brute-force aborts) grew
    /// by since the last sample. A node that restarted counts from 0 again.
    func sampleNodeCounters() {
        guard let cluster else { return }
        for n in GaleraCluster.nodes {
            guard let conn = try? MySQLDatabase(url: cluster.nodeURL(n)).openConnection() else { continue }
            defer { conn.close() }
            guard let rows = try? conn.query("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_cert_failures', 'wsrep_local_bf_aborts')", []) else { continue }
            var now = [0, 0]
            for row in rows {
                let value = row[1].int64.map(Int.init) ?? row[1].string.flatMap { Int($0) } ?? 0
                switch row[0].string?.lowercased() {
                case "wsrep_local_cert_failures": now[0] = value
                case "wsrep_local_bf_aborts": now[1] = value
                default: break
                }
            }
            let last = nodeCounters[n] ?? [0, 0]
            let grown = zip(now, last).map { $0 >= $1 ? $0 - $1 : $0 }
            figures.certificationFailures += grown[0]
            figures.bruteForceAborts += grown[1]
            nodeCounters[n] = now
        }
    }

    func nodeKills() throws {
        guard let cluster else { return }
        let n = intensity.nodeKills
        say("[galera] node kills: \(n) kill -9 of a node under a 4-thread workload (the node its connections go to, or another), the workload going on on the other two, then the node's rejoin under load; 1 in 10 COMMITs failing, 1 in 8 COMMIT replies lost, another writer on a third node")
        let site = try newSite("nodes")
        let extra = ["--threads", "4", "--fail-one-in", "10", "--lose-replies-one-in", "8"]
        let counter = OutcomeLog.CommitCounter(path: site.dir + "/outcomes.log")
        for i in 0..<n {
            let order = nodeOrder()
            // Every other kill hits the node behind the workload's proxy, the first of its URL;
            // the others one of the two nodes it falls back to.
            let victim = i % 2 == 0 ? order[0] : order[1 + rng.below(2)]
            let what = "node kill #\(i + 1) (node \(victim)\(victim == order[0] ? ", the workload's" : ", not the workload's"))"
            var child = try startWorker(site, order: order, firstTxid: try nextTxid(site), sagas: 1_000_000,
                                        extra: extra + otherWriter(site, on: order[2]), tag: "nodes")
            var ok = progress(child, counter, commits: rng.between(5, 30), "\(what): before the kill")
            sampleNodeCounters()
            event(site, "kill -9 of node \(victim) (port \(cluster.port(victim))), the worker's order \(order)")
            try cluster.kill9(victim)
            event(site, "node \(victim) is gone")
            if victim == order[0] { figures.workloadNodeKills += 1 } else { figures.otherNodeKills += 1 }
            // The workload goes on on the two survivors.
            ok = ok && progress(child, counter, commits: rng.between(5, 25), "\(what): with the node down")
            if ok, rng.below(3) == 0 {
                // The workload dies too while the node is down: a new one recovers its sagas on
                // the survivors (its URL may name the dead node first) and goes on there.
                child.killNow()
                event(site, "the worker killed with node \(victim) down; a new one")
                figures.randomKills += 1
                child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 1_000_000, extra: extra, tag: "nodes2")
                ok = progress(child, counter, commits: rng.between(5, 20), "\(what): a new workload with the node down")
            }
            event(site, "restart of node \(victim)")
            try cluster.restart(victim)  // returns once it has rejoined and is synced
            event(site, "node \(victim) synced")
            nodeCounters[victim] = [0, 0]
            figures.nodeRejoins += 1
            // Sagas go on, the rejoined node taking new connections again.
            ok = ok && progress(child, counter, commits: rng.between(5, 25), "\(what): after the rejoin")
            child.killNow()
            event(site, "the worker killed; check")
            if !ok { break }
            if !check(site, "after \(what) and its rejoin") { break }
            if (i + 1) % 10 == 0 { say("  \(i + 1) node kills") }
        }
        sampleNodeCounters()
        countOutcomes(site)
        removeSite(site)
    }

    /// Waits until the worker has committed `commits` more sagas. The workload must go on: a
    /// worker that ends, or commits nothing for a long time (the bound is against a hang, not
    /// a measure of speed), is a failure.
    private func progress(_ child: ChildProcess, _ counter: OutcomeLog.CommitCounter, commits: Int, _ what: String) -> Bool {
        let target = counter.poll() + commits
        var last = counter.poll()
        var lastProgress = Date()
        while counter.poll() < target {
            if child.hasEnded {
                fail("\(what): the worker ended (\(child.wait())): \(child.lastOutput)")
                return false
            }
            if counter.committed > last {
                last = counter.committed
                lastProgress = Date()
            } else if Date().timeIntervalSince(lastProgress) > Self.stallBound {
                fail("\(what): no saga committed for \(Int(Self.stallBound)) s: \(child.lastOutput)")
                return false
            }
            usleep(20_000)
        }
        return true
    }

    static let stallBound = 120.0

    /// Appends a line with the time to the site's `events.log`, to line up with the outcome
    /// log when a check fails.
    func event(_ site: NodeSite, _ line: String) {
        let text = Array("\(Worker.now()) \(line)\n".utf8)
        let fd = open(site.dir + "/events.log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        defer { close(fd) }
        _ = text.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
