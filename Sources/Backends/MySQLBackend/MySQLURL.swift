import Foundation

/// Where and how to connect: `mysql://user:password@host:port/database`, or through a Unix
/// socket, `mysql://user:password@localhost/database?socket=/path/to/mysqld.sock`. User and
/// password may be percent-encoded.
public struct MySQLURL: Sendable, Equatable, CustomStringConvertible {
    public var host: String
    public var port: UInt32
    public var user: String
    public var password: String
    public var database: String
    public var socket: String?

    public init(host: String = "127.0.0.1", port: UInt32 = 3306, user: String, password: String, database: String, socket: String? = nil) {
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.database = database
        self.socket = socket
    }

    public init(_ string: String) throws {
        func bad(_ why: String) -> MySQLUsageError {
            MySQLUsageError(description: "invalid MySQL URL \"\(Self.redact(string))\": \(why); expected mysql://user:password@host:port/database or mysql://user:password@localhost/database?socket=/path")
        }
        guard let components = URLComponents(string: string) else { throw bad("not a URL") }
        guard components.scheme == "mysql" || components.scheme == "mariadb" else {
            throw bad("the scheme must be mysql://, not \(components.scheme.map { "\($0)://" } ?? "missing")")
        }
        guard let user = components.percentEncodedUser.flatMap({ $0.removingPercentEncoding }), !user.isEmpty else {
            throw bad("no user")
        }
        let database = String(components.path.drop { $0 == "/" })
        guard !database.isEmpty, !database.contains("/") else { throw bad("no database name in the path") }
        let socket = components.queryItems?.first { $0.name == "socket" }?.value
        if let socket, socket.isEmpty { throw bad("empty socket path") }
        let host = components.host ?? ""
        guard !host.isEmpty || socket != nil else { throw bad("no host") }
        if let port = components.port, !(1...65535).contains(port) { throw bad("port \(port) is out of range") }
        self.init(
            host: host.isEmpty ? "localhost" : host,
            port: UInt32(components.port ?? 3306),
            user: user,
            password: components.percentEncodedPassword.flatMap { $0.removingPercentEncoding } ?? "",
            database: database,
            socket: socket)
    }

    /// The URL with the password hidden, for messages.
    public var description: String {
        socket.map { "mysql://\(user):***@\(host)/\(database)?socket=\($0)" } ?? "mysql://\(user):***@\(host):\(port)/\(database)"
    }

    static func redact(_ url: String) -> String {
        guard var c = URLComponents(string: url), c.password != nil else { return url }
        c.password = "***"
        return c.string ?? url
    }
}
