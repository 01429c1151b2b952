/// A KV store a saga can write to: the protocol a KV backend implements.
///
/// The store has two key spaces: **data**, the application's keys, and **journal**, where the
/// coordinator keeps its records (a column family in RocksDB). One ``KVWriteBatch`` may touch
/// both, and must be applied atomically: all of it or none of it, also across a crash.
public protocol KVStore: AnyObject, Sendable {
    /// Reads several data keys at once; `nil` for a key that is absent.
    func multiGet(_ keys: [Bytes]) throws -> [Bytes?]
    /// Applies every operation of the batch atomically. With `sync`, the batch is durable
    /// (on disk, fsynced) when this returns.
    func write(_ batch: KVWriteBatch, sync: Bool) throws
    /// Reads one journal key.
    func journalGet(_ key: Bytes) throws -> Bytes?
    /// Every entry of the journal space, in key order.
    func journalEntries() throws -> [(key: Bytes, value: Bytes)]
}

extension KVStore {
    /// Reads one data key.
    public func get(_ key: Bytes) throws -> Bytes? { try multiGet([key])[0] }
}

/// One atomic write to a ``KVStore``.
public struct KVWriteBatch: Sendable {
    public enum Space: Sendable { case data, journal }
    public enum Operation: Sendable {
        case put(Space, key: Bytes, value: Bytes)
        case delete(Space, key: Bytes)
    }

    public private(set) var operations: [Operation] = []
    public init() {}

    public mutating func put(_ key: Bytes, _ value: Bytes, in space: Space = .data) {
        operations.append(.put(space, key: key, value: value))
    }
    public mutating func delete(_ key: Bytes, in space: Space = .data) {
        operations.append(.delete(space, key: key))
    }
    /// Sets a data key to an image: the bytes, or absent (delete).
    public mutating func set(_ key: Bytes, to image: Bytes?) {
        if let image { put(key, image) } else { delete(key) }
    }
    public var isEmpty: Bool { operations.isEmpty }
}
