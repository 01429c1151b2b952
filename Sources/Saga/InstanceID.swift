/// The identity of one coordinator's journal: created at its first open, kept in the journal,
/// and carried by every marker row it writes. Coordinators that share one SQL database read,
/// fence and delete only the marker rows of their own instance (PROTOCOL.md, "Many
/// coordinators, one SQL database").
public struct InstanceID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (lhs: InstanceID, rhs: InstanceID) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { "instance \(rawValue)" }

    /// The instance of a journal written before instance ids existed: it owns the marker rows
    /// of those versions, which migrate to this instance.
    public static let legacy = InstanceID(0)

    /// A new instance id: random in 1...2^63-1, so that it fits a signed 64-bit column as is.
    static func random() -> InstanceID {
        var rng = SystemRandomNumberGenerator()
        return InstanceID(UInt64.random(in: 1...UInt64(Int64.max), using: &rng))
    }

    /// The journal key of the instance record.
    static let journalKey: Bytes = Array("m:instance".utf8)

    /// The instance record: the id, big-endian, then its CRC-32C (12 bytes).
    static func encode(_ id: InstanceID) -> Bytes {
        var value: Bytes = []
        value.appendBigEndian(id.rawValue)
        value.appendBigEndian(CRC32C.checksum(value))
        return value
    }

    static func decode(_ raw: Bytes) throws(SagaError) -> InstanceID {
        func damaged(_ why: String) -> SagaError { .journalCorrupt(saga: nil, key: journalKey, reason: "instance record \(why)") }
        guard raw.count == 12 else { throw damaged("has \(raw.count) bytes, expected 12") }
        let id = raw[0..<8].reduce(0) { $0 << 8 | UInt64($1) }
        let stored = raw[8..<12].reduce(0) { $0 << 8 | UInt32($1) }
        guard stored == CRC32C.checksum(raw[0..<8]) else { throw damaged("fails its checksum") }
        guard id <= UInt64(Int64.max) else { throw damaged("holds \(id), past 2^63-1") }
        return InstanceID(id)
    }

    /// The journal's instance: read, or created and stored (synced) at the first open. A
    /// journal that has been used without one (an id ceiling or records are there) was
    /// written before instance ids existed: it is the ``legacy`` instance.
    static func load(from kv: any KVStore, journal: [(key: Bytes, value: Bytes)]) throws -> InstanceID {
        if let raw = journal.first(where: { $0.key == journalKey })?.value { return try decode(raw) }
        let used = journal.contains { $0.key == IDLease.ceilingKey || JournalRecord.saga(fromKey: $0.key) != nil }
        let id = used ? legacy : random()
        var batch = KVWriteBatch()
        batch.put(journalKey, encode(id), in: .journal)
        try kv.write(batch, sync: true)
        return id
    }
}
