import ArgumentParser
import Foundation
import RocksDBBackend
import Saga
import SagaFaultKit

/// The child of the KV power-loss tests (`KVPowerLossTests`): arms the power-loss simulation
/// on a fresh directory, opens a RocksDB store there, writes, and cuts. It prints one line
/// `synced KEY` after every synced write has returned (one write(2) each, so a line is never
/// half lost), the interposer's counters, then the cut's report. Two shapes:
/// - phases (default): `--unsynced-before` keys `a/…` with sync off, `--synced` keys `s/…`
///   with sync on, `--unsynced-after` keys `u/…` with sync off, then the cut;
/// - `--cut-after-ms`: keys `w/…` written without end, every `--sync-every`-th synced, while a
///   thread cuts after that many milliseconds (with a small `--write-buffer`, in the middle of
///   RocksDB's flushes and compactions).
/// Every value is `KVPowerLoss.probeValue(for:size:)`, so the parent can tell a damaged value from a good one.
struct KVPowerLossProbe: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kv-power-loss-probe", abstract: "Internal: writes to a RocksDB store with the power-loss simulation armed, then cuts.", shouldDisplay: false)

    @Option var dir: String
    @Option var seed: UInt64
    @Option(help: "Damage model: ordered, holes, unordered-dirs, or holes+unordered-dirs.") var mode: String = "ordered"
    @Option(name: .customLong("unsynced-before")) var unsyncedBefore = 100
    @Option var synced = 20
    @Option(name: .customLong("unsynced-after")) var unsyncedAfter = 100
    @Option(name: .customLong("value-size")) var valueSize = 100
    @Option(name: .customLong("write-buffer"), help: "RocksDB's memtable size in bytes (small: flushes and compactions while writing).") var writeBuffer: Int?
    @Option(name: .customLong("cut-after-ms")) var cutAfterMs: Int?
    @Option(name: .customLong("sync-every")) var syncEvery = 4

    static func parseMode(_ text: String) throws -> KVPowerLoss.Mode {
        var mode: KVPowerLoss.Mode = []
        for part in text.split(separator: "+") {
            switch part {
            case "ordered": break
            case "holes": mode.insert(.holes)
            case "unordered-dirs": mode.insert(.unorderedDirectories)
            default: throw ValidationError("unknown power-loss mode \(part)")
            }
        }
        return mode
    }

    func run() throws {
        let mode = try Self.parseMode(self.mode)
        try KVPowerLoss.arm(directory: dir)
        var options = RocksDBStore.Options()
        options.writeBufferSize = writeBuffer
        let kv = try RocksDBStore(path: dir, options: options)
        func put(_ key: String, sync: Bool) throws {
            var batch = KVWriteBatch()
            batch.put(Bytes(key.utf8), KVPowerLoss.probeValue(for: key, size: valueSize))
            try kv.write(batch, sync: sync)
            if sync { emit("synced \(key)") }
        }
        if let cutAfterMs {
            KVPowerLoss.cut(afterMilliseconds: cutAfterMs, seed: seed, mode: mode)
            var i = 0
            while true {
                try put(String(format: "w/%08d", i), sync: i % max(1, syncEvery) == 0)
                i += 1
            }
        }
        for i in 0..<unsyncedBefore { try put(String(format: "a/%06d", i), sync: false) }
        for i in 0..<synced { try put(String(format: "s/%06d", i), sync: true) }
        for i in 0..<unsyncedAfter { try put(String(format: "u/%06d", i), sync: false) }
        emit("counters: \(KVPowerLoss.counters)")
        KVPowerLoss.cut(seed: seed, mode: mode)
    }

    /// One line to stdout in one write(2).
    private func emit(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { Foundation.write(1, $0.baseAddress, $0.count) }
    }
}
