import CFsyncFaults
import Foundation
import Saga

/// A simulated power loss of RocksDB's files, through CFsyncFaults' interposer (only in
/// programs that link it: the tests, `saga-torture`, `aa-demo`, `saga-bench`).
///
/// Armed with a directory, it remembers every change under it that is not durable yet: data
/// written and not covered by an `fsync`/`fdatasync` of its file, files created and renames not
/// covered by an `fsync` of the directory. ``cut(seed:mode:reportTo:)`` then rewrites the files
/// to a state a power loss could leave (unsynced writes kept, dropped or torn; non-durable
/// creations and renames undone or kept) and SIGKILLs the process. The model and its limits are
/// in the header comment of `powerloss_interposer.c`.
public enum KVPowerLoss {
    /// How the cut may damage what was not durable. The default (empty) is what a journaling
    /// file system such as ext4 (data=ordered) leaves: per file a prefix of its unsynced
    /// writes, the first lost one possibly torn; directory entries as a prefix in time order.
    public struct Mode: OptionSet, Sendable, CustomStringConvertible {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        /// Each unsynced write kept, dropped or torn on its own: a lost write may lie below one
        /// that survived (it reads as zeros), a lost append may leave zeros with the size kept.
        /// What a disk cache that reorders writes can leave.
        public static let holes = Mode(rawValue: Int32(SAGA_KV_POWERLOSS_HOLES))
        /// Each non-durable creation and rename kept or undone on its own (POSIX promises no
        /// order between them).
        public static let unorderedDirectories = Mode(rawValue: Int32(SAGA_KV_POWERLOSS_UNORDERED_DIRS))
        public var description: String {
            var parts: [String] = []
            if contains(.holes) { parts.append("holes") }
            if contains(.unorderedDirectories) { parts.append("unordered-dirs") }
            return parts.isEmpty ? "ordered" : parts.joined(separator: "+")
        }
    }

    /// What the interposer saw since it was armed.
    public struct Counters: Sendable, CustomStringConvertible {
        public let writes, bytesWritten, overwrites, fileSyncs, directorySyncs, creates, renames, resizes, unhandled: Int
        /// Not durable now.
        public let unsyncedChanges, unsyncedBytes, pendingDirectoryOps: Int
        public let trackedFiles: Int
        public var description: String {
            "\(writes) writes (\(bytesWritten) bytes, \(overwrites) overwrites), \(fileSyncs) file syncs, \(directorySyncs) directory syncs, \(creates) creations, \(renames) renames, \(resizes) resizes, \(unhandled) unhandled; not durable now: \(unsyncedChanges) changes (\(unsyncedBytes) bytes), \(pendingDirectoryOps) directory ops; \(trackedFiles) files"
        }
    }

    /// Starts tracking `directory` (it must exist; created here if missing). What is in it now
    /// counts as durable. Re-arming forgets what was tracked.
    public static func arm(directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        guard saga_kv_powerloss_arm(directory) == 0 else {
            throw TestSetupError("cannot arm the KV power-loss simulation on \(directory): errno \(errno)")
        }
    }

    /// Stops tracking.
    public static func disarm() { saga_kv_powerloss_disarm() }

    public static var counters: Counters {
        var c = saga_kv_powerloss_counters()
        saga_kv_powerloss_get_counters(&c)
        return Counters(writes: c.writes, bytesWritten: c.bytes_written, overwrites: c.overwrites, fileSyncs: c.file_syncs,
                        directorySyncs: c.dir_syncs, creates: c.creates, renames: c.renames, resizes: c.resizes,
                        unhandled: c.unhandled, unsyncedChanges: c.unsynced_changes, unsyncedBytes: c.unsynced_bytes,
                        pendingDirectoryOps: c.pending_dir_ops, trackedFiles: c.tracked_files)
    }

    /// The power cut: waits for calls in flight under the directory, blocks every later one,
    /// rewrites the files as chosen by `seed` and `mode`, writes one line ("kv power loss: ...")
    /// to the descriptor `reportTo` (-1: none), and SIGKILLs the process.
    public static func cut(seed: UInt64, mode: Mode = [], reportTo fd: Int32 = 1) -> Never {
        saga_kv_powerloss_cut(seed, mode.rawValue, fd)
    }

    /// Cuts after `milliseconds`, from a thread of its own; returns at once.
    public static func cut(afterMilliseconds milliseconds: Int, seed: UInt64, mode: Mode = [], reportTo fd: Int32 = 1) {
        Thread.detachNewThread {
            usleep(useconds_t(max(0, milliseconds)) * 1000)
            cut(seed: seed, mode: mode, reportTo: fd)
        }
    }

    /// The value the KV power-loss probe (`saga-torture kv-power-loss-probe`) writes under
    /// `key`: the key repeated, so that a damaged value is told from a good one.
    public static func probeValue(for key: String, size: Int) -> Bytes {
        let unit = Array(key.utf8) + [UInt8(ascii: "|")]
        return (0..<size).map { unit[$0 % unit.count] }
    }
}
