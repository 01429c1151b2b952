import CFsyncFaults
import Foundation
import SagaFaultKit

/// `--fsync-delay-ms`: a slower disk. In this process the fsync interposer (CFsyncFaults)
/// sleeps before every fsync/fdatasync (RocksDB's WAL, SQLite's WAL); a MariaDB server that
/// saga-bench starts gets the same through an LD_PRELOAD library built at bench time from
/// `scripts/fsync-delay-preload.c`, which reads the delay from a small file this class rewrites
/// between rounds (no restart).
final class FsyncDelay {
    let file: String
    /// The preload library, when one was built.
    private(set) var library: String?
    private let fd: Int32

    init(dir: String, slowServer: Bool) throws {
        file = dir + "/fsync-delay"
        guard FileManager.default.createFile(atPath: file, contents: Data(count: MemoryLayout<Int>.size)) else {
            throw BenchError("cannot create \(file)")
        }
        fd = open(file, O_WRONLY)
        guard fd >= 0 else { throw BenchError("cannot open \(file)") }
        guard slowServer else { return }
        let source = URL(fileURLWithPath: MariaDBServer.script).deletingLastPathComponent().appendingPathComponent("fsync-delay-preload.c").path
        let out = dir + "/fsync-delay.so"
        let result = try Shell.run("/bin/sh", ["-c", "cc -shared -fPIC -O2 -o '\(out)' '\(source)' -ldl"])
        if result.status == 0 {
            library = out
        } else {
            say("(cannot build \(source) with cc: \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)); the delay applies to this process only, not to MariaDB)")
        }
    }

    deinit { close(fd) }

    /// What the server is started with: the library and the file it reads the delay from.
    var serverEnvironment: [String: String] {
        guard let library else { return [:] }
        return ["MARIADBD_PRELOAD": library, "SAGA_FSYNC_DELAY_FILE": file]
    }

    func set(ms: Double) {
        let ns = Int((ms * 1e6).rounded())
        saga_fault_fsync_set_delay_ns(ns)
        var value = ns
        _ = withUnsafeBytes(of: &value) { pwrite(fd, $0.baseAddress, $0.count, 0) }
    }
}
