import Foundation

// MARK: - Protocols

/// A value that can be stored under a KV key: it encodes itself to bytes.
///
/// The encodings of the types Saga conforms are fixed and documented on each conformance;
/// they are part of the stored format and never change, so that data written by one version
/// stays readable by later ones. A `Codable` type conforms with no code: its default encoding
/// is JSON (see `kvEncoded()` on `KVEncodable where Self: Encodable`).
public protocol KVEncodable {
    /// The bytes stored for this value.
    func kvEncoded() throws -> Bytes
}

/// A value that can be read back from the bytes stored under a KV key.
///
/// Decoding throws ``KVDecodingError`` when the bytes are not an encoding of the type. Thrown
/// inside a saga's body, it ends the saga as ``SagaError/bodyFailed(saga:underlying:)`` with
/// nothing written.
public protocol KVDecodable {
    /// Decodes a value from the bytes stored under a key.
    init(kvEncoded bytes: Bytes) throws
}

/// A value that can be stored under a KV key and read back.
public typealias KVCodable = KVEncodable & KVDecodable

/// The bytes under a key are not an encoding of the type they were read as.
///
/// The description names the target type, the byte count and what was wrong, e.g.
/// `cannot decode Int64 from 3 bytes: expected 8`.
public struct KVDecodingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The name of the type the bytes were decoded as.
    public let type: String
    /// How many bytes there were.
    public let byteCount: Int
    /// What was wrong with them.
    public let reason: String

    /// Makes an error for bytes that could not be decoded as `type`.
    public init(type: Any.Type, byteCount: Int, reason: String) {
        self.type = String(describing: type)
        self.byteCount = byteCount
        self.reason = reason
    }

    /// What could not be decoded, and why, e.g. "cannot decode Int64 from 3 bytes: expected 8".
    public var description: String {
        "cannot decode \(type) from \(byteCount) byte\(byteCount == 1 ? "" : "s"): \(reason)"
    }
}

// MARK: - Raw bytes and text

/// Raw: the bytes are stored as they are.
extension Array: KVEncodable where Element == UInt8 {
    /// The bytes themselves.
    public func kvEncoded() -> Bytes { self }
}

/// Raw: the bytes are stored as they are.
extension Array: KVDecodable where Element == UInt8 {
    /// The bytes themselves; never fails.
    public init(kvEncoded bytes: Bytes) { self = bytes }
}

/// Raw: the bytes are stored as they are.
extension Data: KVEncodable, KVDecodable {
    /// The bytes themselves.
    public func kvEncoded() -> Bytes { Bytes(self) }
    /// The bytes themselves; never fails.
    public init(kvEncoded bytes: Bytes) { self.init(bytes) }
}

/// UTF-8, with no length prefix or terminator.
extension String: KVEncodable, KVDecodable {
    /// The UTF-8 bytes of the string.
    public func kvEncoded() -> Bytes { Bytes(utf8) }
    /// Decodes UTF-8; throws ``KVDecodingError`` on bytes that are not valid UTF-8.
    public init(kvEncoded bytes: Bytes) throws {
        guard let string = String(validating: bytes, as: UTF8.self) else {
            throw KVDecodingError(type: String.self, byteCount: bytes.count, reason: "not valid UTF-8")
        }
        self = string
    }
}

// MARK: - Integers

/// The 8 bytes of a 64-bit pattern, most significant first.
private func bigEndianBytes(_ bits: UInt64) -> Bytes {
    (0..<8).map { UInt8(truncatingIfNeeded: bits >> (56 - 8 * $0)) }
}

/// The 64-bit pattern of exactly 8 big-endian bytes; throws for any other length.
private func bigEndianBits(_ bytes: Bytes, as type: Any.Type) throws -> UInt64 {
    guard bytes.count == 8 else {
        throw KVDecodingError(type: type, byteCount: bytes.count, reason: "expected 8")
    }
    return bytes.reduce(0) { $0 << 8 | UInt64($1) }
}

/// Eight bytes, big-endian two's complement: non-negative values sort by byte order.
extension Int64: KVEncodable, KVDecodable {
    /// Eight bytes, big-endian two's complement.
    public func kvEncoded() -> Bytes { bigEndianBytes(UInt64(bitPattern: self)) }
    /// Decodes exactly eight big-endian bytes.
    public init(kvEncoded bytes: Bytes) throws {
        self.init(bitPattern: try bigEndianBits(bytes, as: Int64.self))
    }
}

/// An integer type narrower than (or as wide as) `Int64`, stored as the `Int64` of its value:
/// eight big-endian bytes, and a value out of the type's range throws.
private func narrowedFromInt64<T: FixedWidthInteger>(_ bytes: Bytes) throws -> T {
    let value = Int64(bitPattern: try bigEndianBits(bytes, as: T.self))
    guard let narrowed = T(exactly: value) else {
        throw KVDecodingError(type: T.self, byteCount: bytes.count, reason: "\(value) is out of range")
    }
    return narrowed
}

/// Eight bytes, big-endian two's complement (the same bytes as the `Int64` of the same value).
extension Int: KVEncodable, KVDecodable {
    /// Eight bytes, big-endian two's complement.
    public func kvEncoded() -> Bytes { Int64(self).kvEncoded() }
    /// Decodes exactly eight big-endian bytes; throws if the value does not fit in `Int`.
    public init(kvEncoded bytes: Bytes) throws { self = try narrowedFromInt64(bytes) }
}

/// Eight bytes, big-endian: values sort by byte order.
extension UInt64: KVEncodable, KVDecodable {
    /// Eight bytes, big-endian.
    public func kvEncoded() -> Bytes { bigEndianBytes(self) }
    /// Decodes exactly eight big-endian bytes.
    public init(kvEncoded bytes: Bytes) throws {
        self = try bigEndianBits(bytes, as: UInt64.self)
    }
}

/// Eight bytes, big-endian two's complement (the same bytes as the `Int64` of the same value).
extension Int32: KVEncodable, KVDecodable {
    /// Eight bytes, big-endian two's complement.
    public func kvEncoded() -> Bytes { Int64(self).kvEncoded() }
    /// Decodes exactly eight big-endian bytes; throws if the value does not fit in `Int32`.
    public init(kvEncoded bytes: Bytes) throws { self = try narrowedFromInt64(bytes) }
}

// MARK: - Other scalars

/// One byte: 0 for false, 1 for true.
extension Bool: KVEncodable, KVDecodable {
    /// One byte: 0 or 1.
    public func kvEncoded() -> Bytes { [self ? 1 : 0] }
    /// Decodes one byte, 0 or 1; anything else throws.
    public init(kvEncoded bytes: Bytes) throws {
        guard bytes.count == 1 else {
            throw KVDecodingError(type: Bool.self, byteCount: bytes.count, reason: "expected 1")
        }
        switch bytes[0] {
        case 0: self = false
        case 1: self = true
        case let byte: throw KVDecodingError(type: Bool.self, byteCount: 1, reason: "byte \(byte) is neither 0 nor 1")
        }
    }
}

/// Eight bytes: the IEEE-754 bit pattern, big-endian.
extension Double: KVEncodable, KVDecodable {
    /// The IEEE-754 bit pattern, big-endian.
    public func kvEncoded() -> Bytes { bigEndianBytes(bitPattern) }
    /// Decodes exactly eight big-endian bytes of an IEEE-754 bit pattern.
    public init(kvEncoded bytes: Bytes) throws {
        self.init(bitPattern: try bigEndianBits(bytes, as: Double.self))
    }
}

/// Sixteen bytes: the UUID's raw bytes, in order.
extension UUID: KVEncodable, KVDecodable {
    /// The sixteen raw bytes.
    public func kvEncoded() -> Bytes { withUnsafeBytes(of: uuid) { Bytes($0) } }
    /// Decodes exactly sixteen raw bytes.
    public init(kvEncoded bytes: Bytes) throws {
        guard bytes.count == 16 else {
            throw KVDecodingError(type: UUID.self, byteCount: bytes.count, reason: "expected 16")
        }
        var raw: uuid_t = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        withUnsafeMutableBytes(of: &raw) { $0.copyBytes(from: bytes) }
        self.init(uuid: raw)
    }
}

/// Seconds since 2001-01-01 00:00:00 UTC (Foundation's reference date, what a `Date` holds),
/// as a `Double`'s encoding (eight bytes, big-endian IEEE-754): every `Date` reads back equal
/// to the one written. (Seconds since 1970 would not: converting adds and subtracts
/// 978,307,200 in `Double` arithmetic, which rounds.)
extension Date: KVEncodable, KVDecodable {
    /// `timeIntervalSinceReferenceDate` in `Double`'s encoding.
    public func kvEncoded() -> Bytes { timeIntervalSinceReferenceDate.kvEncoded() }
    /// Decodes `Double`'s encoding of seconds since 2001.
    public init(kvEncoded bytes: Bytes) throws {
        guard bytes.count == 8 else {
            throw KVDecodingError(type: Date.self, byteCount: bytes.count, reason: "expected 8")
        }
        self.init(timeIntervalSinceReferenceDate: try Double(kvEncoded: bytes))
    }
}

// MARK: - Codable

extension KVEncodable where Self: Encodable {
    /// The default encoding of an `Encodable` type: JSON, written by Foundation's
    /// `JSONEncoder` with `outputFormatting = .sortedKeys` (keys in sorted order, no
    /// whitespace), `dateEncodingStrategy = .deferredToDate` (a `Date` is its number of
    /// seconds since 2001-01-01 UTC, so it reads back equal) and `dataEncodingStrategy = .base64` (a `Data` is a base64
    /// string). This is the stored format of such values and stays readable by later
    /// versions.
    public func kvEncoded() throws -> Bytes {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        encoder.dateEncodingStrategy = .deferredToDate
        encoder.dataEncodingStrategy = .base64
        return Bytes(try encoder.encode(self))
    }
}

extension KVDecodable where Self: Decodable {
    /// The default decoding of a `Decodable` type: JSON, read by Foundation's `JSONDecoder`
    /// with dates as seconds since 2001 and data as base64 (the format `kvEncoded()` writes).
    /// Throws ``KVDecodingError`` (naming what the JSON decoder found wrong) on bytes that do
    /// not decode.
    public init(kvEncoded bytes: Bytes) throws {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .deferredToDate
        decoder.dataDecodingStrategy = .base64
        do {
            self = try decoder.decode(Self.self, from: Data(bytes))
        } catch {
            throw KVDecodingError(type: Self.self, byteCount: bytes.count, reason: "invalid JSON: \(jsonProblem(error))")
        }
    }
}

/// A short account of a `DecodingError`: what was wrong, and where.
private func jsonProblem(_ error: any Error) -> String {
    guard let error = error as? DecodingError else { return String(describing: error) }
    func path(_ context: DecodingError.Context) -> String {
        let path = context.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        return path.isEmpty ? "" : " at `\(path)`"
    }
    switch error {
    case .typeMismatch(let type, let context): return "expected \(type)\(path(context))"
    case .valueNotFound(let type, let context): return "missing \(type) value\(path(context))"
    case .keyNotFound(let key, let context): return "missing key `\(key.stringValue)`\(path(context))"
    case .dataCorrupted(let context): return context.debugDescription + path(context)
    @unknown default: return String(describing: error)
    }
}

// MARK: - Typed access

extension SagaKV {
    /// Reads a key (locking it) and decodes its value as `V`: the saga's own staged value if
    /// any, else the store's; nil if the key is absent. Throws ``KVDecodingError`` if the
    /// bytes are not an encoding of `V`.
    public func get<V: KVDecodable>(_ key: Bytes, as type: V.Type = V.self) throws -> V? {
        try get(key).map { try V(kvEncoded: $0) }
    }

    /// Stages a put of the value's encoding.
    public func put(_ key: Bytes, _ value: some KVEncodable) throws {
        try put(key, value.kvEncoded())
    }

    /// Reads a key given as UTF-8 text and decodes its value as `V` (see `get(_:as:)`).
    public func get<V: KVDecodable>(_ key: String, as type: V.Type = V.self) throws -> V? {
        try get(Bytes(key.utf8), as: type)
    }

    /// Stages a put of the value's encoding under a key given as UTF-8 text.
    public func put(_ key: String, _ value: some KVEncodable) throws {
        try put(Bytes(key.utf8), value.kvEncoded())
    }
}

extension KVStore {
    /// Reads one data key outside any saga and decodes its value as `V`; nil if absent.
    /// Throws ``KVDecodingError`` if the bytes are not an encoding of `V`.
    public func get<V: KVDecodable>(_ key: Bytes, as type: V.Type = V.self) throws -> V? {
        try get(key).map { try V(kvEncoded: $0) }
    }

    /// Reads one data key given as UTF-8 text, outside any saga, and decodes its value as `V`.
    public func get<V: KVDecodable>(_ key: String, as type: V.Type = V.self) throws -> V? {
        try get(Bytes(key.utf8), as: type)
    }
}
