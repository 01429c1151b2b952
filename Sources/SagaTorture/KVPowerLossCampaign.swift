import Foundation
import SagaFaultKit

/// Power loss of RocksDB's files: the worker arms the KV power-loss simulation
/// (`KVPowerLoss`, CFsyncFaults) on its RocksDB directory before its node opens, runs the
/// workload, and cuts after a random time: every KV write not covered by an fsync is kept,
/// dropped or torn, every file creation and rename not covered by a directory fsync is kept or
/// undone, as a journaling file system may leave them; then the process is SIGKILLed. Half of
/// the runs use a 64 KiB memtable, so that cuts land in flushes, compactions and WAL switches.
/// The parent reopens both stores and runs the checker, in the campaign's coordinator mode.
extension Campaign {
    func kvPowerLoss() throws {
        let n = intensity.kvPowerLosses
        say("[\(label)] KV power loss: \(n) cuts of RocksDB's files under a 4-thread workload; unsynced KV writes kept, dropped or torn, non-durable creations and renames kept or undone")
        let site = try newSite("kvpower-\(mode.rawValue)")
        for i in 0..<n {
            let ms = rng.between(200, 900)
            let cutSeed = rng.next() % 1_000_000_007
            let smallBuffer = rng.below(2) == 0
            var extra = ["--threads", "4", "--fail-one-in", "10",
                         "--kv-power-loss-after-ms", "\(ms)", "--kv-power-loss-seed", "\(cutSeed)"]
            if smallBuffer { extra += ["--kv-write-buffer", "65536"] }
            if backend.usesMySQL { extra += ["--lose-replies-one-in", "8"] }
            let child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 1_000_000, extra: extra, tag: "kvpower")
            guard let ended = child.wait(timeout: 120) else {
                child.killNow()
                fail("KV power loss #\(i + 1): the worker hung (killed after 120 s): \(child.lastOutput)")
                break
            }
            let report = child.stdout.split(separator: "\n").first { $0.hasPrefix("kv power loss") }.map(String.init) ?? ""
            if ended == .signaled(SIGKILL), !report.isEmpty {
                figures.kvPowerLosses += 1
                figures.kvPowerLossChanges += Self.number(before: " unsynced change", in: report)
                figures.kvPowerLossLost += Self.number(before: " dropped", in: report) + Self.number(before: " torn", in: report)
                figures.kvPowerLossDirOpsUndone += Self.number(before: " undone", in: report)
            } else {
                fail("KV power loss #\(i + 1): the worker ended with \(ended) before the cut: \(child.lastOutput)")
            }
            if verbose { say("    #\(i + 1): cut after \(ms) ms, \(smallBuffer ? "64 KiB" : "default") memtable: \(report)") }
            let context = "after KV power loss #\(i + 1) (\(mode.rawValue) mode, cut seed \(cutSeed) after \(ms) ms, \(smallBuffer ? "64 KiB" : "default") memtable: \(report))"
            if !check(site, context) { break }
        }
        say("  \(figures.kvPowerLosses) cuts: \(figures.kvPowerLossChanges) unsynced KV changes at the cuts, \(figures.kvPowerLossLost) of them dropped or torn, \(figures.kvPowerLossDirOpsUndone) creations or renames undone")
        countOutcomes(site)
        removeSite(site)
    }

    /// The integer just before `label` in a line of the cut's report (0 if absent).
    static func number(before label: String, in line: String) -> Int {
        guard let r = line.range(of: label) else { return 0 }
        let digits = line[..<r.lowerBound].reversed().prefix { $0.isNumber }
        return Int(String(digits.reversed())) ?? 0
    }
}
