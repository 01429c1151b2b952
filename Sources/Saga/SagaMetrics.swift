import CoreMetrics

/// Every metric a coordinator emits, made once when it opens (one handle per label set; no
/// handle is made per saga) through ``SagaCoordinator/Configuration/metricsFactory``. The names,
/// labels and their meanings are listed in one place, <doc:OperatingANode> ("Metrics"); a test
/// checks that every name here is there. Label values come from fixed enums only (never a saga
/// id or a key), so the number of series is bounded.
struct SagaMetrics: Sendable {
    enum Outcome: String, CaseIterable, Sendable {
        case committed, compensated, failed
        case inDoubt = "in_doubt"
        case foreignWrite = "foreign_write"

        /// How a `run` that threw ended.
        init(_ error: SagaError) {
            switch error {
            case .commitFailed: self = .compensated
            case .inDoubt: self = .inDoubt
            case .foreignWrite: self = .foreignWrite
            case .compensationFailedAfterCommit(_, _, .foreignWrite): self = .foreignWrite
            // The saga stays prepared with its keys locked, for recovery: in doubt.
            case .compensationFailed, .compensationFailedAfterCommit: self = .inDoubt
            default: self = .failed
            }
        }

        var index: Int {
            switch self {
            case .committed: 0
            case .compensated: 1
            case .failed: 2
            case .inDoubt: 3
            case .foreignWrite: 4
            }
        }
    }

    enum Decision: String, CaseIterable, Sendable {
        case committed, compensated, replayed
        case inDoubt = "in_doubt"
    }

    static let sagasTotal = "saga_sagas_total"
    static let sagaDuration = "saga_duration_seconds"
    static let stepDuration = "saga_step_duration_seconds"
    static let inDoubtCount = "saga_in_doubt"
    static let oldestInDoubt = "saga_oldest_in_doubt_seconds"
    static let recoveryDecisions = "saga_recovery_decisions_total"
    static let gcCollected = "saga_gc_collected_total"
    static let allNames = [sagasTotal, sagaDuration, stepDuration, inDoubtCount, oldestInDoubt, recoveryDecisions, gcCollected]

    /// By ``Outcome/index``.
    private let sagas: [Counter]
    private let durations: [CoreMetrics.Timer]
    /// By `phase * SagaStep.allCases.count + step`, so that the lookup on the saga path is an
    /// index, not a hash; nil where the step is never reached in that phase (see
    /// ``reachable``).
    private let steps: [CoreMetrics.Timer?]

    /// The steps each phase reaches (where the coordinator calls `hook` with that phase), in
    /// either mode: only these get a timer, so that a scrape does not carry dozens
    /// of series that stay empty. A step reached in a phase not listed here is not timed.
    static let reachable: [SagaPhase: Set<SagaStep>] = [
        .run: [.begin, .body, .prepare, .prepared, .marker, .commit, .committed, .compensate, .compensated, .resolve, .applied],
        .recovery: [.resolve, .committed, .compensate, .compensated, .applied, .replay, .checkpoint, .checkpointed],
        .gc: [.gcJournal, .gcMarkers, .checkpoint, .checkpointed],
    ]
    private let inDoubt: Gauge
    private let oldestInDoubt: Gauge
    private let committedByRecovery, compensatedByRecovery, replayedByRecovery, inDoubtAfterRecovery: Counter
    private let collected: Counter

    /// False with swift-metrics' no-op factory (no backend bootstrapped): then a saga does not
    /// even read the clock per step.
    let enabled: Bool

    init(factory: any MetricsFactory, mode: SagaCoordinator.Configuration.Mode) {
        enabled = !(factory is NOOPMetricsHandler)
        let modeLabel = ("mode", mode.rawValue)
        sagas = Outcome.allCases.map { Counter(label: Self.sagasTotal, dimensions: [("outcome", $0.rawValue), modeLabel], factory: factory) }
        durations = Outcome.allCases.map {
            CoreMetrics.Timer(label: Self.sagaDuration, dimensions: [("outcome", $0.rawValue), modeLabel], preferredDisplayUnit: .seconds, factory: factory)
        }
        steps = SagaPhase.allCases.flatMap { phase in
            SagaStep.allCases.map { step -> CoreMetrics.Timer? in
                guard Self.reachable[phase]?.contains(step) == true else { return nil }
                return CoreMetrics.Timer(label: Self.stepDuration, dimensions: [("step", step.rawValue), ("phase", phase.rawValue)], preferredDisplayUnit: .seconds, factory: factory)
            }
        }
        inDoubt = Gauge(label: Self.inDoubtCount, factory: factory)
        oldestInDoubt = Gauge(label: Self.oldestInDoubt, factory: factory)
        func decision(_ d: Decision) -> Counter { Counter(label: Self.recoveryDecisions, dimensions: [("decision", d.rawValue)], factory: factory) }
        committedByRecovery = decision(.committed)
        compensatedByRecovery = decision(.compensated)
        replayedByRecovery = decision(.replayed)
        inDoubtAfterRecovery = decision(.inDoubt)
        collected = Counter(label: Self.gcCollected, factory: factory)
    }

    /// A `run` call ended.
    func sagaEnded(_ outcome: Outcome, after duration: Duration) {
        sagas[outcome.index].increment()
        durations[outcome.index].recordNanoseconds(duration.nanoseconds)
    }

    /// `step` (reached in `phase`) took `duration` until the next step.
    func step(_ step: SagaStep, _ phase: SagaPhase, took duration: Duration) {
        steps[phase.index * SagaStep.allCases.count + step.index]?.recordNanoseconds(duration.nanoseconds)
    }

    func inDoubt(count: Int, oldest: ContinuousClock.Instant?, now: ContinuousClock.Instant = .now) {
        inDoubt.record(count)
        oldestInDoubt.record(oldest.map { (now - $0).seconds } ?? 0)
    }

    func recovered(_ report: RecoveryReport) {
        if !report.committed.isEmpty { committedByRecovery.increment(by: report.committed.count) }
        if !report.compensated.isEmpty { compensatedByRecovery.increment(by: report.compensated.count) }
        if !report.replayed.isEmpty { replayedByRecovery.increment(by: report.replayed.count) }
        if !report.inDoubt.isEmpty { inDoubtAfterRecovery.increment(by: report.inDoubt.count) }
    }

    func collected(_ count: Int) {
        if count > 0 { collected.increment(by: count) }
    }
}

extension Duration {
    /// The duration in seconds, as a floating-point number.
    var seconds: Double {
        let (s, atto) = components
        return Double(s) + Double(atto) * 1e-18
    }

    /// The duration in whole nanoseconds (saturated: a timer takes an `Int64`).
    var nanoseconds: Int64 {
        let (s, atto) = components
        let (n, overflow) = s.multipliedReportingOverflow(by: 1_000_000_000)
        return overflow ? (s < 0 ? .min : .max) : n &+ atto / 1_000_000_000
    }
}

extension SagaPhase {
    /// The position in `allCases`, without a search.
    var index: Int {
        switch self {
        case .run: 0
        case .recovery: 1
        case .gc: 2
        }
    }
}

extension SagaStep {
    /// The position in `allCases`, without a search (a test checks they agree).
    var index: Int {
        switch self {
        case .begin: 0
        case .body: 1
        case .prepare: 2
        case .prepared: 3
        case .marker: 4
        case .commit: 5
        case .committed: 6
        case .compensate: 7
        case .compensated: 8
        case .resolve: 9
        case .gcJournal: 10
        case .gcMarkers: 11
        case .applied: 12
        case .checkpoint: 13
        case .checkpointed: 14
        case .replay: 15
        }
    }
}
