/// The identity of one coordinator's journal: created at its first open, kept in the journal,
/// and carried by every marker row it writes. Coordinators that share one SQL database read,
/// fence and delete only the marker rows of their own instance (<doc:Protocol>, "Many
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
}

/// What the journal keeps about its instance (under ``InstanceID/journalKey``): the id, and the
/// claims it made on the SQL side. Every open claims the instance in the SQL database's
/// instance table with a new random value, which the journal records; an open whose journal
/// does not know the value the table holds is refused. So two journals can never share an
/// instance id (two journals written before instance ids on one database, a copied or
/// restored KV store opened after the original, or the original after its copy), each
/// deleting the other's marker rows as orphans.
///
/// A claim is made in three steps that a crash may cut anywhere: the new value is added to the
/// journal's `pending` values (synced), the table moves from `current` or a pending value to
/// it, and the journal makes it `current`. Every open moves the table to a value of its own,
/// also after an open that did not finish: two copies of a journal with the same values can
/// never both pass. The table holding `current` or a pending value is this journal.
struct InstanceRecord: Equatable {
    var id: InstanceID
    var current: UInt64
    /// Claims of opens that did not finish, oldest first; the table may hold any of them.
    var pending: [UInt64]

    /// At most this many pending claims are kept (the oldest go first): an open adds one only
    /// once the SQL database has answered, so only opens cut off inside the claim add one.
    static let maxPending = 16

    /// The record: id, current, each u64 big-endian; a u8 count and that many pending u64;
    /// then a CRC-32C of everything before it.
    func encoded() -> Bytes {
        var value: Bytes = []
        value.appendBigEndian(id.rawValue)
        value.appendBigEndian(current)
        value.append(UInt8(pending.count))
        for p in pending { value.appendBigEndian(p) }
        value.appendBigEndian(CRC32C.checksum(value))
        return value
    }

    init(id: InstanceID, current: UInt64, pending: [UInt64]) {
        self.id = id; self.current = current; self.pending = pending
    }

    init(decoding raw: Bytes) throws(SagaError) {
        func damaged(_ why: String) -> SagaError { .journalCorrupt(saga: nil, key: InstanceID.journalKey, reason: "instance record \(why)") }
        guard raw.count >= 21 else { throw damaged("has \(raw.count) bytes, at least 21 expected") }
        func u64(_ at: Int) -> UInt64 { raw[at..<(at + 8)].reduce(0) { $0 << 8 | UInt64($1) } }
        let body = raw.count - 4
        let stored = raw[body...].reduce(0) { $0 << 8 | UInt32($1) }
        guard stored == CRC32C.checksum(raw[..<body]) else { throw damaged("fails its checksum") }
        let count = Int(raw[16])
        guard count <= Self.maxPending, body == 17 + 8 * count else { throw damaged("has \(raw.count) bytes for \(count) pending claims") }
        guard u64(0) <= UInt64(Int64.max) else { throw damaged("holds instance \(u64(0)), past 2^63-1") }
        self.init(id: InstanceID(u64(0)), current: u64(8), pending: (0..<count).map { u64(17 + 8 * $0) })
    }

    /// A claim value: random in 1...2^63-1.
    static func newClaim() -> UInt64 {
        var rng = SystemRandomNumberGenerator()
        return UInt64.random(in: 1...UInt64(Int64.max), using: &rng)
    }

    func store(in kv: any KVStore) throws {
        var batch = KVWriteBatch()
        batch.put(InstanceID.journalKey, encoded(), in: .journal)
        try kv.write(batch, sync: true)
    }

    /// The journal's instance record: read, or created and stored (synced) at the first open.
    /// A journal that has been used without one (an id ceiling or records are there) was
    /// written before instance ids existed: it is the ``InstanceID/legacy`` instance.
    static func load(from kv: any KVStore, journal: [(key: Bytes, value: Bytes)]) throws -> InstanceRecord {
        if let raw = journal.first(where: { $0.key == InstanceID.journalKey })?.value { return try InstanceRecord(decoding: raw) }
        let used = journal.contains { $0.key == IDLease.ceilingKey || JournalRecord.saga(fromKey: $0.key) != nil }
        let record = InstanceRecord(id: used ? .legacy : .random(), current: newClaim(), pending: [])
        try record.store(in: kv)
        return record
    }
}
