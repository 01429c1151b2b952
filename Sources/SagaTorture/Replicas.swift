import Foundation
import MySQLBackend
import Saga

/// The motivating bug, shown not to happen: three independent nodes (each its own RocksDB and
/// SQL database) run aa-demo on the same stream of AA triggers. Node A runs undisturbed; node B
/// crashes itself at random protocol steps and has a COMMIT fail; node C is SIGKILLed at random
/// moments and has a COMMIT fail with an unknown outcome. All three must end with the same
/// state digest.
extension Campaign {
    static var aaDemoPath: String {
        URL(fileURLWithPath: ChildProcess.selfPath).deletingLastPathComponent().appendingPathComponent("aa-demo").path
    }

    func replicas() throws {
        let triggers = intensity.replicaTriggers
        say("[\(label)] replicas: 3 nodes x \(triggers) AA triggers, faults in 2 of them")
        guard FileManager.default.isExecutableFile(atPath: Self.aaDemoPath) else {
            fail("aa-demo not found next to saga-torture (\(Self.aaDemoPath)); build every product with `swift build`")
            return
        }
        // On a cluster each replica writes through another node first.
        let sites = try (0..<3).map { i in
            let site = try newSite("replica-\(["a", "b", "c"][i])")
            return backend == .galera ? try site.withNodeOrder([1, 2, 3].map { ($0 + i - 1) % 3 + 1 }) : site
        }
        let streamSeed = seed % 1_000_000 + 1
        func demo(_ site: NodeSite, _ args: [String], tag: String) throws -> ChildProcess {
            var all = args + ["--data", site.dir + "/node"]
            if let url = site.mysqlURL { all += ["--sql", url] }
            return try ChildProcess(Self.aaDemoPath, all, outputIn: site.dir, tag: tag)
        }
        let base = ["run", "--triggers", "\(triggers)", "--seed", "\(streamSeed)", "--gc-every", "7", "--mode", mode.rawValue]
        // A replica whose fault rounds ran out before its queue was empty.
        var finishedByAPlainRun: [String] = []
        func finishQueue(_ site: NodeSite, _ name: String) throws {
            finishedByAPlainRun.append(name)
            let run = try demo(site, base, tag: "finish")
            let t = run.wait()
            if t != .exited(0) { fail("replica \(name): the run that finishes its queue: \(t): \(run.lastOutput)") }
        }
        let failMode = backend == .sqlite ? "fk" : "kill"
        let unknownMode = backend == .sqlite ? "io" : "kill"

        // A: no faults.
        let a = try demo(sites[0], base, tag: "run")
        if a.wait() != .exited(0) { fail("replica A: \(a.status.map(String.init(describing:)) ?? "?"): \(a.lastOutput)") }

        // B: crashes at random steps until the queue is empty.
        var done = false
        for round in 0..<60 where !done {
            // Steps on every saga's path, so that most rounds do crash.
            let onPath: [SagaStep] = mode == .redo ? [.begin, .body, .marker, .commit, .committed, .applied]
                : [.begin, .body, .prepare, .prepared, .marker, .commit, .committed]
            // Round 0 fails a COMMIT and crashes after it: in compensation, or (redo mode, with
            // nothing to undo) right after the next COMMIT.
            let step = round == 0 ? (mode == .redo ? SagaStep.committed : .compensate) : onPath[rng.below(onPath.count)]
            var args = base + ["--crash-at", step.rawValue, "--crash-occurrence", "\(round == 0 ? 1 : rng.between(1, 4))"]
            if round == 0 { args += ["--fail-commit-at", "\(rng.between(2, triggers))", "--fail-mode", failMode] }
            let b = try demo(sites[1], args, tag: "run")
            switch b.wait() {
            case .exited(0): done = true
            case .signaled(SIGKILL): figures.replicaCrashes += 1
            case let t: fail("replica B: \(t): \(b.lastOutput)"); done = true
            }
        }
        if !done { try finishQueue(sites[1], "B") }

        // C: SIGKILLed from outside at random moments, one COMMIT with an unknown outcome.
        done = false
        for round in 0..<60 where !done {
            var args = base
            if round == 0 { args += ["--fail-commit-at", "\(rng.between(2, triggers))", "--fail-mode", unknownMode] }
            let c = try demo(sites[2], args, tag: "run")
            usleep(useconds_t(rng.between(20, 300)) * 1000)
            if c.hasEnded {
                if c.wait() == .exited(0) { done = true } else { fail("replica C: \(c.wait()): \(c.lastOutput)"); done = true }
            } else {
                c.killNow()
                figures.replicaKills += 1
            }
        }
        // A loaded machine can start aa-demo slower than the kills come (seen on the cluster:
        // 60 rounds, 9 triggers of 30): the queue is then finished by one run left alone, so
        // that the digests compare whole streams.
        if !done { try finishQueue(sites[2], "C") }

        // All three: verify and compare digests.
        var digests: [String] = []
        for (i, site) in sites.enumerated() {
            let v = try demo(site, ["verify"], tag: "verify")
            let status = v.wait()
            let digest = v.stdout.split(separator: "\n").first { $0.hasPrefix("digest ") }.map { String($0.dropFirst(7)) } ?? "?"
            if status != .exited(0) {
                figures.divergences += 1
                fail("replica \(["A", "B", "C"][i]) does not verify: \(v.lastOutput)")
            }
            digests.append(digest)
        }
        figures.replicasEqual = Set(digests).count == 1 && digests[0] != "?"
        figures.replicaDigest = digests[0]
        if !figures.replicasEqual {
            figures.divergences += 1
            fail("replicas differ: A \(digests[0]), B \(digests[1]), C \(digests[2])")
        }
        say("  digests: A \(digests[0]), B \(digests[1]), C \(digests[2])")
        if verbose, !finishedByAPlainRun.isEmpty { say("    queue finished by a run without faults: \(finishedByAPlainRun.joined(separator: ", "))") }
        if backend == .galera {
            // Each replica's database, node by node, once every node is synced.
            if let unsynced = waitEveryNodeSynced() { fail("replicas: \(unsynced)") }
            for (i, site) in sites.enumerated() {
                figures.nodeChecks += 1
                let differences = Checker.compareNodes(site)
                if differences.isEmpty { figures.nodesIdentical += 1 }
                figures.divergences += differences.count
                for d in differences.prefix(5) { fail("replica \(["A", "B", "C"][i]): \(d)") }
            }
        }
        sites.forEach(removeSite)
    }
}
