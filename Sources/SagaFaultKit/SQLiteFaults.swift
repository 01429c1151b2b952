import CSagaFaults
import CSQLite
import SQLiteBackend

/// Real SQLite I/O failures on demand, through the "saga-fault" VFS that wraps the default
/// one. Open a database with `configuration.vfs = SQLiteFaults.vfsName` to route it there.
public enum SQLiteFaults {
    public enum Operation: Sendable {
        /// `xSync` fails with `SQLITE_IOERR_FSYNC`.
        case sync
        /// `xWrite` fails with `SQLITE_IOERR_WRITE`.
        case write
        /// `xWrite` fails with `SQLITE_FULL`.
        case diskFull
    }

    public static let vfsName = SAGA_FAULT_VFS_NAME

    /// Registers the VFS (idempotent). Throws if SQLite refuses it.
    public static func register() throws {
        let rc = saga_fault_vfs_register()
        guard rc == SQLITE_OK else { throw SQLiteError(code: rc, message: "cannot register the \(vfsName) VFS") }
    }

    /// Fails the `countdown`-th operation from now (1 = the next); with `persistent`, every one
    /// after it too, until ``disarm()``. With `pathPrefix`, only files whose path starts with it
    /// count (the database file, its `-wal` and `-journal`): other databases are left alone.
    public static func arm(_ op: Operation, countdown: Int = 1, persistent: Bool = false, pathPrefix: String? = nil) {
        let code: Int32 = switch op {
        case .sync: Int32(SAGA_FAULT_SYNC.rawValue)
        case .write: Int32(SAGA_FAULT_WRITE.rawValue)
        case .diskFull: Int32(SAGA_FAULT_FULL.rawValue)
        }
        saga_fault_vfs_arm(code, Int32(countdown), persistent ? 1 : 0, pathPrefix)
    }

    public static func disarm() { saga_fault_vfs_disarm() }
    /// Operations failed since the last ``arm(_:countdown:persistent:)``.
    public static var failures: Int { Int(saga_fault_vfs_failures()) }
    /// `xSync` calls that went through the VFS since the process started.
    public static var syncs: Int { Int(saga_fault_vfs_syncs()) }
}

extension SQLiteFaults {
    /// What a simulated power loss did to the writes that were not synced yet.
    public struct PowerLoss: Sendable, CustomStringConvertible {
        public let unsynced: Int
        public let dropped: Int
        public let garbled: Int
        public var description: String { "\(unsynced) unsynced write(s): \(dropped) dropped, \(garbled) garbled, \(unsynced - dropped - garbled) kept" }
    }

    /// Starts (or stops) remembering every write to files under `pathPrefix` until the file is
    /// synced, for ``simulatePowerLoss(seed:)``.
    public static func trackUnsyncedWrites(_ on: Bool, pathPrefix: String? = nil) {
        saga_fault_vfs_track_power(on ? 1 : 0, pathPrefix)
    }

    /// Writes not synced yet (while tracking).
    public static var unsyncedWrites: Int { Int(saga_fault_vfs_unsynced_writes()) }

    /// Rolls the files back as a power cut with a volatile disk cache may: every unsynced write,
    /// newest first, is kept, dropped or garbled, chosen by `seed`. Afterwards no thread can
    /// write through the VFS any more: kill the process right away (as the power cut would).
    public static func simulatePowerLoss(seed: UInt64) -> PowerLoss {
        var dropped = 0, garbled = 0
        let n = saga_fault_vfs_power_loss(seed, &dropped, &garbled)
        return PowerLoss(unsynced: Int(n), dropped: dropped, garbled: garbled)
    }
}
