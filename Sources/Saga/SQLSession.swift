/// The server session a saga's SQL transaction ran in, as far as the database can name it
/// (MySQL: the connection id, and when the server started, so that an id reused after a
/// restart is never taken for the old one). A COMMIT sent on it may still reach the server
/// after the client gave up; the session must be seen gone before the saga's outcome is
/// decided (PROTOCOL.md, "Late COMMITs"). SQLite has none: a closed connection in this
/// process, or a dead process, holds no transaction.
public struct SQLSession: Hashable, Sendable, CustomStringConvertible {
    /// The server's id for the session.
    public let id: UInt64
    /// When the server started, in seconds since 1970 (0: unknown).
    public let serverStart: UInt64
    public init(id: UInt64, serverStart: UInt64) { self.id = id; self.serverStart = serverStart }
    public var description: String { "session \(id) (server started at \(serverStart))" }
}
