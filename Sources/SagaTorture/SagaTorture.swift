import ArgumentParser
import Foundation
import SagaFaultKit
import Synchronization

@main
struct SagaTorture: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "saga-torture",
        abstract: "Tries hard to make Saga lose an acknowledged write or let its two stores diverge, and prints how hard it tried.",
        discussion: """
            Per SQL backend: a SIGKILL at every protocol step x every COMMIT outcome (and again inside \
            recovery), random SIGKILLs of a multi-threaded workload, I/O errors and power loss in \
            SQLite's VFS, kill -9 of the MariaDB server and lost COMMIT replies, kill -9 and rejoin \
            of the nodes of a 3-node Galera cluster with another writer making sagas lose \
            certification, a contention run checked against a model, three replicas with faults \
            in two, RocksDB's own writes failing (ENOSPC, EIO), power loss of RocksDB's files, and \
            kills of a node with hundreds of sagas pending. Exits 1 when anything is lost, unexpected or divergent (on the \
            cluster: when its three nodes differ); the seed replays the same schedule.
            """,
        subcommands: [Torture.self, Worker.self, KVPowerLossProbe.self],
        defaultSubcommand: Torture.self)
}

struct Torture: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run the torture (the default).")

    @Flag(help: "What CI runs: every crash point, 50 random kills a backend, the I/O countdown, the replicas, 16 KV write faults, 12 backlog kills and 8 KV power losses a backend; on the Galera cluster 16 random kills, 4 node kills, 8 KV write faults and 1 backlog kill (a few minutes).")
    var short = false

    @Flag(help: "Thousands of kills, for humans (an hour or more).")
    var long = false

    @Option(help: "Seed of the whole schedule (printed; a failing seed replays the same run).")
    var seed: UInt64?

    @Option(help: "Backends to torture, comma-separated: sqlite, mysql, galera (a 3-node cluster); both (sqlite and mysql) or all.")
    var backend: String = "all"

    @Option(help: "Coordinator modes, comma-separated: compensate, redo. Every campaign of a backend runs once per mode (the Galera cluster in compensate mode only: redo mode is refused on a cluster).")
    var modes: String = "compensate,redo"

    @Option(name: .customLong("random-kills"), help: "Override the number of random kills per backend.")
    var randomKills: Int?

    @Option(name: .customLong("node-kills"), help: "Override the number of kill -9 of a Galera node (each followed by its rejoin).")
    var nodeKills: Int?

    @Option(help: "Write the figures as JSON to this file.")
    var json: String?

    @Option(help: "Work in this directory (default: a new one under the temporary directory).")
    var workdir: String?

    @Option(help: "Run only these campaigns (comma-separated): \(Campaign.Name.allCases.map(\.rawValue).joined(separator: ", ")). Default: all.")
    var campaigns: String?

    @Flag(help: "Print the outcome counts of every site.")
    var verbose = false

    func validate() throws {
        if short && long { throw ValidationError("--short and --long exclude each other") }
        _ = try selectedBackends()
        if let randomKills, randomKills < 0 { throw ValidationError("--random-kills must be 0 or more") }
        if let nodeKills, nodeKills < 0 { throw ValidationError("--node-kills must be 0 or more") }
        _ = try selectedCampaigns()
        _ = try selectedModes()
    }

    func selectedModes() throws -> [CoordinatorMode] {
        let names = modes.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        let chosen = try names.map { name in
            guard let m = CoordinatorMode(rawValue: name) else { throw ValidationError("--modes takes compensate and redo (comma-separated), not \(name)") }
            return m
        }
        guard !chosen.isEmpty else { throw ValidationError("--modes names no mode") }
        return chosen
    }

    func selectedBackends() throws -> [NodeSite.Backend] {
        var chosen: [NodeSite.Backend] = []
        for name in backend.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) {
            let add: [NodeSite.Backend]
            switch name {
            case "all": add = NodeSite.Backend.allCases
            case "both": add = [.sqlite, .mysql]
            default:
                guard let b = NodeSite.Backend(rawValue: name) else {
                    throw ValidationError("--backend takes sqlite, mysql, galera, both or all (comma-separated), not \(name)")
                }
                add = [b]
            }
            for b in add where !chosen.contains(b) { chosen.append(b) }
        }
        guard !chosen.isEmpty else { throw ValidationError("--backend names no backend") }
        return chosen
    }

    func selectedCampaigns() throws -> [Campaign.Name] {
        guard let campaigns else { return Campaign.Name.allCases }
        return try campaigns.split(separator: ",").map { name in
            guard let c = Campaign.Name(rawValue: name.trimmingCharacters(in: .whitespaces)) else {
                throw ValidationError("unknown campaign \(name); known: \(Campaign.Name.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return c
        }
    }

    func run() throws {
        let seed = self.seed ?? UInt64(Date().timeIntervalSince1970 * 1000) % 1_000_000_007
        let base: Intensity = long ? .long : .short
        let mode = long ? "long" : "short"
        let root = try workdir ?? MariaDBServer.makeTempDir("saga-torture")
        say("saga-torture --\(mode) --seed \(seed)   (work in \(root))")
        let backends = try selectedBackends()
        var report = TortureReport(seed: seed, mode: mode, backends: [])
        // Interrupted (Ctrl-C, CI's timeout): the workers are killed and the servers stopped.
        Cleanup.stopOnSignals()
        for b in backends {
            var server: MariaDBServer?
            var cluster: GaleraCluster?
            var startError: (any Error)?
            do {
                switch b {
                case .sqlite: break
                case .mysql:
                    say("[mysql] starting a throwaway MariaDB server")
                    server = try MariaDBServer()
                case .galera:
                    say("[galera] starting a throwaway 3-node MariaDB Galera cluster")
                    cluster = try GaleraCluster()
                }
            } catch { startError = error }
            let cleanup = Cleanup.add { [server, cluster] in
                server?.stop()
                cluster?.stop()
            }
            defer { Cleanup.run(cleanup) }
            var intensity = b == .galera && !long ? base.forShortClusterRun : base
            if let randomKills { intensity.randomKills = randomKills }
            if let nodeKills { intensity.nodeKills = nodeKills }
            for mode in try selectedModes() where mode == .compensate || b != .galera {
                let campaign = Campaign(backend: b, mode: mode, root: root, seed: seed, intensity: intensity, server: server, cluster: cluster, say: say)
                campaign.verbose = verbose
                do {
                    if let startError { throw startError }
                    try campaign.runAll(try selectedCampaigns())
                } catch {
                    // A campaign that throws leaves its worker running: it would go on against
                    // a stopped server.
                    Cleanup.killChildren()
                    campaign.fail("aborted: \(error)")
                }
                report.backends.append(campaign.figures)
            }
        }
        report.passed = report.backends.allSatisfy(\.passed)
        say("")
        say(report.table())
        let json = try report.json()
        if let path = self.json { try json.write(toFile: path, atomically: true, encoding: .utf8) }
        if report.passed {
            say("PASSED: nothing lost, nothing unexpected, no divergence (seed \(seed))")
            try? FileManager.default.removeItem(atPath: root)
        } else {
            for b in report.backends { for f in b.failures.prefix(20) { say("  [\(b.backend)] \(f)") } }
            say("FAILED with seed \(seed): replay with saga-torture --\(mode) --seed \(seed); data kept in \(root)")
            throw ExitCode(1)
        }
    }
}

func say(_ line: String) {
    print(line)
    fflush(nil)
}

/// What to undo when the run ends early or is interrupted: servers and clusters to stop, worker
/// processes to kill. On SIGINT, SIGTERM or SIGHUP (CI's timeout sends SIGTERM) every live
/// child is SIGKILLed, every registered stop runs, and the program exits.
enum Cleanup {
    private static let state = Mutex<(next: Int, actions: [Int: @Sendable () -> Void], children: Set<pid_t>)>((0, [:], []))
    nonisolated(unsafe) private static var sources: [any DispatchSourceSignal] = []

    /// Registers `action`; returns its key for ``run(_:)``.
    static func add(_ action: @escaping @Sendable () -> Void) -> Int {
        state.withLock { s in
            s.next += 1
            s.actions[s.next] = action
            return s.next
        }
    }

    /// Runs the action registered under `key` (once) and forgets it.
    static func run(_ key: Int) {
        let action = state.withLock { $0.actions.removeValue(forKey: key) }
        action?()
    }

    static func childStarted(_ pid: pid_t) { state.withLock { _ = $0.children.insert(pid) } }
    static func childEnded(_ pid: pid_t) { state.withLock { _ = $0.children.remove(pid) } }

    /// SIGKILLs every child not reaped yet.
    static func killChildren() {
        for pid in state.withLock({ $0.children }) { kill(pid, SIGKILL) }
    }

    /// Installs the signal handlers (once, from the main thread).
    static func stopOnSignals() {
        guard sources.isEmpty else { return }
        for sig in [SIGINT, SIGTERM, SIGHUP] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                say("interrupted (signal \(sig)): killing the workers, stopping the servers")
                killChildren()
                let actions = state.withLock { s in
                    defer { s.actions = [:] }
                    return Array(s.actions.values)
                }
                for action in actions { action() }
                exit(128 + sig)
            }
            source.resume()
            sources.append(source)
        }
    }
}
