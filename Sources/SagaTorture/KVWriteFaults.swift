import Foundation

/// RocksDB's own writes fail: the worker arms the write-family interposer (CFsyncFaults) on
/// its RocksDB directory once its node is open, so that the n-th write()/pwrite()/writev() there
/// fails with ENOSPC or EIO, once or from then on (or a disk that fills up: a short write, then
/// ENOSPC for writes and fallocate alike). The worker's node must stop (`kvWriteFailed` or
/// `compensationFailed`, then `stopped` for every later saga, which the worker checks with one
/// more saga), or the process
/// dies inside RocksDB (Debian's build has its assertions on). Either way the parent reopens the
/// stores with the disk healthy again, recovers and checks; at the end a fault-free run on the
/// same stores must finish its sagas.
extension Campaign {
    /// What a failed call of the interposer's log ("op errno=N path") wrote to.
    static func fileKind(_ line: Substring) -> String {
        let parts = line.split(separator: " ")
        let op = parts.first.map(String.init) ?? "?"
        let name = parts.count > 2 ? (parts[2].split(separator: "/").last.map(String.init) ?? "") : ""
        let file = name.hasSuffix(".log") ? "WAL" : name.hasSuffix(".sst") ? "SST" : name.hasPrefix("MANIFEST") ? "MANIFEST"
            : name.hasPrefix("LOG") ? "info LOG" : name.hasPrefix("OPTIONS") ? "OPTIONS" : name
        return op == "write" ? file : "\(file) (\(op))"
    }

    func kvWriteFaults() throws {
        let combos: [(KVWriteFault.Mode, Int32)] = [(.once, ENOSPC), (.once, EIO), (.persistent, EIO), (.full, ENOSPC)]
        var plan: [KVWriteFault] = []
        for files in KVWriteFault.Files.allCases {
            for (mode, errorNumber) in combos {
                for k in 0..<intensity.kvFaultsPerKind {
                    // The first writes of a run (the first sagas, the id lease) and later ones
                    // (compensations, garbage collection, a memtable flush at close).
                    let n = k == 0 ? rng.between(1, 3) : rng.between(4, 120)
                    plan.append(KVWriteFault(n: n, mode: mode, errorNumber: errorNumber, files: files))
                }
            }
        }
        say("[\(label)] KV write faults: \(plan.count) runs, the n-th write under RocksDB's directory fails (ENOSPC or EIO, once, persistent, or a disk filling up; all files or data files only)")
        let site = try newSite("kvfaults")
        let faultLog = site.dir + "/kvfaults.log"
        for (i, fault) in plan.enumerated() {
            try? FileManager.default.removeItem(atPath: faultLog)
            let child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 400,
                                        extra: ["--threads", "2", "--fail-one-in", "10", "--gc-every", "16", "--kv-write-fault", "\(fault)"], tag: "kvfault")
            guard let ended = child.wait(timeout: 120) else {
                child.killNow()
                fail("KV write fault \(fault): the worker hung (killed after 120 s): \(child.lastOutput)")
                break
            }
            let lines = ((try? String(contentsOfFile: faultLog, encoding: .utf8)) ?? "").split(separator: "\n")
            let injected = lines.count
            for line in lines { figures.kvFaultFiles[Self.fileKind(line), default: 0] += 1 }
            figures.kvFaultRuns += 1
            figures.kvFaultsInjected += injected
            let how: String
            switch ended {
            case .exited(Worker.stoppedExit):
                figures.kvStopped += 1
                let out = child.stdout
                var first = "?"
                if let line = out.split(separator: "\n").first(where: { $0.hasPrefix("kv write fault:") }),
                   let r = line.range(of: "first error: ") {
                    first = String(line[r.upperBound...].prefix { $0 != ":" })
                }
                figures.kvFirstErrors[first, default: 0] += 1
                how = "node stopped (first error \(first); the probe saga refused)"
            case .signaled(SIGABRT):
                let assertion = child.stderr.split(separator: "\n").first { $0.contains("Assertion") }.map(String.init)
                guard let assertion, assertion.contains("rocksdb") || assertion.contains("writable_file_writer") else {
                    fail("KV write fault \(fault): SIGABRT, but not from a RocksDB assertion: \(child.lastOutput)")
                    how = "aborted elsewhere"
                    break
                }
                figures.kvAborted += 1
                // "file:line: function: Assertion `x' failed." without the program name.
                let site = assertion.split(separator: ":", maxSplits: 1).last.map { String($0).trimmingCharacters(in: .whitespaces) } ?? assertion
                figures.kvAbortAssertions[site, default: 0] += 1
                how = "aborted in RocksDB"
            case .exited(Worker.wentOnExit):
                // No KV write had failed when the worker stopped: the node may go on.
                figures.kvRanOn += 1
                figures.kvWentOn += 1
                how = "went on: the errors were no KV write failures (the probe saga committed)"
            case .exited(0):
                figures.kvRanOn += 1
                if injected > 0 { figures.kvAbsorbed += 1 }
                how = injected > 0 ? "ran on (RocksDB absorbed it)" : "ran on (fault not reached)"
            case .exited(Worker.notStoppedExit):
                fail("KV write fault \(fault): the coordinator accepted a saga after a KV write failed: \(child.lastOutput)")
                how = "not stopped"
            case let t:
                fail("KV write fault \(fault): the worker ended with \(t): \(child.lastOutput)")
                how = "\(t)"
            }
            if verbose { say("    \(fault): \(injected) injected, \(how)") }
            if !check(site, "after KV write fault \(fault) (\(injected) injected, \(how))") { break }
            if (i + 1) % 8 == 0 { say("  \(i + 1) runs") }
        }
        // The disk is healthy again: the node must make progress on the same stores.
        if figures.failures.isEmpty {
            let child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 100, extra: ["--threads", "2", "--fail-one-in", "10"], tag: "kvfault-after")
            let ended = child.wait(timeout: 120)
            if ended == nil { child.killNow() }
            if ended != .exited(0) { fail("after the KV write faults, a fault-free run of 100 sagas did not finish: \(ended.map { "\($0)" } ?? "hung"): \(child.lastOutput)") }
            check(site, "after the fault-free run that follows the KV write faults")
        }
        say("  \(figures.kvFaultsInjected) failed writes in \(figures.kvFaultRuns) runs: node stopped \(figures.kvStopped), aborted in RocksDB \(figures.kvAborted), ran on \(figures.kvRanOn) (\(figures.kvAbsorbed) with the fault absorbed, \(figures.kvWentOn) after other errors)")
        say("    failed calls by file: \(figures.kvFaultFiles.sorted(by: { $0.value > $1.value }).map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
        say("    first error of a stopped node: \(figures.kvFirstErrors.sorted(by: { $0.key < $1.key }).map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
        for (assertion, n) in figures.kvAbortAssertions.sorted(by: { $0.value > $1.value }) { say("    \(n) x \(assertion.prefix(160))") }
        countOutcomes(site)
        removeSite(site)
    }
}
