import Logging
import Saga

/// What the conformance suite needs from a pair of backends. One implementation per SQL
/// backend (SQLite, MariaDB...), always over the real stores.
public protocol SagaHarness: Sendable {
    /// A short name for test output ("rocksdb+sqlite").
    var name: String { get }
    /// Fresh, empty stores with the suite's test table created.
    func makeEnvironment() throws -> any HarnessEnvironment
}

/// One pair of real stores under test. Sendable because concurrent cases share it between
/// threads; ``reopen()`` is only called while no saga runs.
public protocol HarnessEnvironment: AnyObject, Sendable {
    var kv: any KVStore { get }
    var sql: any SQLDatabase { get }
    /// Closes both stores and opens them again, as a restarted process would.
    func reopen() throws
    /// Stages something in `saga` that makes its COMMIT fail for real, in a way the database
    /// proves (the outcome is "failed", not "unknown").
    func arrangeCommitFailure(in saga: Saga) throws
    /// Ends the saga's SQL transaction by committing it in a way no check of the statement's
    /// text can see coming (MySQL: DDL, whose implicit commit the statement check afterwards
    /// catches; SQLite, which has no such statement: `COMMIT` through the raw handle, which the
    /// check before the next statement catches). What the saga wrote in SQL is committed.
    func endTransactionUnseen(in saga: Saga) throws
    /// Hooks that make the next COMMIT's outcome unknown for real (an I/O error while
    /// committing, a lost reply): the coordinator must resolve it by fencing.
    func unknownCommitHooks() -> any SagaHooks
    /// Whether the SQL database runs one writing transaction at a time (SQLite): then sagas
    /// cannot deadlock on KV keys, because the first holds the database until it completes.
    var serializesWriters: Bool { get }
    /// Removes the stores.
    func destroy()
    /// The mode every coordinator of ``coordinator(_:)`` runs in: ``SagaCoordinator/Configuration/Mode/compensate``
    /// unless the environment is wrapped by ``ModeEnvironment``.
    var mode: SagaCoordinator.Configuration.Mode { get }
}

extension HarnessEnvironment {
    public var mode: SagaCoordinator.Configuration.Mode { .compensate }
}

/// An environment whose coordinators run in `mode`: the conformance suite, unchanged, in redo
/// mode. Everything else is the wrapped environment's.
public final class ModeEnvironment: HarnessEnvironment {
    public let base: any HarnessEnvironment
    public let mode: SagaCoordinator.Configuration.Mode
    public init(_ base: any HarnessEnvironment, mode: SagaCoordinator.Configuration.Mode) { self.base = base; self.mode = mode }
    public var kv: any KVStore { base.kv }
    public var sql: any SQLDatabase { base.sql }
    public func reopen() throws { try base.reopen() }
    public func arrangeCommitFailure(in saga: Saga) throws { try base.arrangeCommitFailure(in: saga) }
    public func endTransactionUnseen(in saga: Saga) throws { try base.endTransactionUnseen(in: saga) }
    public func unknownCommitHooks() -> any SagaHooks { base.unknownCommitHooks() }
    public var serializesWriters: Bool { base.serializesWriters }
    public func destroy() { base.destroy() }
}

/// A check that failed, with the place it was made.
public struct ConformanceFailure: Error, CustomStringConvertible {
    public let description: String
}

/// Throws ``ConformanceFailure`` unless `condition` holds.
public func check(_ condition: Bool, _ message: @autoclosure () -> String, file: StaticString = #fileID, line: UInt = #line) throws {
    if !condition { throw ConformanceFailure(description: "\(file):\(line): \(message())") }
}

/// Runs `body` and returns the ``SagaError`` it threw; fails if it threw nothing or something else.
public func expectSagaError<T>(_ body: () throws -> T, file: StaticString = #fileID, line: UInt = #line) throws -> SagaError {
    try sagaError(in: Result { try body() }, file: file, line: line)
}

/// The ``SagaError`` of `result`, or a ``ConformanceFailure`` saying what came instead.
private func sagaError<T>(in result: Result<T, any Error>, file: StaticString, line: UInt) throws -> SagaError {
    switch result {
    case .success(let value): throw ConformanceFailure(description: "\(file):\(line): expected a SagaError, got success (\(value))")
    case .failure(let e as SagaError): return e
    case .failure(let e as ConformanceFailure): throw e
    case .failure(let error): throw ConformanceFailure(description: "\(file):\(line): expected a SagaError, got \(type(of: error)): \(error)")
    }
}

extension HarnessEnvironment {
    /// A coordinator over the environment's stores (recovery runs as it opens), in the
    /// environment's ``mode`` when it is a ``ModeEnvironment``.
    public func coordinator(_ configuration: SagaCoordinator.Configuration = .init(), logger: Logger = Logger(label: "saga")) throws -> SagaCoordinator {
        var configuration = configuration
        // A ModeEnvironment runs every coordinator in its mode; otherwise the caller's.
        if let forced = (self as? ModeEnvironment)?.mode { configuration.mode = forced }
        return try SagaCoordinator(kv: kv, sql: sql, configuration: configuration, logger: logger)
    }

    /// One query on a fresh connection, outside any saga.
    public func sqlQuery(_ sql: String, _ args: [SQLValue] = []) throws -> [SQLRow] {
        let conn = try self.sql.connect()
        defer { conn.close() }
        return try conn.query(sql, args)
    }

    /// One statement on a fresh connection, outside any saga (autocommit).
    @discardableResult
    public func sqlExecute(_ sql: String, _ args: [SQLValue] = []) throws -> Int {
        let conn = try self.sql.connect()
        defer { conn.close() }
        return try conn.execute(sql, args)
    }

    /// The test table's value for `k`, or nil.
    public func row(_ k: String) throws -> Int64? {
        try sqlQuery("SELECT v FROM saga_test WHERE k = ?", [.text(k)]).first?[0].int64
    }

    /// Sagas the journal leaves undecided: `prepared` records without a `committed` marker.
    /// (A committed saga needs no further journal write: its marker proves the outcome, and
    /// garbage collection deletes its `prepared` record.)
    public func undecided() throws -> [SagaID] {
        let markers = try markers()
        return try journal().filter { $0.value.state == .prepared && markers[$0.key] != "committed" }.map(\.key).sorted()
    }

    /// The journal records, decoded, by saga id.
    package func journal() throws -> [SagaID: JournalRecord] {
        var out: [SagaID: JournalRecord] = [:]
        for (key, value) in try kv.journalEntries() {
            guard let id = JournalRecord.saga(fromKey: key) else { continue }
            out[id] = try JournalRecord(decoding: value)
        }
        return out
    }

    public func markers() throws -> [SagaID: String] {
        var out: [SagaID: String] = [:]
        for row in try sqlQuery("SELECT saga_id, status FROM saga_markers") {
            if let id = row[0].int64, let status = row[1].string { out[SagaID(UInt64(id))] = status }
        }
        return out
    }

    /// Writes KV keys directly, outside any saga (test set-up, or a "foreign" writer).
    public func kvSet(_ pairs: [(String, String?)]) throws {
        var batch = KVWriteBatch()
        for (k, v) in pairs { batch.set(Bytes(k.utf8), to: v.map { Bytes($0.utf8) }) }
        try kv.write(batch, sync: true)
    }

    public func kvGet(_ key: String) throws -> String? {
        try kv.get(Bytes(key.utf8)).map { String(decoding: $0, as: UTF8.self) }
    }
}

/// Inserts a `committed` marker row straight into the table (test set-up: what a saga that
/// committed before a crash left behind), inside the caller's transaction on `conn`.
public func insertMarkerRow(_ id: SagaID, instance: InstanceID, on conn: any SQLExecutor) throws {
    try conn.execute("INSERT INTO saga_markers (instance, saga_id, status) VALUES (?, ?, 'committed')",
                     [.integer(Int64(bitPattern: instance.rawValue)), .integer(Int64(bitPattern: id.rawValue))])
}

/// Portable DDL for the suite's table (works on SQLite and MySQL).
public let conformanceTableDDL = "CREATE TABLE IF NOT EXISTS saga_test (k VARCHAR(64) NOT NULL PRIMARY KEY, v BIGINT NOT NULL)"

/// ``expectSagaError(_:file:line:)`` for async code.
public func expectSagaErrorAsync<T>(_ body: () async throws -> T, file: StaticString = #fileID, line: UInt = #line) async throws -> SagaError {
    let result: Result<T, any Error>
    do { result = .success(try await body()) } catch { result = .failure(error) }
    return try sagaError(in: result, file: file, line: line)
}
