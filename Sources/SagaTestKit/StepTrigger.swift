#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Saga
import Synchronization

/// Ready-made hooks: crash the process, fail a step or pause the process on its n-th occurrence.
public final class StepTrigger: SagaHooks {
    public enum Action: Sendable {
        /// `SIGKILL` the whole process: nothing is flushed, nothing is cleaned up.
        case crash
        /// Throw ``InjectedFault`` from the step.
        case fail
        /// `SIGSTOP` the whole process, then go on with the step once it gets `SIGCONT`: the
        /// parent that waits for it (`waitpid` with `WUNTRACED`) acts at a known point (kills
        /// a server, say) without racing the process.
        case pause
    }

    public let step: SagaStep
    public let phase: SagaPhase?
    public let occurrence: Int
    public let action: Action
    public let repeats: Bool
    // Atomic: hooks are called from every thread that runs a saga.
    private let seen = Atomic<Int>(0)

    /// - Parameters:
    ///   - action: what to do when the step fires: crash the process, throw ``InjectedFault``
    ///     or pause the process until it is continued.
    ///   - step: the step to watch.
    ///   - occurrence: fires on the n-th time the step is reached (1 = the first).
    ///   - phase: only count the step in this phase (nil: any phase).
    ///   - repeats: keep firing on every later occurrence too.
    public init(_ action: Action, at step: SagaStep, phase: SagaPhase? = nil, occurrence: Int = 1, repeats: Bool = false) {
        self.action = action
        self.step = step
        self.phase = phase
        self.occurrence = max(1, occurrence)
        self.repeats = repeats
    }

    /// How often the watched step has been reached.
    public var count: Int { seen.load(ordering: .relaxed) }

    public func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard step == self.step, self.phase == nil || self.phase == phase else { return }
        let n = seen.add(1, ordering: .relaxed).newValue
        guard n == occurrence || (repeats && n > occurrence) else { return }
        switch action {
        case .crash:
            kill(getpid(), SIGKILL)
            // SIGKILL cannot be caught; never continue past a requested crash.
            while true { pause() }
        case .fail:
            throw InjectedFault(step: step, phase: phase)
        case .pause:
            // Stops every thread before it returns; returns once continued.
            kill(getpid(), SIGSTOP)
        }
    }
}

/// Several hooks in order.
public struct CombinedHooks: SagaHooks {
    public let hooks: [any SagaHooks]
    public init(_ hooks: [any SagaHooks]) { self.hooks = hooks }
    public func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        for hook in hooks { try hook.reached(step, phase: phase, saga: saga) }
    }
}
