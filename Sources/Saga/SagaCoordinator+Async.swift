import Dispatch

extension SagaCoordinator {
    /// Runs one saga from async code. The saga's blocking work (RocksDB, SQL, fsync) runs on a
    /// dispatch queue, never on Swift's cooperative pool; the caller suspends until it is done.
    ///
    /// The body runs on that queue's thread, so it must be `@Sendable`, and so must its result.
    public func run<T: Sendable>(_ body: @escaping @Sendable (Saga) throws -> T) async throws(SagaError) -> T {
        let result: Result<T, SagaError> = await withCheckedContinuation { continuation in
            DispatchQueue.global().async {
                continuation.resume(returning: Result { () throws(SagaError) -> T in try self.run(body) })
            }
        }
        return try result.get()
    }
}
