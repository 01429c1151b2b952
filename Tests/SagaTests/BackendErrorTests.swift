import Foundation
import RocksDBBackend
import Saga
import SQLiteBackend
import Testing

@Suite("Backend errors name the problem")
struct BackendErrorTests {
    @Test func lockedRocksDBDirectory() throws {
        let dir = try SQLiteEnvironment.makeTempDir("locked")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let first = try RocksDBStore(path: dir)
        defer { first.close() }
        let error = #expect(throws: RocksDBError.self) { try RocksDBStore(path: dir) }
        #expect(error?.isLocked == true)
        #expect(error.map { "\($0)" }?.contains("locked") == true)
    }

    @Test func rocksDBPathThatIsAFile() throws {
        let dir = try SQLiteEnvironment.makeTempDir("file")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/not-a-dir"
        _ = FileManager.default.createFile(atPath: path, contents: Data("hello".utf8))
        let error = #expect(throws: RocksDBError.self) { try RocksDBStore(path: path) }
        #expect(error.map { "\($0)" }?.contains(path) == true)
    }

    @Test func closedRocksDBRefusesCalls() throws {
        let dir = try SQLiteEnvironment.makeTempDir("closed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let store = try RocksDBStore(path: dir)
        store.close()
        store.close()  // idempotent
        #expect(throws: RocksDBError.self) { try store.get(Bytes("k".utf8)) }
        #expect(throws: RocksDBError.self) { try store.write(KVWriteBatch(), sync: true) }
    }

    @Test func sqliteFileThatIsNotADatabase() throws {
        let dir = try SQLiteEnvironment.makeTempDir("notdb")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/garbage.sqlite"
        _ = FileManager.default.createFile(atPath: path, contents: Data(repeating: 0x41, count: 4096))
        let error = #expect(throws: SQLiteError.self) { try SQLiteDatabase(path: path) }
        #expect(error?.extendedCode == 26, "SQLITE_NOTADB")
    }

    @Test func sqliteStatementsTakeBoundArgumentsOnly() throws {
        let dir = try SQLiteEnvironment.makeTempDir("args")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let db = try SQLiteDatabase(path: dir + "/db.sqlite")
        let conn = try db.openConnection()
        defer { conn.close() }
        try conn.execute("CREATE TABLE t (a TEXT)", [])
        let tricky = "x'); DROP TABLE t; --"
        try conn.execute("INSERT INTO t (a) VALUES (?)", [.text(tricky)])
        #expect(try conn.query("SELECT a FROM t", []).first?[0] == .text(tricky))
        #expect(throws: SQLiteUsageError.self) { try conn.execute("INSERT INTO t (a) VALUES (?)", []) }
        #expect(throws: SQLiteUsageError.self) { try conn.execute("DELETE FROM t; DELETE FROM t", []) }
        let error = #expect(throws: SQLiteError.self) { try conn.execute("INSERT INTO nope VALUES (1)", []) }
        #expect(error.map { "\($0)" }?.contains("no such table: nope") == true)
        #expect(throws: SQLiteUsageError.self) {
            var c = SQLiteDatabase.Configuration()
            c.markerTable = "markers; DROP TABLE t"
            _ = try SQLiteDatabase(path: dir + "/db.sqlite", configuration: c)
        }
    }
}
