import CRocksDB
import Foundation
import Saga

/// A RocksDB database (librocksdb's C API) as a saga ``KVStore``.
///
/// Application keys live in the default column family; the saga journal lives in its own
/// column family, `saga_journal`, so that one `WriteBatch` carries the forward writes and the
/// journal record atomically.
///
/// `rocksdb_t` is thread-safe, so the store is `Sendable`. A read-write lock only keeps
/// ``close()`` from freeing the handles under a running call.
public final class RocksDBStore: KVStore, @unchecked Sendable {
    public struct Options: Sendable {
        /// Create the database (and its journal column family) when missing.
        public var createIfMissing = true
        /// RocksDB's paranoid checks on open and during reads.
        public var paranoidChecks = true
        /// How RocksDB replays its write-ahead log at open.
        public var walRecovery: WALRecovery = .tolerateCorruptedTailRecords
        /// RocksDB's memtable size (`write_buffer_size`); nil keeps RocksDB's default (64 MiB).
        /// Tests make it small to have RocksDB flush and compact while they write.
        package var writeBufferSize: Int?
        public init() {}
    }

    /// RocksDB's WAL recovery modes (`rocksdb_options_set_wal_recovery_mode`).
    public enum WALRecovery: Int32, Sendable {
        /// The default here. A record cut short at the very end of the log (a crash in the
        /// middle of an unsynced write) is ignored; damage anywhere else fails the open with a
        /// corruption error. No synced write is ever dropped without an error: a synced write
        /// is complete on disk before it is acknowledged, so it is never the torn tail.
        case tolerateCorruptedTailRecords = 0
        /// Any damage fails the open, a torn tail too (which a crash can leave).
        case absoluteConsistency = 1
        /// RocksDB's own default: replay up to the first damaged record and silently drop the
        /// rest of the log, synced writes after the damage included. Not safe for the journal.
        case pointInTime = 2
        /// Skip damaged records and go on (disaster salvage only).
        case skipAnyCorruptedRecords = 3
    }

    public static let journalFamily = "saga_journal"

    public let path: String
    private var db: OpaquePointer?
    private var dataFamily: OpaquePointer?
    private var journalFamily: OpaquePointer?
    private let options: OpaquePointer
    private let readOptions: OpaquePointer
    private let syncWrite: OpaquePointer
    private let asyncWrite: OpaquePointer
    /// Keeps ``close()`` from freeing the handles under a running call.
    private let closeLock = ReadWriteLock()

    /// Opens (or creates) the database at `path`.
    ///
    /// Throws ``RocksDBError`` naming the problem: the directory is locked by another process,
    /// unreadable, or not a RocksDB database.
    public init(path: String, options opts: Options = Options()) throws {
        self.path = path
        options = rocksdb_options_create()
        rocksdb_options_set_create_if_missing(options, opts.createIfMissing ? 1 : 0)
        rocksdb_options_set_create_missing_column_families(options, opts.createIfMissing ? 1 : 0)
        rocksdb_options_set_paranoid_checks(options, opts.paranoidChecks ? 1 : 0)
        // Tolerate a torn tail only: damage before the end of the log fails the open instead of
        // dropping the synced writes after it (which point-in-time recovery would do).
        rocksdb_options_set_wal_recovery_mode(options, opts.walRecovery.rawValue)
        if let size = opts.writeBufferSize { rocksdb_options_set_write_buffer_size(options, size) }
        readOptions = rocksdb_readoptions_create()
        syncWrite = rocksdb_writeoptions_create()
        rocksdb_writeoptions_set_sync(syncWrite, 1)
        asyncWrite = rocksdb_writeoptions_create()

        let names = ["default", Self.journalFamily]
        var handles = [OpaquePointer?](repeating: nil, count: names.count)
        var err: UnsafeMutablePointer<CChar>?
        let cNames = names.map { strdup($0) }
        defer { cNames.forEach { free($0) } }
        let familyOptions: [OpaquePointer?] = names.map { _ in options }
        let handle = cNames.map { UnsafePointer($0) }.withUnsafeBufferPointer { namePtrs in
            familyOptions.withUnsafeBufferPointer { optPtrs in
                rocksdb_open_column_families(options, path, Int32(names.count), namePtrs.baseAddress, optPtrs.baseAddress, &handles, &err)
            }
        }
        if let err {
            let message = String(cString: err)
            rocksdb_free(err)
            // Every stored property is initialized here, so deinit runs and frees the options.
            throw RocksDBError.open(path: path, message: message)
        }
        db = handle
        dataFamily = handles[0]
        journalFamily = handles[1]
    }

    private static func freeOptions(_ o: OpaquePointer, _ r: OpaquePointer, _ s: OpaquePointer, _ a: OpaquePointer) {
        rocksdb_writeoptions_destroy(a)
        rocksdb_writeoptions_destroy(s)
        rocksdb_readoptions_destroy(r)
        rocksdb_options_destroy(o)
    }

    deinit {
        close()
        Self.freeOptions(options, readOptions, syncWrite, asyncWrite)
    }

    /// Closes the database; later calls throw ``RocksDBError/closed``. Idempotent.
    public func close() {
        closeLock.withWriteLock { closeLocked() }
    }

    private func closeLocked() {
        guard let db else { return }
        if let dataFamily { rocksdb_column_family_handle_destroy(dataFamily) }
        if let journalFamily { rocksdb_column_family_handle_destroy(journalFamily) }
        rocksdb_close(db)
        self.db = nil
        dataFamily = nil
        journalFamily = nil
    }

    /// Runs `body` with the open handles, holding the read side of the close lock.
    private func withHandles<T>(_ body: (OpaquePointer, OpaquePointer, OpaquePointer) throws -> T) throws -> T {
        try closeLock.withReadLock { () throws -> T in
            guard let db, let dataFamily, let journalFamily else { throw RocksDBError.closed(path: path) }
            return try body(db, dataFamily, journalFamily)
        }
    }

    // MARK: KVStore

    public func multiGet(_ keys: [Bytes]) throws -> [Bytes?] {
        guard !keys.isEmpty else { return [] }
        return try withHandles { db, data, _ in try multiGet(db, family: data, keys) }
    }

    private func multiGet(_ db: OpaquePointer, family: OpaquePointer, _ keys: [Bytes]) throws -> [Bytes?] {
        // One key (a saga's read, key by key): a plain get, without multi-get's per-call setup.
        if keys.count == 1 { return [try get(db, family: family, keys[0])] }
        let n = keys.count
        var values = [UnsafeMutablePointer<CChar>?](repeating: nil, count: n)
        var sizes = [Int](repeating: 0, count: n)
        var errs = [UnsafeMutablePointer<CChar>?](repeating: nil, count: n)
        let families = [OpaquePointer?](repeating: family, count: n)
        let sizesIn = keys.map(\.count)
        // Keep every key's storage alive for the call: copy into one contiguous buffer.
        // One spare byte keeps the buffer non-empty when every key is empty.
        var flat = Bytes()
        flat.reserveCapacity(sizesIn.reduce(1, +))
        for k in keys { flat.append(contentsOf: k) }
        flat.append(0)
        flat.withUnsafeBufferPointer { buf in
            guard let start = buf.baseAddress else { return }
            let base = UnsafeRawPointer(start)
            var offset = 0
            let ptrs: [UnsafePointer<CChar>?] = sizesIn.map { size in
                defer { offset += size }
                return (base + offset).assumingMemoryBound(to: CChar.self)
            }
            families.withUnsafeBufferPointer { fams in
                ptrs.withUnsafeBufferPointer { kp in
                    rocksdb_multi_get_cf(db, readOptions, fams.baseAddress, n, kp.baseAddress, sizesIn, &values, &sizes, &errs)
                }
            }
        }
        var out: [Bytes?] = []
        out.reserveCapacity(n)
        var firstError: String?
        for i in 0..<n {
            if let e = errs[i] {
                if firstError == nil { firstError = String(cString: e) }
                rocksdb_free(e)
            }
            if let v = values[i] {
                out.append(Bytes(UnsafeRawBufferPointer(start: v, count: sizes[i])))
                rocksdb_free(v)
            } else {
                out.append(nil)
            }
        }
        if let firstError { throw RocksDBError.read(path: path, message: firstError) }
        return out
    }

    private func get(_ db: OpaquePointer, family: OpaquePointer, _ key: Bytes) throws -> Bytes? {
        var size = 0
        var err: UnsafeMutablePointer<CChar>?
        let value = key.withUnsafeBufferPointer { k in
            k.withMemoryRebound(to: CChar.self) { rocksdb_get_cf(db, readOptions, family, $0.baseAddress, $0.count, &size, &err) }
        }
        if let err {
            let message = String(cString: err)
            rocksdb_free(err)
            if let value { rocksdb_free(value) }
            throw RocksDBError.read(path: path, message: message)
        }
        guard let value else { return nil }
        defer { rocksdb_free(value) }
        return Bytes(UnsafeRawBufferPointer(start: value, count: size))
    }

    public func write(_ batch: KVWriteBatch, sync: Bool) throws {
        try withHandles { db, data, journal in
            let wb = rocksdb_writebatch_create()
            defer { rocksdb_writebatch_destroy(wb) }
            for op in batch.operations {
                switch op {
                case .put(let space, let key, let value):
                    key.withUnsafeBufferPointer { k in
                        value.withUnsafeBufferPointer { v in
                            k.withMemoryRebound(to: CChar.self) { k in
                                v.withMemoryRebound(to: CChar.self) { v in
                                    rocksdb_writebatch_put_cf(wb, space == .data ? data : journal, k.baseAddress, k.count, v.baseAddress, v.count)
                                }
                            }
                        }
                    }
                case .delete(let space, let key):
                    key.withUnsafeBufferPointer { k in
                        k.withMemoryRebound(to: CChar.self) { k in
                            rocksdb_writebatch_delete_cf(wb, space == .data ? data : journal, k.baseAddress, k.count)
                        }
                    }
                }
            }
            // The C API drops the status of a refused put or delete (a key or value of 4 GiB or
            // more): a batch missing an operation must never be written.
            let held = Int(rocksdb_writebatch_count(wb))
            guard held == batch.operations.count else {
                throw RocksDBError.write(path: path, message: "the write batch holds \(held) of its \(batch.operations.count) operations (RocksDB refused one: a key or value of 4 GiB or more?); nothing was written")
            }
            var err: UnsafeMutablePointer<CChar>?
            rocksdb_write(db, sync ? syncWrite : asyncWrite, wb, &err)
            if let err {
                let message = String(cString: err)
                rocksdb_free(err)
                throw RocksDBError.write(path: path, message: message)
            }
        }
    }

    public func journalGet(_ key: Bytes) throws -> Bytes? {
        try withHandles { db, _, journal in try multiGet(db, family: journal, [key])[0] }
    }

    public func journalEntries() throws -> [(key: Bytes, value: Bytes)] {
        try withHandles { db, _, journal in try scan(db, family: journal, prefix: []) }
    }

    // MARK: Direct access (outside sagas: verification, tools, tests)

    /// Every data entry whose key starts with `prefix`, in key order.
    public func scan(prefix: Bytes = []) throws -> [(key: Bytes, value: Bytes)] {
        try withHandles { db, data, _ in try scan(db, family: data, prefix: prefix) }
    }

    private func scan(_ db: OpaquePointer, family: OpaquePointer, prefix: Bytes) throws -> [(key: Bytes, value: Bytes)] {
        guard let it = rocksdb_create_iterator_cf(db, readOptions, family) else {
            throw RocksDBError.read(path: path, message: "cannot create an iterator")
        }
        defer { rocksdb_iter_destroy(it) }
        prefix.withUnsafeBufferPointer { p in
            p.withMemoryRebound(to: CChar.self) { rocksdb_iter_seek(it, $0.baseAddress, $0.count) }
        }
        var out: [(key: Bytes, value: Bytes)] = []
        while rocksdb_iter_valid(it) != 0 {
            var klen = 0, vlen = 0
            let k = rocksdb_iter_key(it, &klen)
            let key = Bytes(UnsafeRawBufferPointer(start: k, count: klen))
            guard key.starts(with: prefix) else { break }
            let v = rocksdb_iter_value(it, &vlen)
            out.append((key, Bytes(UnsafeRawBufferPointer(start: v, count: vlen))))
            rocksdb_iter_next(it)
        }
        var err: UnsafeMutablePointer<CChar>?
        rocksdb_iter_get_error(it, &err)
        if let err {
            let message = String(cString: err)
            rocksdb_free(err)
            throw RocksDBError.read(path: path, message: message)
        }
        return out
    }
}

/// A RocksDB failure, with the database path and RocksDB's own message.
public enum RocksDBError: Error, CustomStringConvertible, Sendable {
    /// Opening failed. ``isLocked`` tells whether another process holds the database.
    case open(path: String, message: String)
    case read(path: String, message: String)
    case write(path: String, message: String)
    case closed(path: String)

    /// The directory is locked: another process (or another store in this one) has it open.
    public var isLocked: Bool {
        if case .open(_, let m) = self { return m.contains("lock") && (m.contains("LOCK") || m.contains("Resource temporarily unavailable")) }
        return false
    }

    public var description: String {
        switch self {
        case .open(let p, let m):
            isLocked
                ? "RocksDB at \(p) is locked by another process or store (\(m)); close it first"
                : "cannot open RocksDB at \(p): \(m)"
        case .read(let p, let m): "RocksDB read failed at \(p): \(m)"
        case .write(let p, let m): "RocksDB write failed at \(p): \(m)"
        case .closed(let p): "RocksDB at \(p) is closed"
        }
    }
}
