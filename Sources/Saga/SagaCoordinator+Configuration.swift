extension SagaCoordinator {
    /// How a coordinator runs: lock waits, pooling, garbage collection, record size, hooks.
    /// Checked when the coordinator opens: a value out of range is refused with
    /// ``SagaError/Misuse/invalidConfiguration(_:)``.
    public struct Configuration: Sendable {
        /// How long a saga waits for a key lock before giving up (also ends deadlocks that run
        /// through the SQL database's own locks). At most ``maxLockTimeout``.
        public var lockTimeout: Duration
        /// Fault-injection and test hooks, called at every protocol step.
        public var hooks: (any SagaHooks)?
        /// Garbage collection runs once this many sagas have finished.
        public var gcThreshold: Int
        /// Idle SQL connections kept for reuse.
        public var poolSize: Int
        /// The largest journal record a saga may write: its keys with their pre- and
        /// after-images. A saga over it is refused at prepare with
        /// ``SagaError/Misuse/sagaTooLarge(size:limit:)``, and nothing is written. RocksDB
        /// refuses values of 4 GiB and more.
        public var maxRecordSize: Int
        /// Where the async `SagaCoordinator.run(_:)` runs sagas: the blocking work and
        /// the body run on this executor's threads (through `withTaskExecutorPreference`).
        /// nil: the coordinator's own ``SagaThreadPool`` of ``asyncThreads`` threads, started
        /// lazily and shut down by ``SagaCoordinator/close()``. A caller's executor must stay
        /// alive as long as the coordinator and is never shut down by it; it should run jobs on
        /// threads of its own (not Swift's cooperative pool), since saga work blocks.
        public var executor: (any TaskExecutor)?
        /// The bound of the coordinator's own pool (used when ``executor`` is nil): at most this
        /// many sagas run at once from async code; more wait in its queue. At least 1.
        public var asyncThreads: Int

        public static let maxLockTimeout: Duration = .seconds(24 * 3600)
        public static let maxGCThreshold = 1 << 24
        public static let maxPoolSize = 4096
        public static let recordSizeLimit = Int(UInt32.max) - (1 << 20)
        /// The largest accepted ``asyncThreads``.
        public static let maxAsyncThreads = 4096

        public init(lockTimeout: Duration = .seconds(5), hooks: (any SagaHooks)? = nil, gcThreshold: Int = 512, poolSize: Int = 16, maxRecordSize: Int = 1 << 30,
                    executor: (any TaskExecutor)? = nil, asyncThreads: Int = SagaThreadPool.defaultThreadCount) {
            self.lockTimeout = lockTimeout
            self.hooks = hooks
            self.gcThreshold = gcThreshold
            self.poolSize = poolSize
            self.maxRecordSize = maxRecordSize
            self.executor = executor
            self.asyncThreads = asyncThreads
        }

        /// What is wrong with the values, if anything.
        var problem: String? {
            if lockTimeout <= .zero || lockTimeout > Self.maxLockTimeout {
                return "lockTimeout must be positive and at most \(Self.maxLockTimeout), not \(lockTimeout)"
            }
            if gcThreshold < 1 || gcThreshold > Self.maxGCThreshold {
                return "gcThreshold must be between 1 and \(Self.maxGCThreshold), not \(gcThreshold)"
            }
            if poolSize < 0 || poolSize > Self.maxPoolSize { return "poolSize must be between 0 and \(Self.maxPoolSize), not \(poolSize)" }
            if maxRecordSize < 1024 || maxRecordSize > Self.recordSizeLimit {
                return "maxRecordSize must be between 1024 and \(Self.recordSizeLimit) bytes, not \(maxRecordSize)"
            }
            if asyncThreads < 1 || asyncThreads > Self.maxAsyncThreads {
                return "asyncThreads must be between 1 and \(Self.maxAsyncThreads), not \(asyncThreads)"
            }
            return nil
        }
    }
}
