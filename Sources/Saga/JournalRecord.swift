import Foundation

/// One record of the saga journal, kept in the KV store's journal space under
/// ``JournalRecord/key(for:)``. The format is documented in the README ("Journal format").
///
///     offset  size  field
///     0       1     magic 0x53 ('S')
///     1       1     format version: 1, or 2 for a prepared record that names its SQL session,
///                   or 3 for a prepared record that carries when it was prepared (this build
///                   writes 3 for every prepared record; 1 and 2 are still read)
///     2       1     state: 1 prepared, 2 committed, 3 compensated, 4 redo (redo mode's
///                   after-images: only in the saga's marker row, never in the journal)
///     3       8     saga id, big-endian
///     11      24    version 2 only: the SQL session, u64 id, u64 server start, u64 client
///     11      1     version 3 only: flags, bit 0 a session follows, bit 1 a caller key follows
///     12      8     version 3 only: when the record was prepared, u64 milliseconds since 1970
///     20      24    version 3, flag bit 0: the SQL session, as in version 2
///     ...     ...   version 3, flag bit 1: the caller's key, u32 length, bytes
///     ...     ...   prepared and redo only: u32 entry count, then per entry
///                   u32 key length, key, pre-image, after-image;
///                   an image is 0x00 (absent) or 0x01, u32 length, bytes
///     end-4   4     CRC-32C of every byte before it, big-endian
package struct JournalRecord: Sendable, Equatable {
    package enum State: UInt8, Sendable {
        case prepared = 1, committed = 2, compensated = 3, redo = 4
        /// Whether records in this state carry their entries.
        var hasEntries: Bool { self == .prepared || self == .redo }
    }

    /// A key the saga wrote: its bytes before the saga and the bytes the saga wrote.
    package struct Entry: Sendable, Equatable {
        package let key: Bytes
        package let preImage: Bytes?
        package let afterImage: Bytes?
        package init(key: Bytes, preImage: Bytes?, afterImage: Bytes?) {
            self.key = key; self.preImage = preImage; self.afterImage = afterImage
        }
    }

    package static let magic: UInt8 = 0x53
    /// The format version of records without a session; ``sessionVersion`` for those with one.
    package static let version: UInt8 = 1
    package static let sessionVersion: UInt8 = 2
    /// The format version of prepared records that carry ``preparedAt`` (and a caller key).
    package static let stampedVersion: UInt8 = 3

    package let saga: SagaID
    package let state: State
    /// Empty for `committed` and `compensated`: a finished saga needs no images.
    package let entries: [Entry]
    /// The SQL session the saga's transaction ran in (`prepared` records only): it must be
    /// seen gone before recovery decides the saga. nil where the database has none to name.
    package let session: SQLSession?
    /// When the record was prepared, in milliseconds since 1970 (`prepared` records of format
    /// version 3): how long a saga has been in doubt. nil in records of versions 1 and 2.
    package let preparedAt: UInt64?
    /// The caller's key the saga ran with (`run(key:)`), so that an undecided saga's key is
    /// known to be undecided. `prepared` records of format version 3 only.
    package let callerKey: Bytes?

    package init(saga: SagaID, state: State, entries: [Entry] = [], session: SQLSession? = nil, preparedAt: UInt64? = nil, callerKey: Bytes? = nil) {
        self.saga = saga; self.state = state; self.entries = entries
        let prepared = state == .prepared
        self.session = prepared ? session : nil
        // A caller key needs the version-3 layout, which always carries the time.
        self.preparedAt = prepared ? (preparedAt ?? (callerKey == nil ? nil : 0)) : nil
        self.callerKey = prepared ? callerKey : nil
    }

    /// Milliseconds since 1970, now: a prepared record's ``preparedAt``.
    package static func now() -> UInt64 {
        UInt64(max(0, Date().timeIntervalSince1970 * 1000))
    }

    // MARK: Keys of the journal space

    /// Record keys: `'r'` + the saga id, big-endian, so records iterate in id order.
    package static func key(for saga: SagaID) -> Bytes {
        var k: Bytes = [0x72]
        k.appendBigEndian(saga.rawValue)
        return k
    }
    /// The saga id a record key names, or nil if the key is not a record key.
    package static func saga(fromKey key: Bytes) -> SagaID? {
        guard key.count == 9, key[0] == 0x72 else { return nil }
        var r = ByteReader(key[1...])
        return (try? r.u64()).map(SagaID.init(rawValue:))
    }

    // MARK: Encoding

    package func encoded() -> Bytes {
        var out: Bytes = []
        out.reserveCapacity(32 + entries.reduce(0) { $0 + 16 + $1.key.count + ($1.preImage?.count ?? 0) + ($1.afterImage?.count ?? 0) })
        out.append(Self.magic)
        out.append(preparedAt != nil ? Self.stampedVersion : session == nil ? Self.version : Self.sessionVersion)
        out.append(state.rawValue)
        out.appendBigEndian(saga.rawValue)
        if let preparedAt {
            out.append((session == nil ? 0 : 1) | (callerKey == nil ? 0 : 2))
            out.appendBigEndian(preparedAt)
        }
        if let session {
            out.appendBigEndian(session.id)
            out.appendBigEndian(session.serverStart)
            out.appendBigEndian(session.client)
        }
        if let callerKey {
            out.appendBigEndian(UInt32(callerKey.count))
            out.append(contentsOf: callerKey)
        }
        if state.hasEntries {
            out.appendBigEndian(UInt32(entries.count))
            for e in entries {
                out.appendBigEndian(UInt32(e.key.count))
                out.append(contentsOf: e.key)
                Self.appendImage(e.preImage, to: &out)
                Self.appendImage(e.afterImage, to: &out)
            }
        }
        out.appendBigEndian(CRC32C.checksum(out))
        return out
    }

    private static func appendImage(_ image: Bytes?, to out: inout Bytes) {
        guard let image else { out.append(0); return }
        out.append(1)
        out.appendBigEndian(UInt32(image.count))
        out.append(contentsOf: image)
    }

    /// Why a record could not be decoded.
    package struct DecodingError: Error, CustomStringConvertible, Sendable {
        package let reason: String
        package var description: String { reason }
    }

    package init(decoding bytes: Bytes) throws(DecodingError) {
        guard bytes.count >= 15 else { throw DecodingError(reason: "record of \(bytes.count) bytes is shorter than the 15-byte minimum") }
        let body = bytes[..<(bytes.count - 4)]
        var trailer = ByteReader(bytes[(bytes.count - 4)...])
        let stored = try trailer.u32()
        let computed = CRC32C.checksum(body)
        guard stored == computed else {
            throw DecodingError(reason: "checksum mismatch (stored \(stored), computed \(computed))")
        }
        var r = ByteReader(body)
        guard try r.u8() == Self.magic else { throw DecodingError(reason: "bad magic byte") }
        let version = try r.u8()
        guard (Self.version...Self.stampedVersion).contains(version) else {
            throw DecodingError(reason: "unknown format version \(version) (this build reads \(Self.version) to \(Self.stampedVersion))")
        }
        let rawState = try r.u8()
        guard let state = State(rawValue: rawState) else { throw DecodingError(reason: "unknown state \(rawState)") }
        let saga = SagaID(try r.u64())
        var session: SQLSession?
        var preparedAt: UInt64?
        var callerKey: Bytes?
        var hasSession = version == Self.sessionVersion
        if version == Self.stampedVersion {
            guard state == .prepared else { throw DecodingError(reason: "a \(state) record of version \(version): only prepared records carry a time") }
            let flags = try r.u8()
            guard flags & ~3 == 0 else { throw DecodingError(reason: "unknown flags \(flags)") }
            hasSession = flags & 1 != 0
            preparedAt = try r.u64()
            if flags & 2 != 0 { callerKey = [] }
        }
        if hasSession {
            guard state == .prepared else { throw DecodingError(reason: "a \(state) record of version \(version): only prepared records name a session") }
            session = SQLSession(id: try r.u64(), serverStart: try r.u64(), client: try r.u64())
        }
        if callerKey != nil { callerKey = try r.bytes(Int(try r.u32())) }
        var entries: [Entry] = []
        if state.hasEntries {
            let count = try r.u32()
            // Every entry takes at least 6 bytes: refuse counts the record cannot hold.
            guard Int(count) <= r.remaining / 6 else { throw DecodingError(reason: "entry count \(count) exceeds the record size") }
            entries.reserveCapacity(Int(count))
            var seen: Set<Bytes> = []
            for _ in 0..<count {
                let key = try r.bytes(Int(try r.u32()))
                // A saga stages each key once; two images for one key cannot be undone safely.
                guard seen.insert(key).inserted else { throw DecodingError(reason: "duplicate key \"\(key.debugText)\" in the record") }
                let pre = try Self.readImage(&r)
                let post = try Self.readImage(&r)
                entries.append(Entry(key: key, preImage: pre, afterImage: post))
            }
        }
        guard r.remaining == 0 else { throw DecodingError(reason: "\(r.remaining) trailing bytes") }
        self.init(saga: saga, state: state, entries: entries, session: session, preparedAt: preparedAt, callerKey: callerKey)
    }

    private static func readImage(_ r: inout ByteReader) throws(DecodingError) -> Bytes? {
        switch try r.u8() {
        case 0: return nil
        case 1: return try r.bytes(Int(try r.u32()))
        case let t: throw DecodingError(reason: "bad image tag \(t)")
        }
    }
}

/// Reads big-endian integers and byte runs, refusing to read past the end.
struct ByteReader {
    private let data: ArraySlice<UInt8>
    private var position: Int

    init(_ data: ArraySlice<UInt8>) { self.data = data; self.position = data.startIndex }
    var remaining: Int { data.endIndex - position }

    mutating func bytes(_ n: Int) throws(JournalRecord.DecodingError) -> Bytes {
        guard n >= 0, n <= remaining else { throw .init(reason: "truncated: wanted \(n) bytes, \(remaining) left") }
        defer { position += n }
        return Bytes(data[position..<(position + n)])
    }
    mutating func u8() throws(JournalRecord.DecodingError) -> UInt8 { try bytes(1)[0] }
    mutating func u32() throws(JournalRecord.DecodingError) -> UInt32 {
        try bytes(4).reduce(0) { $0 << 8 | UInt32($1) }
    }
    mutating func u64() throws(JournalRecord.DecodingError) -> UInt64 {
        try bytes(8).reduce(0) { $0 << 8 | UInt64($1) }
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian<T: FixedWidthInteger>(_ value: T) {
        var v = value.bigEndian
        Swift.withUnsafeBytes(of: &v) { append(contentsOf: $0) }
    }
}
