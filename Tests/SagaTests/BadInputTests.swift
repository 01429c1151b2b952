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
            (SagaCoordinator.Configuration(gcThreshold: 0), "gcThreshold must be at least 1"),
            (SagaCoordinator.Configuration(lockTimeout: .zero), "lockTimeout must be positive"),
            (SagaCoordinator.Configuration(poolSize: -1), "poolSize must be 0 or more"),
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
        let holder = try db.openConnection()
        defer { holder.close() }
        try holder.begin()  // BEGIN IMMEDIATE: holds the write lock
        let c = try SagaCoordinator(kv: env.kv, sql: db)
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
}
