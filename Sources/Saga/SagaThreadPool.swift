#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation

/// A bounded pool of threads of the library's own, usable as a Swift `TaskExecutor` (SE-0417).
///
/// The async `SagaCoordinator.run(_:)` runs the blocking part of a saga (RocksDB writes, SQL
/// round trips, fsync) on such a pool through `withTaskExecutorPreference`, so that it never
/// occupies a thread of Swift's cooperative pool. Any other blocking work may use it the same
/// way:
///
/// ```swift
/// let pool = SagaThreadPool(threads: 4)
/// let value = await withTaskExecutorPreference(pool) { blockingCall() }
/// pool.shutdown()
/// ```
///
/// - **Bound**: at most ``threadCount`` threads run jobs at any time. Threads are started
///   lazily: one is started when a job is enqueued while no thread is idle and fewer than
///   ``threadCount`` exist; an idle thread waits on a condition variable (no busy waiting).
/// - **Order**: jobs run in the order they were enqueued (first in, first out).
/// - **Shutdown**: ``shutdown()`` lets every job already queued run, then ends the threads and
///   waits for them to exit. It never strands a task: a job enqueued after a shutdown (a task
///   that still prefers this pool) starts a thread again, within the bound, and that thread
///   exits as soon as the queue is empty (a later enqueue, shutdown or `deinit` reclaims it).
///   `deinit` shuts down the same way, so a pool never leaks threads: dropping the last
///   reference ends them.
/// - **Lifetime**: as SE-0417 requires of every task executor, keep the pool alive for as long
///   as any task may prefer it (a task's preference does not retain the executor).
///
/// Threads are named `<name>-<n>` (truncated to the 15 characters Linux allows).
public final class SagaThreadPool: TaskExecutor, @unchecked Sendable {
    /// The most threads the pool runs at once.
    public let threadCount: Int
    /// The prefix of the threads' names.
    public let name: String
    private let core: PoolCore

    /// The default bound: `max(2, ProcessInfo.processInfo.activeProcessorCount)`. Saga work
    /// mostly waits on fsync and on the SQL database, so one thread per core is enough to keep
    /// both stores busy without flooding them.
    public static var defaultThreadCount: Int { max(2, ProcessInfo.processInfo.activeProcessorCount) }

    /// Creates a pool of at most `threads` threads (at least 1); no thread starts before the
    /// first job arrives.
    public init(threads: Int = SagaThreadPool.defaultThreadCount, name: String = "saga-pool") {
        precondition(threads >= 1, "a SagaThreadPool needs at least one thread, not \(threads)")
        self.threadCount = threads
        self.name = name
        self.core = PoolCore(limit: threads, name: name)
        core.executor = asUnownedTaskExecutor()
    }

    deinit { core.shutdown() }

    /// Queues `job`; a thread of the pool runs it. Called by the Swift runtime.
    public func enqueue(_ job: consuming ExecutorJob) {
        core.enqueue(UnownedJob(job))
    }

    /// Lets every job already queued run, then ends the pool's threads and waits until they have
    /// exited. Idempotent. Called from one of the pool's own threads (a job that shuts its own
    /// pool down), it cannot wait for itself: it returns at once and the threads, detached,
    /// exit by themselves once the queue is empty (the calling one when its job returns).
    ///
    /// The pool stays usable: a job enqueued later starts a thread again (see the type's
    /// documentation), which exits when the queue is empty.
    public func shutdown() { core.shutdown() }

    /// Threads of the pool alive right now (for tests and diagnostics).
    public var liveThreads: Int { core.liveThreads }
}

/// The queue and threads of a ``SagaThreadPool``, apart from it so that the threads (which
/// retain this) never keep the pool alive: its `deinit` is what ends them.
///
/// `@unchecked Sendable`: every mutable field is guarded by `mutex`, except `executor`,
/// written once in the pool's `init` before any thread starts.
private final class PoolCore: @unchecked Sendable {
    let limit: Int
    let name: String
    var executor: UnownedTaskExecutor?

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// Signalled when a job is queued or the pool stops.
    private let workAvailable: UnsafeMutablePointer<pthread_cond_t>

    // Guarded by `mutex`.
    private var jobs: [UnownedJob?] = []
    private var head = 0
    private var live = 0
    private var idle = 0
    private var started = 0
    /// Set by `shutdown`: threads exit when the queue is empty.
    private var stopping = false
    /// Threads started and neither joined nor detached yet (running, or exited).
    private var threads: [pthread_t] = []
    /// Those of `threads` that have left their loop, to be joined.
    private var exited: [pthread_t] = []

    init(limit: Int, name: String) {
        self.limit = limit
        self.name = name
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(mutex, nil)
        workAvailable = .allocate(capacity: 1)
        workAvailable.initialize(to: pthread_cond_t())
        pthread_cond_init(workAvailable, nil)
    }

    deinit {
        pthread_cond_destroy(workAvailable)
        workAvailable.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    var liveThreads: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return live
    }

    func enqueue(_ job: UnownedJob) {
        pthread_mutex_lock(mutex)
        jobs.append(job)
        if idle > 0 {
            pthread_cond_signal(workAvailable)
        } else if live < limit {
            startThread()
        }
        // Otherwise every thread is busy: the first to finish its job takes this one.
        // After a shutdown threads come and go: reclaim those gone since.
        let reap = exited
        if !reap.isEmpty { forget(reap) }
        pthread_mutex_unlock(mutex)
        for thread in reap { pthread_join(thread, nil) }
    }

    /// Removes `gone` from `threads` and `exited`. Called with `mutex` held.
    private func forget(_ gone: [pthread_t]) {
        threads.removeAll { t in gone.contains { pthread_equal($0, t) != 0 } }
        exited.removeAll { t in gone.contains { pthread_equal($0, t) != 0 } }
    }

    /// Starts a worker. Called with `mutex` held.
    private func startThread() {
        started += 1
        let threadName = String("\(name)-\(started)".utf8.prefix(15)) ?? "saga-pool"
        let context = Unmanaged.passRetained(WorkerContext(core: self, name: threadName)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { raw in
            let context = Unmanaged<WorkerContext>.fromOpaque(raw!).takeRetainedValue()
            context.core.work(named: context.name)
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<WorkerContext>.fromOpaque(context).release()
            // The threads that exist will run the job; with none, nothing could.
            precondition(live > 0, "SagaThreadPool cannot start a thread: pthread_create returned \(rc)")
            return
        }
        live += 1
        threads.append(thread)
    }

    /// A worker's loop: runs jobs until the pool stops and the queue is empty.
    private func work(named threadName: String) {
        Thread.current.name = threadName  // pthread_setname_np, which Glibc's module hides
        pthread_mutex_lock(mutex)
        while true {
            if head < jobs.count, let job = jobs[head] {
                jobs[head] = nil
                head += 1
                if head == jobs.count {
                    jobs.removeAll(keepingCapacity: true)
                    head = 0
                } else if head >= 1024, head * 2 >= jobs.count {
                    jobs.removeFirst(head)
                    head = 0
                }
                pthread_mutex_unlock(mutex)
                job.runSynchronously(on: executor!)
                pthread_mutex_lock(mutex)
                continue
            }
            if stopping { break }
            idle += 1
            pthread_cond_wait(workAvailable, mutex)
            idle -= 1
        }
        live -= 1
        if threads.contains(where: { pthread_equal($0, pthread_self()) != 0 }) { exited.append(pthread_self()) }
        pthread_mutex_unlock(mutex)
    }

    func shutdown() {
        pthread_mutex_lock(mutex)
        stopping = true
        pthread_cond_broadcast(workAvailable)
        let all = threads
        forget(all)
        if all.contains(where: { pthread_equal($0, pthread_self()) != 0 }) {
            // Cannot wait for ourselves: the threads end by themselves once the queue is empty.
            pthread_mutex_unlock(mutex)
            for thread in all { pthread_detach(thread) }
            return
        }
        pthread_mutex_unlock(mutex)
        // Every thread started before this call: once joined, it is gone from the process.
        for thread in all { pthread_join(thread, nil) }
    }
}

private final class WorkerContext {
    let core: PoolCore
    let name: String
    init(core: PoolCore, name: String) { self.core = core; self.name = name }
}
