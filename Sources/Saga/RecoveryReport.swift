/// What a recovery pass decided.
public struct RecoveryReport: Sendable, CustomStringConvertible {
    /// Prepared sagas whose marker proved them committed.
    public internal(set) var committed: [SagaID] = []
    /// Prepared sagas that were fenced (or found aborted) and whose KV writes were undone. In
    /// redo mode: sagas fenced as not committed, which had written nothing to undo.
    public internal(set) var compensated: [SagaID] = []
    /// Redo mode, at open: committed sagas whose after-images were written again from their
    /// redo rows, in sequence order (those above the durable watermark: applied or not before
    /// the crash or the power loss, writing them again is harmless).
    public internal(set) var replayed: [SagaID] = []
    /// Sagas that could not be decided (database unreachable); they stay prepared and locked.
    public internal(set) var inDoubt: [SagaID] = []
    /// Sagas recovery refused to finish: foreign writes, damaged records, failed writes.
    public internal(set) var problems: [SagaError] = []

    public var isClean: Bool { inDoubt.isEmpty && problems.isEmpty }

    public var description: String {
        var s = "recovery: \(committed.count) committed, \(compensated.count) compensated, \(inDoubt.count) in doubt"
        if !replayed.isEmpty { s += ", \(replayed.count) replayed" }
        for p in problems { s += "\n  problem: \(p)" }
        return s
    }
}
