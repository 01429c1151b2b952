import Foundation
import RocksDBBackend
@testable import Saga
import SagaTestKit
import Testing

/// A coordinator's end: `shutdown()` lets running sagas finish, refuses new ones, collects
/// everything and lets the stores go, so the next open has nothing to do.
@Suite("Coordinator lifecycle")
struct LifecycleTests {
    /// An async saga is inside its body when `shutdown()` is called (one: SQLite has one writer
    /// at a time): a saga started after it is refused with `closed`, the running one finishes
    /// and commits, `shutdown()` returns only then, and a new coordinator opens on the same
    /// stores at once with nothing to decide.
    @Test(arguments: SagaCoordinator.Configuration.Mode.allCases)
    func shutdownLetsRunningSagasFinish(mode: SagaCoordinator.Configuration.Mode) async throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        // Threads enough for the blocked body, the close and the refused saga.
        let c = try env.coordinator(.init(gcThreshold: 1 << 20, asyncThreads: 8, mode: mode, checkpointEvery: 1 << 20, checkpointInterval: .seconds(3600)))
        let inside = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let sagas = (0..<1).map { i in
            Task {
                try await c.run { saga in
                    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("s\(i)"), .integer(Int64(i))])
                    try saga.kv.put("s\(i)", "v\(i)")
                    inside.signal()
                    release.wait()
                    return saga.id
                }
            }
        }
        // Waited for on a thread of its own: blocking the cooperative pool could starve the
        // very tasks that start the sagas.
        await withCheckedContinuation { (entered: CheckedContinuation<Void, Never>) in
            Thread.detachNewThread {
                inside.wait()
                entered.resume()
            }
        }
        let done = Locked(false)
        let shutdown = Task {
            await c.shutdown()
            done.withLock { $0 = true }
        }
        while !c.isClosed { try await Task.sleep(for: .milliseconds(1)) }
        let late = try await expectSagaErrorAsync { try await c.run { saga in try saga.kv.put("late", "x") } }
        guard case .misuse(.closed) = late else { Issue.record("a saga after shutdown() must be refused with closed, got \(late)"); return }
        #expect(!done.withLock { $0 }, "shutdown() waits while sagas run")
        #expect(throws: SagaError.self) { try env.coordinator() }
        release.signal()
        var ids: [SagaID] = []
        for t in sagas { ids.append(try await t.value) }
        await shutdown.value
        #expect(done.withLock { $0 })
        for i in 0..<1 { #expect(try env.row("s\(i)") == Int64(i) && env.kvGet("s\(i)") == "v\(i)", "saga \(i) committed in both stores") }
        #expect(try env.kvGet("late") == nil)
        #expect(try env.journal().isEmpty && env.markers().isEmpty, "shutdown collected every finished saga")
        let steps = StepRecorder()
        let d = try env.coordinator(.init(hooks: steps, mode: mode))
        defer { d.close() }
        #expect(d.recoveryAtOpen.committed.isEmpty && d.recoveryAtOpen.compensated.isEmpty && d.recoveryAtOpen.replayed.isEmpty && d.recoveryAtOpen.isClean)
        #expect(!steps.steps.contains(.resolve), "no fencing at the open after a shutdown")
    }

    /// `close()` twice, and `shutdown()` after `close()`, are harmless.
    @Test func closingTwiceIsHarmless() async throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        try await c.run { saga in try saga.kv.put("a", "1") }
        c.close()
        c.close()
        await c.shutdown()
        let d = try env.coordinator()
        d.close()
        #expect(try env.kvGet("a") == "1")
    }
}
