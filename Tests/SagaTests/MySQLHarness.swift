import SagaFaultKit
import Foundation
import MySQLBackend
import RocksDBBackend
import Saga
import SagaTestKit

/// RocksDB + MariaDB, both real: a fresh database on the shared throwaway server, reached
/// through a ``MySQLProxy`` that can lose a COMMIT's reply.
struct MySQLHarness: SagaHarness {
    var name: String { "rocksdb+mariadb" }
    func makeEnvironment() throws -> any HarnessEnvironment { try MySQLEnvironment(serverURL: try SharedMariaDB.url()) }
}

/// `@unchecked Sendable`: the stores are thread-safe; `reopen()` swaps them only while no saga runs.
final class MySQLEnvironment: HarnessEnvironment, @unchecked Sendable {
    let dir: String
    let server: MySQLURL
    let database: String
    let proxy: MySQLProxy
    private(set) var rocks: RocksDBStore
    private(set) var mysql: MySQLDatabase
    var kv: any KVStore { rocks }
    var sql: any SQLDatabase { mysql }
    var serializesWriters: Bool { false }

    /// The URL of this environment's database, straight to the server (no proxy).
    let directURL: MySQLURL
    /// The same database through the proxy.
    let proxiedURL: MySQLURL

    /// The backend's configuration for the stores (``reopen()`` keeps it).
    let configuration: MySQLDatabase.Configuration

    /// On a cluster (a URL with several servers) the proxy stands in front of the first server,
    /// and the others follow it in ``proxiedURL``: a connection that cannot reach the first
    /// goes to the next.
    init(serverURL: String, rocksDir: String? = nil, configuration: MySQLDatabase.Configuration = .init()) throws {
        self.configuration = configuration
        server = try MySQLURL(serverURL)
        database = "saga_t_" + UUID().uuidString.prefix(8).lowercased()
        dir = try rocksDir ?? SQLiteEnvironment.makeTempDir("saga-my")
        let admin = try MySQLDatabase(url: server).openConnection()
        defer { admin.close() }
        try admin.execute("CREATE DATABASE \(database)", [])
        proxy = try MySQLProxy(targetHost: server.host == "localhost" ? "127.0.0.1" : server.host, targetPort: UInt16(server.port))
        var direct = server
        direct.database = database
        directURL = direct
        var proxied = direct
        proxied.endpoints = [MySQLURL.Endpoint(host: "127.0.0.1", port: UInt32(proxy.port))] + direct.endpoints.dropFirst()
        proxied.socket = nil
        proxiedURL = proxied
        rocks = try RocksDBStore(path: dir + "/kv")
        mysql = try MySQLDatabase(url: proxiedURL, configuration: configuration)
        let conn = try mysql.openConnection()
        defer { conn.close() }
        try conn.execute(conformanceTableDDL + " ENGINE=InnoDB", [])
    }

    func reopen() throws {
        rocks.close()
        rocks = try RocksDBStore(path: dir + "/kv")
        mysql = try MySQLDatabase(url: proxiedURL, configuration: configuration)
    }

    /// Kills the saga's own connection from another session: the marker insert or COMMIT that
    /// follows finds the connection gone, and the server rolls the transaction back.
    func arrangeCommitFailure(in saga: Saga) throws {
        guard let id = try saga.sql.query("SELECT CONNECTION_ID()", []).first?[0].int64 else {
            throw TestSetupError("no connection id")
        }
        try killConnection(id)
    }

    func killConnection(_ id: Int64) throws {
        let side = try MySQLDatabase(url: directURL).openConnection()
        defer { side.close() }
        try side.execute("KILL CONNECTION ?", [.integer(id)])
    }

    /// The proxy forwards the COMMIT and loses the server's reply: the client sees 2013 while
    /// the transaction is committed.
    func unknownCommitHooks() -> any SagaHooks { LoseCommitReply(proxy: proxy) }

    /// DDL commits the open transaction before it runs.
    func endTransactionUnseen(in saga: Saga) throws {
        try saga.sql.execute("CREATE TABLE IF NOT EXISTS implicit_commit_probe (x INT)", [])
    }

    func destroy() {
        rocks.close()
        if let admin = try? MySQLDatabase(url: server).openConnection() {
            _ = try? admin.execute("DROP DATABASE IF EXISTS \(database)", [])
            admin.close()
        }
        try? FileManager.default.removeItem(atPath: dir)
    }
}

struct LoseCommitReply: SagaHooks {
    let proxy: MySQLProxy
    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        if step == .commit, phase == .run { proxy.arm(.loseReply) }
    }
}
