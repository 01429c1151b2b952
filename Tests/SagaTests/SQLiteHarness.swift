import SagaFaultKit
import Foundation
import RocksDBBackend
import CSQLite
@testable import Saga
import SagaTestKit
import SQLiteBackend

/// RocksDB + SQLite, both real, in a fresh temporary directory.
struct SQLiteHarness: SagaHarness {
    var name: String { "rocksdb+sqlite" }
    func makeEnvironment() throws -> any HarnessEnvironment { try SQLiteEnvironment() }
}

/// `@unchecked Sendable`: the stores are thread-safe; `reopen()` swaps them only while no saga runs.
final class SQLiteEnvironment: HarnessEnvironment, @unchecked Sendable {
    let dir: String
    private(set) var rocks: RocksDBStore
    private(set) var sqlite: SQLiteDatabase
    var kv: any KVStore { rocks }
    var sql: any SQLDatabase { sqlite }
    var serializesWriters: Bool { true }

    static func makeTempDir(_ tag: String = "saga") throws -> String {
        let dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("\(tag)-\(getpid())-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    var sqlitePath: String { dir + "/db.sqlite" }

    init() throws {
        dir = try Self.makeTempDir()
        try SQLiteFaults.register()
        (rocks, sqlite) = try Self.open(dir)
        let conn = try sqlite.openConnection()
        defer { conn.close() }
        try conn.execute(conformanceTableDDL, [])
        try conn.execute("CREATE TABLE fault_parent (id TEXT PRIMARY KEY)", [])
        try conn.execute("CREATE TABLE fault_probe (ref TEXT REFERENCES fault_parent(id) DEFERRABLE INITIALLY DEFERRED)", [])
    }

    private static func open(_ dir: String) throws -> (RocksDBStore, SQLiteDatabase) {
        var config = SQLiteDatabase.Configuration()
        config.vfs = SQLiteFaults.vfsName
        return (try RocksDBStore(path: dir + "/kv"), try SQLiteDatabase(path: dir + "/db.sqlite", configuration: config))
    }

    func reopen() throws {
        rocks.close()
        (rocks, sqlite) = try Self.open(dir)
    }

    /// A deferred foreign key violated at COMMIT: SQLite returns 787 and keeps the transaction
    /// open, which proves it did not commit.
    func arrangeCommitFailure(in saga: Saga) throws {
        try saga.sql.execute("INSERT INTO fault_probe (ref) VALUES ('no-such-parent')", [])
    }

    func endTransactionUnseen(in saga: Saga) throws {
        guard let conn = saga.connection as? SQLiteConnection, let handle = conn.sqliteHandle else {
            throw SQLiteError(code: SQLITE_MISUSE, message: "not an open SQLite connection")
        }
        let rc = sqlite3_exec(handle, "COMMIT", nil, nil, nil)
        guard rc == SQLITE_OK else { throw SQLiteError(code: rc, message: "raw COMMIT failed") }
    }

    /// An fsync failure of this database, injected through the fault VFS right before COMMIT:
    /// SQLite rolls back by itself and reports SQLITE_IOERR_FSYNC, so the outcome is unknown.
    func unknownCommitHooks() -> any SagaHooks { FailSyncAtCommit(pathPrefix: sqlitePath) }

    func destroy() {
        rocks.close()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

/// Arms the fault VFS to fail the next fsync of one database when a saga reaches COMMIT.
struct FailSyncAtCommit: SagaHooks {
    let pathPrefix: String
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == .commit, phase == .run { SQLiteFaults.arm(.sync, pathPrefix: pathPrefix) }
    }
}
