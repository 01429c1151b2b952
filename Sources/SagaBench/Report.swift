import Foundation

struct ModeFigures: Codable, Sendable {
    var mode: Mode
    var roundsPerSecond: [Double]
    var medianPerSecond: Double
    var p50Millis: Double
    var p99Millis: Double
    var fsyncsPerSaga: Double
    var ratioToUnsafe: Double
    /// The median over rounds of this mode's sagas/s over the unsafe mode's in the same round:
    /// steadier than the ratio of the medians when the machine's load drifts between rounds.
    var pairedRatioToUnsafe: Double
    var errors: Int
    /// Galera: write sets replicated (and certified) per saga, their bytes, and the
    /// transactions the cluster rolled back over all rounds (zero elsewhere).
    var writeSetsPerSaga: Double
    var writeSetBytesPerSaga: Double
    var certificationFailures: Int
    var bruteForceAborts: Int
}

struct CellFigures: Codable, Sendable {
    var backend: BenchBackend
    var workload: String
    var threads: Int
    /// The latency added to every fsync (`--fsync-delay-ms`), 0 for the disk as it is.
    var fsyncDelayMs: Double? = 0
    var modes: [ModeFigures]

    init(backend: BenchBackend, workload: String, threads: Int, modes: [Mode], results: [Mode: [RoundResult]], fsyncDelayMs: Double = 0) {
        self.backend = backend
        self.workload = workload
        self.threads = threads
        self.fsyncDelayMs = fsyncDelayMs
        let unsafeRounds = (results[.unsafe] ?? []).map(\.throughput)
        let unsafeMedian = median(unsafeRounds)
        self.modes = modes.map { mode in
            let rounds = results[mode] ?? []
            let lat = rounds.flatMap(\.latenciesMicros).sorted()
            let ops = rounds.map(\.ops).reduce(0, +)
            let med = median(rounds.map(\.throughput))
            let counters = rounds.map(\.counters).reduce(ServerCounters(), +)
            func perSaga(_ n: Int) -> Double { ops > 0 ? Double(n) / Double(ops) : 0 }
            return ModeFigures(
                mode: mode, roundsPerSecond: rounds.map(\.throughput), medianPerSecond: med,
                p50Millis: percentile(lat, 0.50) / 1000, p99Millis: percentile(lat, 0.99) / 1000,
                fsyncsPerSaga: perSaga(counters.fsyncs),
                ratioToUnsafe: unsafeMedian > 0 ? med / unsafeMedian : 0,
                pairedRatioToUnsafe: medianOfRatios(rounds.map(\.throughput), unsafeRounds),
                errors: rounds.map(\.errors).reduce(0, +),
                writeSetsPerSaga: perSaga(counters.writeSets), writeSetBytesPerSaga: perSaga(counters.writeSetBytes),
                certificationFailures: counters.certificationFailures, bruteForceAborts: counters.bruteForceAborts)
        }
    }

    func lines() -> [String] {
        modes.map { m in
            String(format: "%@ %8.0f/s  x%.3f of unsafe (paired by round x%.3f)  p50 %6.2f ms  p99 %7.2f ms  %.2f fsyncs/saga%@%@",
                   m.mode.rawValue.padded(6), m.medianPerSecond, m.ratioToUnsafe, m.pairedRatioToUnsafe, m.p50Millis, m.p99Millis, m.fsyncsPerSaga,
                   backend == .galera ? String(format: "  %.3f write sets/saga (%.0f B), %d cert. failures, %d BF aborts",
                                               m.writeSetsPerSaga, m.writeSetBytesPerSaga, m.certificationFailures, m.bruteForceAborts) : "",
                   m.errors > 0 ? "  (\(m.errors) errors)" : "")
        }
    }
}

/// One mode of one cell on the cluster and on the single server, from rounds interleaved in
/// the same run: what a certification round adds to each COMMIT.
struct ClusterComparison: Codable, Sendable {
    var workload: String
    var threads: Int
    var mode: Mode
    var cluster: ModeFigures
    var single: ModeFigures
    /// The cluster's median sagas/s over the single server's.
    var throughputRatio: Double
    /// The median over rounds of the cluster's sagas/s over the single server's in the same round.
    var pairedRatio: Double
    /// The cluster's median latency minus the single server's.
    var p50AddedMillis: Double

    static func pairs(cluster: CellFigures, single: CellFigures) -> [ClusterComparison] {
        cluster.modes.compactMap { c in
            single.modes.first { $0.mode == c.mode }.map {
                ClusterComparison(workload: cluster.workload, threads: cluster.threads, mode: c.mode, cluster: c, single: $0,
                                  throughputRatio: $0.medianPerSecond > 0 ? c.medianPerSecond / $0.medianPerSecond : 0,
                                  pairedRatio: medianOfRatios(c.roundsPerSecond, $0.roundsPerSecond),
                                  p50AddedMillis: c.p50Millis - $0.p50Millis)
            }
        }
    }

    func line() -> String {
        String(format: "%@ cluster/one server x%.3f (paired by round x%.3f)  p50 %+.2f ms  %.3f write sets/saga (%.0f B)  %d cert. failures  %d BF aborts",
               mode.rawValue.padded(6), throughputRatio, pairedRatio, p50AddedMillis, cluster.writeSetsPerSaga, cluster.writeSetBytesPerSaga,
               cluster.certificationFailures, cluster.bruteForceAborts)
    }
}

struct MachineInfo: Codable, Sendable {
    var cpu: String
    var cores: Int
    var memoryGiB: Int
    var kernel: String
    var filesystem: String
    var date: String

    var summary: String { "\(cpu), \(cores) cores, \(memoryGiB) GiB, Linux \(kernel), \(filesystem), \(date)" }

    static func read(workdir: String) -> MachineInfo {
        let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        let model = cpuinfo.split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingCharacters(in: .whitespaces) } ?? "unknown CPU"
        let kernel = ((try? String(contentsOfFile: "/proc/sys/kernel/osrelease", encoding: .utf8)) ?? "?").trimmingCharacters(in: .whitespacesAndNewlines)
        var fs = "unknown filesystem"
        if let mounts = try? String(contentsOfFile: "/proc/mounts", encoding: .utf8) {
            // The longest mount point that holds the work directory.
            var bestLength = -1
            for line in mounts.split(separator: "\n") {
                let fields = line.split(separator: " ").map(String.init)
                guard fields.count > 2, workdir.hasPrefix(fields[1]), fields[1].count > bestLength else { continue }
                bestLength = fields[1].count
                fs = "\(fields[2]) on \(fields[1])"
            }
        }
        let formatter = ISO8601DateFormatter()
        return MachineInfo(cpu: model, cores: ProcessInfo.processInfo.activeProcessorCount,
                           memoryGiB: Int(ProcessInfo.processInfo.physicalMemory >> 30), kernel: kernel,
                           filesystem: fs, date: formatter.string(from: Date()))
    }
}

struct BenchReport: Codable, Sendable {
    var machine: MachineInfo
    var rounds: Int
    var secondsPerRound: Double
    var cells: [CellFigures] = []
    var clusterComparisons: [ClusterComparison] = []
    var recovery: [String: RecoveryBench.Result] = [:]
    var growth: [String: [GrowthBench.Sample]] = [:]
    /// `--profile`: the per-step tables.
    var profiles: [ProfileFigures]? = []

    func table() -> String {
        var out = "backend | workload   | threads | fsync +ms | mode       | sagas/s (median) | ratio to unsafe | p50 ms | p99 ms | fsyncs/saga\n"
        out += "--------+------------+---------+-----------+------------+------------------+-----------------+--------+--------+------------\n"
        for c in cells {
            for m in c.modes {
                out += String(format: "%@ | %@ | %7d | %9.1f | %@ | %16.0f | %15.3f | %6.2f | %6.2f | %11.2f\n",
                              c.backend.rawValue.padded(7), c.workload.padded(10), c.threads, c.fsyncDelayMs ?? 0, m.mode.rawValue.padded(10), m.medianPerSecond, m.ratioToUnsafe, m.p50Millis, m.p99Millis, m.fsyncsPerSaga)
            }
        }
        if !clusterComparisons.isEmpty {
            out += "\nGalera (3 nodes on this machine, clients on node 1) against one MariaDB server, rounds interleaved in the same run:\n"
            out += "workload   | threads | mode   | cluster sagas/s | one server sagas/s | cluster/one | paired by round | p50 added ms | write sets/saga | bytes/saga | cert. failures | BF aborts | fsyncs/saga cluster | one server\n"
            out += "-----------+---------+--------+-----------------+--------------------+-------------+-----------------+--------------+-----------------+------------+----------------+-----------+---------------------+-----------\n"
            for c in clusterComparisons {
                out += String(format: "%@ | %7d | %@ | %15.0f | %18.0f | %11.3f | %15.3f | %12.2f | %15.3f | %10.0f | %14d | %9d | %19.2f | %10.2f\n",
                              c.workload.padded(10), c.threads, c.mode.rawValue.padded(6), c.cluster.medianPerSecond, c.single.medianPerSecond, c.throughputRatio,
                              c.pairedRatio, c.p50AddedMillis, c.cluster.writeSetsPerSaga, c.cluster.writeSetBytesPerSaga, c.cluster.certificationFailures,
                              c.cluster.bruteForceAborts, c.cluster.fsyncsPerSaga, c.single.fsyncsPerSaga)
            }
        }
        for (b, r) in recovery.sorted(by: { $0.key < $1.key }) {
            out += String(format: "\n%@: recovery of %d prepared sagas in %.3f s (%d kept, %d compensated, %@)", b, r.sagas, r.seconds, r.committed, r.compensated, r.correct ? "correct" : "WRONG")
        }
        for (b, samples) in growth.sorted(by: { $0.key < $1.key }) {
            let maxRecords = samples.map(\.journalRecords).max() ?? 0
            let maxMarkers = samples.map(\.markerRows).max() ?? 0
            let maxBytes = samples.map(\.journalBytes).max() ?? 0
            out += "\n\(b): after \(samples.last?.sagas ?? 0) sagas with GC: journal at most \(maxRecords) records (\(maxBytes) bytes), markers at most \(maxMarkers) rows, over \(samples.count) samples"
        }
        return out + "\n"
    }

    func json() throws -> String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try e.encode(self), as: UTF8.self)
    }
}

extension String {
    /// Padded with spaces to `width` characters: `%-10@` pads nothing in Foundation on Linux,
    /// which left the tables' columns unaligned.
    func padded(_ width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
}
