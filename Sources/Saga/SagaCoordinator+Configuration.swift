import CoreMetrics
import Tracing

extension SagaCoordinator {
    /// How a coordinator runs: lock waits, pooling, garbage collection, record size, hooks.
    /// Checked when the coordinator opens: a value out of range is refused with
    /// ``SagaError/Misuse/invalidConfiguration(_:)``.
    public struct Configuration: Sendable {
        /// How a saga's KV writes reach the store (<doc:Protocol>, "Redo mode").
        public enum Mode: String, Sendable, CaseIterable, CustomStringConvertible {
            /// The KV writes and a journal record with their pre-images are written, synced,
            /// before `COMMIT`, and undone if `COMMIT` fails: two synced writes per saga, and
            /// a reader outside sagas can see a KV value that is later undone.
            case compensate
            /// The after-images ride in the SQL transaction, in the saga's marker row;
            /// `COMMIT` is the saga's only synced write. The KV batch is written after
            /// `COMMIT`, unsynced, before the keys are released; a periodic synced
            /// checkpoint makes it durable, and recovery replays what a crash or a power loss
            /// of the KV store lost from the SQL rows. Readers outside sagas never see a KV
            /// value that SQL did not commit.
            case redo
            public var description: String { rawValue }
        }

        /// How a saga's KV writes reach the store: ``Mode/compensate`` (the default) or
        /// ``Mode/redo``. Either mode's leftovers are recovered whichever mode the next open
        /// uses.
        public var mode: Mode
        /// Redo mode: a checkpoint (a synced KV write of the watermark, then deleting the
        /// redo rows at or below it) runs once this many sagas applied since the last one,
        /// or once ``checkpointInterval`` passed and a saga ends; and at ``SagaCoordinator/close()``.
        public var checkpointEvery: Int
        /// Redo mode: the longest time between checkpoints while sagas run.
        public var checkpointInterval: Duration
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
        /// How long the outcome of a finished saga can be looked up
        /// (``SagaCoordinator/outcome(of:)``, ``SagaCoordinator/outcome(ofKey:)``): at least this
        /// long after it was recorded, and until garbage collection prunes it after that. A
        /// caller key's row goes then too, and the key can run again. Between 1 ms and
        /// ``maxOutcomeRetention``; default 24 hours.
        public var outcomeRetention: Duration
        /// The bound of the coordinator's own pool (used when ``executor`` is nil): at most this
        /// many sagas run at once from async code; more wait in its queue. At least 1.
        public var asyncThreads: Int
        /// Where the coordinator's metrics go (<doc:OperatingANode>, "Metrics"): nil, the
        /// global `MetricsSystem.factory` as it is when the coordinator opens. The handles are
        /// made once, at open.
        public var metricsFactory: (any MetricsFactory)?
        /// Where sagas' spans go: nil, the global `InstrumentationSystem.tracer` as it is when
        /// the coordinator opens.
        public var tracer: (any Tracer)?

        public static let maxLockTimeout: Duration = .seconds(24 * 3600)
        public static let maxGCThreshold = 1 << 24
        public static let maxPoolSize = 4096
        public static let recordSizeLimit = Int(UInt32.max) - (1 << 20)
        /// The largest accepted ``asyncThreads``.
        public static let maxAsyncThreads = 4096
        /// The largest accepted ``checkpointEvery``.
        public static let maxCheckpointEvery = 1 << 20
        /// The longest accepted ``outcomeRetention``: a year.
        public static let maxOutcomeRetention: Duration = .seconds(366 * 24 * 3600)

        public init(lockTimeout: Duration = .seconds(5), hooks: (any SagaHooks)? = nil, gcThreshold: Int = 512, poolSize: Int = 16, maxRecordSize: Int = 1 << 30,
                    executor: (any TaskExecutor)? = nil, asyncThreads: Int = SagaThreadPool.defaultThreadCount,
                    mode: Mode = .compensate, checkpointEvery: Int = 256, checkpointInterval: Duration = .milliseconds(200),
                    metricsFactory: (any MetricsFactory)? = nil, tracer: (any Tracer)? = nil,
                    outcomeRetention: Duration = .seconds(24 * 3600)) {
            self.metricsFactory = metricsFactory
            self.tracer = tracer
            self.outcomeRetention = outcomeRetention
            self.mode = mode
            self.checkpointEvery = checkpointEvery
            self.checkpointInterval = checkpointInterval
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
            if checkpointEvery < 1 || checkpointEvery > Self.maxCheckpointEvery {
                return "checkpointEvery must be between 1 and \(Self.maxCheckpointEvery), not \(checkpointEvery)"
            }
            if checkpointInterval <= .zero || checkpointInterval > Self.maxLockTimeout {
                return "checkpointInterval must be positive and at most \(Self.maxLockTimeout), not \(checkpointInterval)"
            }
            if outcomeRetention < .milliseconds(1) || outcomeRetention > Self.maxOutcomeRetention {
                return "outcomeRetention must be between 1 ms and \(Self.maxOutcomeRetention), not \(outcomeRetention)"
            }
            return nil
        }
    }
}
