import Foundation
import MySQLBackend
import RocksDBBackend
import Saga
import SagaFaultKit
import SQLiteBackend
import Synchronization

/// The torture workload: transfers that move amounts between accounts kept twice, once as KV
/// keys `a/NNNNN` and once as SQL rows, plus a per-saga token (`t/TXID` in KV, a `tt_sagas` row
/// in SQL) so the checker can tell, saga by saga, whether all of it or none of it happened.
/// Everything a saga does follows from (seed, txid), so the checker can replay it.
struct BankSpec: Sendable {
    var seed: UInt64
    /// Accounts in all.
    var accounts: Int = 200
    /// The hot set: 80% of the keys a saga touches come from the first `hot` accounts.
    var hot: Int = 8
    /// At most this many accounts a saga.
    var maxKeys: Int = 20
    /// One saga in `failOneIn` has its COMMIT fail for real (0: none).
    var failOneIn: Int = 10

    struct Transfer: Sendable {
        let txid: Int64
        /// Sorted, distinct accounts with their deltas.
        let deltas: [(account: Int, delta: Int64)]
        let forcedFailure: Bool
    }

    func transfer(_ txid: Int64) -> Transfer {
        var rng = SplitMix64(seed: seed ^ (UInt64(bitPattern: txid) &* 0x9E37_79B9_7F4A_7C15))
        let n = 1 + Int(rng.next() % UInt64(max(1, maxKeys)))
        var chosen: [Int: Int64] = [:]
        while chosen.count < min(n, accounts) {
            let hotPick = rng.next() % 10 < 8
            let account = hotPick ? Int(rng.next() % UInt64(max(1, hot))) : hot + Int(rng.next() % UInt64(max(1, accounts - hot)))
            chosen[account] = Int64(rng.next() % 101) - 50
        }
        let fail = failOneIn > 0 && rng.next() % UInt64(failOneIn) == 0
        return Transfer(txid: txid, deltas: chosen.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }, forcedFailure: fail)
    }

    static func accountKey(_ a: Int) -> Bytes { Bytes("a/\(String(format: "%05d", a))".utf8) }
    static func tokenKey(_ txid: Int64) -> Bytes { Bytes("t/\(txid)".utf8) }
    static let accountPrefix = Bytes("a/".utf8)
    static let tokenPrefix = Bytes("t/".utf8)

    static func encode(_ v: Int64) -> Bytes { Bytes(String(v).utf8) }
    static func decode(_ b: Bytes?) throws -> Int64 {
        guard let b else { return 0 }
        guard let v = Int64(String(decoding: b, as: UTF8.self)) else { throw TortureError("KV value \"\(b.debugText)\" is not a balance") }
        return v
    }
}

struct TortureError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Where one node under test keeps its two stores.
struct NodeSite: Sendable {
    /// galera: a 3-node MariaDB Galera cluster, reached through a URL that names every node.
    enum Backend: String, Sendable, CaseIterable, Codable {
        case sqlite, mysql, galera
        /// The SQL side speaks MySQL (one server or a cluster).
        var usesMySQL: Bool { self != .sqlite }
    }
    let backend: Backend
    let dir: String
    /// The MySQL database of this node (direct to the server; on a cluster, every node, in
    /// the order a connection tries them).
    let mysqlURL: String?

    var kvPath: String { dir + "/kv" }
    var sqlitePath: String { dir + "/bank.sqlite" }

    static let sqliteSchema = [
        "CREATE TABLE IF NOT EXISTS tt_accounts (k INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS tt_sagas (txid INTEGER PRIMARY KEY, nkeys INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS tt_parent (id TEXT PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS tt_probe (ref TEXT REFERENCES tt_parent(id) DEFERRABLE INITIALLY DEFERRED)",
    ]
    static let mysqlSchema = [
        "CREATE TABLE IF NOT EXISTS tt_accounts (k INT PRIMARY KEY, balance BIGINT NOT NULL) ENGINE=InnoDB",
        "CREATE TABLE IF NOT EXISTS tt_sagas (txid BIGINT PRIMARY KEY, nkeys INT NOT NULL) ENGINE=InnoDB",
    ]

    func openSQL(proxyPort: UInt16? = nil) throws -> any SQLDatabase {
        switch backend {
        case .sqlite:
            try SQLiteFaults.register()
            var config = SQLiteDatabase.Configuration()
            config.vfs = SQLiteFaults.vfsName
            return try SQLiteDatabase(path: sqlitePath, configuration: config)
        case .mysql, .galera:
            guard let mysqlURL else { throw TortureError("no MySQL URL for \(dir)") }
            var url = try MySQLURL(mysqlURL)
            if let proxyPort {
                // The proxy stands in front of the first server; on a cluster the other nodes
                // follow it, so a connection goes on to them when that node is down.
                url.endpoints = [MySQLURL.Endpoint(host: "127.0.0.1", port: UInt32(proxyPort))] + url.endpoints.dropFirst()
                url.socket = nil
            }
            return try MySQLDatabase(url: url)
        }
    }

    /// The same site with its cluster nodes tried in another order (`order` names nodes
    /// 1...3 of ``mysqlURL`` as it was made, in node order).
    func withNodeOrder(_ order: [Int]) throws -> NodeSite {
        guard let mysqlURL else { return self }
        var url = try MySQLURL(mysqlURL)
        let nodes = url.endpoints
        url.endpoints = order.map { nodes[$0 - 1] }
        return NodeSite(backend: backend, dir: dir, mysqlURL: url.withPassword)
    }

    /// Every server of the URL alone, in its order (on a cluster: one URL per node).
    var serverURLs: [String] {
        guard let mysqlURL, let url = try? MySQLURL(mysqlURL) else { return [] }
        return url.endpoints.map { endpoint in
            var single = url
            single.endpoints = [endpoint]
            return single.withPassword
        }
    }

    /// Creates the tables and the accounts (idempotent).
    func prepareSchema(_ sql: any SQLDatabase, accounts: Int) throws {
        let conn = try sql.connect()
        defer { conn.close() }
        for s in backend == .sqlite ? Self.sqliteSchema : Self.mysqlSchema { try conn.execute(s, []) }
        let have = try conn.query("SELECT COUNT(*) FROM tt_accounts", []).first?[0].int64 ?? 0
        guard have < accounts else { return }
        try conn.begin()
        let verb = backend == .sqlite ? "INSERT OR IGNORE" : "INSERT IGNORE"
        for a in 0..<accounts { try conn.execute("\(verb) INTO tt_accounts (k, balance) VALUES (?, 0)", [.integer(Int64(a))]) }
        switch conn.commit() {
        case .committed: break
        case .failed(let e), .unknown(let e): throw e
        }
    }
}

extension MySQLURL {
    /// The URL as a string with the password in it (``description`` hides it), for a child.
    var withPassword: String {
        func encoded(_ s: String) -> String { s.addingPercentEncoding(withAllowedCharacters: .urlUserAllowed.subtracting(CharacterSet(charactersIn: ":@"))) ?? s }
        if let socket { return "mysql://\(encoded(user)):\(encoded(password))@\(host)/\(database)?socket=\(socket)" }
        return "mysql://\(encoded(user)):\(encoded(password))@\(endpoints.map(\.description).joined(separator: ","))/\(database)"
    }
}

/// Kills a saga's own connection from another session, on the server that connection reached:
/// a connection id names a session of one server only (on a cluster, of one node), and the
/// saga's connection may have gone to another node than a new one would (a node was down).
final class ConnectionKiller: Sendable {
    private let url: MySQLURL
    private let servers = Mutex<[UInt32: MySQLDatabase]>([:])

    init(url: String) throws { self.url = try MySQLURL(url) }

    /// Kills the session `id` of the server listening on `port` (the saga's `@@port`: the
    /// server's own, also when the saga's connection goes through a proxy).
    func kill(_ id: Int64, serverPort port: UInt32) throws {
        let database = try servers.withLock { servers in
            if let known = servers[port] { return known }
            var single = url
            single.endpoints = [MySQLURL.Endpoint(host: url.host, port: port)]
            let opened = try MySQLDatabase(url: single)
            servers[port] = opened
            return opened
        }
        let side = try database.openConnection()
        defer { side.close() }
        try side.execute("KILL CONNECTION ?", [.integer(id)])
    }
}

/// Runs one transfer as one saga. `failCommit` makes its COMMIT fail for real: a deferred
/// foreign key on SQLite, the saga's own connection killed from another session on MySQL.
/// Returns, on a cluster, the port of the node the saga's transaction ran on (for the outcome
/// log).
@discardableResult
func runTransfer(_ t: BankSpec.Transfer, on coordinator: SagaCoordinator, backend: NodeSite.Backend, killer: ConnectionKiller?) throws(SagaError) -> Int64? {
    try coordinator.run { saga in
        let node = backend == .galera ? try saga.sql.query("SELECT @@port", []).first?[0].int64 : nil
        // KV locks first, in key order: sagas never wait for each other in a cycle, and no
        // saga holds an InnoDB row lock while it waits for a KV lock.
        var balances: [Int64] = []
        for (account, _) in t.deltas { balances.append(try BankSpec.decode(saga.kv.get(BankSpec.accountKey(account)))) }
        for (account, delta) in t.deltas {
            try saga.sql.execute("UPDATE tt_accounts SET balance = balance + ? WHERE k = ?", [.integer(delta), .integer(Int64(account))])
        }
        try saga.sql.execute("INSERT INTO tt_sagas (txid, nkeys) VALUES (?, ?)", [.integer(t.txid), .integer(Int64(t.deltas.count))])
        for ((account, delta), balance) in zip(t.deltas, balances) {
            try saga.kv.put(BankSpec.accountKey(account), BankSpec.encode(balance + delta))
        }
        try saga.kv.put(BankSpec.tokenKey(t.txid), Bytes("1".utf8))
        if t.forcedFailure {
            switch backend {
            case .sqlite:
                try saga.sql.execute("INSERT INTO tt_probe (ref) VALUES ('missing-parent')", [])
            case .mysql, .galera:
                guard let killer, let row = try saga.sql.query("SELECT CONNECTION_ID(), @@port", []).first,
                      let id = row[0].int64, let port = row[1].int64 else { break }
                try killer.kill(id, serverPort: UInt32(port))
            }
        }
        return node
    }
}
