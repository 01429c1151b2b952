/// One running saga, handed to the body of ``SagaCoordinator/run(_:)``.
///
/// Use ``kv`` to read and stage KV writes and ``sql`` to run statements in the saga's SQL
/// transaction. Nothing touches the KV store until the body returns; reads see the saga's own
/// staged writes. Every key read or written is locked until the saga has completed.
///
/// A `Saga` belongs to the thread running the body; it is not `Sendable`, and using it after
/// the body returned throws ``SagaError/Misuse/sagaEnded(_:)``.
public final class Saga {
    public let id: SagaID
    /// The KV side of the saga.
    public private(set) lazy var kv = SagaKV(saga: self)
    /// The SQL side of the saga: statements run inside its transaction.
    public private(set) lazy var sql = SagaSQL(saga: self)

    let connection: any SQLConnection
    let context: SagaContext
    /// Staged writes: key -> image to write (nil = delete), in first-touch order.
    private(set) var staged: [Bytes: Bytes?] = [:]
    private(set) var writeOrder: [Bytes] = []
    var ended = false
    /// Set when the database ended the transaction under the saga.
    var lostTransaction: (any Error)?

    init(id: SagaID, connection: any SQLConnection, context: SagaContext) {
        self.id = id
        self.connection = connection
        self.context = context
    }

    func checkUsable() throws(SagaError) {
        if ended { throw .misuse(.sagaEnded(id)) }
    }

    func validate(key: Bytes) throws(SagaError) {
        if key.isEmpty { throw .misuse(.emptyKey) }
        if key.starts(with: SagaContext.reservedPrefix) { throw .misuse(.reservedKey(key)) }
        if key.count > SagaContext.maxKeySize { throw .misuse(.keyTooLarge(size: key.count, limit: SagaContext.maxKeySize)) }
    }

    fileprivate func lock(_ key: Bytes) throws(SagaError) {
        try checkUsable()
        try validate(key: key)
        try context.locks.lock(key, for: id, timeout: context.lockTimeout)
    }

    fileprivate func stage(_ key: Bytes, _ image: Bytes?) throws(SagaError) {
        if let image, image.count > SagaContext.maxValueSize {
            throw .misuse(.valueTooLarge(size: image.count, limit: SagaContext.maxValueSize))
        }
        try lock(key)
        if staged.updateValue(image, forKey: key) == nil { writeOrder.append(key) }
    }

    fileprivate func read(_ key: Bytes) throws -> Bytes? {
        try lock(key)
        if let image = staged[key] { return image }
        return try context.kv.get(key)
    }

    /// The staged writes in first-touch order.
    var writes: [(key: Bytes, image: Bytes?)] {
        writeOrder.map { ($0, staged[$0] ?? nil) }
    }
}

@available(*, unavailable)
extension Saga: Sendable {}

/// The KV side of a saga: reads see staged writes; writes are staged until the saga commits.
public struct SagaKV {
    unowned let saga: Saga

    /// Reads a key (locking it): the saga's own staged value if any, else the store's.
    public func get(_ key: Bytes) throws -> Bytes? { try saga.read(key) }
    /// Stages a put.
    public func put(_ key: Bytes, _ value: Bytes) throws { try saga.stage(key, value) }
    /// Stages a delete.
    public func delete(_ key: Bytes) throws { try saga.stage(key, nil) }

    public func get(_ key: String) throws -> Bytes? { try get(Bytes(key.utf8)) }
    public func put(_ key: String, _ value: String) throws { try put(Bytes(key.utf8), Bytes(value.utf8)) }
    public func delete(_ key: String) throws { try delete(Bytes(key.utf8)) }
}

@available(*, unavailable)
extension SagaKV: Sendable {}

/// The SQL side of a saga: statements run in the saga's transaction. If the database ends the
/// transaction under the saga (deadlock victim, lost connection), every later statement throws
/// ``SagaError/transactionLost(saga:underlying:)`` and the saga will not commit.
public final class SagaSQL: SQLExecutor {
    unowned let saga: Saga
    init(saga: Saga) { self.saga = saga }

    @discardableResult
    public func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int {
        try guarded { try saga.connection.execute(sql, arguments) }
    }

    public func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow] {
        try guarded { try saga.connection.query(sql, arguments) }
    }

    private func guarded<T>(_ work: () throws -> T) throws -> T {
        try saga.checkUsable()
        if let lost = saga.lostTransaction { throw SagaError.transactionLost(saga: saga.id, underlying: lost) }
        // A statement run after the transaction ended would autocommit on its own.
        guard saga.connection.isInTransaction else {
            saga.lostTransaction = TransactionEnded()
            throw SagaError.transactionLost(saga: saga.id, underlying: TransactionEnded())
        }
        do {
            return try work()
        } catch {
            if saga.connection.transactionEnded(by: error) { saga.lostTransaction = error }
            throw error
        }
    }
}

@available(*, unavailable)
extension SagaSQL: Sendable {}

/// The database reports no open transaction where the saga expected its own.
struct TransactionEnded: Error, CustomStringConvertible {
    var description: String { "the SQL transaction is no longer open" }
}

/// What a running saga needs from its coordinator.
struct SagaContext: Sendable {
    static let reservedPrefix: Bytes = [0x00, 0x73, 0x61, 0x67, 0x61, 0x00]  // "\0saga\0"
    static let maxKeySize = 16 * 1024
    static let maxValueSize = 16 * 1024 * 1024

    let kv: any KVStore
    let locks: KeyLocks
    let lockTimeout: Duration
}
