/// The named points of the protocol (<doc:Protocol>). Every one of them is a place where a
/// ``SagaHooks`` implementation can crash the process or inject a failure.
public enum SagaStep: String, CaseIterable, Sendable, CustomStringConvertible {
    /// Before `BEGIN` on the SQL connection.
    case begin
    /// The body returned; nothing has touched the KV store yet.
    case body
    /// Pre-images read; the forward batch with the `prepared` record is about to be written.
    case prepare
    /// The forward batch is durable; the marker row is not inserted yet.
    case prepared
    /// The KV side is prepared; the marker row is about to be added to the open SQL transaction.
    case marker
    /// The marker insert and `COMMIT` are about to be sent (one round trip where the backend
    /// can): the decision point.
    case commit
    /// `COMMIT` succeeded (or a fence found the saga committed); its locks are not released yet.
    /// No journal write follows: the marker row proves the outcome, and garbage collection
    /// deletes the `prepared` record.
    case committed
    /// The outcome is known to be "failed"; the compensating batch is about to be written.
    case compensate
    /// The compensating batch (with `compensated`) is durable; locks not released yet.
    case compensated
    /// The fencing insert is about to run on a fresh connection (unknown outcome, recovery).
    case resolve
    /// GC: finished journal records are about to be deleted (synced).
    case gcJournal
    /// GC: the journal records are gone; their marker rows are about to be deleted.
    case gcMarkers

    // Redo mode (<doc:Protocol>, "Redo mode"). It also reaches begin, body, marker, commit,
    // committed (COMMIT succeeded; nothing is in the KV store yet) and resolve.

    /// Redo mode: the after-images are written to the KV store (not synced); the saga's locks
    /// are not released yet.
    case applied
    /// Redo mode: the watermark (every saga up to its sequence applied) is about to be written,
    /// synced.
    case checkpoint
    /// Redo mode: the watermark is durable; the redo rows at or below it are about to be
    /// deleted.
    case checkpointed
    /// Redo mode, recovery: a chunk of redo rows above the watermark is about to be written to
    /// the KV store (reached once per chunk, so a crash can land inside replay).
    case replay

    /// The steps a saga, recovery or garbage collection reaches in `mode`.
    public static func steps(of mode: SagaCoordinator.Configuration.Mode) -> [SagaStep] {
        switch mode {
        case .compensate: [.begin, .body, .prepare, .prepared, .marker, .commit, .committed, .compensate, .compensated, .resolve, .gcJournal, .gcMarkers]
        case .redo: [.begin, .body, .marker, .commit, .committed, .applied, .resolve, .checkpoint, .checkpointed, .replay]
        }
    }

    public var description: String { rawValue }
}

/// Where a step was reached: in a caller's saga, in recovery, or in garbage collection.
public enum SagaPhase: String, Sendable, CaseIterable {
    case run, recovery, gc
}

/// Test and fault-injection hooks, called at every ``SagaStep``.
///
/// Throwing from `reached` makes the step's own operation fail with that error; the coordinator
/// then follows the protocol exactly as if the store had failed there.
public protocol SagaHooks: Sendable {
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws
}

/// An error injected by a hook, distinguishable from real store errors in reports.
package struct InjectedFault: Error, CustomStringConvertible, Sendable {
    package let step: SagaStep
    package let phase: SagaPhase
    package var description: String { "injected fault at step '\(step)' (\(phase))" }
    package init(step: SagaStep, phase: SagaPhase) { self.step = step; self.phase = phase }
}
