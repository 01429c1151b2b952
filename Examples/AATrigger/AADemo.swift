import SagaTestKit
import ArgumentParser
import Foundation
import Logging
import Prometheus
import Saga

@main
struct AADemo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aa-demo",
        abstract: "An ocore-style node processing AA triggers: state vars in RocksDB, balances in SQL.",
        discussion: "With no subcommand, runs a short show: the same COMMIT failure unprotected and protected by Saga.",
        subcommands: [Show.self, Run.self, Recover.self, Verify.self, Outcome.self],
        defaultSubcommand: Show.self)
}

/// Prints a line to stdout right away: a crashing child's output must reach its parent.
func say(_ line: String) {
    print(line)
    fflush(nil)  // all streams; `stdout` itself is not concurrency-safe to name
}

/// Log lines go to stderr; from `notice` up (recovery's report among them) by default.
func makeLogger(verbose: Bool) -> Logger {
    var logger = Logger(label: "aa-demo") { StreamLogHandler.standardError(label: $0) }
    logger.logLevel = verbose ? .debug : .notice
    return logger
}

/// What recovery at open did, in one line (the coordinator keeps its report).
func recoverySummary(_ node: Node) -> String {
    let pending = node.coordinator?.inDoubt ?? []
    let report = node.coordinator?.recoveryAtOpen
    let decided = report.map { !$0.committed.isEmpty || !$0.compensated.isEmpty || !$0.replayed.isEmpty || !$0.isClean } ?? false
    return "recovery at open: \(node.preparedAtOpen.count) saga(s) prepared in the journal; "
        + (decided ? "\(report!)" : "nothing to decide")
        + (pending.isEmpty ? "" : "; still in doubt: \(pending.map(String.init(describing:)).joined(separator: ", "))")
}

extension SagaCoordinator.Configuration.Mode: ExpressibleByArgument {}

/// Where a node keeps its state: shared by every subcommand.
struct NodeLocation: ParsableArguments {
    @Option(help: "The node's data directory (KV in DIR/kv, SQL in DIR/ledger.sqlite).")
    var data: String

    @Option(help: "Keep the SQL side in MySQL/MariaDB instead: mysql://user:password@host:port/db.")
    var sql: String?

    @Option(help: "How sagas write the KV side: compensate (KV batch and journal record before COMMIT, undone if it fails) or redo (after-images in the SQL transaction, KV batch after COMMIT). A node's stores open in either mode.")
    var mode: SagaCoordinator.Configuration.Mode = .compensate

    /// For commands that work on an existing node: both stores must be there.
    func requireExisting() throws {
        guard FileManager.default.fileExists(atPath: Node.kvPath(data)), sql != nil || FileManager.default.fileExists(atPath: Node.sqlPath(data)) else {
            throw DemoError("no node data in \(data) (expected \(Node.kvPath(data)) and \(Node.sqlPath(data)) or --sql)")
        }
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Seed the queue on first use, recover, then process what is left of it in order.",
        discussion: """
            Retries only failures that can clear by themselves (lock timeout, deadlock, a transaction \
            the database ended, a COMMIT that failed and was compensated, SQL unreachable), at most \
            --max-attempts times per trigger, with a backoff of 10 ms doubling up to 500 ms. A lock \
            held by a saga in doubt runs recovery instead. A failure of the AA's body is retried once. \
            A failed fsync or KV write reopens the stores (recovery decides). \(NodeStop.exitCodes)
            """)

    @OptionGroup var location: NodeLocation

    @Option(help: "How many triggers to seed on first use.")
    var triggers: Int = 100

    @Option(help: "Seed of the deterministic trigger stream.")
    var seed: UInt64 = 1

    @Option(name: .customLong("fail-commit-at"), help: "Make the COMMIT of the trigger with this mci fail (once).")
    var failCommitAt: Int64?

    @Option(name: .customLong("fail-mode"), help: "How COMMIT fails: fk (deferred foreign key) or io (injected fsync error) on SQLite; kill (connection killed) on MySQL.")
    var failMode: String = "fk"

    @Flag(help: "Run the unsafe sequence (KV batch, then COMMIT) instead of sagas.")
    var unprotected = false

    @Option(name: .customLong("crash-at"), help: "SIGKILL the process at this protocol step: STEP or PHASE:STEP (phases: run, recovery, gc).")
    var crashAt: String?

    @Option(name: .customLong("crash-occurrence"), help: "Crash on the n-th time the step is reached.")
    var crashOccurrence: Int = 1

    @Option(name: .customLong("pause-at"), help: "SIGSTOP the process at this protocol step (STEP or PHASE:STEP) until it gets SIGCONT: whoever started it acts at a known point, e.g. kills the SQL server.")
    var pauseAt: String?

    @Option(name: .customLong("pause-occurrences"), help: "Pause on these times the step is reached, comma-separated (1 = the first).")
    var pauseOccurrences: String = "1"

    @Option(name: .customLong("gc-every"), help: "Collect garbage after this many finished sagas (redo mode: checkpoint after this many applied sagas).")
    var gcEvery: Int = 512

    @Option(name: .customLong("max-attempts"), help: "Attempts per trigger before a transient failure (lock timeout, deadlock, lost transaction, failed COMMIT, SQL unreachable) stops the node (exit 4).")
    var maxAttempts: Int = 8

    @Flag(help: "Log the protocol's steps to stderr.")
    var verbose = false

    @Option(name: .customLong("metrics-file"), help: "Write the coordinator's metrics to this file, in Prometheus' text format, when the run ends (also when it stops with an error).")
    var metricsFile: String?

    func validate() throws {
        guard maxAttempts >= 1 else { throw ValidationError("--max-attempts must be at least 1") }
        guard triggers >= 0 else { throw ValidationError("--triggers must be 0 or more") }
        guard let mode = Node.FailMode(rawValue: failMode) else { throw ValidationError("--fail-mode must be fk, io or kill, not \(failMode)") }
        if location.sql != nil, mode != .kill, failCommitAt != nil { throw ValidationError("with --sql mysql://..., use --fail-mode kill") }
        if location.sql == nil, mode == .kill { throw ValidationError("--fail-mode kill needs --sql mysql://...") }
        guard gcEvery >= 1 else { throw ValidationError("--gc-every must be at least 1") }
        if let crashAt { _ = try parseStepPoint(crashAt) }
        if let pauseAt { _ = try parseStepPoint(pauseAt) }
        guard !pauseOccurrenceList.isEmpty, pauseOccurrences.split(separator: ",").count == pauseOccurrenceList.count else {
            throw ValidationError("--pause-occurrences takes numbers from 1 up, comma-separated, not \(pauseOccurrences)")
        }
    }

    var pauseOccurrenceList: [Int] {
        pauseOccurrences.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }.filter { $0 >= 1 }
    }

    func parseStepPoint(_ text: String) throws -> (SagaPhase?, SagaStep) {
        let parts = text.split(separator: ":").map(String.init)
        let stepName = parts.last ?? ""
        guard let step = SagaStep(rawValue: stepName) else {
            throw ValidationError("unknown step \"\(stepName)\"; steps: \(SagaStep.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard parts.count <= 2 else { throw ValidationError("--crash-at and --pause-at take STEP or PHASE:STEP") }
        if parts.count == 2 {
            guard let phase = SagaPhase(rawValue: parts[0]) else {
                throw ValidationError("unknown phase \"\(parts[0])\"; phases: run, recovery, gc")
            }
            return (phase, step)
        }
        return (nil, step)
    }

    func run() throws {
        let logger = makeLogger(verbose: verbose)
        var stepHooks: [any SagaHooks] = []
        if let crashAt {
            let (phase, step) = try parseStepPoint(crashAt)
            stepHooks.append(StepTrigger(.crash, at: step, phase: phase, occurrence: crashOccurrence))
        }
        if let pauseAt {
            let (phase, step) = try parseStepPoint(pauseAt)
            // One trigger per occurrence: each counts the step on its own.
            stepHooks += pauseOccurrenceList.map { StepTrigger(.pause, at: step, phase: phase, occurrence: $0) }
        }
        let hooks: (any SagaHooks)? = stepHooks.isEmpty ? nil : CombinedHooks(stepHooks)
        // One registry for the whole run: a reopened node's coordinator counts on in the same
        // series.
        let registry = PrometheusCollectorRegistry()
        let factory = PrometheusMetricsFactory(registry: registry)
        defer { if let metricsFile { writeMetrics(registry, to: metricsFile) } }
        let open = { [location, unprotected, gcEvery] in
            try Node(dir: location.data, sqlURL: location.sql, mode: location.mode, protected: !unprotected, hooks: hooks, gcEvery: gcEvery,
                     metricsFactory: factory, logger: logger)
        }
        let node = try open()
        if !unprotected { say(recoverySummary(node)) }
        if try node.seed(triggers: triggers, seed: seed) {
            say("seeded \(triggers) triggers (seed \(seed)) in \(location.data)")
        }
        let runner = QueueRunner(
            node: node, policy: RetryPolicy(maxAttempts: maxAttempts),
            failAt: failCommitAt.map { ($0, Node.FailMode(rawValue: failMode) ?? .fk) },
            reopen: {
                let node = try open()
                say(recoverySummary(node))
                return node
            })
        defer { runner.node.close() }
        do {
            try runner.run()
        } catch let stop as NodeStop {
            say("stopped: \(runner.processed) trigger(s) processed in this run, \(runner.retries) failed attempt(s); SQL connections opened: \(runner.node.sql.opened)")
            sayError("aa-demo: \(stop)")
            throw ExitCode(stop.reason.rawValue)
        }
        let report = try runner.node.check()
        say("done: \(runner.processed) trigger(s) processed in this run, \(runner.retries) failed attempt(s); queue empty; digest \(report.digest); SQL connections opened: \(runner.node.sql.opened)")
    }
}

/// Writes the registry's metrics in Prometheus' text exposition format.
func writeMetrics(_ registry: PrometheusCollectorRegistry, to path: String) {
    var buffer: [UInt8] = []
    registry.emit(into: &buffer)
    if !FileManager.default.createFile(atPath: path, contents: Data(buffer)) {
        sayError("aa-demo: cannot write the metrics to \(path)")
    }
}

/// Prints a line to stderr right away.
func sayError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Open the node's stores with the coordinator (which recovers), print what recovery did, process nothing.",
        discussion: "Exit codes: 0 nothing is left in doubt; 2 sagas stay in doubt (named on stderr; their keys stay locked); 1 the stores cannot be opened (a damaged journal record is named).")

    @OptionGroup var location: NodeLocation

    @Option(name: .customLong("crash-at"), help: "SIGKILL the process at this step of recovery (resolve, committed, compensate, compensated, gcJournal, gcMarkers; redo mode: replay, checkpoint, checkpointed).")
    var crashAt: String?

    func run() throws {
        try location.requireExisting()
        var hooks: (any SagaHooks)?
        if let crashAt {
            guard let step = SagaStep(rawValue: crashAt) else { throw ValidationError("unknown step \"\(crashAt)\"") }
            hooks = StepTrigger(.crash, at: step, phase: step == .gcJournal || step == .gcMarkers ? .gc : .recovery)
        }
        let node = try Node(dir: location.data, sqlURL: location.sql, mode: location.mode, protected: true, hooks: hooks, logger: makeLogger(verbose: false))
        defer { node.close() }
        say(recoverySummary(node))
        let pending = node.coordinator?.inDoubt ?? []
        say("recovered; in doubt: \(pending.isEmpty ? "none" : pending.map(String.init(describing:)).joined(separator: ", "))")
        if !pending.isEmpty {
            sayError("aa-demo: recovery cannot decide \(names(pending)); they stay prepared with their keys locked: run `aa-demo recover` again once the SQL database can be reached")
            throw ExitCode(NodeStop.Reason.inDoubt.rawValue)
        }
    }
}

struct Outcome: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Open the node (recovery runs), then print whether the trigger of each --mci committed: each trigger runs with the caller key mci-N.")

    @OptionGroup var location: NodeLocation

    @Option(parsing: .upToNextOption, help: "The triggers to look up, by mci.")
    var mci: [Int64]

    func run() throws {
        try location.requireExisting()
        let node = try Node(dir: location.data, sqlURL: location.sql, mode: location.mode, protected: true, logger: makeLogger(verbose: false))
        defer { node.close() }
        guard let coordinator = node.coordinator else { throw DemoError("no coordinator") }
        for m in mci {
            switch try coordinator.outcome(ofKey: Node.callerKey(mci: m)) {
            case .committed(let id): say("outcome \(m) committed \(id.rawValue)")
            case .notCommitted: say("outcome \(m) notCommitted")
            case .unknown(let why): say("outcome \(m) unknown \(why)")
            }
        }
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check that KV and SQL agree for every address; print the state digest. Exit 1 when they disagree.")

    @OptionGroup var location: NodeLocation

    func run() throws {
        try location.requireExisting()
        let node = try Node(dir: location.data, sqlURL: location.sql, protected: false, logger: makeLogger(verbose: false))
        defer { node.close() }
        let report = try node.check()
        say("addresses: \(report.addresses), responses: \(report.responses), queued: \(report.queued)")
        say("digest \(report.digest)")
        if report.agree {
            say("OK: KV and SQL agree")
        } else {
            say("DIVERGED: \(report.differences.count) difference(s)")
            for d in report.differences { say("  \(d)") }
            throw ExitCode(1)
        }
    }
}

struct Show: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The same COMMIT failure, unprotected (the stores diverge) and protected by Saga (they agree).")

    func run() throws {
        let triggers = 8, failAt: Int64 = 4
        var logger = makeLogger(verbose: false)
        logger.logLevel = .error  // the show prints its own account of the failure
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("aa-demo-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: root) }

        say("Saga demo: \(triggers) AA triggers; the COMMIT of trigger #\(failAt) fails for real")
        say("(a deferred foreign key that SQLite only checks at COMMIT). The node then retries the trigger.\n")

        var digests: [String] = []
        for protected in [false, true] {
            let dir = root + (protected ? "/protected" : "/unprotected")
            say(protected ? "== 2. Protected by Saga ==" : "== 1. Unprotected: BEGIN; SQL; KV batch (synced); COMMIT ==")
            let node = try Node(dir: dir, protected: protected, logger: logger)
            try node.seed(triggers: triggers, seed: 42)
            var failed = false
            while let t = try node.nextTrigger() {
                let fail: Node.FailMode? = (t.mci == failAt && !failed) ? .fk : nil
                if fail != nil { failed = true }
                do {
                    if protected { try node.process(t, fail: fail) } else { try node.processUnprotected(t, fail: fail) }
                    say("   trigger #\(t.mci): committed")
                } catch {
                    say("   trigger #\(t.mci): COMMIT FAILED (\(shortReason(error)))")
                    say(protected
                        ? "      Saga restored the KV pre-images; retrying the trigger"
                        : "      the KV batch is already durable and stays; retrying the trigger")
                }
            }
            let report = try node.check()
            node.close()
            if report.agree {
                say("   verify: OK, KV and SQL agree (digest \(report.digest))\n")
            } else {
                say("   verify: DIVERGED, \(report.differences.count) difference(s):")
                for d in report.differences { say("      \(d)") }
                say("   every other node computes different results from now on: a chain split.\n")
            }
            digests.append(report.agree ? report.digest : "diverged")
        }
        say("Try it yourself: aa-demo run --data /tmp/node --triggers 100 --fail-commit-at 7; aa-demo verify --data /tmp/node")
    }

    func shortReason(_ error: any Error) -> String {
        let text = String(describing: error)
        if text.contains("FOREIGN KEY") { return "deferred foreign key violated" }
        return text
    }
}
