/// A value bound to, or read from, an SQL statement. Statements only ever take values as bound
/// parameters; no SQL text is built from values.
public enum SQLValue: Sendable, Hashable, CustomStringConvertible {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob(Bytes)

    public var description: String {
        switch self {
        case .null: "NULL"
        case .integer(let v): String(v)
        case .real(let v): String(v)
        case .text(let v): "'\(v)'"
        case .blob(let v): "x'\(v.map { String(format2: $0) }.joined())'"
        }
    }
    public var int64: Int64? {
        switch self {
        case .integer(let v): v
        case .real(let v): Int64(exactly: v)
        case .text(let v): Int64(v)
        default: nil
        }
    }
    public var string: String? {
        switch self {
        case .text(let v): v
        case .integer(let v): String(v)
        case .real(let v): String(v)
        case .blob(let v): String(decoding: v, as: UTF8.self)
        case .null: nil
        }
    }
}

extension String {
    init(format2 byte: UInt8) { self = (byte < 16 ? "0" : "") + String(byte, radix: 16) }
}

extension SQLValue: ExpressibleByIntegerLiteral, ExpressibleByStringLiteral, ExpressibleByNilLiteral {
    public init(integerLiteral value: Int64) { self = .integer(value) }
    public init(stringLiteral value: String) { self = .text(value) }
    public init(nilLiteral: ()) { self = .null }
}

/// One result row: values by position and by column name.
public struct SQLRow: Sendable, Hashable {
    public let columns: [String]
    public let values: [SQLValue]
    public init(columns: [String], values: [SQLValue]) { self.columns = columns; self.values = values }
    public subscript(index: Int) -> SQLValue { values[index] }
    public subscript(column: String) -> SQLValue? {
        columns.firstIndex(of: column).map { values[$0] }
    }
}

/// Runs SQL statements with bound parameters.
public protocol SQLExecutor: AnyObject {
    /// Runs a statement; returns the number of rows it changed.
    @discardableResult
    func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int
    /// Runs a query and returns all its rows.
    func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow]
}

extension SQLExecutor {
    @discardableResult
    public func execute(_ sql: String, _ arguments: SQLValue...) throws -> Int { try execute(sql, arguments) }
    public func query(_ sql: String, _ arguments: SQLValue...) throws -> [SQLRow] { try query(sql, arguments) }
}

/// What `COMMIT` did, as far as the database can prove it.
public enum CommitResult {
    /// The transaction committed.
    case committed
    /// The database proves the transaction did not commit (and it has been rolled back).
    case failed(any Error)
    /// The transaction may or may not have committed (lost connection, I/O error while
    /// committing). Only a fencing insert on a fresh connection can tell.
    case unknown(any Error)
}

/// An error after which a store must not be trusted until it is reopened: an fsync or a write
/// failed, so what is on disk may differ from what the process believes (a failed fsync may
/// have dropped dirty pages, or a transaction the database reported failed may come back from
/// its log at reopen). Backends mark such errors; the coordinator never retries or continues
/// past one: it stops, and recovery after reopening decides the sagas in flight.
public protocol DurabilityError: Error {
    /// Whether the store must be reopened before anything else runs on it.
    var requiresReopen: Bool { get }
}

// Defaults only where forgetting one costs time, never safety: a wrapper that forwards what
// the compiler asks for must not silently lose the session a late COMMIT runs in, or the check
// that a statement left the transaction open.
extension SQLConnection {
    public func isUsableAfterIdling() -> Bool { !isBroken && !isInTransaction }

    public func commit(afterRunning statement: String, _ arguments: [SQLValue]) -> CommitResult {
        executeThenCommit(statement, arguments)
    }

    /// `statement`, then `COMMIT`, in two round trips: what ``commit(afterRunning:_:)`` does by
    /// default, and what a backend that sends both at once falls back to when it cannot. A
    /// failed statement rolls back and is `.failed`: COMMIT was never sent.
    package func executeThenCommit(_ statement: String, _ arguments: [SQLValue]) -> CommitResult {
        do { try execute(statement, arguments) } catch {
            if isInTransaction { try? rollback() }
            return .failed(error)
        }
        return commit()
    }
}

extension Error {
    /// Whether this is a ``DurabilityError`` that requires reopening the store.
    var requiresReopen: Bool { (self as? any DurabilityError)?.requiresReopen ?? false }
}

/// The decision a fencing insert reached for a saga id.
package enum FenceDecision: Sendable, Equatable {
    /// The saga's own marker row is there: its transaction committed.
    case committed
    /// The `aborted` row holds the id: the saga's transaction can never commit.
    case aborted
}

/// An SQL database the coordinator can open connections to: the protocol an SQL backend
/// implements.
public protocol SQLDatabase: AnyObject, Sendable {
    /// Opens a new connection (never a pooled one: the coordinator pools).
    func connect() throws -> any SQLConnection
    /// Closes `failed`, whose COMMIT outcome is unknown, and opens a fresh connection in its
    /// place for the fencing insert. A backend whose writers queue in the process (SQLite)
    /// hands `failed`'s place in the queue to the new connection: the saga still holds its
    /// keys, and a writer queued behind it may be waiting for one of them. A database with no
    /// such queue closes `failed` and connects. (No default: a wrapper must forward it.)
    func connect(replacing failed: any SQLConnection) throws -> any SQLConnection
    /// Holds `instance` while the returned hold lives, so that no other coordinator (another
    /// process, on a copy of the same KV store) can open with it meanwhile; nil if another one
    /// holds it now. A hold that the database drops (a server restart) only lets another
    /// coordinator open: the instance claims then stop this one at its next marker write.
    func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)?
    /// The name of the marker table (letters, digits and underscores, not starting with a digit:
    /// it is spliced into SQL text, and the core refuses anything else at open); its instance
    /// table is the same name with `_instances` appended, its caller-key table with `_keys`.
    var markerTable: String { get }
    /// What differs in the SQL the core runs on the marker tables.
    var dialect: SQLDialect { get }
}

/// What differs between SQL databases in the statements the core runs on its own tables: the
/// core writes every marker statement (see <doc:Protocol>), a backend says how its database
/// spells these few things.
public struct SQLDialect: Sendable {
    /// "Insert unless the key exists": `INSERT OR IGNORE` (SQLite), `INSERT IGNORE` (MySQL).
    public var insertIgnore: String
    /// Appended to a `SELECT` to make it read the newest committed rows inside a transaction
    /// and wait for their writers: ` LOCK IN SHARE MODE` (MySQL); empty for a database whose
    /// writer holds the whole database (SQLite).
    public var lockingRead: String
    /// Whether an error of an `INSERT` is a NOT NULL violation (the marker insert's claim
    /// check failing: the instance was claimed by another journal).
    public var isNotNullViolation: @Sendable (any Error) -> Bool
    /// Whether an error says the database rolled the transaction back whole because a
    /// conflicting one committed first (on a cluster: a failed certification), so that running
    /// it again may succeed. A fence that fails so is run again.
    public var isRolledBackByConflict: @Sendable (any Error) -> Bool
    /// For a cluster whose nodes apply each other's committed writes a little later (Galera):
    /// a query that returns once its node has applied every write the cluster committed before
    /// it, and changes nothing (`SET STATEMENT wsrep_sync_wait = 1 FOR SELECT 1`). The fence
    /// runs it before each of its transactions, so that it sees a saga's COMMIT certified on
    /// another node; a COMMIT certified later conflicts with the fence's own, and one of the two
    /// is rolled back. nil for a single server.
    public var causalWait: String?
    /// The old session of a saga cannot always be ended: on a cluster it may live on a node
    /// this client cannot reach that is still in the cluster, and a COMMIT sent on it can land
    /// long after the fence. Only the fence's `aborted` row stops it, so garbage collection
    /// never deletes `aborted` rows where this is set (on Galera, "keep `aborted` rows longer
    /// than any session can live"). False for a single server, whose old sessions are ended
    /// first.
    public var keepsAbortedMarkers: Bool
    /// The largest value the database takes in one statement (MySQL's `max_allowed_packet`,
    /// SQLite's length limit), nil if none is known: redo mode refuses a saga whose redo row is
    /// larger, before COMMIT, with ``SagaError/Misuse/sagaTooLarge(size:limit:)``.
    public var maxStatementBytes: Int?
    /// Whether an error of an `INSERT` is a duplicate primary key: a caller key's row
    /// (`<markerTable>_keys`) that a committed saga already holds. The saga is then refused
    /// with ``SagaError/alreadyCommitted(key:saga:)``. A backend that cannot tell answers
    /// false: such a run fails with ``SagaError/sqlFailed(saga:step:underlying:)`` instead,
    /// and is still never applied twice.
    public var isDuplicateKey: @Sendable (any Error) -> Bool

    public init(
        insertIgnore: String, lockingRead: String, causalWait: String? = nil,
        keepsAbortedMarkers: Bool = false, maxStatementBytes: Int? = nil,
        isNotNullViolation: @escaping @Sendable (any Error) -> Bool,
        isRolledBackByConflict: @escaping @Sendable (any Error) -> Bool = { _ in false },
        isDuplicateKey: @escaping @Sendable (any Error) -> Bool = { _ in false }
    ) {
        self.isDuplicateKey = isDuplicateKey
        self.insertIgnore = insertIgnore
        self.lockingRead = lockingRead
        self.causalWait = causalWait
        self.keepsAbortedMarkers = keepsAbortedMarkers
        self.maxStatementBytes = maxStatementBytes
        self.isNotNullViolation = isNotNullViolation
        self.isRolledBackByConflict = isRolledBackByConflict
    }
}

/// A database's hold on one instance for as long as a coordinator runs with it (see
/// ``SQLDatabase/holdInstance(_:)``). Let go by ``release()``, or when freed.
public protocol InstanceHold: AnyObject, Sendable {
    func release()
}

/// The hold of a database that has no way to hold an instance: nothing is held, and only the
/// instance claims keep journals apart. A backend returns it from
/// ``SQLDatabase/holdInstance(_:)`` when it has nothing better, on purpose.
public final class NoInstanceHold: InstanceHold {
    public init() {}
    public func release() {}
}

extension TransactionState {
    /// Whether a statement could end a transaction by committing it: anything but plain
    /// reads and DML and savepoints (`COMMIT`, `END`, `SET autocommit`, `CALL`, DDL with an
    /// implicit commit...). Neither SQLite nor MySQL lets a plain `SELECT`, `INSERT`,
    /// `UPDATE`, `DELETE` or `REPLACE` commit (MySQL refuses COMMIT in stored functions and
    /// triggers).
    public static func statementMayCommit(_ sql: String) -> Bool { StatementKind(sql) != .plain }

    /// Whether a statement plainly starts or ends a transaction (`BEGIN`, `START TRANSACTION`,
    /// `COMMIT`, `END`, `ROLLBACK` but not `ROLLBACK [WORK|TRANSACTION] TO`): a saga refuses
    /// it before it runs. Comments before it are skipped; MySQL's executable comments
    /// (`/*! ... */`, `/*M! ... */`) count as the code they hold.
    public static func statementControlsTransaction(_ sql: String) -> Bool { StatementKind(sql) == .transactionControl }
}

/// What a statement's leading keywords say about the transaction it runs in. Read from the
/// UTF-8 bytes, comments skipped: it runs before every statement of every saga.
enum StatementKind: Equatable {
    /// Reads, DML and savepoints: cannot end the transaction or change the session.
    case plain
    /// `BEGIN`, `START`, `COMMIT`, `END`, `ROLLBACK` (not `ROLLBACK ... TO`).
    case transactionControl
    /// Anything else: DDL, `CALL`, `SET`, pragmas... may commit or leave session state.
    case other

    init(_ sql: String) {
        var sql = sql
        self = sql.withUTF8 { Self.classify($0) }
    }

    private static func classify(_ text: UnsafeBufferPointer<UInt8>) -> StatementKind {
        var scanner = KeywordScanner(text: text)
        guard let first = scanner.next() else { return .other }
        switch first {
        case "SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "VALUES", "SAVEPOINT", "RELEASE":
            // MySQL's GET_LOCK takes a named lock that belongs to the session, not to the
            // transaction: it outlives COMMIT, so the connection must not be lent again.
            return containsGetLock(text) ? .other : .plain
        case "BEGIN", "START", "COMMIT", "END": return .transactionControl
        case "ROLLBACK":
            var word = scanner.next()
            if word == "WORK" || word == "TRANSACTION" { word = scanner.next() }
            return word == "TO" ? .plain : .transactionControl
        default: return .other
        }
    }
}

/// Whether the bytes hold `GET_LOCK` in any case (a string literal counts too: a false alarm
/// only closes a connection that could have been pooled).
private func containsGetLock(_ text: UnsafeBufferPointer<UInt8>) -> Bool {
    let word: StaticString = "GET_LOCK"
    let bytes = UnsafeBufferPointer(start: word.utf8Start, count: word.utf8CodeUnitCount)
    guard text.count >= bytes.count else { return false }
    for start in 0...(text.count - bytes.count) where text[start + 3] == 0x5F {  // '_'
        var i = 0
        while i < bytes.count, text[start + i] & 0xDF == bytes[i] & 0xDF { i += 1 }
        if i == bytes.count { return true }
    }
    return false
}

/// The words of a statement's code, upper-cased, comments skipped (`/* */`, `--`, `#`), the
/// code of MySQL's executable comments (`/*! */`, `/*M! */`) kept.
private struct KeywordScanner {
    let text: UnsafeBufferPointer<UInt8>
    var i = 0

    private func at(_ offset: Int) -> UInt8 { i + offset < text.count ? text[i + offset] : 0 }
    private static func isWordByte(_ b: UInt8) -> Bool {
        (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x5F || b >= 0x80
    }

    mutating func next() -> String? {
        while i < text.count {
            let b = text[i]
            if b == 0x2F, at(1) == 0x2A {  // "/*"
                if at(2) == 0x21 || (at(2) == 0x4D && at(3) == 0x21) {  // "/*!" or "/*M!": code
                    i += at(2) == 0x21 ? 3 : 4
                    while i < text.count, text[i] >= 0x30, text[i] <= 0x39 { i += 1 }  // version
                    continue
                }
                i += 2
                while i < text.count, !(text[i] == 0x2A && at(1) == 0x2F) { i += 1 }
                i += 2
            } else if b == 0x2A, at(1) == 0x2F {  // the end of an executable comment
                i += 2
            } else if b == 0x23 || (b == 0x2D && at(1) == 0x2D) {  // "#" or "--": to the line end
                while i < text.count, text[i] != 0x0A { i += 1 }
            } else if Self.isWordByte(b), !(b >= 0x30 && b <= 0x39) {
                let start = i
                while i < text.count, Self.isWordByte(text[i]) { i += 1 }
                return String(decoding: UnsafeBufferPointer(rebasing: text[start..<i]), as: UTF8.self).uppercased()
            } else {
                i += 1
            }
        }
        return nil
    }
}

/// Where a transaction stands after one of its statements failed.
public enum TransactionState: Sendable, Equatable {
    /// Still open: the statement failed alone.
    case open
    /// Rolled back by the database: nothing of it is committed.
    case rolledBack
    /// Ended, and possibly committed (a failed `COMMIT`, DDL with an implicit commit).
    case mayBeCommitted
}

/// One connection to an SQL database. Used by one saga at a time, never concurrently.
public protocol SQLConnection: SQLExecutor {
    /// Creates the marker table, its instance table and its caller-key table if they are
    /// missing, and migrates a
    /// marker table of an earlier version (see <doc:WritingABackend> for their columns). Runs
    /// outside any transaction. The only DDL a backend writes: every other statement on these
    /// tables is the core's.
    func ensureMarkerTable() throws
    /// Starts a transaction.
    func begin() throws
    /// Rolls the open transaction back.
    func rollback() throws
    /// Commits, and tells what the database can prove about the outcome. On `.failed`, the
    /// transaction is no longer open.
    func commit() -> CommitResult
    /// Whether the database still has a transaction open on this connection.
    var isInTransaction: Bool { get }
    /// Whether the connection is known to be unusable (lost, closed): it is not pooled.
    var isBroken: Bool { get }
    /// After a statement failed with `error`: whether the transaction is still open, was
    /// rolled back by the database (deadlock victim, lost connection, an error SQLite rolls
    /// back on), or ended in a way that may have committed it (a failed `COMMIT`, DDL whose
    /// implicit commit ran before it failed). A saga whose transaction ended under it must not
    /// run another statement.
    func transactionState(after error: any Error) -> TransactionState
    /// Before a body statement that might end the transaction (anything but plain DML): marks
    /// the open transaction, so that ``transactionSurvived()`` can tell afterwards whether the
    /// same transaction is still open. (On MySQL a `CALL` or a `BEGIN` can commit it and open
    /// another: being in *a* transaction proves nothing.) A database where no statement can do
    /// that (SQLite) does nothing.
    func markTransaction() throws
    /// After such a statement: whether the transaction marked before it is still the open one
    /// (SQLite: ``isInTransaction``).
    func transactionSurvived() -> Bool
    /// Runs `statement` with `arguments` (written by the core: the saga's marker insert, its
    /// arguments integers only), then commits: the saga's decision point. The default runs
    /// one, then the other, the statement prepared once per connection like any other. A
    /// backend may send both in one round trip, if its database runs `COMMIT` only when the
    /// statement succeeded. A failed statement means COMMIT was never sent: `.failed`, with
    /// the transaction rolled back.
    func commit(afterRunning statement: String, _ arguments: [SQLValue]) -> CommitResult
    /// The server session this connection's transactions run in, when the database can name
    /// one (see ``SQLSession``). Read at ``begin()``, kept in the saga's `prepared` record.
    /// nil for a database whose connections live only in this process (SQLite).
    var session: SQLSession? { get }
    /// Ends the named sessions if they still exist and waits until the server has let them go
    /// (their transactions rolled back), so that no COMMIT sent on one of them can still land.
    /// Sessions of an earlier run of the server are gone already. Returns the sessions still
    /// there when the wait ran out: nothing of their sagas may be decided. A database whose
    /// connections live only in this process (SQLite) ends nothing and returns none.
    func endSessions(_ sessions: [SQLSession]) throws -> Set<SQLSession>
    /// Before an idle pooled connection is lent again: whether it is still alive, with no
    /// transaction open (MySQL asks the server: it may have closed the connection after
    /// `wait_timeout`). The default answers from what the connection knows.
    func isUsableAfterIdling() -> Bool
    /// Closes the connection. After an unknown COMMIT outcome this lets the database recover
    /// what the failed connection left behind (SQLite's rollback journal or WAL).
    func close()
}
