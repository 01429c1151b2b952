/// Bytes as a dictionary key, hashed in one call over the whole buffer. `[UInt8]`'s own
/// `Hashable` feeds the hasher one byte at a time (`Hasher.combine(UInt8)` per byte), which a
/// profile of the saga path showed; `combine(bytes:)` takes the buffer at once.
struct HashedBytes: Hashable, Sendable {
    let bytes: Bytes
    init(_ bytes: Bytes) { self.bytes = bytes }

    func hash(into hasher: inout Hasher) {
        // The length first, as Array's own hashing does: keys that are prefixes of each other
        // then differ in more than their last bytes.
        hasher.combine(bytes.count)
        bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
    }

    static func == (a: HashedBytes, b: HashedBytes) -> Bool { a.bytes == b.bytes }
}
