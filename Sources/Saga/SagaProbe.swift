import ServiceContextModule
import Synchronization
import Tracing

/// Watches one saga (or one recovery or garbage-collection pass) through the protocol's steps:
/// times each step until the next, and for a saga keeps its span, with each step as an event.
/// Bound as a task-local around the work, so that ``SagaCoordinator/hook(_:_:phase:)`` (every
/// step passes there) finds it without a parameter through every function of the protocol.
final class SagaProbe: Sendable {
    /// Whose steps it watches: a saga's body may run a saga of another coordinator.
    let coordinator: ObjectIdentifier
    private let metrics: SagaMetrics
    private let span: (any Span)?
    private let recording: Bool
    private let start: ContinuousClock.Instant
    /// The step reached last, and when. Only the thread running the saga (or pass) touches it;
    /// the lock is for the compiler and costs nothing uncontended.
    private let last: Mutex<(step: SagaStep, phase: SagaPhase, at: ContinuousClock.Instant)?> = Mutex(nil)

    /// Starts watching. With a tracer, a saga's span starts here, a child of the caller's
    /// `ServiceContext.current`.
    init(_ coordinator: SagaCoordinator, saga tracer: (any Tracer)?) {
        self.coordinator = ObjectIdentifier(coordinator)
        metrics = coordinator.metrics
        start = .now
        if let tracer {
            let span = tracer.startSpan("saga", context: ServiceContext.current ?? .topLevel, ofKind: .internal)
            span.attributes["saga.mode"] = coordinator.configuration.mode.rawValue
            self.span = span
            // A span the tracer does not record (sampled out) still ends, but gets no events:
            // they cost an allocation each.
            recording = span.isRecording
        } else {
            span = nil
            recording = false
        }
    }

    /// Runs `work` with this probe bound as the task's ``SagaCoordinator/probe`` and, when its
    /// span records, the span's context as `ServiceContext.current`: spans the body makes
    /// (a traced SQL client, say) are the saga span's children.
    func bind<T, E: Error>(_ work: () throws(E) -> T) throws(E) -> T {
        let result = SagaCoordinator.$probe.withValue(self) { () -> Result<T, E> in
            guard recording, let span else { return Result(catching: work) }
            return ServiceContext.withValue(span.context) { Result(catching: work) }
        }
        return try result.get()
    }

    /// The saga got its id.
    func identify(_ id: SagaID) {
        span?.attributes["saga.id"] = Int64(truncatingIfNeeded: id.rawValue)
    }

    /// A protocol step was reached: the step before it ends here.
    func reached(_ step: SagaStep, phase: SagaPhase) {
        if recording, let span { span.addEvent(SpanEvent(name: step.rawValue, attributes: ["saga.phase": .string(phase.rawValue)])) }
        guard metrics.enabled else { return }
        let now = ContinuousClock.now
        let previous = last.withLock { last in
            defer { last = (step, phase, now) }
            return last
        }
        if let previous { metrics.step(previous.step, previous.phase, took: now - previous.at) }
    }

    /// The pass (recovery, garbage collection) ended: its last step ends here.
    func end() -> (now: ContinuousClock.Instant, elapsed: Duration) {
        let now = ContinuousClock.now
        if let previous = last.withLock({ $0 }) { metrics.step(previous.step, previous.phase, took: now - previous.at) }
        return (now, now - start)
    }

    /// The saga's `run` ended: returned (`error` nil) or threw `error`.
    func end(sagaThrew error: SagaError?) {
        let outcome = error.map(SagaMetrics.Outcome.init) ?? .committed
        metrics.sagaEnded(outcome, after: end().elapsed)
        guard let span else { return }
        span.attributes["saga.outcome"] = outcome.rawValue
        if let error {
            span.recordError(error)
            span.setStatus(SpanStatus(code: .error, message: "\(outcome.rawValue)"))
        }
        span.end()
    }
}

extension SagaCoordinator {
    /// The probe of the saga or pass running in this task (or thread), if any.
    @TaskLocal static var probe: SagaProbe?

    /// Runs a recovery or garbage-collection pass under a probe of its own (no span), so that
    /// its steps are timed apart from the saga it may run inside.
    func probed<T, E: Error>(_ work: () throws(E) -> T) throws(E) -> T {
        let probe = SagaProbe(self, saga: nil)
        defer { _ = probe.end() }
        return try probe.bind(work)
    }
}
