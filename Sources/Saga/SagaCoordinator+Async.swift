extension SagaCoordinator {
    /// Runs one saga from async code: the same saga as the blocking `run(_:)`, run in the
    /// calling task on threads made for blocking work. Returns what `body` returned.
    ///
    /// - **Where the body runs**: on a thread of ``Configuration/executor``, or (nil, the
    ///   default) of the coordinator's own ``SagaThreadPool`` of ``Configuration/asyncThreads``
    ///   threads, through `withTaskExecutorPreference`. The whole saga (BEGIN, the body, the
    ///   synced KV batch, COMMIT, compensation) blocks one such thread and never a thread of
    ///   Swift's cooperative pool. The caller suspends meanwhile.
    /// - **Bound**: at most as many sagas run at once as the executor has threads (the own
    ///   pool: ``Configuration/asyncThreads``); further calls wait in its queue, in order, and
    ///   cost no thread while they wait. The coordinator's own pool is shut down by ``close()``
    ///   once the sagas running then have ended.
    /// - **Same task**: the body runs in the calling task, not in a new one, so task-local
    ///   values bound around the call are visible in the body, and so is the task's
    ///   cancellation (`Task.isCancelled`, `Task.checkCancellation()`).
    /// - **Cancellation** is honoured until the forward KV batch is written, and ignored after:
    ///   if the task is cancelled before `BEGIN`, before the body starts, or after the body has
    ///   returned but before the KV batch is written (a saga that writes KV keys), the saga is
    ///   rolled back and this throws ``SagaError/cancelled(saga:)`` with nothing written in
    ///   either store and its locks released. A `CancellationError` thrown by the body ends it
    ///   the same way. Once the KV batch is written the saga finishes as the protocol says
    ///   (commits, or compensates if `COMMIT` fails) whatever happens to the task. A saga that
    ///   writes no KV key has no batch: its last check is before the body.
    ///
    /// The body need not be `@Sendable` nor escaping: it is sent to the executor's thread and
    /// run there before this returns. It must not capture state isolated to an actor (the
    /// compiler refuses that: the body does not run on the actor).
    ///
    /// `key`: the caller's idempotency key, as in the blocking ``run(key:_:)-4bh0f``.
    @concurrent
    @discardableResult
    public func run<T: Sendable>(key: String? = nil, _ body: sending (Saga) throws -> T) async throws(SagaError) -> T {
        if Task.isCancelled { throw .cancelled(saga: nil) }
        return try await withTaskExecutorPreference(asyncExecutor) { () async throws(SagaError) -> T in
            try self.runBlocking(key: key, body)
        }
    }

    /// The blocking `run(key:_:)`, named apart so that async code cannot pick this overload.
    private func runBlocking<T>(key: String?, _ body: (Saga) throws -> T) throws(SagaError) -> T {
        try run(key: key, body)
    }
}
