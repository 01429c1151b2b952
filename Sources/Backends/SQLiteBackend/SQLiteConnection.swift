import CSQLite
import Saga

/// One connection to an SQLite database. Not `Sendable`: a connection is used by one thread at
/// a time (the coordinator lends it to one saga). Statements are prepared once and cached;
/// values are always bound, never spliced into SQL text.
public final class SQLiteConnection: SQLConnection {
    private var handle: OpaquePointer?
    private let statements: StatementCache<OpaquePointer>
    private let markerTable: String
    public let path: String
    private let gate: WriterGate?
    private var holdsGate = false
    private let busyTimeout: Duration

    /// - Parameter readOnly: opens an existing file read-only (`SQLITE_OPEN_READONLY`, and
    ///   `PRAGMA query_only`), setting no pragma that could write: for tools that inspect a node.
    init(path: String, configuration: SQLiteDatabase.Configuration, gate: WriterGate? = nil, readOnly: Bool = false) throws {
        self.path = path
        self.gate = gate
        self.busyTimeout = configuration.busyTimeout
        self.markerTable = configuration.markerTable
        self.statements = StatementCache(capacity: configuration.statementCacheSize) { sqlite3_finalize($0) }
        var db: OpaquePointer?
        let flags = (readOnly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE
        let rc = sqlite3_open_v2(path, &db, flags, configuration.vfs)
        guard rc == SQLITE_OK, let db else {
            let error = SQLiteError(code: rc, connection: db, sql: nil)
            sqlite3_close_v2(db)
            throw SQLiteError(code: error.extendedCode, message: "cannot open \(path): \(error.message)")
        }
        handle = db
        sqlite3_extended_result_codes(db, 1)
        sqlite3_busy_timeout(db, configuration.busyTimeoutMilliseconds)
        if readOnly {
            do { try execute("PRAGMA query_only=1", []) } catch {
                close()
                throw error
            }
            return
        }
        do {
            let mode = try query("PRAGMA journal_mode=\(configuration.journalMode.rawValue)", []).first?[0].string ?? ""
            if mode.lowercased() != configuration.journalMode.rawValue.lowercased() {
                throw SQLiteUsageError(description: "\(path): journal_mode \(configuration.journalMode.rawValue) was refused (got \(mode))")
            }
            try execute("PRAGMA synchronous=\(configuration.synchronous.rawValue)", [])
            try execute("PRAGMA foreign_keys=\(configuration.foreignKeys ? "ON" : "OFF")", [])
        } catch {
            close()
            throw error
        }
    }

    deinit { close() }

    /// The raw handle, for what this wrapper does not cover. Valid until ``close()``.
    /// Statements this connection has prepared (cache misses).
    package var statementsPrepared: Int { statements.prepared }
    package var sqliteHandle: OpaquePointer? { handle }

    public func close() {
        defer { releaseGate() }
        statements.removeAll()
        if let handle { sqlite3_close_v2(handle) }
        handle = nil
    }

    private func db() throws -> OpaquePointer {
        guard let handle else { throw SQLiteUsageError(description: "the SQLite connection to \(path) is closed") }
        return handle
    }

    // MARK: Statements

    private func statement(_ sql: String) throws -> OpaquePointer {
        try statements.statement(for: sql) { try prepare(sql) }
    }

    private func prepare(_ sql: String) throws -> OpaquePointer {
        let db = try db()
        var stmt: OpaquePointer?
        // `tail` points into the C string, which lives only inside this closure: read it here.
        let (rc, trailing) = sql.withCString { text -> (Int32, Bool) in
            var tail: UnsafePointer<CChar>?
            let rc = sqlite3_prepare_v3(db, text, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &stmt, &tail)
            guard rc == SQLITE_OK, let tail, tail.pointee != 0 else { return (rc, false) }
            return (rc, !String(cString: tail).allSatisfy { $0.isWhitespace || $0 == ";" })
        }
        guard rc == SQLITE_OK, let stmt else { throw SQLiteError(code: rc, connection: db, sql: sql) }
        if trailing {
            sqlite3_finalize(stmt)
            throw SQLiteUsageError(description: "only one statement at a time: `\(sql)`")
        }
        return stmt
    }

    private func bind(_ stmt: OpaquePointer, _ arguments: [SQLValue], sql: String) throws {
        let expected = Int(sqlite3_bind_parameter_count(stmt))
        guard expected == arguments.count else {
            throw SQLiteUsageError(description: "`\(sql)` takes \(expected) argument(s), \(arguments.count) given")
        }
        for (i, value) in arguments.enumerated() {
            let idx = Int32(i + 1)
            let rc: Int32
            switch value {
            case .null: rc = sqlite3_bind_null(stmt, idx)
            case .integer(let v): rc = sqlite3_bind_int64(stmt, idx, v)
            case .real(let v): rc = sqlite3_bind_double(stmt, idx, v)
            case .text(let v): rc = sqlite3_bind_text(stmt, idx, v, -1, sqliteTransient)
            case .blob(let v):
                rc = v.withUnsafeBytes { sqlite3_bind_blob(stmt, idx, $0.baseAddress, Int32($0.count), sqliteTransient) }
            }
            guard rc == SQLITE_OK else { throw SQLiteError(code: rc, connection: handle, sql: sql) }
        }
    }

    /// Runs a statement to completion, calling `row` for each result row.
    /// - Parameter keepGateOnError: after a failed statement that ended the transaction, keep
    ///   the writer gate (see ``commit()``).
    private func run(_ sql: String, _ arguments: [SQLValue], keepGateOnError: Bool = false, row: ((OpaquePointer) -> Void)? = nil) throws {
        do {
            try step(sql, arguments, row: row)
        } catch {
            if !keepGateOnError { releaseGateAfterTransaction() }
            throw error
        }
        releaseGateAfterTransaction()
    }

    /// However the transaction ended (COMMIT, ROLLBACK, or SQLite rolling back by itself after
    /// an error), the next writer may go.
    private func releaseGateAfterTransaction() {
        if holdsGate, !isInTransaction { releaseGate() }
    }

    private func step(_ sql: String, _ arguments: [SQLValue], row: ((OpaquePointer) -> Void)?) throws {
        let stmt = try statement(sql)
        defer {
            sqlite3_reset(stmt)
            sqlite3_clear_bindings(stmt)
        }
        try bind(stmt, arguments, sql: sql)
        while true {
            let rc = sqlite3_step(stmt)
            switch rc {
            case SQLITE_ROW: row?(stmt)
            case SQLITE_DONE: return
            default: throw SQLiteError(code: rc, connection: handle, sql: sql)
            }
        }
    }

    @discardableResult
    public func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int {
        try run(sql, arguments)
        return Int(sqlite3_changes(try db()))
    }

    public func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow] {
        var rows: [SQLRow] = []
        var columns: [String]?
        try run(sql, arguments) { stmt in
            let n = sqlite3_column_count(stmt)
            if columns == nil { columns = (0..<n).map { String(cString: sqlite3_column_name(stmt, $0)) } }
            let values = (0..<n).map { i -> SQLValue in
                switch sqlite3_column_type(stmt, i) {
                case SQLITE_INTEGER: return .integer(sqlite3_column_int64(stmt, i))
                case SQLITE_FLOAT: return .real(sqlite3_column_double(stmt, i))
                case SQLITE_TEXT: return .text(String(cString: sqlite3_column_text(stmt, i)))
                case SQLITE_BLOB:
                    let count = Int(sqlite3_column_bytes(stmt, i))
                    guard let p = sqlite3_column_blob(stmt, i), count > 0 else { return .blob([]) }
                    return .blob(Bytes(UnsafeRawBufferPointer(start: p, count: count)))
                default: return .null
                }
            }
            rows.append(SQLRow(columns: columns ?? [], values: values))
        }
        return rows
    }

    // MARK: Transactions

    public var isInTransaction: Bool {
        guard let handle else { return false }
        return sqlite3_get_autocommit(handle) == 0
    }

    public var isBroken: Bool { handle == nil }

    /// `BEGIN IMMEDIATE`: takes the write lock up front, so two sagas never both read and then
    /// fail to upgrade (SQLite has one writer at a time anyway).
    public func begin() throws {
        if let gate, !holdsGate {
            guard gate.acquire(timeout: busyTimeout) else {
                throw SQLiteError(code: SQLITE_BUSY, message: "database is locked: another connection of this process held the write transaction for longer than the busy timeout (\(busyTimeout))", sql: "BEGIN IMMEDIATE")
            }
            holdsGate = true
        }
        try execute("BEGIN IMMEDIATE", [])
    }

    private func releaseGate() {
        guard holdsGate else { return }
        holdsGate = false
        gate?.release()
    }

    public func rollback() throws {
        // Nothing open: whatever ended it, the next writer may go.
        guard isInTransaction else { return releaseGate() }
        try execute("ROLLBACK", [])
    }

    /// When COMMIT fails and SQLite has ended the transaction (an unknown outcome), the
    /// connection keeps the writer gate: the saga still holds its keys, and the fence that
    /// decides it must not queue behind a writer that waits for them. The gate goes with
    /// ``close()`` or to the fencing connection (``SQLiteDatabase/connect(replacing:)``).
    public func commit() -> CommitResult {
        do {
            try run("COMMIT", [], keepGateOnError: true)
            return .committed
        } catch {
            // Still open (deferred constraint, SQLITE_BUSY): the database proves it did not
            // commit; roll it back ourselves. Ended by SQLite itself (I/O error, disk full): a WAL
            // frame may already be on disk, so the outcome is unknown.
            if isInTransaction {
                do { try rollback() } catch { return .unknown(error) }
                return .failed(error)
            }
            return .unknown(error)
        }
    }

    /// No statement can commit SQLite's transaction and open another behind the saga's back:
    /// being in a transaction after a statement is being in the same one.
    public func markTransaction() throws {}
    public func transactionSurvived() -> Bool { isInTransaction }
    /// Connections live only in this process: no server session to name or end (closing the
    /// connection ends whatever it had open).
    public var session: SQLSession? { nil }
    public func endSessions(_ sessions: [SQLSession]) throws -> Set<SQLSession> { [] }

    /// SQLite ends a transaction after an error only by rolling it back, unless the failed
    /// statement was itself the one that commits.
    public func transactionState(after error: any Error) -> TransactionState {
        if isInTransaction { return .open }
        if let e = error as? SQLiteError, let sql = e.sql, TransactionState.statementMayCommit(sql) { return .mayBeCommitted }
        return .rolledBack
    }

    /// Hands this connection's place at the writer gate to `successor` (see
    /// ``SQLiteDatabase/connect(replacing:)``).
    func handGate(to successor: SQLiteConnection) {
        guard holdsGate, successor.gate === gate else { return }
        holdsGate = false
        successor.holdsGate = true
    }

    // MARK: Markers

    /// Creates the marker table, or migrates one of an earlier version (keyed by `saga_id`
    /// alone) in one transaction: its rows go to ``InstanceID/legacy``. Creates the instance
    /// and caller-key tables beside it when they are missing.
    public func ensureMarkerTable() throws {
        try execute("CREATE TABLE IF NOT EXISTS \(markerTable)_instances (instance INTEGER PRIMARY KEY, claim INTEGER NOT NULL)", [])
        // Caller keys (`run(key:)`): one row per key whatever the instance; the index serves the
        // pruning by age.
        try execute("CREATE TABLE IF NOT EXISTS \(markerTable)_keys (caller_key BLOB NOT NULL PRIMARY KEY, instance INTEGER NOT NULL, saga_id INTEGER NOT NULL, created_ms INTEGER NOT NULL) WITHOUT ROWID", [])
        try execute("CREATE INDEX IF NOT EXISTS \(markerTable)_keys_age ON \(markerTable)_keys (instance, created_ms)", [])
        func columns() throws -> [String] { try query("PRAGMA table_info(\(markerTable))", []).compactMap { $0["name"]?.string } }
        let current = try columns()
        if current.contains("instance") && current.contains("seq") { return }
        try begin()
        do {
            // Another process may have migrated it meanwhile: look again under the write lock.
            let columns = try columns()
            if !columns.contains("instance") {
                try execute("""
                    CREATE TABLE \(markerTable)_new (
                        instance INTEGER NOT NULL,
                        saga_id INTEGER NOT NULL,
                        status TEXT NOT NULL CHECK (status IN ('committed', 'aborted')),
                        seq INTEGER,
                        redo BLOB,
                        PRIMARY KEY (instance, saga_id)) WITHOUT ROWID
                    """, [])
                if !columns.isEmpty {
                    try execute("INSERT INTO \(markerTable)_new (instance, saga_id, status) SELECT 0, saga_id, status FROM \(markerTable)", [])
                    try execute("DROP TABLE \(markerTable)", [])
                }
                try execute("ALTER TABLE \(markerTable)_new RENAME TO \(markerTable)", [])
            } else if !columns.contains("seq") {
                // A table of a version before redo mode: its rows are markers, without a sequence.
                try execute("ALTER TABLE \(markerTable) ADD COLUMN seq INTEGER", [])
                try execute("ALTER TABLE \(markerTable) ADD COLUMN redo BLOB", [])
            }
            switch commit() {
            case .committed: break
            case .failed(let e), .unknown(let e): throw e
            }
        } catch {
            try? rollback()
            throw error
        }
    }
}

@available(*, unavailable)
extension SQLiteConnection: Sendable {}

/// `SQLITE_TRANSIENT` is a macro Swift does not import: SQLite copies the bound bytes.
let sqliteTransient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)
