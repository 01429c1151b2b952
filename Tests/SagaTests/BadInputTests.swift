import Foundation
import MySQLBackend
import RocksDBBackend
@testable import Saga
import SagaTestKit
import SQLiteBackend
import Testing

/// Bad input at every public entry point: each gives an error that names the problem, and
/// nothing is written anywhere, not even the valid writes the same saga made before it.
@Suite("Bad input is refused and writes nothing")
struct BadInputTests {
    struct BadCall: Sendable, CustomStringConvertible {
        let description: String
        let expected: SagaError.Misuse
        let message: String
        let call: @Sendable (Saga) throws -> Void
    }

    static let reserved: Bytes = [0x00, 0x73, 0x61, 0x67, 0x61, 0x00] + Bytes("r:1".utf8)
    static let calls: [BadCall] = [
        BadCall(description: "put with an empty key", expected: .emptyKey, message: "empty key") { try $0.kv.put(Bytes(), Bytes("v".utf8)) },
        BadCall(description: "get with an empty key", expected: .emptyKey, message: "empty key") { _ = try $0.kv.get(Bytes()) },
        BadCall(description: "delete with an empty key", expected: .emptyKey, message: "empty key") { try $0.kv.delete(Bytes()) },
        BadCall(description: "put into the journal's reserved space", expected: .reservedKey(reserved), message: "reserved journal space") { try $0.kv.put(reserved, Bytes("v".utf8)) },
        BadCall(description: "get from the reserved space", expected: .reservedKey(reserved), message: "reserved journal space") { _ = try $0.kv.get(reserved) },
        BadCall(description: "delete in the reserved space", expected: .reservedKey(reserved), message: "reserved journal space") { try $0.kv.delete(reserved) },
        BadCall(description: "a key one byte over the limit", expected: .keyTooLarge(size: 16_385, limit: 16_384), message: "16385 bytes is over the limit of 16384") {
            try $0.kv.put(Bytes(repeating: 0x6B, count: 16_385), Bytes("v".utf8))
        },
        BadCall(description: "a value one byte over the limit", expected: .valueTooLarge(size: 16 << 20 + 1, limit: 16 << 20), message: "over the limit") {
            try $0.kv.put("big", String(repeating: "v", count: 16 << 20 + 1))
        },
    ]

    @Test(arguments: calls)
    func badCallInsideASagaWritesNothing(_ bad: BadCall) throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                // Valid writes first: the bad call must take them down with it.
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('good', 1)", [])
                try saga.kv.put("good", "x")
                try bad.call(saga)
            }
        }
        guard case .misuse(let m) = error, m == bad.expected else { Issue.record("\(bad): expected \(bad.expected), got \(error)"); return }
        #expect("\(error)".contains(bad.message), "the message names the problem: \(error)")
        #expect(try env.row("good") == nil, "SQL rolled back")
        #expect(try env.kvGet("good") == nil && env.kvGet("big") == nil, "KV untouched")
        #expect(try env.journal().isEmpty && env.markers().isEmpty, "no journal record, no marker")
        // The coordinator goes on.
        try c.run { saga in try saga.kv.put("after", "ok") }
        #expect(try env.kvGet("after") == "ok")
    }

    @Test func aKeyWrittenTwiceIsOneJournalEntryAndUndoesCleanly() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("dup", "d0")])
        let c = try env.coordinator()
        try c.run { saga in
            try saga.kv.put("dup", "d1")
            try saga.kv.delete("dup")
            try saga.kv.put("dup", "d2")
        }
        #expect(try env.kvGet("dup") == "d2", "the last write wins")
        // The same, with a COMMIT that fails: the one pre-image comes back (no foreign write).
        let error = try expectSagaError {
            try c.run { saga in
                try saga.kv.put("dup", "d3")
                try saga.kv.put("dup", "d4")
                try env.arrangeCommitFailure(in: saga)
            }
        }
        guard case .commitFailed(_, _, let restored) = error else { Issue.record("expected commitFailed, got \(error)"); return }
        #expect(restored == 1)
        #expect(try env.kvGet("dup") == "d2")
    }

    @Test func aJournalRecordWithADuplicateKeyIsRefused() throws {
        let record = JournalRecord(saga: SagaID(5), state: .prepared, entries: [
            .init(key: Bytes("k".utf8), preImage: Bytes("a".utf8), afterImage: Bytes("b".utf8)),
            .init(key: Bytes("k".utf8), preImage: Bytes("b".utf8), afterImage: Bytes("c".utf8)),
        ])
        let error = #expect(throws: JournalRecord.DecodingError.self) { try JournalRecord(decoding: record.encoded()) }
        #expect(error?.reason.contains("duplicate key \"k\"") == true)
    }

    @Test func aClosedKVStoreFailsTheSagaAndCommitsNothing() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        env.rocks.close()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('c', 1)", [])
                try saga.kv.put("c", "x")
            }
        }
        #expect("\(error)".contains("closed"), "names the closed store: \(error)")
        #expect(try env.row("c") == nil, "SQL rolled back")
    }

    @Test func invalidConfigurationIsNamed() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        for (config, words) in [
            (SagaCoordinator.Configuration(gcThreshold: 0), "gcThreshold must be between 1 and"),
            (SagaCoordinator.Configuration(gcThreshold: Int.max), "gcThreshold must be between 1 and"),
            (SagaCoordinator.Configuration(lockTimeout: .zero), "lockTimeout must be positive"),
            // Accepted before, and the first lock wait crashed inside NSCondition.wait(until:).
            (SagaCoordinator.Configuration(lockTimeout: .seconds(10_000_000_000)), "lockTimeout must be positive and at most"),
            (SagaCoordinator.Configuration(poolSize: -1), "poolSize must be between 0 and"),
            (SagaCoordinator.Configuration(maxRecordSize: 5 << 30), "maxRecordSize must be between"),
        ] {
            let error = try expectSagaError { try env.coordinator(config) }
            guard case .misuse(.invalidConfiguration) = error else { Issue.record("got \(error)"); continue }
            #expect("\(error)".contains(words), "\(error)")
        }
    }

    @Test func sqlitePathsThatCannotBeOpenedAreNamed() throws {
        let dir = try SQLiteEnvironment.makeTempDir("badpath")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let missing = dir + "/no/such/dir/db.sqlite"
        let error = #expect(throws: SQLiteError.self) { try SQLiteDatabase(path: missing).openConnection() }
        #expect(error?.primaryCode == 14, "SQLITE_CANTOPEN")
        #expect(error.map { "\($0)" }?.contains(missing) == true, "names the path: \(String(describing: error))")
        #expect(!FileManager.default.fileExists(atPath: dir + "/no"), "created nothing")
    }

    @Test func aLockedSQLiteDatabaseFailsTheSagaCleanly() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        var config = SQLiteDatabase.Configuration()
        config.busyTimeout = .milliseconds(100)
        let db = try SQLiteDatabase(path: env.sqlitePath, configuration: config)
        // Opening claims the instance (a write): before the holder takes the lock.
        let c = try SagaCoordinator(kv: env.kv, sql: db)
        let holder = try db.openConnection()
        defer { holder.close() }
        try holder.begin()  // BEGIN IMMEDIATE: holds the write lock
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('busy', 1)", [])
                try saga.kv.put("busy", "x")
            }
        }
        guard case .sqlFailed(_, .begin, let underlying) = error else { Issue.record("expected sqlFailed at begin, got \(error)"); return }
        #expect("\(underlying)".contains("locked"), "\(underlying)")
        try holder.rollback()
        #expect(try env.row("busy") == nil && env.kvGet("busy") == nil)
    }

    @Test func badMySQLURLsAreNamed() {
        let cases: [(String, String)] = [
            ("postgres://u:p@h/db", "the scheme must be mysql://"),
            ("mysql://u:p@h:3306/", "no database name"),
            ("mysql://:p@h/db", "no user"),
            ("mysql://u:p@h:70000/db", "out of range"),
            ("mysql://u:p@localhost/db?socket=", "empty socket path"),
        ]
        for (url, words) in cases {
            let error = #expect(throws: MySQLUsageError.self) { try MySQLURL(url) }
            #expect(error.map { "\($0)" }?.contains(words) == true, "\(url): \(String(describing: error))")
            #expect(error.map { "\($0)" }?.contains(":p@") == false, "the password is not echoed")
        }
    }

    /// synchronous=NORMAL in WAL mode skips the fsync at COMMIT: a power cut can take back an
    /// acknowledged COMMIT, and recovery would then undo a saga reported committed.
    @Test func sqliteSynchronousNormalIsRefused() throws {
        let dir = try SQLiteEnvironment.makeTempDir("sync")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var config = SQLiteDatabase.Configuration()
        config.synchronous = .normal
        let error = #expect(throws: SQLiteUsageError.self) { try SQLiteDatabase(path: dir + "/db.sqlite", configuration: config) }
        #expect(error.map { "\($0)" }?.contains("synchronous NORMAL can lose an acknowledged COMMIT") == true, "\(String(describing: error))")
        #expect(!FileManager.default.fileExists(atPath: dir + "/db.sqlite"), "created nothing")
    }

    /// A busy timeout SQLite cannot take (over Int32.max ms, about 24.8 days) crashed at connect.
    @Test func backendTimeoutsOutOfRangeAreNamed() throws {
        let dir = try SQLiteEnvironment.makeTempDir("busy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for timeout in [Duration.seconds(30 * 24 * 3600), .milliseconds(-1), .seconds(Int64.max / 100)] {
            var config = SQLiteDatabase.Configuration()
            config.busyTimeout = timeout
            let error = #expect(throws: SQLiteUsageError.self) { try SQLiteDatabase(path: dir + "/db.sqlite", configuration: config) }
            #expect(error.map { "\($0)" }?.contains("busyTimeout must be between 0 and") == true, "\(String(describing: error))")
        }
        for (connect, read) in [(Duration.milliseconds(500), Duration.seconds(5)), (.seconds(5), .seconds(Int64(UInt32.max) + 10)), (.seconds(5), .milliseconds(1500))] {
            var config = MySQLDatabase.Configuration()
            config.connectTimeout = connect
            config.readTimeout = read
            let error = #expect(throws: MySQLUsageError.self) { try MySQLDatabase(url: "mysql://u:p@127.0.0.1:1/db", configuration: config) }
            #expect(error.map { "\($0)" }?.contains("must be between 1 s and 24 h in whole seconds") == true, "\(String(describing: error))")
        }
    }

    /// A saga whose journal record would be over the limit is refused at prepare: nothing is
    /// written, not even its valid writes. (RocksDB drops a record of 4 GiB or more from the
    /// batch without an error: the forward writes would land without their undo record.)
    /// In redo mode the limit is the redo row's: refused before its sequence or COMMIT.
    @Test(arguments: SagaCoordinator.Configuration.Mode.allCases)
    func aSagaOverTheRecordLimitWritesNothing(_ mode: SagaCoordinator.Configuration.Mode) throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("old0", "x")])
        let c = try env.coordinator(.init(lockTimeout: .milliseconds(200), maxRecordSize: 64 << 10, mode: mode))
        let value = String(repeating: "v", count: 20 << 10)
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('big', 1)", [])
                try saga.kv.delete("old0")
                for i in 0..<4 { try saga.kv.put("big\(i)", value) }
            }
        }
        guard case .misuse(.sagaTooLarge(let size, 65_536)) = error, size > 80 << 10 else { Issue.record("expected sagaTooLarge, got \(error)"); return }
        #expect("\(error)".contains("over the limit of 65536 bytes"), "\(error)")
        #expect(try env.row("big") == nil && env.kvGet("big0") == nil && env.kvGet("old0") == "x", "nothing written")
        #expect(try env.journal().isEmpty && env.markers().isEmpty)
        try c.run { saga in try saga.kv.put("big0", "small") }  // locks released
        #expect(try env.kvGet("big0") == "small")
    }

    /// The RocksDB C API throws away the status of a refused put (a value of 4 GiB or more):
    /// the store must refuse the whole batch rather than write it without that operation.
    @Test func aRocksDBBatchMissingAnOperationIsNotWritten() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let size = Int(UInt32.max) + 1
        // Never touched: RocksDB checks the length before it copies anything, so the pages of
        // this allocation are never faulted in.
        let huge = Bytes(unsafeUninitializedCapacity: size) { _, count in count = size }
        var batch = KVWriteBatch()
        batch.put(Bytes("before".utf8), Bytes("1".utf8))
        batch.put(Bytes("huge".utf8), huge)
        batch.put(Bytes("record".utf8), Bytes("2".utf8), in: .journal)
        let error = #expect(throws: RocksDBError.self) { try env.kv.write(batch, sync: true) }
        #expect(error.map { "\($0)" }?.contains("holds 2 of its 3 operations") == true, "\(String(describing: error))")
        #expect(try env.kvGet("before") == nil && env.kv.journalGet(Bytes("record".utf8)) == nil, "nothing written")
    }

    /// Ids at the edge of the range are damage, reported as such, never a crash at open.
    @Test func sagaIDsOutOfRangeAreReportedAsDamage() throws {
        do {
            let env = try SQLiteEnvironment()
            defer { env.destroy() }
            var batch = KVWriteBatch()
            batch.put(JournalRecord.key(for: SagaID(UInt64.max)), JournalRecord(saga: SagaID(UInt64.max), state: .compensated).encoded(), in: .journal)
            try env.kv.write(batch, sync: true)
            let error = try expectSagaError { try env.coordinator() }
            guard case .journalCorrupt = error else { Issue.record("expected journalCorrupt, got \(error)"); return }
            #expect("\(error)".contains("18446744073709551615"), "\(error)")
        }
        do {
            let env = try SQLiteEnvironment()
            defer { env.destroy() }
            try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, -1, 'committed')", [.integer(Int64(try SagaCoordinator.instance(in: env.kv).rawValue))])
            let error = try expectSagaError { try env.coordinator() }
            #expect("\(error)".contains("holds saga id -1, outside 1...9223372036854775807"), "\(error)")
        }
        do {
            // The last id a marker can name leaves no id to hand out: refused, not wrapped.
            let env = try SQLiteEnvironment()
            defer { env.destroy() }
            try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, ?, 'committed')", [.integer(Int64(try SagaCoordinator.instance(in: env.kv).rawValue)), .integer(Int64.max)])
            let error = try expectSagaError { try env.coordinator() }
            #expect("\(error)".contains("exhausted"), "\(error)")
        }
    }

    /// The id ceiling carries a checksum: a flipped bit is damage, not a new ceiling.
    @Test func aDamagedIDCeilingIsReported() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        _ = try env.coordinator()
        var raw = try #require(try env.kv.journalGet(IDLease.ceilingKey))
        #expect(raw.count == 12, "ceiling and CRC-32C")
        raw[3] ^= 0x10
        var batch = KVWriteBatch()
        batch.put(IDLease.ceilingKey, raw, in: .journal)
        try env.kv.write(batch, sync: true)
        let error = try expectSagaError { try env.coordinator() }
        guard case .journalCorrupt(_, _, let reason) = error else { Issue.record("expected journalCorrupt, got \(error)"); return }
        #expect(reason.contains("checksum"), "\(reason)")
        // The 8-byte form of earlier versions is still read.
        var legacy = KVWriteBatch()
        legacy.put(IDLease.ceilingKey, [0, 0, 0, 0, 0, 1, 0, 0], in: .journal)
        try env.kv.write(legacy, sync: true)
        let c = try env.coordinator()
        #expect(try c.run { $0.id }.rawValue >= 65_536)
    }

    /// When the marker-table check fails at open, the connection taken for it is closed, not
    /// leaked.
    @Test func aFailedOpenClosesItsConnection() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        // A marker table that is not Saga's: reading the largest id fails.
        try env.sqlExecute("DROP TABLE saga_markers")
        try env.sqlExecute("CREATE TABLE saga_markers (something_else INTEGER)")
        let counting = OpenConnectionCounter(env.sqlite)
        let error = try expectSagaError { try SagaCoordinator(kv: env.kv, sql: counting) }
        #expect("\(error)".contains("saga_id"), "\(error)")
        #expect(counting.opened >= 1 && counting.open == 0, "every connection closed: \(counting.open) of \(counting.opened) left open")
        // A check that fails after the connection went back to the pool: the pool is closed.
        try env.sqlExecute("DROP TABLE saga_markers")
        try env.sqlExecute("CREATE TABLE saga_markers (instance INTEGER, saga_id INTEGER, status TEXT, PRIMARY KEY (instance, saga_id))")
        try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, -1, 'committed')", [.integer(Int64(try SagaCoordinator.instance(in: env.kv).rawValue))])
        _ = try expectSagaError { try SagaCoordinator(kv: env.kv, sql: counting) }
        #expect(counting.open == 0, "every connection closed: \(counting.open) of \(counting.opened) left open")
    }
}

/// A real SQLite database whose connections are counted while open.
final class OpenConnectionCounter: SQLDatabase, @unchecked Sendable {
    private let base: SQLiteDatabase
    private let lock = NSLock()
    private var openCount = 0
    private var openedCount = 0
    private var stuckSessions: Set<SQLSession> = []
    init(_ base: SQLiteDatabase) { self.base = base }
    var markerTable: String { base.markerTable }
    var dialect: SQLDialect { base.dialect }
    func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { try base.holdInstance(instance) }
    /// Counted like every other connection (closes the failed one, opens a fresh one).
    func connect(replacing failed: any SQLConnection) throws -> any SQLConnection {
        failed.close()
        return try connect()
    }
    var open: Int { lock.withLock { openCount } }
    var opened: Int { lock.withLock { openedCount } }
    /// Sessions that `endSessions` reports still there (as a server would for a session that
    /// does not go after KILL).
    var stuck: Set<SQLSession> {
        get { lock.withLock { stuckSessions } }
        set { lock.withLock { stuckSessions = newValue } }
    }

    func connect() throws -> any SQLConnection {
        let conn = try base.openConnection()
        lock.withLock { openCount += 1; openedCount += 1 }
        return ReportingConnection(conn, stuck: { [weak self] in self?.stuck ?? [] }) { [weak self] in self?.lock.withLock { self?.openCount -= 1 } }
    }
}

/// Forwards every call to a real connection and reports its close, once.
final class ReportingConnection: SQLConnection {
    private let base: any SQLConnection
    private var onClose: (() -> Void)?
    private let stuck: () -> Set<SQLSession>
    init(_ base: any SQLConnection, stuck: @escaping () -> Set<SQLSession> = { [] }, onClose: @escaping () -> Void) {
        self.base = base; self.stuck = stuck; self.onClose = onClose
    }

    func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int { try base.execute(sql, arguments) }
    func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow] { try base.query(sql, arguments) }
    func ensureMarkerTable() throws { try base.ensureMarkerTable() }
    func begin() throws { try base.begin() }
    func rollback() throws { try base.rollback() }
    func commit() -> CommitResult { base.commit() }
    var isInTransaction: Bool { base.isInTransaction }
    var isBroken: Bool { base.isBroken }
    func transactionState(after error: any Error) -> TransactionState { base.transactionState(after: error) }
    func commit(afterRunning statement: String, _ arguments: [SQLValue]) -> CommitResult { base.commit(afterRunning: statement, arguments) }
    func markTransaction() throws { try base.markTransaction() }
    func transactionSurvived() -> Bool { base.transactionSurvived() }
    var session: SQLSession? { base.session }
    func endSessions(_ sessions: [SQLSession]) throws -> Set<SQLSession> { try base.endSessions(sessions).union(stuck().intersection(sessions)) }
    func isUsableAfterIdling() -> Bool { base.isUsableAfterIdling() }
    func close() {
        base.close()
        onClose?()
        onClose = nil
    }
}

/// A database of someone else's whose marker table name is not a plain identifier: the core
/// splices the name into SQL text, so it refuses the name before any statement runs.
@Suite("Bad input: a backend's marker table name")
struct MarkerTableNameTests {
    final class Renamed: SQLDatabase {
        let base: any SQLDatabase
        let markerTable: String
        init(_ base: any SQLDatabase, markerTable: String) { self.base = base; self.markerTable = markerTable }
        func connect() throws -> any SQLConnection { try base.connect() }
        func connect(replacing failed: any SQLConnection) throws -> any SQLConnection { try base.connect(replacing: failed) }
        func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { try base.holdInstance(instance) }
        var dialect: SQLDialect { base.dialect }
    }

    @Test(arguments: ["saga_markers; DROP TABLE saga_test", "", "1markers", "märker"])
    func aNameThatIsNotAPlainIdentifierIsRefused(_ name: String) throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let error = try expectSagaError { try SagaCoordinator(kv: env.kv, sql: Renamed(env.sql, markerTable: name)) }
        guard case .misuse(.invalidConfiguration(let why)) = error else { Issue.record("got \(error)"); return }
        #expect(why.contains("marker table name"), "\(why)")
        #expect(try env.sqlQuery("SELECT COUNT(*) FROM saga_test").first?[0].int64 == 0, "the test table is still there")
    }
}
