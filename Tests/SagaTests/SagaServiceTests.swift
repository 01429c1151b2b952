import Foundation
import Logging
import MetricsTestKit
@testable import Saga
import SagaServiceLifecycle
import SagaTestKit
import ServiceLifecycle
import Synchronization
import Testing

/// `SagaService` in a real `ServiceGroup`, on RocksDB + SQLite.
@Suite("SagaService")
struct SagaServiceTests {
    /// Holds the first `holds` sagas to reach `begin` (before BEGIN: SQLite runs one writing
    /// transaction at a time, so a saga held later would block every other) on their threads
    /// until the test opens the gate; later sagas pass.
    final class Gate: SagaHooks, Sendable {
        private let arrived = Mutex(0)
        private let open = DispatchSemaphore(value: 0)
        private let holds: Int

        init(holding holds: Int) { self.holds = holds }

        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            guard step == .begin, phase == .run else { return }
            let n = arrived.withLock { $0 += 1; return $0 }
            if n <= holds { open.wait() }
        }

        /// How many sagas are held now (or were, once opened).
        var held: Int { min(arrived.withLock { $0 }, holds) }

        func release() { for _ in 0..<holds { open.signal() } }
    }

    /// Waits (without asserting on time) until `condition` holds.
    static func until(_ condition: () -> Bool) async throws {
        while !condition() { try await Task.sleep(for: .milliseconds(5)) }
    }

    static let fast = SagaService.Configuration(initialBackoff: .milliseconds(5), maxBackoff: .milliseconds(40), recoveryCheckInterval: .milliseconds(5),
                                                gcInterval: .milliseconds(20), gaugeInterval: .milliseconds(20))

    /// Graceful shutdown while sagas run: the sagas under way finish and commit; sagas started
    /// after the shutdown began are refused with `.misuse(.closed)`; the group ends.
    @Test func gracefulShutdownLetsRunningSagasFinishAndRefusesNewOnes() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let gate = Gate(holding: 3)
        let c = try env.coordinator(.init(hooks: gate, asyncThreads: 6))
        let group = ServiceGroup(services: [SagaService(coordinator: c, configuration: Self.fast)], logger: Logger(label: "test"))
        let running = Task { try await group.run() }

        let sagas = (0..<3).map { i in
            Task { () async throws(SagaError) -> Int in
                try await c.run { saga in
                    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("g\(i)"), .integer(Int64(i))])
                    try saga.kv.put("g\(i)", "\(i)")
                    return i
                }
            }
        }
        try await Self.until { gate.held == 3 }
        await group.triggerGracefulShutdown()

        // Sagas that start before the service has closed the coordinator still run; from then
        // on every one is refused.
        var refused = false
        while !refused {
            do { try await c.run { _ in } } catch {
                guard case .misuse(.closed) = error else { Issue.record("got \(error)"); break }
                refused = true
            }
        }
        #expect(refused)
        gate.release()
        for (i, saga) in sagas.enumerated() {
            #expect(try await saga.value == i, "saga \(i) under way at shutdown finished")
            #expect(try env.row("g\(i)") == Int64(i))
            #expect(try env.kvGet("g\(i)") == "\(i)")
        }
        try await running.value
        do {
            try await c.run { _ in }
            Issue.record("a saga ran after shutdown")
        } catch {
            guard case .misuse(.closed) = error else { Issue.record("got \(error)"); return }
        }
    }

    /// A saga left in doubt (its COMMIT failed, then its undo) is resolved by the service once
    /// the database answers the fencing insert again: it refuses three times, so the service
    /// retries (with backoff) until the fourth pass decides and undoes the saga.
    @Test func sagaInDoubtIsResolvedByTheService() async throws {
        let env = try SQLiteHarness().makeEnvironment() as! SQLiteEnvironment
        defer { env.destroy() }
        let hooks = ObservabilityTests.ArmedHooks()
        let metrics = TestMetrics()
        let c = try env.coordinator(.init(hooks: hooks, metricsFactory: metrics))
        hooks.fail(.compensate, .run, times: 1)
        hooks.fail(.resolve, .recovery, times: 3)
        do {
            try await c.run { saga in
                try ObservabilityTests.write(saga, "d", 1)
                try env.arrangeCommitFailure(in: saga)
            }
            Issue.record("the saga committed")
        } catch {
            guard case .compensationFailedAfterCommit = error else { Issue.record("got \(error)"); return }
        }
        let held = c.inDoubt
        #expect(held.count == 1)
        #expect(try env.kvGet("d") == "1", "in doubt: the KV write is still there")

        let group = ServiceGroup(services: [SagaService(coordinator: c, configuration: Self.fast)], logger: Logger(label: "test"))
        let running = Task { try await group.run() }
        try await Self.until { c.inDoubt.isEmpty }
        // The pass under way ends before the service closes the coordinator and returns.
        await group.triggerGracefulShutdown()
        try await running.value

        #expect(hooks.usedFailures(.resolve, .recovery) == 3, "three passes were refused before one decided")
        #expect(try env.kvGet("d") == nil, "undone")
        #expect(try env.row("d") == nil)
        #expect(try metrics.expectCounter(SagaMetrics.recoveryDecisions, [("decision", "in_doubt")]).totalValue == 3)
        #expect(try metrics.expectCounter(SagaMetrics.recoveryDecisions, [("decision", "compensated")]).totalValue == 1)
        #expect(try metrics.expectGauge(SagaMetrics.inDoubtCount).lastValue == 0)
        #expect(c.oldestInDoubtAge == nil)
    }
}
