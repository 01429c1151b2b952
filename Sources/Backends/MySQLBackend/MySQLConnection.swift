import CMariaDB
import Foundation
import Saga

/// Calls `mysql_library_init` once, before any thread uses the client library.
enum MySQLLibrary {
    static let initialized: Bool = mysql_server_init(0, nil, nil) == 0
}

/// One connection to a MySQL/MariaDB server (MariaDB Connector/C). Not `Sendable`: used by one
/// thread at a time. Automatic reconnect is off (it would silently continue in autocommit mode
/// after a lost connection). Every statement with values is a server-side prepared statement;
/// values are bound, never spliced into SQL text.
public final class MySQLConnection: SQLConnection {
    private var handle: UnsafeMutablePointer<MYSQL>?
    private let statements: StatementCache<UnsafeMutablePointer<MYSQL_STMT>>
    private let markerTable: String
    private let requireReady: Bool
    private let configuration: MySQLDatabase.Configuration
    public let url: MySQLURL
    /// The connection died: nothing more can run on it.
    private var lost = false
    /// The server ended our transaction (deadlock victim, rollback on timeout).
    private var transactionGone = false
    /// The server could not say whether a transaction is open: never reuse the connection.
    private var stateUnknown = false
    /// When the server started (seconds since 1970), read at connect: tells a session of this
    /// run of the server from one of an earlier run whose id was reused.
    private var serverStart: UInt64 = 0

    /// - Parameter requireReady: false to reach a cluster node that is not ready for clients
    ///   (to end old sessions on it, which needs no table).
    init(url: MySQLURL, configuration: MySQLDatabase.Configuration, requireReady: Bool = true) throws {
        self.requireReady = requireReady
        guard MySQLLibrary.initialized else {
            throw MySQLUsageError(description: "the MariaDB client library failed to initialize")
        }
        self.url = url
        self.configuration = configuration
        self.markerTable = configuration.markerTable
        self.statements = StatementCache(capacity: configuration.statementCacheSize) { mysql_stmt_close($0) }
        // The first server that answers and is ready; a wrong password or a missing database
        // is the same on every server of a cluster, so it ends the search.
        var failures: [(MySQLURL.Endpoint, MySQLError)] = []
        for endpoint in url.endpoints {
            do {
                try connect(to: endpoint, configuration: configuration)
                self.endpoint = endpoint
                return
            } catch let error as MySQLError where Self.triesNextServer(error) && url.endpoints.count > 1 {
                failures.append((endpoint, error))
            }
        }
        throw MySQLError(
            code: failures.last?.1.code ?? 2003, sqlState: failures.last?.1.sqlState ?? "HY000",
            message: "no server of \(url) answered and was ready: " + failures.map { "\($0.0): \($0.1.message)" }.joined(separator: "; "),
            context: "connect to \(url)")
    }

    /// The server this connection reached (the first of the URL's that answered and was ready).
    public private(set) var endpoint: MySQLURL.Endpoint = MySQLURL.Endpoint(host: "")

    /// Connect errors after which the next server of the URL is tried: unreachable, lost
    /// during the handshake, too many connections, not ready (a cluster node that is not in
    /// the primary component or not synced), shutting down.
    private static func triesNextServer(_ error: MySQLError) -> Bool {
        [2002, 2003, 2005, 2006, 2013, 2026, 1040, 1047, 1053, 1927, notReady].contains(error.code)
    }

    /// Not an error code of the server's: a Galera node that answers but is not ready
    /// (`wsrep_ready` is OFF), found at connect.
    static let notReady: UInt32 = 1047

    private func connect(to endpoint: MySQLURL.Endpoint, configuration: MySQLDatabase.Configuration) throws {
        guard let mysql = mysql_init(nil) else { throw MySQLUsageError(description: "mysql_init failed (out of memory)") }
        var off: my_bool = 0
        mysql_options(mysql, MYSQL_OPT_RECONNECT, &off)
        var connectTimeout = UInt32(configuration.connectTimeout.components.seconds)
        mysql_options(mysql, MYSQL_OPT_CONNECT_TIMEOUT, &connectTimeout)
        var readTimeout = UInt32(configuration.readTimeout.components.seconds)
        mysql_options(mysql, MYSQL_OPT_READ_TIMEOUT, &readTimeout)
        mysql_options(mysql, MYSQL_OPT_WRITE_TIMEOUT, &readTimeout)
        let connected = mysql_real_connect(
            mysql, url.socket == nil ? endpoint.host : nil, url.user, url.password, url.database,
            url.socket == nil ? endpoint.port : 0, url.socket, UInt(CLIENT_MULTI_STATEMENTS))
        guard connected != nil else {
            let error = MySQLError(connection: mysql, context: "connect")
            mysql_close(mysql)
            throw Self.explain(error, url: url, endpoint: endpoint)
        }
        handle = mysql
        lost = false
        do {
            try setUpSession(isolation: configuration.isolation, endpoint: endpoint)
        } catch {
            close()
            throw error
        }
    }

    /// What the protocol relies on, set explicitly rather than taken from the server's
    /// defaults: the character set, autocommit on between sagas (a server started with
    /// `--autocommit=0` would otherwise hold every fencing insert and marker delete in a
    /// transaction that closing the connection rolls back), and the isolation level.
    private func setUpSession(isolation: MySQLDatabase.Isolation, endpoint: MySQLURL.Endpoint) throws {
        let db = try db()
        if mysql_set_character_set(db, "utf8mb4") != 0 {
            throw MySQLError(connection: db, context: "SET NAMES utf8mb4")
        }
        if mysql_autocommit(db, 1) != 0 {
            throw MySQLError(connection: db, context: "SET autocommit=1")
        }
        try simple("SET SESSION TRANSACTION ISOLATION LEVEL \(isolation.rawValue)")
        guard serverStatus & UInt32(SERVER_STATUS_AUTOCOMMIT) != 0 else {
            throw MySQLUsageError(description: "the server did not turn autocommit on for the connection to \(url)")
        }
        let status = readServerStatus()
        serverStart = status.start ?? 0
        if status.ready == false && requireReady {
            throw MySQLError(code: Self.notReady, sqlState: "08S01", message: "the cluster node at \(endpoint) is not ready (wsrep_ready is OFF: not synced with the primary component; or wsrep_reject_queries is set)", context: "connect to \(url)")
        }
        if let host = (try? query("SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = CONNECTION_ID()", []))?.first?[0].string {
            client = SQLSession.clientHash(host)
        }
    }

    /// The server is a Galera node (it has a cluster provider), found at connect.
    private var clusterNode = false

    /// A hash of this connection's client address as the server sees it (0: unknown).
    private var client: UInt64 = 0

    /// When the server started, from its clock and its `Uptime` (MariaDB and MySQL alike;
    /// nil if it cannot be read), and whether a Galera node is ready for clients (nil: not a
    /// cluster node).
    private func readServerStatus() -> (start: UInt64?, ready: Bool?) {
        guard let now = (try? query("SELECT UNIX_TIMESTAMP()", []))?.first?[0].int64,
              let rows = try? query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Uptime', 'wsrep_ready', 'wsrep_provider_name')", []) else { return (nil, nil) }
        var uptime: Int64?, ready: Bool?, provider = ""
        for row in rows {
            switch row[0].string?.lowercased() {
            case "uptime": uptime = row[1].int64 ?? row[1].string.flatMap { Int64($0) }
            case "wsrep_ready": ready = row[1].string?.uppercased() == "ON"
            case "wsrep_provider_name": provider = row[1].string ?? ""
            default: break
            }
        }
        // A server without a cluster provider reports wsrep_ready OFF too: not a cluster node.
        clusterNode = !provider.isEmpty
        if provider.isEmpty { ready = nil }
        // A node drained by its operator (`wsrep_reject_queries` other than NONE) reports
        // wsrep_ready ON and answers this, but refuses every statement on a table (1047).
        if ready == true, let reject = (try? query("SHOW GLOBAL VARIABLES WHERE Variable_name = 'wsrep_reject_queries'", []))?.first?[1].string,
           reject.uppercased() != "NONE" {
            ready = false
        }
        guard let uptime, now > uptime else { return (nil, ready) }
        return (UInt64(now - uptime), ready)
    }

    /// The status bits of the server's last OK reply (`SERVER_STATUS_IN_TRANS`,
    /// `SERVER_STATUS_AUTOCOMMIT`...).
    private var serverStatus: UInt32 { handle?.pointee.server_status ?? 0 }

    /// Says which part of the URL is wrong when connecting fails.
    private static func explain(_ e: MySQLError, url: MySQLURL, endpoint: MySQLURL.Endpoint) -> MySQLError {
        let why: String
        switch e.code {
        case 1045: why = "wrong user or password for \(url.user)"
        case 1049: why = "database \"\(url.database)\" does not exist"
        case 1044: why = "user \(url.user) may not use database \"\(url.database)\""
        case 2002, 2003, 2005, 2006:
            why = url.socket.map { "no server at socket \($0)" } ?? "no server reachable at \(endpoint)"
        default: why = "cannot connect"
        }
        return MySQLError(code: e.code, sqlState: e.sqlState, message: "\(why) (\(e.message))", context: "connect to \(url)")
    }

    deinit { close() }

    public func close() {
        statements.removeAll()
        if let handle { mysql_close(handle) }
        handle = nil
    }

    /// The server's id for this connection (`CONNECTION_ID()`), the one `KILL` takes.
    public var connectionID: UInt64 {
        handle.map { UInt64(mysql_thread_id($0)) } ?? 0
    }

    private func db() throws -> UnsafeMutablePointer<MYSQL> {
        guard let handle, !lost else {
            throw MySQLError(code: 2006, sqlState: "HY000", message: "the connection to \(url) is closed or was lost", context: nil)
        }
        return handle
    }

    private func record(_ error: MySQLError) -> MySQLError {
        // 1047 on a cluster node: it left the primary component (or refuses queries); nothing
        // more runs on this connection, like a lost one (the server rolls back).
        if error.isConnectionLost || error.code == Self.notReady { lost = true }
        if error.isRolledBackConflict { transactionGone = true }
        // A failure the client library reports without an error (code 0, seen once at
        // START TRANSACTION on a pooled connection to a Galera node under load): nothing is
        // known of the connection's state, so it is never lent again (a saga's BEGIN then
        // moves on to another connection).
        if error.code == 0 { stateUnknown = true }
        return error
    }

    /// A statement without values and without results, over the text protocol.
    private func simple(_ sql: String) throws {
        let db = try db()
        if mysql_real_query(db, sql, UInt(sql.utf8.count)) != 0 {
            throw record(MySQLError(connection: db, context: sql))
        }
    }

    // MARK: Prepared statements

    private func statement(_ sql: String) throws -> UnsafeMutablePointer<MYSQL_STMT> {
        try statements.statement(for: sql) { try prepare(sql) }
    }

    private func prepare(_ sql: String) throws -> UnsafeMutablePointer<MYSQL_STMT> {
        let db = try db()
        guard let stmt = mysql_stmt_init(db) else { throw record(MySQLError(connection: db, context: sql)) }
        if mysql_stmt_prepare(stmt, sql, UInt(sql.utf8.count)) != 0 {
            let error = MySQLError(statement: stmt, context: sql)
            mysql_stmt_close(stmt)
            throw record(error)
        }
        var update: my_bool = 1
        mysql_stmt_attr_set(stmt, STMT_ATTR_UPDATE_MAX_LENGTH, &update)
        return stmt
    }

    /// Runs a prepared statement with bound values; collects result rows, if any.
    private func run(_ sql: String, _ arguments: [SQLValue], wantRows: Bool) throws -> (rows: [SQLRow], affected: Int) {
        let stmt = try statement(sql)
        let expected = Int(mysql_stmt_param_count(stmt))
        guard expected == arguments.count else {
            throw MySQLUsageError(description: "`\(sql)` takes \(expected) argument(s), \(arguments.count) given")
        }
        // Parameter buffers live until the statement has executed.
        var buffers: [UnsafeMutableRawPointer] = []
        defer { buffers.forEach { $0.deallocate() } }
        func store(_ bytes: UnsafeRawBufferPointer) -> UnsafeMutableRawPointer {
            let p = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 8)
            if let base = bytes.baseAddress, bytes.count > 0 { p.copyMemory(from: base, byteCount: bytes.count) }
            buffers.append(p)
            return p
        }
        var params = [MYSQL_BIND](repeating: MYSQL_BIND(), count: arguments.count)
        for (i, value) in arguments.enumerated() {
            switch value {
            case .null:
                params[i].buffer_type = MYSQL_TYPE_NULL
            case .integer(var v):
                params[i].buffer_type = MYSQL_TYPE_LONGLONG
                params[i].buffer = withUnsafeBytes(of: &v) { store($0) }
            case .real(var v):
                params[i].buffer_type = MYSQL_TYPE_DOUBLE
                params[i].buffer = withUnsafeBytes(of: &v) { store($0) }
            case .text(let s):
                let bytes = Array(s.utf8)
                params[i].buffer_type = MYSQL_TYPE_STRING
                params[i].buffer = bytes.withUnsafeBytes { store($0) }
                params[i].buffer_length = UInt(bytes.count)
            case .blob(let b):
                params[i].buffer_type = MYSQL_TYPE_BLOB
                params[i].buffer = b.withUnsafeBytes { store($0) }
                params[i].buffer_length = UInt(b.count)
            }
        }
        if !arguments.isEmpty, mysql_stmt_bind_param(stmt, &params) != 0 {
            throw record(MySQLError(statement: stmt, context: sql))
        }
        if mysql_stmt_execute(stmt) != 0 {
            throw record(MySQLError(statement: stmt, context: sql))
        }
        let affected = Int(truncatingIfNeeded: mysql_stmt_affected_rows(stmt))
        guard let meta = mysql_stmt_result_metadata(stmt) else { return ([], affected) }
        defer {
            mysql_free_result(meta)
            mysql_stmt_free_result(stmt)
        }
        if mysql_stmt_store_result(stmt) != 0 { throw record(MySQLError(statement: stmt, context: sql)) }
        guard wantRows else { return ([], affected) }
        return (try fetchRows(stmt, meta: meta, sql: sql), affected)
    }

    private func fetchRows(_ stmt: UnsafeMutablePointer<MYSQL_STMT>, meta: UnsafeMutablePointer<MYSQL_RES>, sql: String) throws -> [SQLRow] {
        let count = Int(mysql_num_fields(meta))
        guard let fields = mysql_fetch_fields(meta) else { return [] }
        enum Kind { case signed, unsigned, double, bytes(binary: Bool) }
        var kinds: [Kind] = []
        var names: [String] = []
        var binds = [MYSQL_BIND](repeating: MYSQL_BIND(), count: count)
        // The client library writes lengths and null flags through these on every fetch, so
        // they need addresses that stay put: allocate them.
        let lengths = UnsafeMutablePointer<UInt>.allocate(capacity: max(count, 1))
        lengths.initialize(repeating: 0, count: max(count, 1))
        let nulls = UnsafeMutablePointer<my_bool>.allocate(capacity: max(count, 1))
        nulls.initialize(repeating: 0, count: max(count, 1))
        var buffers: [UnsafeMutableRawPointer] = []
        defer {
            buffers.forEach { $0.deallocate() }
            lengths.deallocate()
            nulls.deallocate()
        }
        for i in 0..<count {
            let f = fields[i]
            names.append(String(cString: f.name))
            let size: Int
            switch f.type {
            case MYSQL_TYPE_TINY, MYSQL_TYPE_SHORT, MYSQL_TYPE_LONG, MYSQL_TYPE_LONGLONG, MYSQL_TYPE_INT24, MYSQL_TYPE_YEAR:
                let unsigned = (f.flags & UInt32(UNSIGNED_FLAG)) != 0
                kinds.append(unsigned ? .unsigned : .signed)
                binds[i].buffer_type = MYSQL_TYPE_LONGLONG
                binds[i].is_unsigned = unsigned ? 1 : 0
                size = 8
            case MYSQL_TYPE_FLOAT, MYSQL_TYPE_DOUBLE:
                kinds.append(.double)
                binds[i].buffer_type = MYSQL_TYPE_DOUBLE
                size = 8
            default:
                // charsetnr 63 is "binary": BLOB, BINARY, VARBINARY. Decimals and dates carry
                // it too, but the client hands them over as text ("12.50", "2024-01-02 03:04:05.678").
                let textual = [MYSQL_TYPE_DECIMAL, MYSQL_TYPE_NEWDECIMAL, MYSQL_TYPE_DATE, MYSQL_TYPE_NEWDATE, MYSQL_TYPE_TIME,
                               MYSQL_TYPE_DATETIME, MYSQL_TYPE_TIMESTAMP].contains(f.type)
                kinds.append(.bytes(binary: f.charsetnr == 63 && !textual))
                binds[i].buffer_type = MYSQL_TYPE_BLOB
                size = Int(f.max_length) + 1
            }
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            buffers.append(buffer)
            binds[i].buffer = buffer
            binds[i].buffer_length = UInt(size)
            binds[i].length = lengths + i
            binds[i].is_null = nulls + i
        }
        if mysql_stmt_bind_result(stmt, &binds) != 0 { throw record(MySQLError(statement: stmt, context: sql)) }
        var rows: [SQLRow] = []
        while true {
            let rc = mysql_stmt_fetch(stmt)
            if rc == MYSQL_NO_DATA { break }
            if rc == 1 { throw record(MySQLError(statement: stmt, context: sql)) }
            // MYSQL_DATA_TRUNCATED cannot happen: buffers are sized from max_length.
            var values: [SQLValue] = []
            values.reserveCapacity(count)
            for i in 0..<count {
                if nulls[i] != 0 { values.append(.null); continue }
                let buffer = buffers[i]
                switch kinds[i] {
                case .signed: values.append(.integer(buffer.loadUnaligned(as: Int64.self)))
                case .unsigned:
                    // Past Int64.max an unsigned value has no `.integer`: its decimal text,
                    // which integer decoding refuses as out of range instead of misreading.
                    let u = buffer.loadUnaligned(as: UInt64.self)
                    values.append(u <= UInt64(Int64.max) ? .integer(Int64(u)) : .text(String(u)))
                case .double: values.append(.real(buffer.loadUnaligned(as: Double.self)))
                case .bytes(let binary):
                    let bytes = Bytes(UnsafeRawBufferPointer(start: buffer, count: Int(lengths[i])))
                    values.append(binary ? .blob(bytes) : .text(String(decoding: bytes, as: UTF8.self)))
                }
            }
            rows.append(SQLRow(columns: names, values: values))
        }
        return rows
    }

    @discardableResult
    public func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int {
        try run(sql, arguments, wantRows: false).affected
    }

    public func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow] {
        try run(sql, arguments, wantRows: true).rows
    }

    // MARK: XA

    /// The statements of an XA (two-phase) transaction on this connection.
    package enum XAStep: String, Sendable {
        case start = "XA START", end = "XA END", prepare = "XA PREPARE", commit = "XA COMMIT", rollback = "XA ROLLBACK"
    }

    /// Runs `XA START|END|PREPARE|COMMIT|ROLLBACK 'xid'` (over the text protocol: the server
    /// does not prepare XA statements). The xid is limited to letters, digits, `_` and `-`.
    package func xa(_ step: XAStep, xid: String) throws {
        guard !xid.isEmpty, xid.utf8.count <= 64, xid.utf8.allSatisfy({ $0 == 0x5F || $0 == 0x2D || (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) }) else {
            throw MySQLUsageError(description: "invalid XA transaction id \"\(xid)\": use 1-64 letters, digits, '_' or '-'")
        }
        try simple("\(step.rawValue) '\(xid)'")
    }

    // MARK: Transactions

    /// Whether a transaction is open: the server's own status flag (sent with every OK reply),
    /// unless the connection died or an error told us the server ended the transaction.
    public var isInTransaction: Bool {
        guard handle != nil, !lost, !transactionGone else { return false }
        return serverStatus & UInt32(SERVER_STATUS_IN_TRANS) != 0
    }

    public var isBroken: Bool { handle == nil || lost || stateUnknown }

    public var session: SQLSession? {
        guard let handle, !lost else { return nil }
        return SQLSession(id: UInt64(mysql_thread_id(handle)), serverStart: serverStart, client: client)
    }

    /// A savepoint belongs to its transaction: if a statement commits the transaction (a
    /// `CALL` of a procedure that commits, an implicit commit) and another one opens, the
    /// savepoint is gone, and `RELEASE` says so (1305).
    private static let guardSavepoint = "saga_guard"

    public func markTransaction() throws {
        try simple("SAVEPOINT \(Self.guardSavepoint)")
    }

    public func transactionSurvived() -> Bool {
        guard isInTransaction else { return false }
        do {
            try simple("RELEASE SAVEPOINT \(Self.guardSavepoint)")
            return true
        } catch {
            // 1305: no such savepoint, the transaction is another one. Anything else: the
            // connection cannot be trusted with a transaction any more.
            if (error as? MySQLError)?.code != 1305 { giveUpOnState() }
            return false
        }
    }

    /// Checks the status bits first: a connection that has a transaction open must never start
    /// another (`START TRANSACTION` would commit it). Such a connection is given up.
    public func begin() throws {
        if serverStatus & UInt32(SERVER_STATUS_IN_TRANS) != 0 {
            giveUpOnState()
            throw MySQLUsageError(description: "the connection to \(url) has a transaction open before BEGIN; closed instead of committing it")
        }
        transactionGone = false
        try simple("START TRANSACTION")
    }

    /// Sent whenever the connection lives, also after the server ended the transaction by
    /// itself: a ROLLBACK too many costs nothing, one too few can leave a transaction open.
    /// If it fails, the connection is given up (closing it makes the server roll back).
    public func rollback() throws {
        defer { transactionGone = false }
        guard handle != nil, !lost else { return }  // the server rolls back a lost connection
        do { try simple("ROLLBACK") } catch {
            stateUnknown = true
            throw error
        }
    }

    /// The transaction state cannot be known: send ROLLBACK if the connection lives, and never
    /// lend the connection again (``isBroken``); closing it makes the server roll back.
    private func giveUpOnState() {
        stateUnknown = true
        if handle != nil, !lost { _ = try? simple("ROLLBACK") }
    }

    public func commit() -> CommitResult {
        do {
            try simple("COMMIT")
            return .committed
        } catch let error as MySQLError {
            return afterFailedCommit(error)
        } catch {
            return .unknown(error)
        }
    }

    /// A failed COMMIT: a lost connection may have committed (the reply lost). A server error
    /// with the transaction still open did not commit: roll back. Anything else cannot be
    /// proven either way.
    private func afterFailedCommit(_ error: MySQLError) -> CommitResult {
        if error.isConnectionLost { return .unknown(error) }
        if error.isRolledBackConflict {
            // A cluster's certification failure or a brute-force abort: rolled back whole.
            transactionGone = true
            if probeTransaction() == true { _ = try? rollback() }
            return .failed(error)
        }
        switch probeTransaction() {
        case true?:
            do { try rollback() } catch { return .unknown(error) }
            return .failed(error)
        case false?:
            return .unknown(error)
        case nil:
            giveUpOnState()
            return .unknown(error)
        }
    }

    /// The marker insert and `COMMIT` in one round trip: a multi-statement text query, with
    /// the insert's integer arguments written into its text (a text query binds nothing; any
    /// other argument, and it is two round trips). The server runs `COMMIT` only if the insert
    /// succeeded; a failed insert (a fencing row holds the id, or the instance's claim moved)
    /// leaves the transaction open, and it is rolled back: failed. A lost connection: unknown.
    ///
    /// On a Galera node always two round trips: a replicated write that aborts the transaction
    /// (brute-force abort) between the two statements of one query does not stop the query;
    /// MariaDB 10.11 then answers OK to its `COMMIT` although the transaction, marker included,
    /// was rolled back (seen by saga-torture: acknowledged sagas missing from every node). A
    /// `COMMIT` sent as a command of its own reports such an abort (1213).
    public func commit(afterRunning statement: String, _ arguments: [SQLValue]) -> CommitResult {
        guard !clusterNode, let inlined = Self.inliningLiterals(statement, arguments) else { return executeThenCommit(statement, arguments) }
        let sql = inlined + "; COMMIT"
        guard let db = handle, !lost else { return .failed(MySQLUsageError(description: "the connection is closed")) }
        if mysql_real_query(db, sql, UInt(sql.utf8.count)) != 0 {
            // The insert failed, so COMMIT never ran.
            let error = record(MySQLError(connection: db, context: sql))
            if error.isConnectionLost { return .unknown(error) }
            switch probeTransaction() {
            case true?:
                do { try rollback() } catch { return .unknown(error) }
            case false?:
                break
            case nil:
                giveUpOnState()
            }
            return .failed(error)
        }
        // The insert's result, then COMMIT's.
        switch mysql_next_result(db) {
        case 0:
            while mysql_next_result(db) == 0 {}  // nothing else was sent; drain defensively
            return .committed
        case let status where status > 0:
            return afterFailedCommit(record(MySQLError(connection: db, context: "COMMIT")))
        default:
            return .unknown(MySQLUsageError(description: "no reply to COMMIT after the marker insert"))
        }
    }

    /// `statement` with each `?` replaced by its argument as a literal, when every argument is
    /// an integer (decimal text) or a blob (`X'...'`, hex digits only: nothing in it can end the
    /// literal) and the text holds no quote around a `?` (so none sits inside a string
    /// literal); nil otherwise. Text is never spliced.
    static func inliningLiterals(_ statement: String, _ arguments: [SQLValue]) -> String? {
        // Between quotes are the odd pieces of the text split at each quote.
        let pieces = statement.split(separator: "'", omittingEmptySubsequences: false)
        guard pieces.enumerated().allSatisfy({ $0.offset % 2 == 0 || !$0.element.contains("?") }) else { return nil }
        var values = arguments.makeIterator()
        var out = ""
        for ch in statement {
            guard ch == "?" else { out.append(ch); continue }
            switch values.next() {
            case .integer(let v)?: out += String(v)
            // A large blob goes bound, in binary: as hex it would take twice the packet.
            case .blob(let bytes)? where bytes.count <= Self.inlinedBlobLimit: out += Self.hexLiteral(bytes)
            default: return nil
            }
        }
        return values.next() == nil ? out : nil
    }

    /// The largest blob written into a statement's text (as hex); a larger one makes the marker
    /// insert and COMMIT two round trips.
    static let inlinedBlobLimit = 64 << 10

    /// `X'0a1b...'`.
    private static func hexLiteral(_ bytes: Bytes) -> String {
        let digits: [UInt8] = Array("0123456789abcdef".utf8)
        var text: [UInt8] = [0x58, 0x27]  // X'
        text.reserveCapacity(bytes.count * 2 + 3)
        for b in bytes {
            text.append(digits[Int(b >> 4)])
            text.append(digits[Int(b & 0x0F)])
        }
        text.append(0x27)
        return String(decoding: text, as: UTF8.self)
    }

    /// Asks the server whether this connection has a transaction open: a statement that needs
    /// no prepared-statement slot and touches nothing (`DO 0`), whose OK reply carries the
    /// status bits (portable: MySQL has no `@@in_transaction`). nil if it cannot tell.
    private func probeTransaction() -> Bool? {
        guard handle != nil, !lost, (try? simple("DO 0")) != nil else { return nil }
        return serverStatus & UInt32(SERVER_STATUS_IN_TRANS) != 0
    }

    /// After a failed statement: is the transaction still open? A deadlock or a lock wait
    /// timeout that ended it rolled it back; a lost connection did too, unless the statement
    /// could commit (`COMMIT`, DDL). Anything else that ended the transaction is DDL whose
    /// implicit commit ran before it failed: maybe committed. When the server cannot say, the
    /// connection is given up: ROLLBACK is sent, and it is closed (the server then rolls
    /// back), never pooled with a transaction open.
    public func transactionState(after error: any Error) -> TransactionState {
        // Refused before it reached the server (wrong number of arguments...): nothing changed.
        guard let statement = (error as? MySQLError)?.context else { return isInTransaction ? .open : .rolledBack }
        if lost {
            return TransactionState.statementMayCommit(statement) ? .mayBeCommitted : .rolledBack
        }
        if transactionGone { return .rolledBack }
        guard let open = probeTransaction() else {
            giveUpOnState()
            return TransactionState.statementMayCommit(statement) ? .mayBeCommitted : .rolledBack
        }
        if open { return .open }
        transactionGone = true
        guard let e = error as? MySQLError else { return .mayBeCommitted }
        return e.isRolledBackConflict || e.code == MySQLError.lockWaitTimeout ? .rolledBack : .mayBeCommitted
    }

    /// A ping: the server may have closed an idle connection (`wait_timeout`).
    public func isUsableAfterIdling() -> Bool {
        guard let handle, !isBroken, !isInTransaction else { return false }
        if mysql_ping(handle) != 0 {
            lost = true
            return false
        }
        return serverStatus & UInt32(SERVER_STATUS_IN_TRANS) == 0
    }

    /// `KILL CONNECTION` for each session of this run of the server that still exists, then
    /// waits until none is listed any more (a killed session rolls back before it goes). A
    /// session of an earlier run is gone already: its id may now name someone else's session,
    /// so it is never killed. Returns the sessions still listed after ``sessionEndTimeout``.
    ///
    /// On a Galera node a session may live on any node of the cluster, and a node that left
    /// the primary component keeps its sessions: they can commit once it rejoins (measured: a
    /// transaction left open on a node that was paused, evicted and rejoined committed, and
    /// was replicated). So the sessions are ended on every node of the primary component, and
    /// they count as gone only once every member has been reached: a member this client
    /// cannot reach (a partition between the client and a live node) leaves them all "still
    /// there", and their sagas in doubt. A node that is gone (killed, or evicted while hung)
    /// drops out of the primary component within the cluster's timeouts, which this waits
    /// for, up to ``sessionEndTimeout``.
    public func endSessions(_ sessions: [SQLSession]) throws -> Set<SQLSession> {
        guard !sessions.isEmpty else { return [] }
        guard clusterNode else { return try endSessionsOnThisServer(sessions) }
        let deadline = ContinuousClock.now + Self.sessionEndTimeout
        var left = Set<SQLSession>()
        var reached: Set<String> = []  // nodes (wsrep_gcomm_uuid) whose sessions were ended
        while true {
            let view = try clusterView()
            if reached.insert(view.node).inserted { left.formUnion(try endSessionsOnThisServer(sessions)) }
            for address in url.endpoints + view.addresses where address != endpoint {
                var single = url
                single.endpoints = [address]
                guard let peer = try? MySQLConnection(url: single, configuration: configuration, requireReady: false),
                      let peerView = try? peer.clusterView() else { continue }
                defer { peer.close() }
                guard peerView.cluster == view.cluster, !reached.contains(peerView.node) else { continue }
                left.formUnion(try peer.endSessionsOnThisServer(sessions))
                reached.insert(peerView.node)
            }
            if reached.count >= view.size { return left }
            if ContinuousClock.now > deadline { return Set(sessions) }
            Thread.sleep(forTimeInterval: 0.25)
        }
    }

    /// This node's place in its cluster: its own id, the cluster's, how many nodes the primary
    /// component has, and the SQL addresses they advertise (`wsrep_incoming_addresses`; those
    /// left at `AUTO` are not known, and only the URL's servers can be tried for them).
    private func clusterView() throws -> (node: String, cluster: String, size: Int, addresses: [MySQLURL.Endpoint]) {
        var values: [String: String] = [:]
        for row in try query("SHOW STATUS WHERE Variable_name IN ('wsrep_gcomm_uuid', 'wsrep_cluster_state_uuid', 'wsrep_cluster_size', 'wsrep_cluster_status', 'wsrep_incoming_addresses')", []) {
            if let name = row[0].string?.lowercased() { values[name] = row[1].string ?? row[1].int64.map(String.init) ?? "" }
        }
        guard values["wsrep_cluster_status"] == "Primary", let node = values["wsrep_gcomm_uuid"], let cluster = values["wsrep_cluster_state_uuid"],
              let size = values["wsrep_cluster_size"].flatMap({ Int($0) }) else {
            throw MySQLError(code: Self.notReady, sqlState: "08S01", message: "the cluster node at \(endpoint) is not in the primary component", context: "ending old sessions")
        }
        let addresses = (values["wsrep_incoming_addresses"] ?? "").split(separator: ",").compactMap { item -> MySQLURL.Endpoint? in
            guard let colon = item.lastIndex(of: ":"), let port = UInt32(item[item.index(after: colon)...]) else { return nil }
            let host = item[..<colon].trimmingCharacters(in: CharacterSet(charactersIn: "[] "))
            return host.isEmpty ? nil : MySQLURL.Endpoint(host: host, port: port)
        }
        return (node, cluster, size, addresses)
    }

    private func endSessionsOnThisServer(_ sessions: [SQLSession]) throws -> Set<SQLSession> {
        let mine = session?.id
        let live = sessions.filter { s in
            s.id != mine && (s.serverStart == 0 || serverStart == 0 || s.serverStart.distance(to: serverStart).magnitude <= 2)
        }
        guard !live.isEmpty else { return [] }
        // A listed id whose client address differs is someone else's session that got the id
        // after a restart the start times could not tell (the old one is gone): never killed.
        var listed: [UInt64: UInt64] = [:]
        for row in try query("SELECT ID, HOST FROM information_schema.PROCESSLIST WHERE ID IN (\(live.map { String($0.id) }.joined(separator: ",")))", []) {
            if let id = row[0].int64 { listed[UInt64(bitPattern: id)] = row[1].string.map(SQLSession.clientHash) ?? 0 }
        }
        let ours = live.filter { s in
            guard let host = listed[s.id] else { return false }  // not listed: gone already
            return s.client == 0 || host == 0 || host == s.client
        }
        guard !ours.isEmpty else { return [] }
        for s in ours {
            do { try simple("KILL CONNECTION \(s.id)") } catch let e as MySQLError where e.code == 1094 {
                continue  // unknown thread id: gone already
            }
        }
        let ids = ours.map { String($0.id) }.joined(separator: ",")
        let deadline = ContinuousClock.now + Self.sessionEndTimeout
        while true {
            let left = Set(try query("SELECT ID FROM information_schema.PROCESSLIST WHERE ID IN (\(ids))", []).compactMap { $0[0].int64 }.map { UInt64(bitPattern: $0) })
            if left.isEmpty { return [] }
            if ContinuousClock.now > deadline { return Set(ours.filter { left.contains($0.id) }) }
            Thread.sleep(forTimeInterval: 0.005)
        }
    }

    static let sessionEndTimeout: Duration = .seconds(30)

    // MARK: Markers

    /// Creates the marker table, or migrates one of an earlier version (keyed by `saga_id`
    /// alone) with one `ALTER TABLE`: its rows go to ``InstanceID/legacy``. Creates the
    /// instance and caller-key tables beside it when they are missing.
    public func ensureMarkerTable() throws {
        try simple("""
            CREATE TABLE IF NOT EXISTS \(markerTable)_instances (
                instance BIGINT UNSIGNED NOT NULL PRIMARY KEY,
                claim BIGINT UNSIGNED NOT NULL
            ) ENGINE=InnoDB
            """)
        try simple("""
            CREATE TABLE IF NOT EXISTS \(markerTable) (
                instance BIGINT UNSIGNED NOT NULL,
                saga_id BIGINT UNSIGNED NOT NULL,
                status ENUM('committed', 'aborted') NOT NULL,
                seq BIGINT UNSIGNED NULL,
                redo LONGBLOB NULL,
                PRIMARY KEY (instance, saga_id)
            ) ENGINE=InnoDB
            """)
        // Caller keys (`run(key:)`): bytes compared as bytes (no collation folds "A" into
        // "a"), one row per key whatever the instance; the index serves the pruning by age.
        try simple("""
            CREATE TABLE IF NOT EXISTS \(markerTable)_keys (
                caller_key VARBINARY(255) NOT NULL PRIMARY KEY,
                instance BIGINT UNSIGNED NOT NULL,
                saga_id BIGINT UNSIGNED NOT NULL,
                created_ms BIGINT NOT NULL,
                KEY \(markerTable)_keys_age (instance, created_ms)
            ) ENGINE=InnoDB
            """)
        let columns = Set(try query("""
            SELECT COLUMN_NAME FROM information_schema.COLUMNS
            WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME IN ('instance', 'seq')
            """, [.text(markerTable)]).compactMap { $0[0].string })
        if !columns.contains("instance") {
            do {
                try simple("ALTER TABLE \(markerTable) ADD COLUMN instance BIGINT UNSIGNED NOT NULL DEFAULT 0 FIRST, DROP PRIMARY KEY, ADD PRIMARY KEY (instance, saga_id)")
            } catch let e as MySQLError where e.code == 1060 {
                // Duplicate column: another client migrated it meanwhile.
            }
        }
        if !columns.contains("seq") {
            // A table of a version before redo mode: its rows are markers, without a sequence.
            do {
                try simple("ALTER TABLE \(markerTable) ADD COLUMN seq BIGINT UNSIGNED NULL, ADD COLUMN redo LONGBLOB NULL")
            } catch let e as MySQLError where e.code == 1060 {
                // Duplicate column: another client migrated it meanwhile.
            }
        }
    }
}

@available(*, unavailable)
extension MySQLConnection: Sendable {}
