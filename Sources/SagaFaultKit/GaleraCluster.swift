import Foundation
import MySQLBackend

/// A throwaway 3-node MariaDB Galera cluster on loopback, for tests, the torture program and the
/// benchmark: one directory per node under ``dir``, servers run as the `mysql` user, each node
/// started from a copy of one cached template datadir. Started and controlled through
/// `scripts/galera.sh`, the script CI uses. Callers ``stop()`` it in a `defer` (also when a test
/// fails); `deinit` stops it too.
public final class GaleraCluster: @unchecked Sendable {
    public let dir: String
    /// The multi-host URL: `mysql://saga:...@127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/saga`.
    public private(set) var url: String = ""
    public static let nodes = [1, 2, 3]

    /// `scripts/galera.sh` of this checkout (`SAGA_GALERA_SCRIPT` overrides it).
    public static var script: String {
        if let path = ProcessInfo.processInfo.environment["SAGA_GALERA_SCRIPT"], !path.isEmpty { return path }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/galera.sh").path
    }

    /// Starts a new cluster in a new temporary directory (a few seconds; the first cluster on a
    /// machine also builds the template).
    /// - Parameter evictAfter: how long the other nodes wait for a silent node before they
    ///   suspect it (`evs.suspect_timeout`; twice that, `evs.inactive_timeout`); nil: 2 s.
    public init(evictAfter: Int? = nil) throws {
        dir = try MariaDBServer.makeTempDir("galera")
        var lastError = ""
        let environment = evictAfter.map { ["SAGA_GALERA_SUSPECT_TIMEOUT": "PT\($0)S", "SAGA_GALERA_INACTIVE_TIMEOUT": "PT\(2 * $0)S"] } ?? [:]
        // A random base port may be taken: try a few.
        for _ in 0..<3 {
            let result = try Shell.run("/bin/bash", [Self.script, "start", dir], environment: environment)
            if result.status == 0, let last = result.stdout.split(separator: "\n").last, last.hasPrefix("mysql://") {
                url = String(last)
                try waitUntilAnswering()
                return
            }
            lastError = result.stdout + result.stderr
            _ = try? Shell.run("/bin/bash", [Self.script, "stop", dir])
            try? FileManager.default.removeItem(atPath: dir)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        throw TestSetupError("cannot start a Galera cluster in \(dir): \(lastError)")
    }

    /// A cluster already running in `dir` (started by `scripts/galera.sh start DIR`).
    public init(existing dir: String) throws {
        self.dir = dir
        let result = try Shell.run("/bin/bash", [Self.script, "url", dir])
        guard result.status == 0, let last = result.stdout.split(separator: "\n").last else {
            throw TestSetupError("no cluster in \(dir): \(result.stderr)")
        }
        url = String(last)
        ownsCluster = false
    }

    private var ownsCluster = true

    private func waitUntilAnswering() throws {
        var lastError = ""
        for _ in 0..<100 {
            do { _ = try MySQLDatabase(url: url); return } catch { lastError = "\(error)" }
            usleep(100_000)
        }
        throw TestSetupError("the Galera cluster in \(dir) does not answer: \(lastError)")
    }

    /// Node `n`'s URL alone (1...3).
    public func nodeURL(_ n: Int) -> String {
        let ports = url.split(separator: "@")[1].split(separator: "/")[0].split(separator: ",")
        return url.replacingOccurrences(of: ports.joined(separator: ","), with: String(ports[n - 1]))
    }

    /// Node `n`'s SQL port.
    public func port(_ n: Int) -> Int {
        Int(nodeURL(n).split(separator: "@")[1].split(separator: "/")[0].split(separator: ":")[1])!
    }

    /// The URL with the nodes in the order given (a connection goes to the first that answers).
    public func url(order: [Int]) -> String {
        let ports = url.split(separator: "@")[1].split(separator: "/")[0]
        return url.replacingOccurrences(of: ports, with: order.map { "127.0.0.1:\(port($0))" }.joined(separator: ","))
    }

    public func pid(_ n: Int) -> pid_t? {
        (try? String(contentsOfFile: "\(dir)/node\(n)/mariadbd.pid", encoding: .utf8))
            .flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// `kill -9` of node `n`; returns once the process is gone.
    public func kill9(_ n: Int) throws { try script("kill", n) }

    /// Starts node `n` again; returns once it has rejoined and is synced.
    public func restart(_ n: Int) throws { try script("start-node", n) }

    /// Stops node `n` cleanly.
    public func stopNode(_ n: Int) throws { try script("stop-node", n) }

    /// `SIGSTOP` of node `n`: it hangs, its connections stay open and unanswered.
    public func pause(_ n: Int) {
        if let pid = pid(n) { kill(pid, SIGSTOP) }
    }

    /// `SIGCONT` of node `n`.
    public func resume(_ n: Int) {
        if let pid = pid(n) { kill(pid, SIGCONT) }
    }

    /// Waits until node `n` answers and is synced with the cluster again (after a resume).
    public func waitSynced(_ n: Int, timeout: Duration = .seconds(120)) throws {
        let deadline = ContinuousClock.now + timeout
        var last = ""
        while ContinuousClock.now < deadline {
            if let conn = try? MySQLDatabase(url: nodeURL(n)).openConnection() {
                defer { conn.close() }
                let state = (try? conn.query("SHOW STATUS LIKE 'wsrep_local_state_comment'", []))?.first?[1].string ?? ""
                let size = (try? conn.query("SHOW STATUS LIKE 'wsrep_cluster_size'", []))?.first?[1].string ?? ""
                if state == "Synced" && size == "\(Self.nodes.count)" { return }
                last = "\(state), cluster size \(size)"
            }
            usleep(100_000)
        }
        throw TestSetupError("node \(n) of the cluster in \(dir) is not synced after \(timeout) (\(last))")
    }

    private func script(_ command: String, _ n: Int) throws {
        let result = try Shell.run("/bin/bash", [Self.script, command, dir, "\(n)"])
        guard result.status == 0 else {
            throw TestSetupError("galera.sh \(command) \(dir) \(n) failed: \(result.stdout) \(result.stderr)")
        }
    }

    /// Stops every node and removes the directory (unless `SAGA_KEEP_SERVERS` is set).
    public func stop() {
        guard ownsCluster else { return }
        for n in Self.nodes { resume(n) }
        _ = try? Shell.run("/bin/bash", [Self.script, "stop", dir])
        if ProcessInfo.processInfo.environment["SAGA_KEEP_SERVERS"] == nil { try? FileManager.default.removeItem(atPath: dir) }
    }

    deinit { stop() }
}

/// The Galera cluster the suite shares: `SAGA_GALERA_URL`, which `scripts/test.sh` sets after
/// starting one. Without it the cluster tests fail (never skip). Tests that kill, pause or
/// restart nodes start a cluster of their own.
public enum SharedGalera {
    public static func url() throws -> String {
        guard let url = ProcessInfo.processInfo.environment["SAGA_GALERA_URL"], !url.isEmpty else {
            throw TestSetupError("SAGA_GALERA_URL is not set: the cluster tests need a Galera cluster. Run scripts/test.sh (it starts one), or scripts/galera.sh start DIR and export the URL it prints.")
        }
        return url
    }
}
