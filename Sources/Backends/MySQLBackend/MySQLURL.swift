import Foundation

/// Where and how to connect: `mysql://user:password@host:port/database`, several servers of one
/// cluster, `mysql://user:password@host1:port1,host2:port2/database` (a connection goes to the
/// first that answers and is ready), or a Unix socket,
/// `mysql://user:password@localhost/database?socket=/path/to/mysqld.sock`. User and password
/// may be percent-encoded.
public struct MySQLURL: Sendable, Equatable, CustomStringConvertible {
    /// One server's address.
    public struct Endpoint: Sendable, Equatable, CustomStringConvertible {
        public var host: String
        public var port: UInt32
        public init(host: String, port: UInt32 = 3306) { self.host = host; self.port = port }
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    /// The servers to try, in order: a connection goes to the first that answers and is ready
    /// (on a Galera cluster, a node that is synced with the primary component). Never empty.
    public var endpoints: [Endpoint]
    public var user: String
    public var password: String
    public var database: String
    public var socket: String?

    /// The first server's host. Setting it leaves that one server (with its port) in
    /// ``endpoints``.
    public var host: String {
        get { endpoints[0].host }
        set { endpoints = [Endpoint(host: newValue, port: endpoints[0].port)] }
    }

    /// The first server's port. Setting it leaves that one server in ``endpoints``.
    public var port: UInt32 {
        get { endpoints[0].port }
        set { endpoints = [Endpoint(host: endpoints[0].host, port: newValue)] }
    }

    public init(host: String = "127.0.0.1", port: UInt32 = 3306, user: String, password: String, database: String, socket: String? = nil) {
        self.init(endpoints: [Endpoint(host: host, port: port)], user: user, password: password, database: database, socket: socket)
    }

    /// Several servers of one cluster (at least one), tried in order.
    public init(endpoints: [Endpoint], user: String, password: String, database: String, socket: String? = nil) {
        precondition(!endpoints.isEmpty, "a MySQL URL names at least one server")
        self.endpoints = endpoints
        self.user = user
        self.password = password
        self.database = database
        self.socket = socket
    }

    public init(_ string: String) throws {
        func bad(_ why: String) -> MySQLUsageError {
            MySQLUsageError(description: "invalid MySQL URL \"\(Self.redact(string))\": \(why); expected mysql://user:password@host:port/database, mysql://user:password@host1:port1,host2:port2/database or mysql://user:password@localhost/database?socket=/path")
        }
        // Foundation parses one host: the list of servers is taken out of the authority and
        // parsed here, the rest by URLComponents with the first server in its place.
        let (single, hostList) = Self.splitHosts(string)
        guard let components = URLComponents(string: single) else { throw bad("not a URL") }
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
        var endpoints: [Endpoint] = []
        if let hostList {
            guard socket == nil else { throw bad("a socket goes with one server, not a list of hosts") }
            for item in hostList.split(separator: ",", omittingEmptySubsequences: false) {
                guard let endpoint = Self.endpoint(String(item)) else {
                    throw bad("\"\(item)\" in the list of hosts is not host or host:port (a port from 1 to 65535)")
                }
                endpoints.append(endpoint)
            }
        } else {
            var host = components.host ?? ""
            // A bracketed IPv6 address: the client library takes it without brackets.
            if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty || socket != nil else { throw bad("no host") }
            if let port = components.port, !(1...65535).contains(port) { throw bad("port \(port) is out of range") }
            endpoints = [Endpoint(host: host.isEmpty ? "localhost" : host, port: UInt32(components.port ?? 3306))]
        }
        self.init(
            endpoints: endpoints,
            user: user,
            password: components.percentEncodedPassword.flatMap { $0.removingPercentEncoding } ?? "",
            database: database,
            socket: socket)
    }

    /// `string` with a comma-separated list of servers replaced by a placeholder host, and the
    /// list; the string itself and nil when it names one server.
    private static func splitHosts(_ string: String) -> (String, String?) {
        guard let schemeEnd = string.range(of: "://") else { return (string, nil) }
        let rest = string[schemeEnd.upperBound...]
        let authorityEnd = rest.firstIndex { $0 == "/" || $0 == "?" || $0 == "#" } ?? rest.endIndex
        let authority = rest[..<authorityEnd]
        let hostStart = authority.lastIndex(of: "@").map { authority.index(after: $0) } ?? authority.startIndex
        let hosts = authority[hostStart...]
        guard hosts.contains(",") else { return (string, nil) }
        return (String(string[..<hostStart]) + "placeholder" + String(rest[authorityEnd...]), String(hosts))
    }

    /// `host`, `host:port`, `[v6]` or `[v6]:port`.
    private static func endpoint(_ item: String) -> Endpoint? {
        var host = Substring(item)
        var port: UInt32 = 3306
        if host.hasPrefix("[") {
            guard let close = host.firstIndex(of: "]") else { return nil }
            let after = host[host.index(after: close)...]
            host = host[host.index(after: host.startIndex)..<close]
            if !after.isEmpty {
                guard after.hasPrefix(":"), let p = UInt32(after.dropFirst()) else { return nil }
                port = p
            }
        } else if host.filter({ $0 == ":" }).count > 1 {
            return nil  // an IPv6 address goes in brackets; host:port:port is nothing
        } else if let colon = host.lastIndex(of: ":") {
            guard let p = UInt32(host[host.index(after: colon)...]) else { return nil }
            port = p
            host = host[..<colon]
        }
        guard !host.isEmpty, (1...65535).contains(port), !host.contains(where: { $0 == "@" || $0 == " " }) else { return nil }
        return Endpoint(host: String(host), port: port)
    }

    /// The URL with the password hidden, for messages.
    public var description: String {
        if let socket { return "mysql://\(user):***@\(host)/\(database)?socket=\(socket)" }
        return "mysql://\(user):***@\(endpoints.map(\.description).joined(separator: ","))/\(database)"
    }

    /// Hides everything between the user's `:` and the last `@`: it works on text that is no
    /// valid URL too (a password with an unencoded `/`, `?` or `#`), and hides too much rather
    /// than too little.
    static func redact(_ url: String) -> String {
        guard let schemeEnd = url.range(of: "://"), let at = url.lastIndex(of: "@"), at > schemeEnd.upperBound else { return url }
        let userInfo = url[schemeEnd.upperBound..<at]
        guard let colon = userInfo.firstIndex(of: ":") else { return url }
        return String(url[..<url.index(after: colon)]) + "***" + String(url[at...])
    }
}
