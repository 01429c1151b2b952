import Foundation
import MySQLBackend
import RocksDBBackend
import Saga
import SagaFaultKit
import SagaTestKit
import SQLiteBackend
import Testing

/// Instance ids (the Protocol article, "Many coordinators, one SQL database"): the migration of marker
/// tables written before them, and one coordinator per KV store.
@Suite("Many coordinators: instances and migration", .serialized)
struct ManyCoordinatorsTests {
    /// A marker table and a journal of an earlier version (markers keyed by `saga_id` alone,
    /// no instance record): the table migrates on open, the journal becomes the legacy
    /// instance and keeps deciding by its old rows; a new node on the same database gets an
    /// instance of its own and never touches them.
    @Test(arguments: ["sqlite", "mariadb"])
    func anOldMarkerTableMigratesAndKeepsDeciding(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let statusType = backend == "sqlite" ? "TEXT" : "ENUM('committed', 'aborted')"
        _ = try env.sqlExecute("DROP TABLE saga_markers")
        _ = try env.sqlExecute("CREATE TABLE saga_markers (saga_id BIGINT NOT NULL PRIMARY KEY, status \(statusType) NOT NULL)")
        // Saga 5 committed before the upgrade (its marker is there); saga 6 did not.
        _ = try env.sqlExecute("INSERT INTO saga_markers (saga_id, status) VALUES (5, 'committed'), (3, 'aborted')")
        try Self.leaveSagasFiveAndSixPrepared(env)

        try env.reopen()  // the SQL backend opens: the table migrates
        let rows = try env.sqlQuery("SELECT instance, saga_id, status FROM saga_markers ORDER BY saga_id")
        #expect(rows.map { "\($0[0])/\($0[1])/\($0[2])" } == ["0/3/'aborted'", "0/5/'committed'"], "old rows kept, instance 0: \(rows)")

        var c: SagaCoordinator? = try env.coordinator()
        #expect(c?.instance == .legacy, "a journal used before instance ids is the legacy instance")
        #expect(try env.kvGet("m5") == "after", "the committed saga's marker still decides it")
        #expect(try env.kvGet("m6") == "before", "the uncommitted one is undone")
        let next = try c?.run { saga in try saga.kv.put("n", "1"); return saga.id }
        #expect((next?.rawValue ?? 0) > 6, "ids go on past the old ones: \(String(describing: next))")

        // A second node on the same database: an instance of its own, nothing of the first touched.
        let dirB = try SQLiteEnvironment.makeTempDir("saga-node-b")
        defer { try? FileManager.default.removeItem(atPath: dirB) }
        let kvB = try RocksDBStore(path: dirB + "/kv")
        defer { kvB.close() }
        let b = try SagaCoordinator(kv: kvB, sql: env.sql, configuration: .init(gcThreshold: 1))
        #expect(b.instance != .legacy && b.instance != c?.instance)
        let idB = try b.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('b', 1)", [])
            try saga.kv.put("b", "1")
            return saga.id
        }
        #expect(idB == SagaID(1), "a fresh journal starts at 1 on a shared database: \(idB)")
        try b.collectGarbage()
        c = nil
        let left = try env.sqlQuery("SELECT instance, saga_id FROM saga_markers WHERE instance = 0").count
        #expect(left >= 1, "the first node's rows are still there after the second one opened, ran and collected")
        // The first node restarts: its committed saga is still committed.
        try env.reopen()
        c = try env.coordinator()
        #expect(try env.kvGet("m5") == "after")
        #expect(c?.inDoubt.isEmpty == true)
    }

    /// A marker table of the version before redo mode (instance, saga_id, status): the open adds
    /// the `seq` and `redo` columns, keeps every row, and a coordinator decides by them and
    /// runs in redo mode on the migrated table.
    @Test(arguments: ["sqlite", "mariadb"])
    func aTableBeforeRedoModeMigrates(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        let statusType = backend == "sqlite" ? "TEXT" : "ENUM('committed', 'aborted')"
        _ = try env.sqlExecute("DROP TABLE saga_markers")
        _ = try env.sqlExecute("CREATE TABLE saga_markers (instance BIGINT NOT NULL, saga_id BIGINT NOT NULL, status \(statusType) NOT NULL, PRIMARY KEY (instance, saga_id))")
        let instance = Int64(bitPattern: try SagaCoordinator.instance(in: env.kv).rawValue)
        _ = try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, 5, 'committed')", [.integer(instance)])
        try Self.leaveSagasFiveAndSixPrepared(env)
        try env.reopen()
        let c = try env.coordinator(.init(mode: .redo))
        #expect(try env.kvGet("m5") == "after", "the committed saga's marker still decides it")
        #expect(try env.kvGet("m6") == "before", "the uncommitted one is undone")
        try c.run { saga in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('r', 1)", [])
            try saga.kv.put("r", "1")
        }
        #expect(try env.kvGet("r") == "1" && env.row("r") == 1, "a redo saga commits on the migrated table")
        c.close()
    }

    /// Sagas 5 and 6 left `prepared` in the journal, as a crash leaves them: each wrote its key
    /// (`m5`, `m6`) from "before" to "after".
    static func leaveSagasFiveAndSixPrepared(_ env: any HarnessEnvironment) throws {
        var batch = KVWriteBatch()
        for (id, key) in [(5, "m5"), (6, "m6")] {
            let saga = SagaID(UInt64(id))
            batch.put(Bytes(key.utf8), Bytes("after".utf8))
            batch.put(JournalRecord.key(for: saga), JournalRecord(saga: saga, state: .prepared, entries: [
                .init(key: Bytes(key.utf8), preImage: Bytes("before".utf8), afterImage: Bytes("after".utf8)),
            ]).encoded(), in: .journal)
        }
        try env.kv.write(batch, sync: true)
    }

    /// One journal, one coordinator: a second coordinator on the same KV store is refused while
    /// the first is open, and allowed once it is closed. A second process is refused by RocksDB,
    /// with a message that says the store is in use.
    @Test func aSecondCoordinatorOnTheSameStoreIsRefused() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let first = try env.coordinator()
        let error = try expectSagaError { try env.coordinator() }
        guard case .misuse(.storeInUse) = error else { Issue.record("expected misuse(.storeInUse), got \(error)"); return }
        #expect("\(error)".contains("already has an open coordinator"), "\(error)")
        first.close()
        let second = try env.coordinator()
        #expect(second.instance == first.instance, "the instance is the journal's, kept across opens")
        // The RocksDB directory itself, opened again while open:
        #expect {
            _ = try RocksDBStore(path: env.dir + "/kv")
        } throws: { error in
            "\(error)".contains("locked by another process or store")
        }
    }

    /// Two processes on the same stores: while this process has a node's stores open, `aa-demo`
    /// on the same directory is refused at open with a message that says why, and writes
    /// nothing.
    @Test func aSecondProcessOnTheSameStoresIsRefused() throws {
        let node = try AADemoNode.sqlite("saga-two-procs")
        defer { node.destroy() }
        _ = try node.seedOnly()
        let kv = try RocksDBStore(path: node.dir + "/kv")
        defer { kv.close() }
        let sql = try SQLiteDatabase(path: node.dir + "/ledger.sqlite")
        let c = try SagaCoordinator(kv: kv, sql: sql)
        defer { c.close() }
        let queuedBefore = try node.queued()
        for command in [["recover"], node.runArguments()] {
            let r = try TimedDemo.run(command == ["recover"] ? ["recover"] + node.location : command, timeout: 60)
            #expect(r.exitCode == 1, "\(command[0]): \(r.tail)")
            #expect(r.stderr.contains("locked by another process or store"), "\(command[0]) names the reason: \(r.tail)")
        }
        #expect(try node.queued() == queuedBefore, "the refused process ran no trigger")
    }

    /// Recovery ends the sessions its sagas ran in, all at once, before it fences: a saga whose
    /// session cannot be seen gone stays in doubt (keys locked), and only that one: the others
    /// are decided at once; once the session has gone, `recover()` decides it too.
    @Test func aSessionThatWillNotGoHoldsOnlyItsOwnSagas() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let stuck = SQLSession(id: 7, serverStart: 1), gone = SQLSession(id: 8, serverStart: 1)
        var batch = KVWriteBatch()
        for (id, session) in [(1, stuck), (2, gone), (3, nil), (4, stuck)] as [(UInt64, SQLSession?)] {
            let key = Bytes("s\(id)".utf8)
            batch.put(key, Bytes("after".utf8))
            batch.put(JournalRecord.key(for: SagaID(id)), JournalRecord(saga: SagaID(id), state: .prepared, entries: [
                .init(key: key, preImage: nil, afterImage: Bytes("after".utf8)),
            ], session: session).encoded(), in: .journal)
        }
        try env.kv.write(batch, sync: true)
        let sql = OpenConnectionCounter(env.sqlite)
        sql.stuck = [stuck]
        let c = try SagaCoordinator(kv: env.kv, sql: sql, configuration: .init(lockTimeout: .milliseconds(200)))
        #expect(c.inDoubt == [SagaID(1), SagaID(4)], "only the sagas of the session that did not go: \(c.inDoubt)")
        #expect(try env.kvGet("s2") == nil && env.kvGet("s3") == nil, "the others are decided (no marker: undone)")
        #expect(try env.kvGet("s1") == "after", "nothing of a held saga is undone")
        let blocked = try expectSagaError { try c.run { saga in try saga.kv.put("s1", "x") } }
        guard case .lockTimeout = blocked else { Issue.record("its keys stay locked, got \(blocked)"); return }
        sql.stuck = []
        let report = try c.recover()
        #expect(report.compensated == [SagaID(1), SagaID(4)] && c.inDoubt.isEmpty, "\(report)")
        #expect(try env.kvGet("s1") == nil)
    }
}
