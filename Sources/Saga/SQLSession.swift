/// The server session a saga's SQL transaction ran in, as far as the database can name it
/// (MySQL: the connection id, when the server started and a hash of the client address the
/// server saw, so that an id reused after a restart is never taken for the old one). A COMMIT sent on it may still reach the server
/// after the client gave up; the session must be seen gone before the saga's outcome is
/// decided (<doc:Protocol#Late-COMMITs>). SQLite has none: a closed connection in this
/// process, or a dead process, holds no transaction.
public struct SQLSession: Hashable, Sendable, CustomStringConvertible {
    /// The server's id for the session.
    public let id: UInt64
    /// When the server started, in seconds since 1970 (0: unknown).
    public let serverStart: UInt64
    /// A hash of the client's address as the server saw it (`host:port`; 0: unknown).
    public let client: UInt64
    public init(id: UInt64, serverStart: UInt64, client: UInt64 = 0) {
        self.id = id; self.serverStart = serverStart; self.client = client
    }
    public var description: String { "session \(id) (server started at \(serverStart))" }

    /// FNV-1a of the bytes: the ``client`` of an address.
    public static func clientHash(_ address: String) -> UInt64 {
        var hash: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in address.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        return hash
    }
}
