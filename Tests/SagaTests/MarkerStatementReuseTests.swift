import Foundation
@testable import Saga
import SagaTestKit
import SQLiteBackend
import Testing

/// The saga's marker insert is the same prepared statement for every saga: with the ids spliced
/// into its text, each saga prepared a new statement on SQLite and pushed the body's own
/// statements out of the connection's cache.
@Suite("Marker statement reuse")
struct MarkerStatementReuseTests {
    @Test func theMarkerInsertIsPreparedOncePerConnection() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        let conn = try env.sqlite.openConnection()
        defer { conn.close() }
        let markers = MarkerTable.Statements(for: env.sqlite)
        let owner = MarkerOwner(instance: InstanceID(3), claim: 33)
        #expect(try markers.claim(owner.instance, accepting: [], claim: owner.claim, on: conn) == nil)
        var prepared: [Int] = []
        for id in 1...20 {
            try conn.begin()
            try conn.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("k\(id)"), .integer(Int64(id))])
            guard case .committed = markers.commit(insertingMarker: SagaID(UInt64(id)), owner: owner, on: conn) else {
                Issue.record("saga \(id) did not commit"); return
            }
            prepared.append(conn.statementsPrepared)
        }
        #expect(prepared.first == prepared.last, "statements prepared after each saga: \(prepared)")
        #expect(try env.markers().count == 20)
    }
}

@testable import MySQLBackend

/// MariaDB sends the marker insert and COMMIT as one text query, which binds nothing: the
/// integer and blob arguments (redo mode's after-images) are written into the text, and anything
/// else falls back to two round trips.
@Suite("MariaDB: the marker insert's arguments in its text")
struct InliningTests {
    @Test func integersAreWrittenIn() {
        #expect(MySQLConnection.inliningLiterals("INSERT INTO t VALUES (?, ?, (SELECT 'committed' FROM i WHERE a = ?))", [1, -2, .integer(Int64.max)])
                == "INSERT INTO t VALUES (1, -2, (SELECT 'committed' FROM i WHERE a = 9223372036854775807))")
    }

    @Test func blobsAreWrittenInAsHex() {
        #expect(MySQLConnection.inliningLiterals("INSERT INTO t VALUES (?, ?)", [1, .blob([0x00, 0x27, 0xAB, 0xFF])])
                == "INSERT INTO t VALUES (1, X'0027abff')", "a quote byte becomes hex digits")
        #expect(MySQLConnection.inliningLiterals("SELECT ?", [.blob([])]) == "SELECT X''")
    }

    @Test func anythingElseIsRefused() {
        #expect(MySQLConnection.inliningLiterals("SELECT ?", [.text("x")]) == nil, "text is never spliced")
        #expect(MySQLConnection.inliningLiterals("SELECT ?, ?", [1]) == nil, "too few arguments")
        #expect(MySQLConnection.inliningLiterals("SELECT ?", [1, 2]) == nil, "too many arguments")
        #expect(MySQLConnection.inliningLiterals("SELECT '?', ?", [1]) == nil, "a ? inside a string literal")
    }
}
