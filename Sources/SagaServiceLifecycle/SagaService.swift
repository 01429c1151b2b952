import Logging
import Saga
import ServiceLifecycle

/// A coordinator's background work as a swift-service-lifecycle `Service`: it retries sagas in
/// doubt, collects garbage, keeps the in-doubt gauges current and, on graceful shutdown, closes
/// the coordinator.
///
/// ```swift
/// let coordinator = try SagaCoordinator(kv: rocks, sql: sqlite)
/// let group = ServiceGroup(services: [SagaService(coordinator: coordinator, logger: logger), server],
///                          gracefulShutdownSignals: [.sigterm], logger: logger)
/// try await group.run()
/// ```
///
/// - **In doubt**: while ``SagaCoordinator/inDoubt`` is not empty, `recover()` runs again and
///   again, waiting ``Configuration/initialBackoff`` after the first pass that leaves a saga in
///   doubt (or fails), twice as long after each next one, at most ``Configuration/maxBackoff``;
///   the wait starts over once none is left. Otherwise the set is looked at every
///   ``Configuration/recoveryCheckInterval``.
/// - **Garbage collection**: `collectGarbage()` every ``Configuration/gcInterval`` (it also runs
///   by itself every `gcThreshold` finished sagas; this collects the tail of a quiet node).
/// - **Gauges**: `refreshInDoubtGauges()` every ``Configuration/gaugeInterval``.
/// - **Shutdown**: on graceful shutdown (or cancellation) the loops stop (a pass under way
///   finishes first), then the coordinator is closed: new sagas are refused with
///   `SagaError.misuse(.closed)`, sagas already running finish, and the stores are let go once
///   the last has ended.
///
/// `recover()` and `collectGarbage()` block: they run on the coordinator's executor for blocking
/// work (the one the async `run` uses), never on Swift's cooperative pool.
public struct SagaService: Service {
    public struct Configuration: Sendable {
        /// The wait after the first recovery pass that leaves a saga in doubt.
        public var initialBackoff: Duration
        /// The longest wait between recovery passes.
        public var maxBackoff: Duration
        /// How often the in-doubt set is looked at while it is empty.
        public var recoveryCheckInterval: Duration
        /// How often garbage collection runs.
        public var gcInterval: Duration
        /// How often the in-doubt gauges are refreshed.
        public var gaugeInterval: Duration

        public init(initialBackoff: Duration = .milliseconds(100), maxBackoff: Duration = .seconds(30), recoveryCheckInterval: Duration = .seconds(1),
                    gcInterval: Duration = .seconds(10), gaugeInterval: Duration = .seconds(5)) {
            self.initialBackoff = initialBackoff
            self.maxBackoff = maxBackoff
            self.recoveryCheckInterval = recoveryCheckInterval
            self.gcInterval = gcInterval
            self.gaugeInterval = gaugeInterval
        }
    }

    public let coordinator: SagaCoordinator
    public let configuration: Configuration
    private let logger: Logger

    public init(coordinator: SagaCoordinator, configuration: Configuration = .init(), logger: Logger = Logger(label: "saga.service")) {
        precondition(configuration.initialBackoff > .zero && configuration.maxBackoff >= configuration.initialBackoff, "0 < initialBackoff <= maxBackoff")
        precondition(configuration.recoveryCheckInterval > .zero && configuration.gcInterval > .zero && configuration.gaugeInterval > .zero, "intervals must be positive")
        self.coordinator = coordinator
        self.configuration = configuration
        self.logger = logger
    }

    public func run() async throws {
        // The loops end by cancellation only (graceful shutdown cancels them).
        await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { group in
                group.addTask { await self.recoveryLoop() }
                group.addTask { await self.every(configuration.gcInterval) { _ = try await self.blocking { c throws(SagaError) in try c.collectGarbage() } } }
                group.addTask { await self.every(configuration.gaugeInterval) { self.coordinator.refreshInDoubtGauges() } }
            }
        }
        // New sagas are refused, running ones finish, finished ones are collected, then the
        // stores are let go: the next open has nothing to recover.
        await coordinator.shutdown()
        logger.info("saga coordinator shut down")
    }

    /// Recovery while sagas are in doubt, with exponential backoff between failed passes.
    private func recoveryLoop() async {
        var backoff = configuration.initialBackoff
        while !Task.isCancelled {
            var wait = configuration.recoveryCheckInterval
            if coordinator.oldestInDoubtAge != nil {
                do {
                    let report = try await blocking { c throws(SagaError) in try c.recover() }
                    if report.inDoubt.isEmpty && coordinator.oldestInDoubtAge == nil {
                        backoff = configuration.initialBackoff
                        logger.info("recovery decided every saga in doubt: \(report)")
                    } else {
                        logger.warning("sagas still in doubt after recovery, next pass in \(backoff): \(report)")
                        wait = backoff
                        backoff = min(backoff * 2, configuration.maxBackoff)
                    }
                } catch {
                    logger.warning("recovery failed, next pass in \(backoff): \(error)")
                    wait = backoff
                    backoff = min(backoff * 2, configuration.maxBackoff)
                }
            } else {
                backoff = configuration.initialBackoff
            }
            do { try await Task.sleep(for: wait) } catch { return }
        }
    }

    /// Runs `work` every `interval` until cancelled; a failure is logged and the next turn
    /// comes all the same.
    private func every(_ interval: Duration, _ work: @Sendable () async throws -> Void) async {
        while true {
            do { try await Task.sleep(for: interval) } catch { return }
            do { try await work() } catch { logger.warning("saga background work failed: \(error)") }
        }
    }

    /// Runs blocking coordinator work on the coordinator's executor for blocking work.
    private func blocking<T: Sendable>(_ work: @Sendable (SagaCoordinator) throws(SagaError) -> T) async throws(SagaError) -> T {
        try await withTaskExecutorPreference(coordinator.asyncExecutor) { () async throws(SagaError) -> T in
            try work(coordinator)
        }
    }
}
