import Foundation
import Logging
import Saga

// The cases of the conformance suite about a coordinator's life: a clean close leaves nothing
// for the next open, and an open after a crash recovers and tells the caller what it decided.

extension ConformanceSuite {
    static let lifecycleCases: [ConformanceCase] = [
        ConformanceCase(name: "a clean close leaves nothing for the next open", run: cleanCloseLeavesNothing),
        ConformanceCase(name: "an open after a crash recovers and reports what it decided", run: openAfterCrashReports),
    ]

    /// Sagas committed, one failed at COMMIT, and garbage collection never reached (in redo
    /// mode, no checkpoint): the close collects everything, and the next open neither fences,
    /// compensates nor replays, and logs nothing at notice level or above.
    static func cleanCloseLeavesNothing(_ env: any HarnessEnvironment) throws {
        let c = try env.coordinator(.init(gcThreshold: SagaCoordinator.Configuration.maxGCThreshold, checkpointEvery: SagaCoordinator.Configuration.maxCheckpointEvery, checkpointInterval: .seconds(3600)))
        for i in 0..<12 {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("close\(i)"), .integer(Int64(i))])
                try saga.kv.put("close\(i)", "v\(i)")
            }
        }
        _ = try expectSagaError {
            try c.run { saga in
                try saga.kv.put("close-failed", "never")
                try env.arrangeCommitFailure(in: saga)
            }
        }
        let pendingBefore = try env.journal().count + env.markers().count
        try check(pendingBefore >= 12, "before the close, the finished sagas' records or rows wait for collection (\(pendingBefore))")
        c.close()
        let journal = try env.journal(), markers = try env.markers()
        try check(journal.isEmpty, "the close collected every journal record: \(journal.keys.sorted())")
        try check(markers.isEmpty, "the close collected every marker row: \(markers)")

        let logs = LogCapture()
        let steps = StepRecorder()
        let d = try env.coordinator(.init(hooks: steps), logger: logs.logger)
        defer { d.close() }
        let report = d.recoveryAtOpen
        try check(report.committed.isEmpty && report.compensated.isEmpty && report.replayed.isEmpty && report.isClean, "the open after a clean close decided nothing: \(report)")
        let acted = steps.steps.filter { [.resolve, .compensate, .replay].contains($0) }
        try check(acted.isEmpty, "no fencing, compensation or replay at open: \(acted)")
        let loud = logs.entries.filter { $0.level >= .notice }
        try check(loud.isEmpty, "the open logs nothing at notice level or above: \(loud.map(\.message))")
        for i in 0..<12 { try check(try env.kvGet("close\(i)") == "v\(i)" && env.row("close\(i)") == Int64(i), "saga \(i) is in both stores") }
        try check(try env.kvGet("close-failed") == nil, "the failed saga left nothing")
        // The reopened coordinator works.
        try d.run { saga in try saga.kv.put("close-after", "ok") }
        try check(try env.kvGet("close-after") == "ok", "a saga runs after the reopen")
    }

    /// A coordinator given up without `close()` (its process crashed) leaves its finished
    /// sagas' records; the next open decides them, says so in `recoveryAtOpen`, and logs each
    /// saga and its keys at notice level.
    static func openAfterCrashReports(_ env: any HarnessEnvironment) throws {
        var ran: [SagaID] = []
        do {
            let c = try env.coordinator(.init(gcThreshold: SagaCoordinator.Configuration.maxGCThreshold, checkpointEvery: SagaCoordinator.Configuration.maxCheckpointEvery, checkpointInterval: .seconds(3600)))
            for i in 0..<3 {
                ran.append(try c.run { saga in
                    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("crash\(i)"), .integer(Int64(i))])
                    try saga.kv.put("crash\(i)", "v\(i)")
                    return saga.id
                })
            }
            // No close: the coordinator is dropped as a crashed process would drop it.
        }
        let logs = LogCapture()
        let d = try env.coordinator(.init(), logger: logs.logger)
        defer { d.close() }
        let report = d.recoveryAtOpen
        let decided = Set(report.committed + report.replayed)
        try check(Set(ran).isSubset(of: decided), "the open reports the crashed coordinator's sagas as committed: ran \(ran), \(report)")
        try check(report.isClean, "nothing in doubt: \(report)")
        for (i, id) in ran.enumerated() {
            let line = logs.entries.first { $0.level == .notice && $0.message.contains("saga \(id.rawValue) committed") }
            try check(line?.message.contains("\"crash\(i)\"") == true, "a notice names saga \(id.rawValue) and its key: \(logs.entries.map(\.message))")
            try check(try env.kvGet("crash\(i)") == "v\(i)", "saga \(i)'s KV write stays")
        }
    }
}

/// Records every step a coordinator reaches (a ``SagaHooks`` that never fails one).
public final class StepRecorder: SagaHooks, @unchecked Sendable {
    private let lock = NSLock()
    private var reached: [SagaStep] = []
    public init() {}
    public var steps: [SagaStep] { lock.withLock { reached } }
    public func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        lock.withLock { reached.append(step) }
    }
}

/// A logger whose messages are kept, for tests that check what a coordinator logged.
public final class LogCapture: @unchecked Sendable {
    public struct Entry: Sendable {
        public let level: Logger.Level
        public let message: String
    }
    private let lock = NSLock()
    private var kept: [Entry] = []
    public init() {}
    public var entries: [Entry] { lock.withLock { kept } }
    /// A logger at `trace` level that keeps every message here.
    public var logger: Logger {
        var logger = Logger(label: "saga-test") { _ in Handler(capture: self) }
        logger.logLevel = .trace
        return logger
    }
    fileprivate func keep(_ entry: Entry) { lock.withLock { kept.append(entry) } }

    private struct Handler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            capture.keep(Entry(level: event.level, message: event.message.description))
        }
    }
}
