import ArgumentParser
import Foundation
import Logging
import Saga

@main
struct AADemo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "aa-demo",
        abstract: "An ocore-style node processing AA triggers: state vars in RocksDB, balances in SQL.",
        discussion: "With no subcommand, runs a short show: the same COMMIT failure unprotected and protected by Saga.",
        subcommands: [Show.self, Run.self, Recover.self, Verify.self],
        defaultSubcommand: Show.self)
}

/// Prints a line to stdout right away: a crashing child's output must reach its parent.
func say(_ line: String) {
    print(line)
    fflush(nil)  // all streams; `stdout` itself is not concurrency-safe to name
}

func makeLogger(verbose: Bool) -> Logger {
    var logger = Logger(label: "aa-demo") { StreamLogHandler.standardError(label: $0) }
    logger.logLevel = verbose ? .debug : .warning
    return logger
}

/// Where a node keeps its state: shared by every subcommand.
struct NodeLocation: ParsableArguments {
    @Option(help: "The node's data directory (KV in DIR/kv, SQL in DIR/ledger.sqlite).")
    var data: String

    @Option(help: "Keep the SQL side in MySQL/MariaDB instead: mysql://user:password@host:port/db.")
    var sql: String?

    /// For commands that work on an existing node: both stores must be there.
    func requireExisting() throws {
        guard FileManager.default.fileExists(atPath: Node.kvPath(data)), sql != nil || FileManager.default.fileExists(atPath: Node.sqlPath(data)) else {
            throw DemoError("no node data in \(data) (expected \(Node.kvPath(data)) and \(Node.sqlPath(data)) or --sql)")
        }
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Seed the queue on first use, recover, then process what is left of it in order.")

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

    @Option(name: .customLong("gc-every"), help: "Collect garbage after this many finished sagas.")
    var gcEvery: Int = 512

    @Flag(help: "Log the protocol's steps to stderr.")
    var verbose = false

    func validate() throws {
        guard triggers >= 0 else { throw ValidationError("--triggers must be 0 or more") }
        guard let mode = Node.FailMode(rawValue: failMode) else { throw ValidationError("--fail-mode must be fk, io or kill, not \(failMode)") }
        if location.sql != nil, mode != .kill, failCommitAt != nil { throw ValidationError("with --sql mysql://..., use --fail-mode kill") }
        if location.sql == nil, mode == .kill { throw ValidationError("--fail-mode kill needs --sql mysql://...") }
        guard gcEvery >= 1 else { throw ValidationError("--gc-every must be at least 1") }
        if let crashAt { _ = try parseCrashPoint(crashAt) }
    }

    func parseCrashPoint(_ text: String) throws -> (SagaPhase?, SagaStep) {
        let parts = text.split(separator: ":").map(String.init)
        let stepName = parts.last ?? ""
        guard let step = SagaStep(rawValue: stepName) else {
            throw ValidationError("unknown step \"\(stepName)\"; steps: \(SagaStep.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard parts.count <= 2 else { throw ValidationError("--crash-at takes STEP or PHASE:STEP") }
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
        var hooks: (any SagaHooks)?
        if let crashAt {
            let (phase, step) = try parseCrashPoint(crashAt)
            hooks = StepTrigger(.crash, at: step, phase: phase, occurrence: crashOccurrence)
        }
        var node = try Node(dir: location.data, sqlURL: location.sql, protected: !unprotected, hooks: hooks, gcEvery: gcEvery, logger: logger)
        defer { node.close() }
        if try node.seed(triggers: triggers, seed: seed) {
            say("seeded \(triggers) triggers (seed \(seed)) in \(location.data)")
        }
        let mode = Node.FailMode(rawValue: failMode) ?? .fk
        var failedOnce = false
        var processed = 0
        while let t = try node.nextTrigger() {
            let fail = (t.mci == failCommitAt && !failedOnce) ? mode : nil
            if fail != nil { failedOnce = true }
            if unprotected {
                do {
                    try node.processUnprotected(t, fail: fail)
                    say("committed \(t.unit) mci=\(t.mci)")
                } catch {
                    say("COMMIT failed for trigger mci=\(t.mci): \(error); the KV batch stays (unprotected); retrying")
                }
                processed += 1
                continue
            }
            switch Result(catching: { () throws(SagaError) in try node.process(t, fail: fail) }) {
            case .success:
                say("committed \(t.unit) mci=\(t.mci)")
                processed += 1
            case .failure(let error) where error.isRetryable:
                say("COMMIT failed for trigger mci=\(t.mci): \(error); retrying")
            case .failure(.inDoubt(let saga, _)):
                // The coordinator may have stopped (an fsync failed): reopen both stores, as
                // a node restart would; recovery at open decides the saga.
                say("trigger mci=\(t.mci) in doubt (\(saga)); reopening the stores to recover")
                node.close()
                node = try Node(dir: location.data, sqlURL: location.sql, protected: true, hooks: hooks, gcEvery: gcEvery, logger: logger)
                if let pending = node.coordinator?.inDoubt, !pending.isEmpty { throw DemoError("cannot resolve \(pending)") }
            case .failure(let error):
                throw error
            }
        }
        try node.coordinator?.collectGarbage()
        let report = try Verifier.check(kv: node.kv, sql: node.admin)
        say("done: \(processed) trigger(s) processed in this run; queue empty; digest \(report.digest)")
    }
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Open the node's stores with the coordinator (which recovers), print what recovery did, process nothing.")

    @OptionGroup var location: NodeLocation

    @Option(name: .customLong("crash-at"), help: "SIGKILL the process at this step of recovery (resolve, committed, compensate, compensated, gcJournal, gcMarkers).")
    var crashAt: String?

    func run() throws {
        try location.requireExisting()
        var hooks: (any SagaHooks)?
        if let crashAt {
            guard let step = SagaStep(rawValue: crashAt) else { throw ValidationError("unknown step \"\(crashAt)\"") }
            hooks = StepTrigger(.crash, at: step, phase: step == .gcJournal || step == .gcMarkers ? .gc : .recovery)
        }
        let node = try Node(dir: location.data, sqlURL: location.sql, protected: true, hooks: hooks, logger: makeLogger(verbose: false))
        defer { node.close() }
        let pending = node.coordinator?.inDoubt ?? []
        say("recovered; in doubt: \(pending.isEmpty ? "none" : pending.map(String.init(describing:)).joined(separator: ", "))")
        if !pending.isEmpty { throw ExitCode(2) }
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
        let report = try Verifier.check(kv: node.kv, sql: node.admin)
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
            let report = try Verifier.check(kv: node.kv, sql: node.admin)
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
