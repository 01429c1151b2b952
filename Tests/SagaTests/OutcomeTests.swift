import Foundation
import RocksDBBackend
import Saga
import SagaFaultKit
import SagaTestKit
import SQLiteBackend
import Testing

/// Caller keys and outcome lookups beyond the conformance suite: the async overload, a database
/// of the version before caller keys, keys shared by two coordinators, and the configuration.
@Suite("Outcomes you can look up", .serialized)
struct OutcomeTests {
    /// The async `run(key:)`: the same refusal as the blocking one, and the body of the second
    /// run never runs.
    @Test func theAsyncRunTakesAKey() async throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        let id = try await c.run(key: "async-1") { saga -> SagaID in
            try saga.kv.put("a", "1")
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('a', 1)", [])
            return saga.id
        }
        do {
            try await c.run(key: "async-1") { saga in
                try saga.kv.put("a", "2")
                _ = try saga.sql.execute("UPDATE saga_test SET v = 2 WHERE k = 'a'", [])
            }
            Issue.record("the second run of the key was not refused")
        } catch .alreadyCommitted(let key, let holder) {
            #expect(key == "async-1" && holder == id)
        }
        #expect(try env.kvGet("a") == "1" && env.row("a") == 1, "applied once")
        #expect(try c.outcome(ofKey: "async-1") == .committed(id))
        c.close()
    }

    /// A database and journal of the version before caller keys (no `saga_markers_keys`, no
    /// outcome floor): the open creates the table, decides the sagas left prepared as before,
    /// and keyed sagas run. Sagas of before the upgrade are not answered as not committed:
    /// their outcome was never recorded.
    @Test(arguments: ["sqlite", "mariadb"])
    func aDatabaseBeforeCallerKeysMigrates(_ backend: String) throws {
        let env: any HarnessEnvironment = backend == "sqlite" ? try SQLiteEnvironment() : try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        _ = try env.sqlExecute("DROP TABLE saga_markers_keys")
        let instance = Int64(bitPattern: try SagaCoordinator.instance(in: env.kv).rawValue)
        _ = try env.sqlExecute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, 5, 'committed')", [.integer(instance)])
        try ManyCoordinatorsTests.leaveSagasFiveAndSixPrepared(env)
        try env.reopen()
        let c = try env.coordinator()
        #expect(try env.kvGet("m5") == "after" && env.kvGet("m6") == "before", "recovery at open decides as before")
        #expect(c.outcome(of: SagaID(5)) == .committed(SagaID(5)), "the committed saga: its bit was recorded when GC took its marker")
        #expect(c.outcome(of: SagaID(6)) == .unknown(.expired), "a saga before the upgrade is never answered 'not committed'")
        let id = try c.run(key: "after-upgrade") { saga -> SagaID in
            try saga.kv.put("u", "1")
            return saga.id
        }
        let rows = try env.sqlQuery("SELECT caller_key, saga_id FROM saga_markers_keys")
        #expect(rows.count == 1 && rows.first?[1].int64 == Int64(id.rawValue), "the key's row is in the new table: \(rows)")
        #expect(try c.outcome(ofKey: "after-upgrade") == .committed(id))
        #expect(c.outcome(of: SagaID(id.rawValue + 1)) == .unknown(.notIssued))
        c.close()
    }

    /// Two coordinators (two journals) on one database share the key table: a key committed by
    /// one is refused by the other, which answers it committed, naming the first one's saga.
    @Test func aKeyIsOneForEveryCoordinatorOfTheDatabase() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let a = try env.coordinator()
        let dirB = try SQLiteEnvironment.makeTempDir("saga-node-b")
        defer { try? FileManager.default.removeItem(atPath: dirB) }
        let kvB = try RocksDBStore(path: dirB + "/kv")
        defer { kvB.close() }
        let b = try SagaCoordinator(kv: kvB, sql: env.sql)
        #expect(a.instance != b.instance)
        let id = try a.run(key: "shared") { saga -> SagaID in
            _ = try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('s', 1)", [])
            return saga.id
        }
        let error = try expectSagaError { try b.run(key: "shared") { saga in _ = try saga.sql.execute("UPDATE saga_test SET v = v + 1 WHERE k = 's'", []) } }
        guard case .alreadyCommitted(_, let holder) = error else { Issue.record("expected alreadyCommitted, got \(error)"); return }
        #expect(holder == id)
        #expect(try b.outcome(ofKey: "shared") == .committed(id), "the other coordinator answers committed")
        #expect(try env.row("s") == 1, "applied once")
        b.close()
        a.close()
    }

    /// The retention is checked at open like every other value.
    @Test func anOutcomeRetentionOutOfRangeIsRefused() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        for bad in [Duration.zero, .seconds(400 * 24 * 3600)] {
            let error = try expectSagaError { try env.coordinator(.init(outcomeRetention: bad)) }
            guard case .misuse(.invalidConfiguration(let why)) = error else { Issue.record("expected invalidConfiguration, got \(error)"); continue }
            #expect(why.contains("outcomeRetention"), "\(why)")
        }
    }
}
