/// Everything a saga can end with other than success. Each case says what happened to both
/// stores and what the caller can do about it.
public enum SagaError: Error, CustomStringConvertible, Sendable {
    /// The body threw. The SQL transaction was rolled back and the KV store was never touched:
    /// nothing was written anywhere. Worth retrying only if `underlying` is transient (see
    /// ``isRetryable``): an error of the application's own will be thrown again.
    case bodyFailed(saga: SagaID, underlying: any Error)
    /// The SQL transaction ended under the saga (the database rolled it back: deadlock victim,
    /// lost connection...). The saga refused to run further statements or commit a marker.
    /// Nothing was written anywhere. Safe to retry.
    case transactionLost(saga: SagaID, underlying: any Error)
    /// A statement of the body ended the SQL transaction (`COMMIT`, `ROLLBACK`, DDL with an
    /// implicit commit): what the saga wrote in SQL before it may already be committed. The
    /// saga ran no further statement, committed no marker and never wrote the KV side. Not
    /// retryable: check the SQL side, and do not end the transaction inside a saga.
    case transactionEndedByStatement(saga: SagaID, statement: String, underlying: (any Error)?)
    /// An SQL step outside the body failed before anything was written (`BEGIN`, opening a
    /// connection). Nothing was written anywhere.
    case sqlFailed(saga: SagaID?, step: SagaStep, underlying: any Error)
    /// Writing the forward KV batch failed. The SQL transaction was rolled back: nothing is
    /// committed. If the KV store kept part of the failed write on disk, recovery after
    /// reopening undoes it (it is journaled). Reopen the store before retrying.
    case kvWriteFailed(saga: SagaID, underlying: any Error)
    /// `COMMIT` failed (proved by the database) and every KV write of the saga was undone.
    /// Both stores are as before the saga. Worth retrying only if `underlying` is transient (a
    /// deadlock or a busy database at `COMMIT`), not after a constraint violation.
    case commitFailed(saga: SagaID, underlying: any Error, restoredKeys: Int)
    /// The outcome of `COMMIT` could not be decided (the database is unreachable). The saga
    /// stays `prepared` and its keys stay locked; ``SagaCoordinator/recover()`` (or the next
    /// open) resolves it. Do not retry the saga before it is resolved.
    case inDoubt(saga: SagaID, underlying: any Error)
    /// While undoing a failed saga, a key held bytes that are neither the saga's after-image
    /// nor its pre-image: something wrote it behind the coordinator. Nothing was undone; the
    /// saga stays `prepared` with its keys locked. Repair the key by hand (to the pre-image
    /// if the SQL side is the truth), then run recovery.
    case foreignWrite(saga: SagaID, key: Bytes, preImage: Bytes?, afterImage: Bytes?, current: Bytes?)
    /// Writing the compensating batch failed. The saga stays `prepared` with its keys
    /// locked; recovery (or reopening) finishes it.
    case compensationFailed(saga: SagaID, underlying: any Error)
    /// `COMMIT` failed (or was fenced off: it can never commit), and undoing the saga's KV
    /// writes did not finish: `compensation` says why (``compensationFailed(saga:underlying:)``
    /// or ``foreignWrite(saga:key:preImage:afterImage:current:)``). The SQL side holds none
    /// of the saga; the saga stays `prepared` with its keys locked, and recovery (or a human,
    /// for a foreign write) finishes the undo.
    indirect case compensationFailedAfterCommit(saga: SagaID, commitError: any Error, compensation: SagaError)
    /// A key lock was not granted in time. The saga was rolled back, nothing was written.
    /// Retry; a timeout can also be a deadlock through the SQL database's own locks.
    case lockTimeout(saga: SagaID, keys: [Bytes], heldBy: [SagaID])
    /// Granting the lock would close a cycle of sagas waiting for each other. This saga was
    /// chosen as the victim and rolled back; nothing was written. Retry.
    case deadlock(saga: SagaID, keys: [Bytes], cycle: [SagaID])
    /// A journal record could not be decoded (damaged, or written by an unknown version).
    /// Recovery refuses to guess and leaves it in place.
    case journalCorrupt(saga: SagaID?, key: Bytes, reason: String)
    /// The API was used in a way it does not allow; nothing was written.
    case misuse(Misuse)
    /// The task running the saga was cancelled before the forward KV batch was written
    /// (before `BEGIN`, before the body, or between the body and the KV batch), or the body
    /// threw a `CancellationError`. The SQL transaction was rolled back, the KV store was never
    /// touched and the saga's locks were released: nothing was written anywhere. `saga` is nil
    /// when the task was cancelled before the saga got an id. Cancellation after the KV batch
    /// is ignored: the saga then finishes (commits or compensates) as if not cancelled.
    case cancelled(saga: SagaID?)
    /// A saga run with caller key `key` (``SagaCoordinator/run(key:_:)-4bh0f``) committed already:
    /// `saga` (of the instance that ran it, maybe another coordinator on the same database).
    /// Refused before the body ran (or, in a race, at the key's insert, with the transaction
    /// rolled back): nothing was written, the work is not applied twice. Not retryable.
    case alreadyCommitted(key: String, saga: SagaID)
    /// The coordinator stopped after a failure it cannot continue past (an fsync failed).
    /// Reopen the stores; recovery decides every saga that was in flight.
    case stopped(reason: String)

    public enum Misuse: Sendable, CustomStringConvertible, Equatable {
        case sagaEnded(SagaID)
        case nestedSaga(SagaID)
        case emptyKey
        case reservedKey(Bytes)
        case keyTooLarge(size: Int, limit: Int)
        case valueTooLarge(size: Int, limit: Int)
        /// A statement that starts or ends a transaction (`BEGIN`, `COMMIT`, `ROLLBACK`...)
        /// inside a saga, whose transaction the coordinator owns. It was not run.
        case transactionControl(String)
        /// The saga's journal record (every written key with its pre- and after-image) would
        /// be larger than ``SagaCoordinator/Configuration/maxRecordSize``.
        case sagaTooLarge(size: Int, limit: Int)
        case closed
        /// Another coordinator of this process has the KV store open: one journal, one
        /// coordinator (a second one would decide the first one's sagas).
        case storeInUse
        /// The SQL database's instance table says another journal opened this instance since
        /// this one last did: two journals share one instance id (two journals written before
        /// instance ids on one database, or a copy of a KV store opened beside its original).
        /// Nothing was read or changed; the node must not run on this journal and database
        /// as they are.
        case instanceClaimedByAnotherJournal(InstanceID)
        /// A coordinator runs with this instance right now (another process, on a copy of
        /// this KV store, on the same SQL database). Nothing was read or changed.
        case instanceInUse(InstanceID)
        /// A configuration value out of range, named with the reason.
        case invalidConfiguration(String)
        /// A caller key (``SagaCoordinator/run(key:_:)-4bh0f``) that is empty.
        case emptyCallerKey
        /// A caller key longer than ``SagaCoordinator/maxCallerKeyBytes`` bytes of UTF-8.
        case callerKeyTooLarge(size: Int, limit: Int)

        public var description: String {
            switch self {
            case .sagaEnded(let id): "\(id) has ended; its KV and SQL handles can no longer be used"
            case .nestedSaga(let id): "a saga cannot start inside \(id) on the same thread; run the work in the outer saga"
            case .emptyKey: "the empty key is not a valid KV key"
            case .reservedKey(let key): "the key \"\(key.debugText)\" is in the reserved journal space (prefix \\x00saga\\x00)"
            case .keyTooLarge(let size, let limit): "a key of \(size) bytes is over the limit of \(limit) bytes"
            case .valueTooLarge(let size, let limit): "a value of \(size) bytes is over the limit of \(limit) bytes"
            case .transactionControl(let sql): "`\(sql)` starts or ends a transaction, which the saga owns (it commits or rolls back when the body returns or throws); not run"
            case .sagaTooLarge(let size, let limit): "the saga's journal record (its keys with their pre- and after-images) takes \(size) bytes, over the limit of \(limit) bytes (Configuration.maxRecordSize; in redo mode also the database's largest statement, such as MySQL's max_allowed_packet, less 4 KiB); split the work into smaller sagas"
            case .closed: "the coordinator is closed"
            case .instanceClaimedByAnotherJournal(let instance): "\(instance) of this SQL database was opened by another journal since this journal last opened it: two journals share one instance id (two journals written before instance ids on one database, a copy of a KV store opened beside its original, or a KV store restored from a backup); refused before any marker row was read. Give each node its own journal, or its own SQL database"
            case .instanceInUse(let instance): "\(instance) is open in another coordinator right now (another process on a copy of this KV store, on the same SQL database); refused before any marker row was read"
            case .storeInUse: "the KV store already has an open coordinator in this process; close it first (two coordinators on one journal would decide each other's sagas)"
            case .invalidConfiguration(let why): "invalid configuration: \(why)"
            case .emptyCallerKey: "the caller key is empty; pass nil to run without one, or a non-empty key (a request id)"
            case .callerKeyTooLarge(let size, let limit): "the caller key takes \(size) bytes of UTF-8, over the limit of \(limit) bytes; use a shorter request id (or a hash of it)"
            }
        }
    }

    /// The saga the error is about, when there is one.
    public var saga: SagaID? {
        switch self {
        case .bodyFailed(let s, _), .transactionLost(let s, _), .kvWriteFailed(let s, _), .transactionEndedByStatement(let s, _, _),
             .commitFailed(let s, _, _), .inDoubt(let s, _), .foreignWrite(let s, _, _, _, _),
             .compensationFailed(let s, _), .compensationFailedAfterCommit(let s, _, _), .lockTimeout(let s, _, _), .deadlock(let s, _, _),
             .alreadyCommitted(_, let s):
            s
        case .sqlFailed(let s, _, _), .journalCorrupt(let s, _, _), .cancelled(let s): s
        case .misuse, .stopped: nil
        }
    }

    /// Whether both stores are known to hold none of the saga's writes: running the same work
    /// again cannot apply it twice. Says nothing about whether it would succeed (a body that
    /// threw "insufficient funds" wrote nothing, and will throw it again); see ``isRetryable``.
    public var nothingWritten: Bool {
        switch self {
        case .bodyFailed, .transactionLost, .sqlFailed, .commitFailed, .lockTimeout, .deadlock, .misuse, .cancelled, .alreadyCommitted: true
        default: false
        }
    }

    /// Whether running the same saga again may well succeed: nothing was written
    /// (``nothingWritten``) and the cause was transient: a key lock timed out, a deadlock, a
    /// transaction the database rolled back under the saga (deadlock victim, lost connection),
    /// or a store error its backend classifies as transient (``TransientClassifiable``: a lock
    /// wait timeout, a busy database, a lost connection), whether it reached the caller through
    /// the body, `BEGIN` or `COMMIT`. A body's own error (an application check that failed)
    /// is not transient, nor is a constraint that made `COMMIT` fail: retrying would fail the
    /// same way.
    ///
    /// A correct retry loop retries only on this, a bounded number of times, with a backoff,
    /// and runs the whole saga (reads included) again each time:
    ///
    /// ```swift
    /// var attempt = 0
    /// while true {
    ///     do { return try coordinator.run(body) }
    ///     catch let error where error.isRetryable && attempt < 5 {
    ///         attempt += 1
    ///         Thread.sleep(forTimeInterval: 0.01 * Double(1 << attempt))
    ///     }
    /// }
    /// ```
    public var isRetryable: Bool {
        switch self {
        case .lockTimeout, .deadlock, .transactionLost: true
        case .bodyFailed(_, let e), .sqlFailed(_, _, let e), .commitFailed(_, let e, _): Self.isTransient(e)
        default: false
        }
    }

    /// Whether `error`, or the store error it wraps, is transient.
    static func isTransient(_ error: any Error) -> Bool {
        switch error {
        case let e as SagaError: e.isRetryable
        case let e as any TransientClassifiable: e.isTransient
        default: false
        }
    }

    public var description: String {
        switch self {
        case .bodyFailed(let s, let e):
            "\(s): the body threw (\(e)); SQL rolled back, KV untouched, nothing written"
        case .transactionLost(let s, let e):
            "\(s): the SQL transaction ended under the saga (\(e)); refused to continue, nothing written"
        case .transactionEndedByStatement(let s, let statement, let e):
            "\(s): the statement `\(statement)` ended the SQL transaction\(e.map { " (\($0))" } ?? ""); the saga's SQL writes before it may be committed; KV untouched, no marker; not retryable: check the SQL side and never end the transaction inside a saga"
        case .sqlFailed(let s, let step, let e):
            "\(s.map(String.init(describing:)) ?? "saga"): SQL failed at step '\(step)' (\(e)); nothing written"
        case .kvWriteFailed(let s, let e):
            "\(s): the KV batch failed (\(e)); SQL rolled back, nothing committed; reopen the KV store, recovery undoes any partial write"
        case .commitFailed(let s, let e, let n):
            "\(s): COMMIT failed (\(e)); KV compensated (\(n) key(s) restored), both stores as before"
        case .inDoubt(let s, let e):
            "\(s): COMMIT outcome in doubt (\(e)); saga stays prepared with its keys locked, recovery will resolve it"
        case .foreignWrite(let s, let key, let pre, let post, let cur):
            "\(s): key \"\(key.debugText)\" was written behind the saga: pre-image \(describe(pre)), after-image \(describe(post)), current \(describe(cur)); nothing undone, saga left prepared with its keys locked: repair the key, then run recovery"
        case .compensationFailed(let s, let e):
            "\(s): writing the compensation failed (\(e)); saga left prepared with its keys locked, recovery will finish it"
        case .compensationFailedAfterCommit(let s, let commitError, let compensation):
            "\(s): COMMIT failed (\(commitError)), nothing of the saga is committed in SQL, and undoing its KV writes did not finish: \(compensation)"
        case .lockTimeout(let s, let keys, let holders):
            "\(s): lock wait timed out on \(keys.map { "\"\($0.debugText)\"" }.joined(separator: ", ")) held by \(holders.map(String.init(describing:)).joined(separator: ", ")); rolled back, nothing written"
        case .deadlock(let s, let keys, let cycle):
            "\(s): deadlock on \(keys.map { "\"\($0.debugText)\"" }.joined(separator: ", ")) (cycle \(cycle.map(String.init(describing:)).joined(separator: " -> "))); rolled back, nothing written"
        case .journalCorrupt(let s, let key, let reason):
            "journal record \"\(key.debugText)\"\(s.map { " of \($0)" } ?? "") cannot be decoded: \(reason); recovery refuses to guess"
        case .cancelled(let s):
            "\(s.map(String.init(describing:)) ?? "saga"): cancelled before anything was written; SQL rolled back, KV untouched, nothing written"
        case .misuse(let m):
            "misuse: \(m)"
        case .alreadyCommitted(let key, let s):
            "the caller key \"\(key)\" was committed already by \(s); refused before the body ran, nothing written this time"
        case .stopped(let reason):
            "the coordinator stopped: \(reason); reopen the stores, recovery will decide the sagas in flight"
        }
    }
}

/// A store error that knows whether the same work may succeed when simply run again. Backends
/// conform their error types: MariaDB's deadlock (1213), lock wait timeout (1205) and lost
/// connections, SQLite's `SQLITE_BUSY` and `SQLITE_LOCKED`. ``SagaError/isRetryable`` asks it.
public protocol TransientClassifiable: Error {
    /// Whether the same work may succeed when run again, unchanged.
    var isTransient: Bool { get }
}
