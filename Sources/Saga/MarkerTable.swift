/// What every SQL backend shares about the marker table: `(saga_id PRIMARY KEY, status)`, with
/// status `committed` (inserted in the saga's transaction) or `aborted` (the fencing insert).
public enum MarkerTable {
    /// Table names are spliced into SQL text, so only letters, digits and underscores, not
    /// starting with a digit.
    public static func isValidName(_ name: String) -> Bool {
        guard let first = name.first, first.isLetter || first == "_" else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    /// The decision a marker's status stands for, read right after the fencing insert.
    public static func decision(status: String?, saga: SagaID) throws -> FenceDecision {
        switch status {
        case "committed": return .committed
        case "aborted": return .aborted
        default: throw MissingMarker(saga: saga, status: status)
        }
    }

    public struct MissingMarker: Error, CustomStringConvertible {
        public let saga: SagaID
        public let status: String?
        public var description: String { "marker for \(saga) missing right after the fencing insert (status \(status ?? "none"))" }
    }
}
