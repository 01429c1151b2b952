import Foundation
import RocksDBBackend
import Saga
import SagaFaultKit
import Testing

/// The KV power-loss simulation (CFsyncFaults' `powerloss_interposer.c`) is real on RocksDB
/// itself: a child (`saga-torture kv-power-loss-probe`) arms it on a fresh store, writes with
/// sync off and on, and cuts; the parent reopens the store with the library's options. Every
/// synced write must be there, and so must every write made before a synced one returned (the
/// WAL's fdatasync covers it); across seeds some unsynced writes must be lost, or the
/// simulation did nothing.
@Suite("KV power loss: RocksDB's files", .serialized)
struct KVPowerLossTests {
    /// saga-torture, built next to the test binary.
    static var probe: String {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent("saga-torture").path
    }

    struct Run {
        let killed: Bool
        /// Keys whose synced write returned, in order.
        let synced: [String]
        let output: String
        var counters: String { output.split(separator: "\n").first { $0.hasPrefix("counters: ") }.map(String.init) ?? "" }
        var report: String { output.split(separator: "\n").first { $0.hasPrefix("kv power loss") }.map(String.init) ?? "" }
    }

    func runProbe(_ dir: String, seed: UInt64, _ extra: [String]) throws -> Run {
        #expect(FileManager.default.isExecutableFile(atPath: Self.probe), "saga-torture is built next to the tests (swift build)")
        let out = dir + ".out", err = dir + ".err"
        defer {
            try? FileManager.default.removeItem(atPath: out)
            try? FileManager.default.removeItem(atPath: err)
        }
        let pid = try spawnProcess(Self.probe, ["kv-power-loss-probe", "--dir", dir, "--seed", "\(seed)"] + extra, stdoutPath: out, stderrPath: err)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let stdout = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
        let synced = stdout.split(separator: "\n").filter { $0.hasPrefix("synced ") }.map { String($0.dropFirst(7)) }
        return Run(killed: (status & 0x7F) == SIGKILL, synced: synced, output: stdout + stderr)
    }

    /// Reopens the store; every key present must hold its value. Returns the keys present.
    func reopen(_ dir: String) throws -> Set<String> {
        let store = try RocksDBStore(path: dir)
        defer { store.close() }
        var present: Set<String> = []
        for (key, value) in try store.scan() {
            let k = String(decoding: key, as: UTF8.self)
            #expect(value == KVPowerLoss.probeValue(for: k, size: value.count) && value.count >= 100, "the value of \(k) is intact")
            present.insert(k)
        }
        return present
    }

    static func keys(_ prefix: String, _ n: Int) -> [String] { (0..<n).map { String(format: "\(prefix)/%06d", $0) } }

    /// Unsynced, synced, unsynced writes, then the cut (the default model: what ext4 leaves).
    @Test func syncedWritesSurviveAndUnsyncedOnesAreLostSometimes() throws {
        var seedsThatLost = 0, seedsThatKept = 0
        for seed: UInt64 in 1...8 {
            let dir = try SQLiteEnvironment.makeTempDir("kvpl")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let run = try runProbe(dir, seed: seed, ["--unsynced-before", "150", "--synced", "30", "--unsynced-after", "150"])
            #expect(run.killed, "seed \(seed): the cut SIGKILLs the child: \(run.output.suffix(500))")
            #expect(run.synced == Self.keys("s", 30), "seed \(seed): the child acknowledged every synced write")
            #expect(run.report.contains("unsynced change"), "seed \(seed): the cut reported: \(run.output.suffix(300))")
            // The interposer saw RocksDB's writes, its fdatasyncs and the directory's fsyncs.
            let c = KVPowerLoss.Counters.parse(run.counters)
            #expect(c["writes"] ?? 0 >= 330 && c["file syncs"] ?? 0 >= 30 && c["directory syncs"] ?? 0 >= 1 && c["creations"] ?? 0 >= 3,
                    "seed \(seed): \(run.counters)")
            let present: Set<String>
            do { present = try reopen(dir) } catch {
                Issue.record("seed \(seed): the store does not open after the cut (\(run.report)): \(error)")
                continue
            }
            let missingSynced = (Self.keys("a", 150) + Self.keys("s", 30)).filter { !present.contains($0) }
            #expect(missingSynced.isEmpty, "seed \(seed): writes made durable by a synced write are gone: \(missingSynced.prefix(5)) (\(run.report))")
            let keptAfter = Self.keys("u", 150).filter { present.contains($0) }.count
            if keptAfter < 150 { seedsThatLost += 1 }
            if keptAfter > 0 { seedsThatKept += 1 }
        }
        #expect(seedsThatLost >= 1, "some cut lost unsynced writes: the simulation is not idle")
        #expect(seedsThatKept >= 1, "some cut kept unsynced writes")
    }

    /// A cut at a random moment while RocksDB flushes memtables and compacts (a 64 KiB write
    /// buffer, 1 KiB values, every 4th write synced): the store opens, every acknowledged synced
    /// write is there, and so is every write before the last acknowledged one.
    @Test func cutWhileFlushingAndCompacting() throws {
        var rng = SplitMix64(seed: 20261128)
        for seed: UInt64 in 1...6 {
            let dir = try SQLiteEnvironment.makeTempDir("kvpl-flush")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let ms = rng.between(150, 700)
            let run = try runProbe(dir, seed: seed, ["--cut-after-ms", "\(ms)", "--write-buffer", "65536", "--value-size", "1000", "--sync-every", "4"])
            #expect(run.killed, "seed \(seed): \(run.output.suffix(500))")
            guard let last = run.synced.last, let n = Int(last.dropFirst(2)) else {
                Issue.record("seed \(seed): no synced write acknowledged in \(ms) ms: \(run.output.suffix(500))")
                continue
            }
            let present: Set<String>
            do { present = try reopen(dir) } catch {
                Issue.record("seed \(seed), cut after \(ms) ms: the store does not open (\(run.report)): \(error)")
                continue
            }
            let missing = (0...n).map { String(format: "w/%08d", $0) }.filter { !present.contains($0) }
            #expect(missing.isEmpty, "seed \(seed), cut after \(ms) ms: \(missing.count) writes up to the last acknowledged synced one are gone, first \(missing.prefix(3)) (\(run.report))")
            let tables = (try? FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".sst") }) ?? []
            #expect(!tables.isEmpty, "seed \(seed): RocksDB flushed memtables before the cut (\(n + 1) writes acknowledged)")
        }
    }

    /// The harsher model (a disk cache that reorders writes: a lost unsynced write may lie
    /// below one that survived). Synced writes are never lost silently: the store either opens
    /// with all of them, or refuses to open with a corruption error (the library's WAL recovery
    /// mode tolerates a torn tail only, and a hole before surviving records is no tail).
    @Test func holesNeverLoseASyncedWriteSilently() throws {
        var refused = 0
        for seed: UInt64 in 1...8 {
            let dir = try SQLiteEnvironment.makeTempDir("kvpl-holes")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let run = try runProbe(dir, seed: seed, ["--mode", "holes", "--unsynced-before", "100", "--synced", "20", "--unsynced-after", "100"])
            #expect(run.killed, "seed \(seed): \(run.output.suffix(500))")
            do {
                let present = try reopen(dir)
                let missing = (Self.keys("a", 100) + Self.keys("s", 20)).filter { !present.contains($0) }
                #expect(missing.isEmpty, "seed \(seed): opened without durable writes \(missing.prefix(5)) (\(run.report))")
            } catch let error as RocksDBError {
                #expect("\(error)".contains("Corruption"), "seed \(seed): refused, but not as corruption: \(error)")
                refused += 1
            }
        }
        print("KV power loss with holes: \(refused) of 8 cuts left a store RocksDB refuses to open (corruption before the WAL's tail)")
    }
}

extension KVPowerLoss.Counters {
    /// The numbers of a counters line ("counters: 234 writes (...), 28 file syncs, ..."), by the
    /// words after each number.
    static func parse(_ line: String) -> [String: Int] {
        var out: [String: Int] = [:]
        let body = line.hasPrefix("counters: ") ? String(line.dropFirst(10)) : line
        let scanner = body.replacingOccurrences(of: "(", with: ",").replacingOccurrences(of: ")", with: ",").replacingOccurrences(of: ";", with: ",")
        for part in scanner.split(separator: ",") {
            let words = part.split(separator: " ")
            guard let first = words.first, let n = Int(first) else { continue }
            out[words.dropFirst().joined(separator: " "), default: n] = n
        }
        return out
    }
}
