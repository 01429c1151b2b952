import Foundation
@testable import Saga
import SagaTestKit
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Serialized: several tests count the process's threads.
@Suite("Async API", .serialized)
struct AsyncAPITests {
    @Test func runsSagasFromAsyncCode() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        defer { c.close() }
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<8 {
                group.addTask {
                    try await c.run { saga in
                        try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("a\(i)"), .integer(Int64(i))])
                        try saga.kv.put("a\(i)", "\(i)")
                        return i
                    }
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.sorted() == Array(0..<8))
        for i in 0..<8 {
            #expect(try env.row("a\(i)") == Int64(i))
            #expect(try env.kvGet("a\(i)") == "\(i)")
        }
    }

    @Test func asyncErrorsAreTyped() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        defer { c.close() }
        do {
            _ = try await c.run { saga in try saga.kv.put("", "x") }
            Issue.record("an empty key must be refused")
        } catch {
            guard case .misuse(.emptyKey) = error else { Issue.record("got \(error)"); return }
        }
    }

    @Test func asyncThreadsIsValidated() throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        for bad in [0, -1, SagaCoordinator.Configuration.maxAsyncThreads + 1] {
            do {
                let c = try env.coordinator(.init(asyncThreads: bad))
                c.close()
                Issue.record("asyncThreads \(bad) accepted")
            } catch {
                guard case .misuse(.invalidConfiguration)? = error as? SagaError else { Issue.record("got \(error)"); continue }
            }
        }
    }

    // MARK: - The bound

    /// 200 tasks at once on a pool of 4: every saga succeeds, at most 4 OS threads run bodies,
    /// all of them the pool's, and the process's thread count stays bounded throughout.
    @Test func twoHundredTasksOnFourThreads() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let baseline = processThreads()
        let c = try env.coordinator(.init(asyncThreads: 4))
        let bodyThreads = Locked<Set<UInt>>([])
        let bodyThreadNames = Locked<Set<String>>([])
        let sampling = Locked(true)
        let sampler = Task { () -> (maxTotal: Int, maxPool: Int) in
            var maxTotal = 0, maxPool = 0
            while sampling.withLock({ $0 }) {
                maxTotal = max(maxTotal, processThreads())
                maxPool = max(maxPool, threadsNamed("saga-async"))
                try? await Task.sleep(for: .milliseconds(2))
            }
            return (maxTotal, maxPool)
        }
        let shared = 5
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<200 {
                group.addTask {
                    try await c.run { saga in
                        bodyThreads.withLock { _ = $0.insert(UInt(pthread_self())) }
                        let name = currentThreadName()
                        bodyThreadNames.withLock { _ = $0.insert(name) }
                        if i % 4 == 0 {
                            // Shared keys: a read-modify-write on both stores.
                            let key = "shared-\(i % shared)"
                            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, 1) ON CONFLICT(k) DO UPDATE SET v = v + 1", [.text(key)])
                            let now = try saga.kv.get(key).map { Int(String(decoding: $0, as: UTF8.self))! } ?? 0
                            try saga.kv.put(key, "\(now + 1)")
                        } else {
                            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("d\(i)"), .integer(Int64(i))])
                            try saga.kv.put("d\(i)", "\(i)")
                        }
                        usleep(500)  // Long enough for the tasks to pile up in the queue.
                        return i
                    }
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let during = processThreads()
        sampling.withLock { $0 = false }
        let (maxTotal, maxPool) = await sampler.value
        c.close()
        let after = processThreads()

        #expect(results.sorted() == Array(0..<200))
        for i in 0..<200 where i % 4 != 0 {
            #expect(try env.row("d\(i)") == Int64(i))
            #expect(try env.kvGet("d\(i)") == "\(i)")
        }
        for s in 0..<shared {
            let n = (0..<200).filter { $0 % 4 == 0 && $0 % shared == s }.count
            #expect(try env.row("shared-\(s)") == Int64(n))
            #expect(try env.kvGet("shared-\(s)") == "\(n)")
        }
        let threads = bodyThreads.withLock { $0 }
        let names = bodyThreadNames.withLock { $0 }
        print("200 tasks, asyncThreads 4: process threads \(baseline) before, at most \(maxTotal) during (pool threads at most \(maxPool)), \(after) after close; bodies ran on \(threads.count) thread(s): \(names.sorted().joined(separator: ", "))")
        #expect(threads.count <= 4, "bodies ran on \(threads.count) threads")
        // Never on the cooperative pool: every body ran on a thread of the coordinator's pool.
        #expect(names.allSatisfy { $0.hasPrefix("saga-async-") }, "body threads: \(names.sorted())")
        // The whole process's threads: the pool's 4, plus a margin for what other suites running
        // beside this one start meanwhile (their coordinators' pools are named alike, so the
        // count of pool threads is printed, not asserted). Dispatch's global queue, which the
        // async run used before, grows to 64 threads for 200 blocked bodies.
        #expect(maxTotal <= baseline + 4 + 32, "threads: baseline \(baseline), max during \(maxTotal), at end \(during), after close \(after)")
        #expect(c.ownPool?.liveThreads == 0, "close() ends the pool's threads")
        // (Pools of other suites' coordinators may run beside this one: this coordinator's own
        // count is what is asserted.)
    }

    /// An executor given in the configuration runs the bodies; the coordinator starts no pool.
    @Test func callerSuppliedExecutorRunsBodies() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let pool = SagaThreadPool(threads: 2, name: "callerpool")
        let c = try env.coordinator(.init(executor: pool))
        #expect(c.ownPool == nil)
        let names = try await withThrowingTaskGroup(of: String.self) { group in
            for i in 0..<10 {
                group.addTask {
                    try await c.run { saga in
                        try saga.kv.put("k\(i)", "v")
                        return currentThreadName()
                    }
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(names.count == 10)
        #expect(names.allSatisfy { $0.hasPrefix("callerpool-") }, "\(names)")
        #expect(pool.liveThreads <= 2)
        c.close()
        // The coordinator never shuts down a caller's executor.
        #expect(pool.liveThreads >= 1)
        pool.shutdown()
        #expect(pool.liveThreads == 0)
        #expect(threadsNamed("callerpool") == 0)
    }

    // MARK: - Task locals

    @Test func taskLocalsAreVisibleInTheBody() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        defer { c.close() }
        let seen = try await Probe.$tag.withValue("request-42") {
            try await c.run { saga in
                try saga.kv.put("tl", "x")
                return Probe.tag
            }
        }
        #expect(seen == "request-42")
        let outside = try await c.run { _ in Probe.tag }
        #expect(outside == nil)
    }

    // MARK: - Cancellation

    /// Cancelled before the async `run` is called: refused before the saga gets an id.
    @Test func cancelledBeforeTheCall() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500)))
        defer { c.close() }
        let task = Task { await outcome { () async throws(SagaError) -> Int in
            withUnsafeCurrentTask { $0?.cancel() }
            return try await c.run { saga in try writeBoth(saga, "c1", 1) }
        } }
        let result = await task.value
        guard case .failure(.cancelled(saga: nil)) = result else { Issue.record("got \(result)"); return }
        try expectNothingWritten(env, c, "c1")
    }

    /// Cancelled before BEGIN, in the saga itself (the blocking `run` called from a cancelled
    /// task): the saga has an id, nothing is written.
    @Test func cancelledBeforeBegin() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500)))
        defer { c.close() }
        let task = Task { await outcome { () async throws(SagaError) -> Int in
            withUnsafeCurrentTask { $0?.cancel() }
            return try runBlocking(c) { saga in try writeBoth(saga, "c2", 1) }
        } }
        let result = await task.value
        guard case .failure(.cancelled(saga: let id?)) = result else { Issue.record("got \(result)"); return }
        #expect(id.isValid)
        if case .failure(let e) = result { #expect(e.nothingWritten && !e.isRetryable, "nothing written; the caller gave up, so nothing to retry") }
        try expectNothingWritten(env, c, "c2")
    }

    /// Cancelled while waiting in the pool's queue: the check before BEGIN refuses it.
    @Test func cancelledWhileQueued() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500), asyncThreads: 1))
        defer { c.close() }
        let release = DispatchSemaphore(value: 0)
        let started = DispatchSemaphore(value: 0)
        let blocker = Task {
            try await c.run { saga in
                started.signal()
                release.wait()
                return try writeBoth(saga, "blocker", 1)
            }
        }
        await waitFor(started)
        let queued = Task { await outcome { () async throws(SagaError) -> Int in try await c.run { saga in try writeBoth(saga, "c3", 1) } } }
        try await Task.sleep(for: .milliseconds(50))
        queued.cancel()
        release.signal()
        let result = await queued.value
        guard case .failure(.cancelled) = result else { Issue.record("got \(result)"); return }
        #expect(try await blocker.value == 1)
        try expectNothingWritten(env, c, "c3")
    }

    /// Cancelled at a step before the KV batch (the hook cancels the saga's own task): rolled
    /// back, `.cancelled`, nothing written, the keys free at once.
    ///
    /// `.begin`: after the hook, BEGIN runs, then the check before the body refuses.
    /// `.body`: the body has returned; the check right before the KV batch refuses.
    /// `.prepare`: the batch is built, not written; the same check refuses.
    @Test(arguments: [SagaStep.begin, .body, .prepare])
    func cancelledBeforeTheKVBatch(_ step: SagaStep) async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500), hooks: CancelAt(step: step)))
        defer { c.close() }
        let bodyRan = Locked(false)
        let task = Task { await outcome { () async throws(SagaError) -> Int in
            try await c.run { saga in
                bodyRan.withLock { $0 = true }
                return try writeBoth(saga, "c4", 1)
            }
        } }
        let result = await task.value
        guard case .failure(.cancelled(saga: let id?)) = result else { Issue.record("\(step): got \(result)"); return }
        #expect(id.isValid)
        #expect(bodyRan.withLock { $0 } == (step != .begin))
        try expectNothingWritten(env, c, "c4")
    }

    /// The body cancels its own task and then checks: `CancellationError` becomes `.cancelled`.
    @Test func bodyThrowsCancellationError() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500)))
        defer { c.close() }
        let task = Task { await outcome { () async throws(SagaError) -> Int in
            try await c.run { saga in
                let v = try writeBoth(saga, "c5", 1)
                withUnsafeCurrentTask { $0?.cancel() }
                try Task.checkCancellation()
                return v
            }
        } }
        let result = await task.value
        guard case .failure(.cancelled(saga: _?)) = result else { Issue.record("got \(result)"); return }
        try expectNothingWritten(env, c, "c5")
    }

    /// The test cancels the task while the body blocks; the body returns without looking: the
    /// check before the KV batch refuses the saga.
    @Test func cancelledFromOutsideDuringTheBody() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500)))
        defer { c.close() }
        let inBody = DispatchSemaphore(value: 0)
        let proceed = DispatchSemaphore(value: 0)
        let sawCancel = Locked(false)
        let task = Task { await outcome { () async throws(SagaError) -> Int in
            try await c.run { saga in
                let v = try writeBoth(saga, "c6", 1)
                inBody.signal()
                proceed.wait()
                sawCancel.withLock { $0 = Task.isCancelled }
                return v
            }
        } }
        await waitFor(inBody)
        task.cancel()
        proceed.signal()
        let result = await task.value
        #expect(sawCancel.withLock { $0 }, "the body sees its task cancelled")
        guard case .failure(.cancelled(saga: _?)) = result else { Issue.record("got \(result)"); return }
        try expectNothingWritten(env, c, "c6")
    }

    /// Cancelled once the KV batch is written: ignored, the saga commits in both stores.
    @Test(arguments: [SagaStep.prepared, .marker, .commit, .committed])
    func cancelledAfterTheKVBatchCommits(_ step: SagaStep) async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(500), hooks: CancelAt(step: step)))
        defer { c.close() }
        let cancelled = Locked(false)
        let task = Task { await outcome { () async throws(SagaError) -> Int in
            let v = try await c.run { saga in try writeBoth(saga, "c7", 7) }
            cancelled.withLock { $0 = Task.isCancelled }
            return v
        } }
        let result = await task.value
        guard case .success(7) = result else { Issue.record("\(step): got \(result)"); return }
        #expect(cancelled.withLock { $0 }, "the hook did cancel the task")
        #expect(try env.row("c7") == 7)
        #expect(try env.kvGet("c7") == "7")
        #expect(c.inDoubt.isEmpty)
    }

    // MARK: - close()

    /// The coordinator's own pool: its threads are gone after `close()`.
    @Test func closeLeavesNoThreadBehind() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        // RocksDB starts its background threads on first use: one warm-up saga, outside.
        let warm = try env.coordinator()
        _ = try runBlocking(warm) { saga in try writeBoth(saga, "warm", 1) }
        warm.close()
        let before = processThreads()
        let c = try env.coordinator(.init(asyncThreads: 3))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for i in 0..<30 {
                group.addTask { _ = try await c.run { saga in usleep(200); return try writeBoth(saga, "t\(i)", i) } }
            }
            try await group.waitForAll()
        }
        #expect(threadsNamed("saga-async") >= 1)
        c.close()
        #expect(c.ownPool?.liveThreads == 0)
        // Process-wide figures are printed, not asserted: other suites run beside this one.
        let after = await settledThreads(atMost: before)
        print("close(): process threads \(before) before the coordinator, \(after) after close; its pool's live threads \(c.ownPool?.liveThreads ?? -1)")
    }

    /// `close()` while sagas run: they finish, and the last one to end shuts the pool down
    /// (from one of its own threads, so without waiting for itself); nothing is left.
    @Test func closeWhileSagasRun() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator(.init(asyncThreads: 2))
        let release = DispatchSemaphore(value: 0)
        let started = DispatchSemaphore(value: 0)
        let running = Task { try await c.run { saga in started.signal(); release.wait(); return try writeBoth(saga, "r1", 1) } }
        await waitFor(started)
        c.close()
        release.signal()
        #expect(try await running.value == 1)
        do {
            _ = try await c.run { _ in 0 }
            Issue.record("a closed coordinator must refuse")
        } catch {
            guard case .misuse(.closed) = error else { Issue.record("got \(error)"); return }
        }
        for _ in 0..<300 where c.ownPool?.liveThreads != 0 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(c.ownPool?.liveThreads == 0)
        #expect(try env.row("r1") == 1)
    }

    // MARK: - The pool alone

    @Test func poolShutdownRunsQueuedJobsAndStaysUsable() async throws {
        let pool = SagaThreadPool(threads: 1, name: "alone")
        let count = Locked(0)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<50 {
                group.addTask(executorPreference: pool) { count.withLock { $0 += 1 } }
            }
        }
        #expect(count.withLock { $0 } == 50)
        #expect(pool.liveThreads == 1)
        pool.shutdown()
        #expect(pool.liveThreads == 0)
        // A job after the shutdown still runs (no task may hang), on a thread that then exits.
        let name = await withTaskExecutorPreference(pool) { currentThreadName() }
        #expect(name.hasPrefix("alone-"))
        pool.shutdown()
        #expect(pool.liveThreads == 0)
        #expect(threadsNamed("alone") == 0)
    }
}

// MARK: - Helpers

enum Probe {
    @TaskLocal static var tag: String?
}

/// Cancels the task the saga runs in when it reaches `step` (in a caller's saga), once: the
/// sagas after it run undisturbed.
final class CancelAt: SagaHooks {
    let step: SagaStep
    private let armed = Locked(true)
    init(step: SagaStep) { self.step = step }
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard step == self.step, phase == .run, armed.withLock({ a in defer { a = false }; return a }) else { return }
        withUnsafeCurrentTask { $0?.cancel() }
    }
}

/// What `body` returned or threw.
private func outcome<T>(_ body: () async throws(SagaError) -> T) async -> Result<T, SagaError> {
    do { return .success(try await body()) } catch { return .failure(error) }
}

/// The blocking `run`, called by name from async code (where the async overload is preferred).
private func runBlocking<T>(_ c: SagaCoordinator, _ body: (Saga) throws -> T) throws(SagaError) -> T {
    try c.run(body)
}

/// One row and one KV key named `key`, both holding `value`.
private func writeBoth(_ saga: Saga, _ key: String, _ value: Int) throws -> Int {
    try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text(key), .integer(Int64(value))])
    try saga.kv.put(key, "\(value)")
    return value
}

/// Neither store holds `key`, no saga is left prepared, and the key's lock is free: a saga on
/// it succeeds at once (the coordinator's lock timeout is short).
private func expectNothingWritten(_ env: any HarnessEnvironment, _ c: SagaCoordinator, _ key: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
    #expect(try env.row(key) == nil, sourceLocation: sourceLocation)
    #expect(try env.kvGet(key) == nil, sourceLocation: sourceLocation)
    // (A committed saga's record stays until garbage collection: look for this key only.)
    #expect(try env.journal().values.allSatisfy { !$0.entries.contains { $0.key == Bytes(key.utf8) } }, sourceLocation: sourceLocation)
    #expect(c.inDoubt.isEmpty, sourceLocation: sourceLocation)
    // A key still locked would end this saga with lockTimeout (the coordinator's is short).
    let again = try c.run { saga in try writeBoth(saga, key, 2) }
    #expect(again == 2, sourceLocation: sourceLocation)
    #expect(try env.row(key) == 2, sourceLocation: sourceLocation)
    #expect(try env.kvGet(key) == "2", sourceLocation: sourceLocation)
}

/// Threads of this process (`/proc/self/task`).
private func processThreads() -> Int {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task").count) ?? -1
}

/// Threads of this process whose name starts with `prefix`.
private func threadsNamed(_ prefix: String) -> Int {
    let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
    return tasks.filter { tid in
        let comm = (try? String(contentsOfFile: "/proc/self/task/\(tid)/comm", encoding: .utf8)) ?? ""
        return comm.hasPrefix(prefix)
    }.count
}

/// The calling thread's name, as the kernel has it.
private func currentThreadName() -> String {
    ((try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "")
        .trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Waits up to 3 s for the process's thread count to come down to `limit`; returns the last count.
private func settledThreads(atMost limit: Int) async -> Int {
    var now = processThreads()
    for _ in 0..<300 where now > limit {
        try? await Task.sleep(for: .milliseconds(10))
        now = processThreads()
    }
    return now
}

/// Waits for `semaphore` off the cooperative pool.
private func waitFor(_ semaphore: DispatchSemaphore) async {
    await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
        DispatchQueue.global().async {
            semaphore.wait()
            continuation.resume()
        }
    }
}
