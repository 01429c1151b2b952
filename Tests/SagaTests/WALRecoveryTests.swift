import Foundation
import RocksDBBackend
import Saga
import Testing

/// The RocksDB WAL recovery mode, chosen on disk evidence: three synced batches, then the log
/// file itself damaged, then a reopen with each mode.
@Suite("RocksDB WAL recovery mode")
struct WALRecoveryTests {
    /// Writes k1, k2, k3 with synced batches and closes (the data stays in the WAL: RocksDB does
    /// not flush memtables at close while the WAL is on). Returns the directory and WAL path.
    func threeSyncedWrites() throws -> (dir: String, wal: String) {
        let dir = try SQLiteEnvironment.makeTempDir("wal")
        let store = try RocksDBStore(path: dir)
        for i in 1...3 {
            var batch = KVWriteBatch()
            batch.set(Bytes("k\(i)".utf8), to: Bytes("value-\(i)-".utf8) + Bytes(repeating: UInt8(0x40 + i), count: 200))
            try store.write(batch, sync: true)
        }
        store.close()
        let logs = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".log") && $0 != "LOG" }
        let sized = logs.map { (dir + "/" + $0, (try? FileManager.default.attributesOfItem(atPath: dir + "/" + $0)[.size] as? Int) ?? 0) }
        guard let wal = sized.max(by: { $0.1 < $1.1 }), wal.1 > 600 else { throw WALTestError("no WAL with the three writes in \(dir): \(sized)") }
        return (dir, wal.0)
    }

    func values(_ dir: String, _ mode: RocksDBStore.WALRecovery) throws -> [String?] {
        var options = RocksDBStore.Options()
        options.walRecovery = mode
        let store = try RocksDBStore(path: dir, options: options)
        defer { store.close() }
        return try (1...3).map { i in try store.get(Bytes("k\(i)".utf8)).map { String(decoding: $0.prefix(8), as: UTF8.self) } }
    }

    /// Flips a byte inside the second write's value, in the middle of the log.
    func damageMiddle(_ wal: String) throws {
        var data = try Data(contentsOf: URL(fileURLWithPath: wal))
        guard let at = data.range(of: Data("value-2-".utf8)) else { throw WALTestError("second write not found in \(wal)") }
        data[at.lowerBound + 20] ^= 0xFF
        try data.write(to: URL(fileURLWithPath: wal))
    }

    @Test func damageInTheMiddleFailsTheOpenInsteadOfDroppingSyncedWrites() throws {
        let (dir, wal) = try threeSyncedWrites()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try damageMiddle(wal)
        // The mode Saga uses: the open fails and says why; nothing is dropped silently.
        let error = #expect(throws: RocksDBError.self) { _ = try values(dir, .tolerateCorruptedTailRecords) }
        #expect(error.map { "\($0)" }?.lowercased().contains("corrupt") == true, "\(String(describing: error))")
        // RocksDB's default would open and silently lose k3, a synced write after the damage.
        let pointInTime = try values(dir, .pointInTime)
        #expect(pointInTime[0] == "value-1-" && pointInTime[2] == nil, "point-in-time drops the synced k3: \(pointInTime)")
    }

    @Test func aTornTailIsToleratedAndEarlierSyncedWritesSurvive() throws {
        let (dir, wal) = try threeSyncedWrites()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // A crash in the middle of the last write: the log ends inside its record.
        let data = try Data(contentsOf: URL(fileURLWithPath: wal))
        guard let at = data.range(of: Data("value-3-".utf8)) else { throw WALTestError("third write not found") }
        try data.prefix(at.lowerBound + 30).write(to: URL(fileURLWithPath: wal))
        let v = try values(dir, .tolerateCorruptedTailRecords)
        #expect(v == ["value-1-", "value-2-", nil], "k1 and k2 survive, the torn k3 is dropped: \(v)")
    }
}

struct WALTestError: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}
