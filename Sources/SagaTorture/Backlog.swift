import Foundation
import RocksDBBackend
import Saga

/// A node whose garbage collection is rare (gcThreshold 100000), so that the journal holds
/// hundreds of `prepared` records of finished sagas (redo mode: hundreds of redo rows above the
/// watermark), SIGKILLed again and again. Recovery at the
/// next open must resolve them all (it fences them in chunks: the recovery of more than 256
/// pending sagas on SQLite was once broken by a dangling pointer). After every kill: the
/// pending records are counted (read-only, before any recovery), then a progress run must
/// recover, leave nothing in doubt and finish its queue of sagas within a time bound, then the
/// usual checker runs.
extension Campaign {
    static let backlogGCThreshold = 100_000
    /// Sagas of every progress run, and the time it may take (recovery included).
    static let backlogProgressSagas = 50
    static let backlogProgressBound = 60.0

    func pendingBacklog() throws {
        let n = intensity.backlogKills
        say("[\(label)] pending backlog: \(n) SIGKILLs of a node with GC every \(Self.backlogGCThreshold) sagas after 100-1500 committed sagas, each followed by a run of \(Self.backlogProgressSagas) sagas that must finish within \(Int(Self.backlogProgressBound)) s with nothing in doubt")
        let site = try newSite("backlog")
        let gc = ["--gc-every", "\(Self.backlogGCThreshold)"]
        for i in 0..<n {
            // Kill once the run has committed `target` sagas (a count, not a time: hundreds
            // pending on a slow machine too). The first run goes well past 256.
            let target = i == 0 ? rng.between(600, 1500) : rng.between(100, 1500)
            let counter = OutcomeLog.CommitCounter(path: site.dir + "/outcomes.log")
            let child = try startWorker(site, firstTxid: try nextTxid(site), sagas: 1_000_000,
                                        extra: ["--threads", "4", "--fail-one-in", "10"] + gc, tag: "backlog")
            let deadline = Date().addingTimeInterval(60)
            while !child.hasEnded, Date() < deadline {
                usleep(50_000)
                if counter.poll() >= target { break }
            }
            if child.hasEnded {
                fail("backlog kill #\(i + 1): the worker ended before it was killed (\(child.wait())): \(child.lastOutput)")
                break
            }
            child.killNow()
            figures.backlogKills += 1

            // The records recovery will have to resolve, read before anything recovers.
            let pending = try pendingRecords(site)
            figures.backlogMaxPending = max(figures.backlogMaxPending, pending)
            figures.backlogPendingTotal += pending

            // Progress: the next run recovers them, leaves nothing in doubt, finishes its queue.
            let start = Date()
            let run = try startWorker(site, firstTxid: try nextTxid(site), sagas: Self.backlogProgressSagas,
                                      extra: ["--threads", "2", "--fail-one-in", "10", "--expect-no-doubt"] + gc, tag: "progress")
            let ended = run.wait(timeout: Self.backlogProgressBound)
            let seconds = Date().timeIntervalSince(start)
            if ended == nil { run.killNow() }
            if ended != .exited(0) {
                fail("backlog kill #\(i + 1) (\(pending) pending): the next run of \(Self.backlogProgressSagas) sagas \(ended.map { "ended with \($0)" } ?? "did not finish within \(Int(Self.backlogProgressBound)) s"): \(run.lastOutput)")
                break
            }
            figures.backlogProgressRuns += 1
            figures.backlogSlowestProgress = max(figures.backlogSlowestProgress, seconds)
            let open = run.stdout.split(separator: "\n").first { $0.hasPrefix("open (recovery included): ") }
            if let open, let s = Double(open.dropFirst("open (recovery included): ".count).prefix { $0 != " " }) {
                figures.backlogSlowestOpen = max(figures.backlogSlowestOpen, s)
            }
            if verbose { say("    kill #\(i + 1): \(pending) pending; next run \(String(format: "%.2f", seconds)) s (\(open ?? "?"))") }
            if !check(site, "after backlog kill #\(i + 1) (\(pending) pending) and a progress run") { break }
            if (i + 1) % 10 == 0 { say("  \(i + 1) kills") }
        }
        if figures.backlogKills > 0, figures.backlogMaxPending < 256 {
            fail("the pending backlog never passed 256 records (max \(figures.backlogMaxPending)): the campaign did not test what it is for")
        }
        say("  \(figures.backlogKills) kills; pending records at reopen: max \(figures.backlogMaxPending), mean \(figures.backlogKills > 0 ? figures.backlogPendingTotal / figures.backlogKills : 0); \(figures.backlogProgressRuns) progress runs, slowest \(String(format: "%.1f", figures.backlogSlowestProgress)) s (open and recovery \(String(format: "%.2f", figures.backlogSlowestOpen)) s)")
        countOutcomes(site)
        removeSite(site)
    }

    /// Journal records still `prepared`, read straight from RocksDB with no coordinator; in
    /// redo mode, the redo rows left in the marker table (the open replays those above the
    /// watermark and deletes the rest).
    func pendingRecords(_ site: NodeSite) throws -> Int {
        if mode == .redo {
            let conn = try site.openSQL().connect()
            defer { conn.close() }
            return Int(try conn.query("SELECT COUNT(*) FROM saga_markers WHERE seq IS NOT NULL", []).first?[0].int64 ?? 0)
        }
        let kv = try RocksDBStore(path: site.kvPath)
        defer { kv.close() }
        var n = 0
        for (key, value) in try kv.journalEntries() where JournalRecord.saga(fromKey: key) != nil {
            if try JournalRecord(decoding: value).state == .prepared { n += 1 }
        }
        return n
    }
}
