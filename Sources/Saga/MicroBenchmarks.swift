/// Entry points for the micro-benchmarks of `Benchmarks/` (a package of its own, so that the
/// library keeps its few dependencies): the coordinator's hot pieces, which are internal, run
/// once per call. Not API: `@_spi(Benchmarks) import Saga` only.
@_spi(Benchmarks) public enum MicroBenchmarks {
    /// A lock table: every key of `keys` locked for one saga, then released.
    public final class Locks: @unchecked Sendable {
        private let locks = KeyLocks()
        public init() {}
        public func lockAndRelease(_ keys: [Bytes], saga: UInt64) throws {
            let id = SagaID(saga)
            for k in keys { try locks.lock(k, for: id, timeout: .seconds(1)) }
            locks.releaseAll(id)
        }
    }

    /// A prepared record of `keys` (pre-image: the key, after-image: the key reversed), encoded.
    public static func encodedRecord(_ keys: [Bytes], saga: UInt64) -> Bytes {
        JournalRecord(saga: SagaID(saga), state: .prepared,
                      entries: keys.map { JournalRecord.Entry(key: $0, preImage: $0, afterImage: $0.reversed()) },
                      session: SQLSession(id: 7, serverStart: 1, client: 2)).encoded()
    }

    /// Decodes a record; returns its entry count.
    public static func decodeRecord(_ bytes: Bytes) throws -> Int {
        try JournalRecord(decoding: bytes).entries.count
    }

    /// Inserts every key into a dictionary and reads it back, keyed the way the coordinator
    /// keys its locks and staged writes (`hashed`) or as plain `[UInt8]`.
    public static func dictionaryRoundTrip(_ keys: [Bytes], hashed: Bool) -> Int {
        var n = 0
        if hashed {
            var d: [HashedBytes: Int] = [:]
            for (i, k) in keys.enumerated() { d[HashedBytes(k)] = i }
            for k in keys { n &+= d[HashedBytes(k)] ?? 0 }
        } else {
            var d: [Bytes: Int] = [:]
            for (i, k) in keys.enumerated() { d[k] = i }
            for k in keys { n &+= d[k] ?? 0 }
        }
        return n
    }

    /// The marker statements for a table in SQLite's or MySQL's dialect (built once per
    /// coordinator), and the id lists GC binds (`ids` sagas, padded to the list sizes).
    public static func markerStatements(mysql: Bool, ids: Int) -> Int {
        let statements = MarkerTable.Statements(for: StatementsOnly(mysql: mysql))
        let chunks = MarkerTable.Statements.chunks((1...UInt64(max(1, ids))).map(SagaID.init(rawValue:)))
        return statements.table.count + chunks.count
    }

    /// Only what `MarkerTable.Statements` reads: the table name and the dialect.
    private final class StatementsOnly: SQLDatabase, Sendable {
        let dialect: SQLDialect
        let markerTable = "saga_markers"
        init(mysql: Bool) {
            dialect = SQLDialect(insertIgnore: mysql ? "INSERT IGNORE" : "INSERT OR IGNORE", lockingRead: mysql ? " LOCK IN SHARE MODE" : "",
                                 isNotNullViolation: { _ in false })
        }
        func connect() throws -> any SQLConnection { throw Unsupported() }
        func connect(replacing failed: any SQLConnection) throws -> any SQLConnection { throw Unsupported() }
        func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { nil }
        struct Unsupported: Error {}
    }
}
