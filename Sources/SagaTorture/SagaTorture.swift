import ArgumentParser
import Foundation
import SagaFaultKit

@main
struct SagaTorture: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "saga-torture",
        abstract: "Tries hard to make Saga lose an acknowledged write or let its two stores diverge, and prints how hard it tried.",
        discussion: """
            Per SQL backend: a SIGKILL at every protocol step x every COMMIT outcome (and again inside \
            recovery), random SIGKILLs of a multi-threaded workload, I/O errors and power loss in \
            SQLite's VFS, kill -9 of the MariaDB server and lost COMMIT replies, a contention run \
            checked against a model, three replicas with faults in two, RocksDB's own writes \
            failing (ENOSPC, EIO), and kills of a node with hundreds of sagas pending. Exits 1 \
            when anything is lost, unexpected or divergent; the seed replays the same schedule.
            """,
        subcommands: [Torture.self, Worker.self],
        defaultSubcommand: Torture.self)
}

struct Torture: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run the torture (the default).")

    @Flag(help: "What CI runs: every crash point, 50 random kills a backend, the I/O countdown, the replicas, 16 KV write faults and 12 backlog kills a backend (a few minutes).")
    var short = false

    @Flag(help: "Thousands of kills, for humans (an hour or more).")
    var long = false

    @Option(help: "Seed of the whole schedule (printed; a failing seed replays the same run).")
    var seed: UInt64?

    @Option(help: "Backends to torture: sqlite, mysql, or both.")
    var backend: String = "both"

    @Option(name: .customLong("random-kills"), help: "Override the number of random kills per backend.")
    var randomKills: Int?

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
        guard ["sqlite", "mysql", "both"].contains(backend) else { throw ValidationError("--backend must be sqlite, mysql or both, not \(backend)") }
        if let randomKills, randomKills < 0 { throw ValidationError("--random-kills must be 0 or more") }
        _ = try selectedCampaigns()
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
        var intensity: Intensity = long ? .long : .short
        if let randomKills { intensity.randomKills = randomKills }
        let mode = long ? "long" : "short"
        let root = try workdir ?? MariaDBServer.makeTempDir("saga-torture")
        say("saga-torture --\(mode) --seed \(seed)   (work in \(root))")
        let backends: [NodeSite.Backend] = backend == "both" ? [.sqlite, .mysql] : [NodeSite.Backend(rawValue: backend) ?? .sqlite]
        var report = TortureReport(seed: seed, mode: mode, backends: [])
        for b in backends {
            var server: MariaDBServer?
            if b == .mysql {
                say("[mysql] starting a throwaway MariaDB server")
                server = try MariaDBServer()
            }
            defer { server?.stop() }
            let campaign = Campaign(backend: b, root: root, seed: seed, intensity: intensity, server: server, say: say)
            campaign.verbose = verbose
            do { try campaign.runAll(try selectedCampaigns()) } catch {
                campaign.fail("aborted: \(error)")
            }
            report.backends.append(campaign.figures)
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
