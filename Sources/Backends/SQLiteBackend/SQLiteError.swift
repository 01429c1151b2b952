import CSQLite
import Saga

/// An SQLite failure: the extended result code, SQLite's message, and the statement.
public struct SQLiteError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The extended result code (`SQLITE_CONSTRAINT_FOREIGNKEY` = 787, `SQLITE_IOERR_FSYNC` = 1034...).
    public let extendedCode: Int32
    public let message: String
    /// The SQL that failed, if a statement did.
    public let sql: String?

    /// The primary result code (`SQLITE_CONSTRAINT` = 19, `SQLITE_IOERR` = 10...).
    public var primaryCode: Int32 { extendedCode & 0xFF }

    public init(code: Int32, message: String, sql: String? = nil) {
        self.extendedCode = code
        self.message = message
        self.sql = sql
    }

    init(code: Int32, connection: OpaquePointer?, sql: String?) {
        let msg = connection.flatMap { sqlite3_errmsg($0) }.map { String(cString: $0) } ?? String(cString: sqlite3_errstr(code))
        self.init(code: code, message: msg, sql: sql)
    }

    public var description: String {
        var s = "SQLite error \(extendedCode) (\(String(cString: sqlite3_errstr(extendedCode)))): \(message)"
        if let sql { s += " -- while running `\(sql)`" }
        return s
    }

    /// Result codes worth matching on.
    public struct Code: RawRepresentable, Sendable, Equatable {
        public let rawValue: Int32
        public init(rawValue: Int32) { self.rawValue = rawValue }
        public static let busy = Code(rawValue: SQLITE_BUSY)
        public static let constraint = Code(rawValue: SQLITE_CONSTRAINT)
        public static let constraintForeignKey = Code(rawValue: 787)
        public static let ioError = Code(rawValue: SQLITE_IOERR)
        public static let full = Code(rawValue: SQLITE_FULL)
        public static let cantOpen = Code(rawValue: SQLITE_CANTOPEN)
        public static let notADatabase = Code(rawValue: SQLITE_NOTADB)

        /// Matches on the primary code as well, so `case SQLiteError.Code.constraint` catches
        /// every constraint failure, the extended ones too.
        public static func ~= (pattern: Code, error: any Error) -> Bool {
            guard let e = error as? SQLiteError else { return false }
            return e.extendedCode == pattern.rawValue || e.primaryCode == pattern.rawValue
        }
    }
}

extension SQLiteError: DurabilityError {
    /// Every `SQLITE_IOERR_*`: a read, write or fsync failed under SQLite. The file may not
    /// hold what SQLite believes (a failed fsync can drop dirty pages; WAL frames of a COMMIT
    /// that reported an error may still be replayed at the next open).
    public var requiresReopen: Bool { primaryCode == SQLITE_IOERR }
}

/// Misuse of the SQLite backend, caught before SQLite sees it.
public struct SQLiteUsageError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

extension SQLiteError: TransientClassifiable {
    /// `SQLITE_BUSY` and `SQLITE_LOCKED` (another connection holds the lock past the busy
    /// timeout): the same work may succeed when run again. I/O errors are not transient: they
    /// stop the coordinator (``DurabilityError``).
    public var isTransient: Bool { primaryCode == SQLITE_BUSY || primaryCode == SQLITE_LOCKED }
}
