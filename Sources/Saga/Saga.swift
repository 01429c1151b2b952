/// One running saga, handed to the body of ``SagaCoordinator/run(key:_:)-4bh0f``.
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
    private(set) var staged: [HashedBytes: Bytes?] = [:]
    private(set) var writeOrder: [Bytes] = []
    /// What the store held for each key the body read before staging it. The key stayed
    /// locked from that read on, so no saga can have written it since: it is the key's
    /// pre-image, and prepare need not read it again.
    private(set) var readFromStore: [HashedBytes: Bytes?] = [:]
    var ended = false
    /// The body ran a statement other than plain DML: it may have left session state on the
    /// connection (table locks, `SET autocommit`, SQLite pragmas), which is then closed
    /// instead of pooled.
    var ranSessionStatement = false
    /// Set when the SQL transaction ended under the saga: no statement runs after it, no
    /// marker commits, and the KV side is never written.
    var poison: Poison?

    enum Poison {
        /// The database rolled the transaction back (deadlock victim, lost connection...).
        case rolledBack(any Error)
        /// A statement of the body ended the transaction (`COMMIT`, DDL with an implicit
        /// commit): what the saga wrote in SQL before it may be committed.
        case endedBy(statement: String, error: (any Error)?)

        func error(saga: SagaID) -> SagaError {
            switch self {
            case .rolledBack(let e): .transactionLost(saga: saga, underlying: e)
            case .endedBy(let statement, let e): .transactionEndedByStatement(saga: saga, statement: statement, underlying: e)
            }
        }
    }

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
        try checkUsable()
        if let image, image.count > SagaContext.maxValueSize {
            throw .misuse(.valueTooLarge(size: image.count, limit: SagaContext.maxValueSize))
        }
        try lock(key)
        if staged.updateValue(image, forKey: HashedBytes(key)) == nil { writeOrder.append(key) }
    }

    fileprivate func read(_ key: Bytes) throws -> Bytes? {
        try lock(key)
        let hashed = HashedBytes(key)
        if let image = staged[hashed] { return image }
        if let seen = readFromStore[hashed] { return seen }
        let value = try context.kv.get(key)
        readFromStore[hashed] = value
        return value
    }

    /// The store's value of each written key before the saga: the body's own read where it
    /// read the key before writing it, one multi-get for the others.
    func preImages(of writes: [(key: Bytes, image: Bytes?)]) throws -> [Bytes?] {
        var images = [Bytes?](repeating: nil, count: writes.count)
        var unread: [Int] = []
        for (i, w) in writes.enumerated() {
            if let seen = readFromStore[HashedBytes(w.key)] { images[i] = seen } else { unread.append(i) }
        }
        if !unread.isEmpty {
            let fetched = try context.kv.multiGet(unread.map { writes[$0].key })
            for (j, i) in unread.enumerated() { images[i] = fetched[j] }
        }
        return images
    }

    /// The staged writes in first-touch order.
    var writes: [(key: Bytes, image: Bytes?)] {
        writeOrder.map { ($0, staged[HashedBytes($0)] ?? nil) }
    }
}

@available(*, unavailable)
extension Saga: Sendable {}

/// The KV side of a saga: reads see staged writes; writes are staged until the saga commits.
public struct SagaKV {
    /// Weak: a handle that escaped the body must throw ``SagaError/Misuse/sagaEnded(_:)``
    /// once its saga is gone, not trap.
    private weak var saga: Saga?
    private let id: SagaID

    init(saga: Saga) { self.saga = saga; self.id = saga.id }

    private func live() throws(SagaError) -> Saga {
        guard let saga else { throw .misuse(.sagaEnded(id)) }
        return saga
    }

    /// Reads a key (locking it): the saga's own staged value if any, else the store's.
    public func get(_ key: Bytes) throws -> Bytes? { try live().read(key) }
    /// Stages a put.
    public func put(_ key: Bytes, _ value: Bytes) throws { try live().stage(key, value) }
    /// Stages a delete.
    public func delete(_ key: Bytes) throws { try live().stage(key, nil) }

    public func get(_ key: String) throws -> Bytes? { try get(Bytes(key.utf8)) }
    public func put(_ key: String, _ value: String) throws { try put(Bytes(key.utf8), Bytes(value.utf8)) }
    public func delete(_ key: String) throws { try delete(Bytes(key.utf8)) }
}

@available(*, unavailable)
extension SagaKV: Sendable {}

/// The SQL side of a saga: statements run in the saga's transaction, which the saga owns:
/// `BEGIN`, `COMMIT`, `ROLLBACK` and the like are refused before they run
/// (``SagaError/Misuse/transactionControl(_:)``). If the database rolls the transaction back
/// under the saga (deadlock victim, lost connection), every later statement throws
/// ``SagaError/transactionLost(saga:underlying:)``; if a statement ends it otherwise (DDL with
/// an implicit commit), ``SagaError/transactionEndedByStatement(saga:statement:underlying:)``.
/// Either way the saga will not commit a marker or write the KV side.
public final class SagaSQL: SQLExecutor {
    /// Weak, for the same reason as ``SagaKV``'s.
    private weak var saga: Saga?
    private let id: SagaID
    init(saga: Saga) { self.saga = saga; self.id = saga.id }

    @discardableResult
    public func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int {
        try guarded(sql) { try $0.execute(sql, arguments) }
    }

    public func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow] {
        try guarded(sql) { try $0.query(sql, arguments) }
    }

    /// Runs one statement of the body, and checks the transaction after it: a statement that
    /// ended it (successfully or not) poisons the saga.
    private func guarded<T>(_ sql: String, _ work: (any SQLConnection) throws -> T) throws -> T {
        guard let saga else { throw SagaError.misuse(.sagaEnded(id)) }
        try saga.checkUsable()
        if let poison = saga.poison { throw poison.error(saga: id) }
        let kind = StatementKind(sql)
        if kind == .transactionControl { throw SagaError.misuse(.transactionControl(sql)) }
        let connection = saga.connection
        // A statement run after the transaction ended would autocommit on its own.
        // It can only have ended unseen (through the raw handle...): how is unknown, so it
        // may have committed.
        guard connection.isInTransaction else {
            let poison = Saga.Poison.endedBy(statement: "(before `\(sql)`: the transaction was found ended)", error: TransactionEnded())
            saga.poison = poison
            throw poison.error(saga: id)
        }
        // A statement that is not plain DML may end the transaction (and, on MySQL, open
        // another), or leave session state behind: mark the transaction to check it after,
        // and never pool the connection again.
        let mayCommit = kind != .plain
        if mayCommit {
            saga.ranSessionStatement = true
            try connection.markTransaction()
        }
        let result: T
        do {
            result = try work(connection)
        } catch {
            var state = connection.transactionState(after: error)
            if mayCommit, state == .open, !connection.transactionSurvived() { state = .mayBeCommitted }
            switch state {
            case .open: break
            case .rolledBack: saga.poison = .rolledBack(error)
            case .mayBeCommitted: saga.poison = .endedBy(statement: sql, error: error)
            }
            if let poison = saga.poison, case .endedBy = poison { throw poison.error(saga: id) }
            throw error
        }
        if !(mayCommit ? connection.transactionSurvived() : connection.isInTransaction) {
            let poison = Saga.Poison.endedBy(statement: sql, error: nil)
            saga.poison = poison
            throw poison.error(saga: id)
        }
        return result
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
