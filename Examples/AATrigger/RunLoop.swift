import Foundation
import Logging
import Saga

/// Why `aa-demo run` stopped before the end of the queue. Each reason has its own exit code;
/// the message names the trigger, the sagas and the error.
struct NodeStop: Error, CustomStringConvertible {
    enum Reason: Int32 {
        /// Sagas stay in doubt: recovery cannot decide them (the SQL database cannot fence).
        case inDoubt = 2
        /// The AA's body failed on the same trigger again: it will fail every time.
        case bodyFailed = 3
        /// A transient failure (lock timeout, deadlock, lost transaction, failed COMMIT, SQL
        /// unreachable) did not clear within the attempts allowed for one trigger.
        case gaveUp = 4
        /// Saga refuses to go on without a human: a key written behind its back, a damaged
        /// journal record, a statement that ended the transaction, a misuse of the API.
        case needsRepair = 5
    }

    let reason: Reason
    let description: String
    init(_ reason: Reason, _ description: String) { self.reason = reason; self.description = description }

    /// For `--help` and the README.
    static let exitCodes = """
        Exit codes: 0 the queue is processed; 1 the node cannot be opened or another error; \
        2 sagas stay in doubt (recovery cannot decide them; the message names them); \
        3 the AA's body failed twice on the same trigger (a failure that can only repeat, \
        e.g. a malformed state value; nothing was written); 4 a transient failure did not \
        clear within --max-attempts attempts on one trigger; 5 a failure that needs a human \
        (a key written behind Saga's back, a damaged journal record, a statement that ended the SQL \
        transaction); 64 bad arguments.
        """
}

/// How `aa-demo run` retries: only failures that can clear by themselves, a bounded number of
/// times per trigger, with a small exponential backoff.
struct RetryPolicy {
    /// Attempts per trigger, the first included.
    var maxAttempts = 8
    var firstBackoff: Duration = .milliseconds(10)
    var maxBackoff: Duration = .milliseconds(500)

    /// The pause after the n-th failed attempt (n >= 1): 10, 20, 40 ... ms, at most 500 ms.
    func backoff(after attempt: Int) -> Duration {
        let doubled = firstBackoff * (1 << min(max(attempt - 1, 0), 20))
        return min(doubled, maxBackoff)
    }
}

/// What one failed attempt calls for.
enum NextStep {
    /// Worth another attempt after the backoff (it may clear by itself).
    case retry
    /// Another attempt right away: recovery decided the saga that held the trigger's keys, or
    /// the stores were reopened.
    case retryNow
}

/// Processes a node's queue, one trigger at a time, with the retry rules of `aa-demo run`.
final class QueueRunner {
    private(set) var node: Node
    let policy: RetryPolicy
    let reopen: () throws -> Node
    /// `--fail-commit-at`: the trigger whose COMMIT fails once, and how.
    let failAt: (mci: Int64, mode: Node.FailMode)?
    private var failedOnce = false
    private(set) var processed = 0
    /// Failed attempts over the whole run.
    private(set) var retries = 0

    init(node: Node, policy: RetryPolicy, failAt: (mci: Int64, mode: Node.FailMode)?, reopen: @escaping () throws -> Node) {
        self.node = node
        self.policy = policy
        self.failAt = failAt
        self.reopen = reopen
    }

    /// Runs the queue to its end, or throws ``NodeStop`` (or an error opening the stores).
    func run() throws {
        while let t = try node.nextTrigger() {
            try process(t)
        }
        guard let coordinator = node.coordinator else { return }
        try coordinator.collectGarbage()
        // A saga left in doubt whose keys no later trigger touched: the queue is done, but the
        // stores do not agree yet. Try once more; never report done over an undecided saga.
        if !coordinator.inDoubt.isEmpty {
            let pending = coordinator.inDoubt
            say("queue processed, but \(names(pending)) in doubt; running recovery")
            let report = try recoverOrStop(blocking: pending, trigger: nil)
            say("\(report)")
        }
    }

    private func process(_ t: Trigger) throws {
        var attempts = 0
        var bodyFailures: [String] = []
        while true {
            attempts += 1
            var fail: Node.FailMode?
            if let failAt, failAt.mci == t.mci, !failedOnce {
                fail = failAt.mode
                failedOnce = true
            }
            let next: NextStep
            if node.coordinator != nil {
                switch Result(catching: { () throws(SagaError) in try node.process(t, fail: fail) }) {
                case .success:
                    say("committed \(t.unit) mci=\(t.mci)")
                    processed += 1
                    return
                case .failure(let error):
                    next = try handle(error, trigger: t, bodyFailures: &bodyFailures)
                }
            } else {
                switch Result(catching: { () throws(Node.UnprotectedFailure) in try node.processUnprotected(t, fail: fail) }) {
                case .success:
                    say("committed \(t.unit) mci=\(t.mci)")
                    processed += 1
                    return
                case .failure(.body(let error)):
                    next = try bodyFailed(t, saga: nil, error, &bodyFailures)
                case .failure(.commit(let error)):
                    say("COMMIT failed for trigger mci=\(t.mci): \(error); the KV batch stays (unprotected); retrying")
                    next = .retry
                }
            }
            retries += 1
            guard attempts < policy.maxAttempts else {
                throw NodeStop(.gaveUp, "trigger mci=\(t.mci) (unit \(t.unit)) still failing after \(attempts) attempts; see the lines above for each failure")
            }
            if next == .retry { Thread.sleep(forTimeInterval: policy.backoff(after: attempts).seconds) }
        }
    }

    /// Sorts a saga's failure: retry (transient), recover, reopen, or stop.
    private func handle(_ error: SagaError, trigger t: Trigger, bodyFailures: inout [String]) throws -> NextStep {
        switch error {
        case .bodyFailed(let saga, let underlying):
            return try bodyFailed(t, saga: saga, underlying, &bodyFailures)

        case .lockTimeout(_, _, let holders), .deadlock(_, _, let holders):
            let doubtful = holders.filter(Set(node.coordinator?.inDoubt ?? []).contains)
            guard !doubtful.isEmpty else {
                say("trigger mci=\(t.mci): \(error); retrying")
                return .retry
            }
            // Retrying cannot help: the holder keeps its locks until recovery decides it.
            say("trigger mci=\(t.mci): its keys are held by \(names(doubtful)), in doubt; running recovery")
            let report = try recoverOrStop(blocking: doubtful, trigger: t)
            say("\(report)")
            return .retryNow

        case .transactionLost, .commitFailed, .sqlFailed:
            say("COMMIT failed for trigger mci=\(t.mci): \(error); retrying")
            return .retry

        case .inDoubt(let saga, _), .compensationFailed(let saga, _), .kvWriteFailed(let saga, _):
            // The coordinator may have stopped (an fsync or a KV write failed): reopen both
            // stores, as a node restart would; recovery at open decides the saga.
            say("trigger mci=\(t.mci): \(error); reopening the stores to recover \(saga)")
            try reopenNode(trigger: t)
            return .retryNow

        case .compensationFailedAfterCommit(_, _, let undo):
            // Nothing of it is committed in SQL; the undo's own error says what comes next.
            return try handle(undo, trigger: t, bodyFailures: &bodyFailures)

        case .cancelled:
            // Nothing was written; the node runs sagas synchronously, outside any task, so
            // this is not expected: retry like any transient failure.
            say("trigger mci=\(t.mci): \(error); retrying")
            return .retry

        case .stopped:
            say("trigger mci=\(t.mci): \(error); reopening the stores")
            try reopenNode(trigger: t)
            return .retryNow

        case .foreignWrite, .journalCorrupt, .misuse, .transactionEndedByStatement, .alreadyCommitted:
            // A body statement that ended the transaction may have committed its SQL part:
            // retrying would apply it twice. (The node runs sagas without caller keys: an
            // `alreadyCommitted` cannot happen here.)
            throw NodeStop(.needsRepair, "trigger mci=\(t.mci) (unit \(t.unit)): \(error)")
        }
    }

    /// The first body failure is retried once (after the backoff); the second one stops the
    /// node: the body sees the same state each time, so it will fail each time.
    private func bodyFailed(_ t: Trigger, saga: SagaID?, _ error: any Error, _ failures: inout [String]) throws -> NextStep {
        failures.append("\(error)")
        say("trigger mci=\(t.mci): the AA body failed\(saga.map { " (\($0))" } ?? ""): \(error); nothing written")
        guard failures.count < 2 else {
            throw NodeStop(.bodyFailed, "trigger mci=\(t.mci) (unit \(t.unit)) failed in the AA body \(failures.count) times: \(failures.last ?? "")\(Set(failures).count > 1 ? " (earlier: \(failures.dropLast().joined(separator: "; ")))" : ""); nothing was written; fix the node's state or the AA, then run again")
        }
        return .retry
    }

    /// Runs recovery on demand; stops the node if it leaves any of `blocking` undecided.
    private func recoverOrStop(blocking: [SagaID], trigger t: Trigger?) throws -> RecoveryReport {
        let whose = t.map { " (they hold the keys of trigger mci=\($0.mci), unit \($0.unit))" } ?? ""
        guard let coordinator = node.coordinator else { preconditionFailure("recovery needs a protected node") }
        let report: RecoveryReport
        do { report = try coordinator.recover() } catch {
            throw NodeStop(.inDoubt, "recovery failed (\(error)); \(names(blocking)) stay in doubt\(whose)")
        }
        let still = coordinator.inDoubt
        if !Set(blocking).isDisjoint(with: still) {
            throw NodeStop(.inDoubt, "recovery cannot decide \(names(still)); they stay in doubt\(whose): \(report); run `aa-demo recover` once the SQL database can be reached")
        }
        return report
    }

    private func reopenNode(trigger t: Trigger) throws {
        node.close()
        node = try reopen()
        if let pending = node.coordinator?.inDoubt, !pending.isEmpty {
            throw NodeStop(.inDoubt, "after reopening the stores, recovery cannot decide \(names(pending)) (trigger mci=\(t.mci), unit \(t.unit))")
        }
    }
}

func names(_ sagas: [SagaID]) -> String {
    sagas.count == 1 ? "\(sagas[0])" : "\(sagas.count) sagas (\(sagas.map(String.init(describing:)).joined(separator: ", ")))"
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
