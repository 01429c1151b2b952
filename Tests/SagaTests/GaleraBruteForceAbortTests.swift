import Foundation
import MySQLBackend
import RocksDBBackend
import Saga
import SagaFaultKit
import Synchronization
import Testing

/// A saga's transaction on one node that a replicated write from another node aborts (a
/// brute-force abort: the replicated write was certified first) must never be reported
/// committed. Found by saga-torture's galera backend: MariaDB runs the statements of a
/// multi-statement query that follow a brute-force abort outside the aborted transaction, and
/// answers OK to its `COMMIT`, so the one-round-trip `INSERT marker; COMMIT` reported sagas
/// committed whose transaction (marker included) the cluster had rolled back: acknowledged,
/// then lost in SQL while their KV writes stayed.
@Suite("Galera: brute-force aborts at COMMIT", .serialized)
struct GaleraBruteForceAbortTests {
    @Test func sagaAbortedByAReplicatedWriteIsNeverReportedCommitted() throws {
        let cluster = try MySQLURL(try SharedGalera.url())
        try #require(cluster.endpoints.count >= 2, "the test needs two nodes")
        let database = "saga_bf_" + UUID().uuidString.prefix(8).lowercased()
        var sagaNode = cluster, otherNode = cluster
        sagaNode.database = database
        sagaNode.endpoints = [cluster.endpoints[0]]
        otherNode.database = database
        otherNode.endpoints = [cluster.endpoints[1]]
        let admin = try MySQLDatabase(url: cluster).openConnection()
        defer {
            _ = try? admin.execute("DROP DATABASE IF EXISTS \(database)", [])
            admin.close()
        }
        try admin.execute("CREATE DATABASE \(database)", [])
        try admin.execute("CREATE TABLE \(database).bf_hot (k INT PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB", [])
        try admin.execute("CREATE TABLE \(database).bf_done (id BIGINT PRIMARY KEY) ENGINE=InnoDB", [])
        try admin.execute("INSERT INTO \(database).bf_hot VALUES (1, 0)", [])

        // Another node keeps writing the row every saga writes: its write sets, certified
        // first, abort the sagas' transactions on the first node at any moment.
        let other = try MySQLDatabase(url: otherNode).openConnection()
        try other.execute("SET SESSION wsrep_sync_wait = 1", [])
        _ = try other.query("SELECT COUNT(*) FROM bf_hot", [])  // the tables reached that node
        let stop = Atomic<Bool>(false)
        let writer = WriterConnection(other)
        let done = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            defer { done.signal() }
            while !stop.load(ordering: .relaxed) {
                _ = try? writer.connection.execute("UPDATE bf_hot SET v = v + 1 WHERE k = 1", [])
            }
        }

        let dir = try SQLiteEnvironment.makeTempDir("saga-bf")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let kv = try RocksDBStore(path: dir + "/kv")
        let coordinator = try SagaCoordinator(kv: kv, sql: try MySQLDatabase(url: sagaNode))
        var committed: [Int64] = [], failed: [Int64] = []
        for id in Int64(1)...1000 {
            let result = Result { () throws(SagaError) in
                try coordinator.run { saga in
                    try saga.sql.execute("UPDATE bf_hot SET v = v + 1000000 WHERE k = 1", [])
                    try saga.sql.execute("INSERT INTO bf_done (id) VALUES (?)", [.integer(id)])
                    try saga.kv.put(Bytes("done/\(id)".utf8), Bytes("1".utf8))
                }
            }
            switch result {
            case .success: committed.append(id)
            case .failure(.inDoubt): Issue.record("saga \(id) in doubt with every node up")
            case .failure: failed.append(id)
            }
        }
        stop.store(true, ordering: .relaxed)
        done.wait()
        other.close()
        coordinator.close()
        defer { kv.close() }
        #expect(!failed.isEmpty, "no saga lost a conflict: the test did not test what it is for")

        // Every node, with causal reads: exactly the sagas reported committed, in SQL and in KV.
        for endpoint in cluster.endpoints {
            var node = cluster
            node.database = database
            node.endpoints = [endpoint]
            let conn = try MySQLDatabase(url: node).openConnection()
            defer { conn.close() }
            try conn.execute("SET SESSION wsrep_sync_wait = 1", [])
            let present = Set(try conn.query("SELECT id FROM bf_done", []).compactMap { $0[0].int64 })
            let lost = committed.filter { !present.contains($0) }
            #expect(lost.isEmpty, "\(endpoint): \(lost.count) of \(committed.count) sagas reported committed are not in SQL: \(lost.prefix(10))")
            let unexpected = failed.filter { present.contains($0) }
            #expect(unexpected.isEmpty, "\(endpoint): sagas reported failed are in SQL: \(unexpected.prefix(10))")
        }
        let inKV = try committed.filter { try kv.get(Bytes("done/\($0)".utf8)) == nil }
        #expect(inKV.isEmpty, "sagas reported committed missing from KV: \(inKV.prefix(10))")
        let undone = try failed.filter { try kv.get(Bytes("done/\($0)".utf8)) != nil }
        #expect(undone.isEmpty, "sagas reported failed still in KV: \(undone.prefix(10))")
    }
}

/// The other node's connection, used by its writer thread alone once handed over.
private final class WriterConnection: @unchecked Sendable {
    let connection: MySQLConnection
    init(_ connection: MySQLConnection) { self.connection = connection }
}
