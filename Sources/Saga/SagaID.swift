/// The identity of one saga. Never reused by a coordinator, across restarts too: a reused id
/// would let an old marker row decide a new saga (see `IDLease`).
public struct SagaID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (lhs: SagaID, rhs: SagaID) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { "saga#\(rawValue)" }

    /// The largest id a saga may have: ids stay below 2^63, so that they fit a signed 64-bit
    /// column as they are (SQLite's INTEGER, and every binding of MySQL's BIGINT).
    public static let maxValid = SagaID(UInt64(Int64.max))
    /// Whether the id is in 1...``maxValid``; anything else found in a store is damage.
    public var isValid: Bool { rawValue >= 1 && rawValue <= Self.maxValid.rawValue }

    /// An id outside 1...``maxValid`` found in one of the stores.
    struct OutOfRange: Error, CustomStringConvertible {
        let id: SagaID
        let place: String
        var description: String {
            "\(place) holds saga id \(Int64(bitPattern: id.rawValue)), outside 1...\(SagaID.maxValid.rawValue): damaged, or written by something other than Saga"
        }
    }
}

/// Raw bytes, as read from and written to the KV store. Images are never decoded.
public typealias Bytes = [UInt8]

extension Array where Element == UInt8 {
    /// A readable rendering for error messages: printable ASCII as is, other bytes as `\xNN`.
    package var debugText: String {
        var out = ""
        for b in self {
            switch b {
            case 0x0A: out += "\\n"
            case 0x5C: out += "\\\\"
            case 0x20...0x7E: out.append(Character(UnicodeScalar(b)))
            default: out += "\\x" + (b < 16 ? "0" : "") + String(b, radix: 16)
            }
        }
        return out
    }
}

/// Renders an optional image ("absent" for a key that did not exist).
func describe(_ image: Bytes?) -> String {
    guard let image else { return "<absent>" }
    return "\"\(image.debugText)\""
}
