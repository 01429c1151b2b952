/// What a recovery pass decided.
public struct RecoveryReport: Sendable, CustomStringConvertible {
    /// Prepared sagas whose marker proved them committed.
    public internal(set) var committed: [SagaID] = []
    /// Prepared sagas that were fenced (or found aborted) and whose KV writes were undone.
    public internal(set) var compensated: [SagaID] = []
    /// Sagas that could not be decided (database unreachable); they stay prepared and locked.
    public internal(set) var inDoubt: [SagaID] = []
    /// Sagas recovery refused to finish: foreign writes, damaged records, failed writes.
    public internal(set) var problems: [SagaError] = []

    public var isClean: Bool { inDoubt.isEmpty && problems.isEmpty }

    public var description: String {
        var s = "recovery: \(committed.count) committed, \(compensated.count) compensated, \(inDoubt.count) in doubt"
        for p in problems { s += "\n  problem: \(p)" }
        return s
    }
}
