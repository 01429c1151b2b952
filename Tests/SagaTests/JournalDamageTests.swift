import SagaFaultKit
import Foundation
@testable import Saga
import SagaTestKit
import SQLiteBackend
import Testing

/// Journal records damaged in the store: recovery names the saga, refuses to guess, and leaves
/// both stores as they are (it never compensates from damaged images, never skips a record).
@Suite("Damaged journal records", .serialized)
struct JournalDamageTests {
    /// A saga left prepared in the journal (its COMMIT hit an fsync failure, the coordinator
    /// stopped), with the stores closed.
    func preparedSaga() throws -> (SQLiteEnvironment, SagaID) {
        let env = try SQLiteEnvironment()
        try env.kvSet([("d", "d0")])
        var c: SagaCoordinator? = try env.coordinator(.init(hooks: FailSyncAtCommit(pathPrefix: env.sqlitePath)))
        let error = try expectSagaError {
            try c?.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES ('d', 1)", [])
                try saga.kv.put("d", "d1")
            }
        }
        SQLiteFaults.disarm()
        guard case .inDoubt(let id, _) = error else { throw WALTestError("expected inDoubt, got \(error)") }
        c = nil
        try env.reopen()
        return (env, id)
    }

    func rewriteRecord(_ env: SQLiteEnvironment, _ id: SagaID, _ change: (inout Bytes) -> Void) throws {
        let key = JournalRecord.key(for: id)
        guard var value = try env.kv.journalGet(key) else { throw WALTestError("no record for \(id)") }
        change(&value)
        var batch = KVWriteBatch()
        batch.put(key, value, in: .journal)
        try env.kv.write(batch, sync: true)
    }

    func expectRefused(_ env: SQLiteEnvironment, _ id: SagaID, mentioning reason: String) throws {
        let kvBefore = try env.kvGet("d")
        let rowBefore = try env.row("d")
        let error = try expectSagaError { try env.coordinator() }
        guard case .journalCorrupt(let saga, let key, let why) = error else { Issue.record("expected journalCorrupt, got \(error)"); return }
        #expect(saga == id, "the damaged record is reported with its saga id")
        #expect(key == JournalRecord.key(for: id))
        #expect(why.contains(reason), "\(why)")
        #expect("\(error)".contains("\(id)") && "\(error)".contains("refuses to guess"), "\(error)")
        // Nothing was compensated or decided from the damaged record.
        #expect(try env.kvGet("d") == kvBefore && env.row("d") == rowBefore)
        #expect(try env.kv.journalGet(JournalRecord.key(for: id)) != nil, "the record stays for a human to inspect")
        #expect(try env.markers()[id] == nil, "no fencing marker was written for it")
    }

    @Test func aFlippedBitIsRefused() throws {
        let (env, id) = try preparedSaga()
        defer { env.destroy() }
        try rewriteRecord(env, id) { $0[$0.count / 2] ^= 0x10 }
        try expectRefused(env, id, mentioning: "checksum")
    }

    @Test func aTruncatedRecordIsRefused() throws {
        let (env, id) = try preparedSaga()
        defer { env.destroy() }
        try rewriteRecord(env, id) { $0.removeLast($0.count / 3) }
        try expectRefused(env, id, mentioning: "checksum")
    }

    @Test func anUnknownFormatVersionIsRefused() throws {
        let (env, id) = try preparedSaga()
        defer { env.destroy() }
        try rewriteRecord(env, id) { bytes in
            bytes.removeLast(4)
            bytes[1] = 9
            bytes.appendBigEndian(CRC32C.checksum(bytes))
        }
        try expectRefused(env, id, mentioning: "version 9")
    }

    @Test func aRecordStoredUnderAnotherIDIsRefused() throws {
        let (env, id) = try preparedSaga()
        defer { env.destroy() }
        // A valid record, but for another saga: a misplaced write, not this saga's images.
        let other = JournalRecord(saga: SagaID(id.rawValue + 1000), state: .prepared, entries: [
            .init(key: Bytes("d".utf8), preImage: Bytes("zz".utf8), afterImage: Bytes("d1".utf8)),
        ])
        try rewriteRecord(env, id) { $0 = other.encoded() }
        try expectRefused(env, id, mentioning: "stored under")
    }

    @Test func afterRepairRecoveryFinishesTheSaga() throws {
        let (env, id) = try preparedSaga()
        defer { env.destroy() }
        let good = try #require(try env.kv.journalGet(JournalRecord.key(for: id)))
        try rewriteRecord(env, id) { $0[3] ^= 0x01 }
        try expectRefused(env, id, mentioning: "checksum")
        // A human puts the record back (from a backup): recovery decides as usual.
        try rewriteRecord(env, id) { $0 = good }
        let c = try env.coordinator()
        #expect(c.inDoubt.isEmpty)
        let committed = try env.row("d") == 1
        #expect(try env.kvGet("d") == (committed ? "d1" : "d0"))
    }
}
