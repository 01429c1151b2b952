import Foundation

/// What one backend's campaign did and found; printed as a table and written as JSON.
struct BackendFigures: Codable, Sendable {
    var backend: String
    var stepsKnown = 0
    var stepsCovered = 0
    var crashCells = 0
    var firstCrashes = 0
    var secondCrashes = 0
    var replicaCrashes = 0
    var replicaKills = 0
    var randomKills = 0
    var powerLosses = 0
    var ioFaults = 0
    var serverKills = 0
    /// Runs of the KV write fault campaign, failures injected into RocksDB's writes, and how
    /// each run's worker ended: its node stopped (exit 3), RocksDB aborted the process
    /// (SIGABRT: an assertion of Debian's build), or it ran on to the end (the fault was not
    /// reached, or RocksDB absorbed it: `kvAbsorbed`).
    var kvFaultRuns = 0
    var kvFaultsInjected = 0
    var kvStopped = 0
    var kvAborted = 0
    var kvRanOn = 0
    var kvAbsorbed = 0
    /// Ran on: the worker stopped on errors that were no KV write failure and the node
    /// accepted the next saga.
    var kvWentOn = 0
    /// The first error a stopped node's worker saw, by kind.
    var kvFirstErrors: [String: Int] = [:]
    /// Failed calls by file (WAL, SST, MANIFEST, info LOG...; the call when not write()).
    var kvFaultFiles: [String: Int] = [:]
    /// The assertion messages of the aborts, counted.
    var kvAbortAssertions: [String: Int] = [:]
    /// Simulated power losses of RocksDB's files, the unsynced changes (writes, size changes)
    /// at the cuts, how many of them the cuts dropped or tore, and the file creations and
    /// renames they undid.
    var kvPowerLosses = 0
    var kvPowerLossChanges = 0
    var kvPowerLossLost = 0
    var kvPowerLossDirOpsUndone = 0
    var lostReplies = 0
    /// Galera: kill -9 of the node the workload's connections went to, of another node, and
    /// rejoins; sagas rolled back by a conflict (1213) and transactions of the other writer
    /// rolled back so; the nodes' own counters of failed certifications and brute-force
    /// aborts; checks that compared the three nodes, and how many found them identical.
    var workloadNodeKills = 0
    var otherNodeKills = 0
    var nodeRejoins = 0
    var sagaConflicts = 0
    var otherWriterConflicts = 0
    var certificationFailures = 0
    var bruteForceAborts = 0
    var nodeChecks = 0
    var nodesIdentical = 0
    /// The pending-backlog campaign: kills, `prepared` records found at reopen (max, sum),
    /// progress runs that finished in time, the slowest of them and the slowest open.
    var backlogKills = 0
    var backlogMaxPending = 0
    var backlogPendingTotal = 0
    var backlogProgressRuns = 0
    var backlogSlowestProgress = 0.0
    var backlogSlowestOpen = 0.0
    var forcedCommitFailures = 0
    var sagasCommitted = 0
    var sagasFailed = 0
    var sagasUnknown = 0
    var sagasUnanswered = 0
    var checks = 0
    var lost = 0
    var unexpected = 0
    var divergences = 0
    var contentionSagas = 0
    var replicasEqual = false
    var replicaDigest = ""
    var seconds = 0.0
    var failures: [String] = []
    /// The campaigns that ran (all that apply to the backend unless `--campaigns` picked some).
    var campaigns: [String] = []

    init(backend: String) { self.backend = backend }

    var passed: Bool {
        lost == 0 && unexpected == 0 && divergences == 0 && failures.isEmpty
            && (replicasEqual || !campaigns.contains("replicas"))
            && (stepsCovered == stepsKnown || !campaigns.contains("crash-points"))
            && nodesIdentical == nodeChecks
    }
}

struct TortureReport: Codable, Sendable {
    var seed: UInt64
    var mode: String
    var backends: [BackendFigures]
    var passed = false

    func table() -> String {
        let rows: [(String, (BackendFigures) -> String)] = [
            ("protocol steps known / covered by a crash", { "\($0.stepsKnown) / \($0.stepsCovered)" }),
            ("cells step x COMMIT outcome / crashed", { "\($0.crashCells) / \($0.firstCrashes)" }),
            ("second crashes inside recovery", { "\($0.secondCrashes)" }),
            ("replicas: crashes at a step / SIGKILLs", { "\($0.replicaCrashes) / \($0.replicaKills)" }),
            ("random SIGKILLs of the workload", { "\($0.randomKills)" }),
            ("simulated power losses", { "\($0.powerLosses)" }),
            ("injected I/O errors", { "\($0.ioFaults)" }),
            ("server kills / lost COMMIT replies", { "\($0.serverKills) / \($0.lostReplies)" }),
            ("cluster node kills: workload's / other / rejoins", { "\($0.workloadNodeKills) / \($0.otherNodeKills) / \($0.nodeRejoins)" }),
            ("1213 rollbacks: sagas / other writer", { "\($0.sagaConflicts) / \($0.otherWriterConflicts)" }),
            ("cluster cert. failures / brute-force aborts", { "\($0.certificationFailures) / \($0.bruteForceAborts)" }),
            ("checks of all 3 nodes / nodes identical", { "\($0.nodeChecks) / \($0.nodesIdentical)" }),
            ("KV write faults injected / runs", { "\($0.kvFaultsInjected) / \($0.kvFaultRuns)" }),
            ("KV fault runs: stopped / aborted / ran on", { "\($0.kvStopped) / \($0.kvAborted) / \($0.kvRanOn)" }),
            ("KV power losses / unsynced changes / lost", { "\($0.kvPowerLosses) / \($0.kvPowerLossChanges) / \($0.kvPowerLossLost)" }),
            ("backlog kills / max pending at reopen", { "\($0.backlogKills) / \($0.backlogMaxPending)" }),
            ("backlog: next runs done / slowest (s)", { "\($0.backlogProgressRuns) / " + String(format: "%.1f", $0.backlogSlowestProgress) }),
            ("sagas committed / failed / unknown", { "\($0.sagasCommitted) / \($0.sagasFailed) / \($0.sagasUnknown)" }),
            ("sagas cut off unanswered", { "\($0.sagasUnanswered)" }),
            ("contention sagas, model exact", { "\($0.contentionSagas)" }),
            ("checks after a fault", { "\($0.checks)" }),
            ("LOST (acknowledged, missing)", { "\($0.lost)" }),
            ("UNEXPECTED (failed, present)", { "\($0.unexpected)" }),
            ("DIVERGENCES", { "\($0.divergences)" }),
            ("3 replicas equal (digest)", { !$0.campaigns.contains("replicas") ? "not run" : $0.replicasEqual ? "yes (\($0.replicaDigest))" : "NO" }),
            ("seconds", { String(format: "%.0f", $0.seconds) }),
        ]
        let width = rows.map(\.0.count).max() ?? 0
        let colWidth = max(18, backends.flatMap { b in rows.map { $0.1(b).count } }.max() ?? 0)
        func pad(_ s: String, _ n: Int) -> String { s + String(repeating: " ", count: max(0, n - s.count)) }
        var out = pad("", width) + " | " + backends.map { pad("rocksdb+" + $0.backend, colWidth) }.joined(separator: " | ") + "\n"
        out += String(repeating: "-", count: width) + "-+-" + backends.map { _ in String(repeating: "-", count: colWidth) }.joined(separator: "-+-") + "\n"
        for (name, value) in rows {
            out += pad(name, width) + " | " + backends.map { pad(value($0), colWidth) }.joined(separator: " | ") + "\n"
        }
        return out
    }

    func json() throws -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try encoder.encode(self), as: UTF8.self)
    }
}
