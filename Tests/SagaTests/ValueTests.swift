import Foundation
import MySQLBackend
import Saga
import SagaFaultKit
import SagaTestKit
import Testing

/// A Codable value stored in KV with no code of its own.
private struct Account: Codable, KVCodable, Equatable {
    var name: String
    var balance: Int64
    var opened: Date
    var tags: [String]
    var avatar: Data?
}

private func errorText(_ body: () throws -> Void) -> String? {
    do { try body(); return nil } catch { return String(describing: error) }
}

// MARK: - KV encodings

@Suite("KV values")
struct KVValueTests {
    @Test func integerLayoutsArePinned() throws {
        #expect(Int64(1).kvEncoded() == [0, 0, 0, 0, 0, 0, 0, 1])
        #expect(Int64(-1).kvEncoded() == [UInt8](repeating: 0xFF, count: 8))
        #expect(Int64.min.kvEncoded() == [0x80, 0, 0, 0, 0, 0, 0, 0])
        #expect(Int(258).kvEncoded() == [0, 0, 0, 0, 0, 0, 1, 2])
        #expect(UInt64.max.kvEncoded() == [UInt8](repeating: 0xFF, count: 8))
        #expect(UInt64(0x0102_0304_0506_0708).kvEncoded() == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(Int32(-2).kvEncoded() == [0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE])
        #expect(Int32(7).kvEncoded() == Int64(7).kvEncoded())
    }

    @Test func otherLayoutsArePinned() throws {
        #expect(true.kvEncoded() == [1])
        #expect(false.kvEncoded() == [0])
        #expect(Double(1).kvEncoded() == [0x3F, 0xF0, 0, 0, 0, 0, 0, 0])
        #expect(Double(-2.5).kvEncoded() == [0xC0, 0x04, 0, 0, 0, 0, 0, 0])
        #expect(Date(timeIntervalSinceReferenceDate: 1).kvEncoded() == [0x3F, 0xF0, 0, 0, 0, 0, 0, 0], "seconds since 2001")
        #expect("hé".kvEncoded() == [0x68, 0xC3, 0xA9])
        #expect(Bytes([9, 0, 255]).kvEncoded() == [9, 0, 255])
        #expect(Data([9, 0, 255]).kvEncoded() == [9, 0, 255])
        let uuid = UUID(uuidString: "00112233-4455-6677-8899-AABBCCDDEEFF")!
        #expect(uuid.kvEncoded() == [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF])
    }

    @Test func nonNegativeIntegersSortByBytes() throws {
        let values: [Int64] = [0, 1, 255, 256, 65_535, 1 << 40, Int64.max]
        let encoded = values.map { $0.kvEncoded() }
        #expect(encoded == encoded.sorted { $0.lexicographicallyPrecedes($1) })
    }

    @Test func everyTypeRoundTrips() throws {
        func roundTrip<V: KVCodable & Equatable>(_ value: V) throws {
            #expect(try V(kvEncoded: value.kvEncoded()) == value, "\(V.self): \(value)")
        }
        for v: Int64 in [0, 1, -1, .min, .max] { try roundTrip(v) }
        for v: Int in [0, 42, -42, .min, .max] { try roundTrip(v) }
        for v: UInt64 in [0, 1, .max] { try roundTrip(v) }
        for v: Int32 in [0, -1, .min, .max] { try roundTrip(v) }
        for v in [true, false] { try roundTrip(v) }
        for v: Double in [0, -0.0, 1.5, -1e300, .infinity, .leastNonzeroMagnitude] { try roundTrip(v) }
        #expect(try Double(kvEncoded: Double.nan.kvEncoded()).isNaN)
        for v in ["", "alice", "🎉 ünïcode"] { try roundTrip(v) }
        for v: Bytes in [[], [0], [1, 2, 3, 255]] { try roundTrip(v) }
        for v in [Data(), Data([0, 1, 2])] { try roundTrip(v) }
        try roundTrip(UUID())
        for v in [Date(timeIntervalSince1970: 0), Date(timeIntervalSince1970: 1_700_000_000.123456), Date(timeIntervalSince1970: -86_400.5)] { try roundTrip(v) }
    }

    @Test func codableIsSortedKeyJSON() throws {
        let account = Account(name: "alice", balance: 42, opened: Date(timeIntervalSinceReferenceDate: 721_692_800.5), tags: ["a", "b"], avatar: Data([1, 2]))
        let json = #"{"avatar":"AQI=","balance":42,"name":"alice","opened":721692800.5,"tags":["a","b"]}"#
        #expect(try account.kvEncoded() == Bytes(json.utf8))
        #expect(try Account(kvEncoded: Bytes(json.utf8)) == account)
        // Key order in stored JSON does not matter when reading.
        let shuffled = #"{"tags":[],"name":"bob","balance":-1,"opened":0}"#
        #expect(try Account(kvEncoded: Bytes(shuffled.utf8)) == Account(name: "bob", balance: -1, opened: Date(timeIntervalSinceReferenceDate: 0), tags: [], avatar: nil))
    }

    @Test func decodeErrorsNameTypeCountAndProblem() throws {
        #expect(errorText { _ = try Int64(kvEncoded: [1, 2, 3]) } == "cannot decode Int64 from 3 bytes: expected 8")
        #expect(errorText { _ = try Int(kvEncoded: []) } == "cannot decode Int from 0 bytes: expected 8")
        #expect(errorText { _ = try UInt64(kvEncoded: [1, 2, 3, 4, 5, 6, 7, 8, 9]) } == "cannot decode UInt64 from 9 bytes: expected 8")
        #expect(errorText { _ = try Int32(kvEncoded: Int64(1 << 32).kvEncoded()) } == "cannot decode Int32 from 8 bytes: 4294967296 is out of range")
        #expect(errorText { _ = try Int32(kvEncoded: Int64.min.kvEncoded()) } == "cannot decode Int32 from 8 bytes: -9223372036854775808 is out of range")
        #expect(errorText { _ = try Bool(kvEncoded: [2]) } == "cannot decode Bool from 1 byte: byte 2 is neither 0 nor 1")
        #expect(errorText { _ = try Bool(kvEncoded: [0, 1]) } == "cannot decode Bool from 2 bytes: expected 1")
        #expect(errorText { _ = try Double(kvEncoded: [0]) } == "cannot decode Double from 1 byte: expected 8")
        #expect(errorText { _ = try Date(kvEncoded: [0, 0, 0, 0]) } == "cannot decode Date from 4 bytes: expected 8")
        #expect(errorText { _ = try UUID(kvEncoded: [UInt8](repeating: 0, count: 15)) } == "cannot decode UUID from 15 bytes: expected 16")
        #expect(errorText { _ = try String(kvEncoded: [0x61, 0xFF]) } == "cannot decode String from 2 bytes: not valid UTF-8")
        #expect(errorText { _ = try Account(kvEncoded: Bytes(#"{"name":"x"}"#.utf8)) } == "cannot decode Account from 12 bytes: invalid JSON: missing key `balance`")
        #expect(errorText { _ = try Account(kvEncoded: Bytes(#"{"name":1,"balance":1,"opened":0,"tags":[]}"#.utf8)) } == "cannot decode Account from 43 bytes: invalid JSON: expected String at `name`")
        let garbage = errorText { _ = try Account(kvEncoded: [0, 1, 2]) } ?? ""
        #expect(garbage.hasPrefix("cannot decode Account from 3 bytes: invalid JSON: "), "\(garbage)")
        // The error is a value with its parts.
        do { _ = try Int64(kvEncoded: [1]); Issue.record("decoded") } catch let error as KVDecodingError {
            #expect(error == KVDecodingError(type: Int64.self, byteCount: 1, reason: "expected 8"))
        }
    }
}

// MARK: - SQL conversions

/// An executor that only records what it was given: which overloads the call forms reach.
private final class RecordingExecutor: SQLExecutor {
    var last: [SQLValue] = []
    @discardableResult
    func execute(_ sql: String, _ arguments: [SQLValue]) throws -> Int { last = arguments; return 0 }
    func query(_ sql: String, _ arguments: [SQLValue]) throws -> [SQLRow] { last = arguments; return [] }
}

@Suite("SQL values")
struct SQLValueTests {
    @Test func encodingsArePinned() throws {
        #expect(Int(-5).sqlValue == .integer(-5))
        #expect(Int64.max.sqlValue == .integer(.max))
        #expect(Int32.min.sqlValue == .integer(Int64(Int32.min)))
        #expect(UInt32.max.sqlValue == .integer(4_294_967_295))
        #expect(true.sqlValue == .integer(1) && false.sqlValue == .integer(0))
        #expect(1.5.sqlValue == .real(1.5))
        #expect(Float(0.5).sqlValue == .real(0.5))
        #expect("x".sqlValue == .text("x"))
        #expect(Data([1, 2]).sqlValue == .blob([1, 2]))
        #expect(Bytes([3]).sqlValue == .blob([3]))
        #expect(Date(timeIntervalSince1970: 1_700_000_000.5).sqlValue == .text("2023-11-14 22:13:20.500"))
        #expect(Date(timeIntervalSince1970: 0).sqlValue == .text("1970-01-01 00:00:00.000"))
        #expect(Date(timeIntervalSince1970: -0.001).sqlValue == .text("1969-12-31 23:59:59.999"))
        #expect(Date(timeIntervalSince1970: 951_782_400).sqlValue == .text("2000-02-29 00:00:00.000"))
        #expect(Date(timeIntervalSince1970: 1.0006).sqlValue == .text("1970-01-01 00:00:01.001"), "rounded to the millisecond")
        #expect(Date(timeIntervalSince1970: 1e12).sqlValue == .real(1e12), "beyond year 9999")
        #expect(UUID(uuidString: "00112233-4455-6677-8899-AABBCCDDEEFF")!.sqlValue == .text("00112233-4455-6677-8899-aabbccddeeff"))
        #expect(Optional<Int>.none.sqlValue == .null)
        #expect(Optional(3).sqlValue == .integer(3))
        #expect(SQLValue.blob([1]).sqlValue == .blob([1]))
    }

    @Test func literals() throws {
        let values: [SQLValue] = [1, 1.5, "s", true, false, nil]
        #expect(values == [.integer(1), .real(1.5), .text("s"), .integer(1), .integer(0), .null])
    }

    @Test func everyTypeRoundTrips() throws {
        func roundTrip<V: SQLValueConvertible & Equatable>(_ value: V) throws {
            #expect(try V(sqlValue: value.sqlValue) == value, "\(V.self): \(value)")
        }
        for v in [0, 1, -1, Int.min, Int.max] { try roundTrip(v) }
        for v: Int64 in [0, .min, .max] { try roundTrip(v) }
        for v: Int32 in [0, .min, .max] { try roundTrip(v) }
        for v: UInt32 in [0, .max] { try roundTrip(v) }
        for v in [true, false] { try roundTrip(v) }
        for v: Double in [0, -1.25, 1e300, .infinity] { try roundTrip(v) }
        for v: Float in [0, 0.1, -3.5] { try roundTrip(v) }
        for v in ["", "héllo"] { try roundTrip(v) }
        for v in [Data(), Data([0, 255])] { try roundTrip(v) }
        for v: Bytes in [[], [1, 2]] { try roundTrip(v) }
        for v in [0, 1_700_000_000.123, -0.001, 253_402_300_799.999, -62_135_596_800] { try roundTrip(Date(timeIntervalSince1970: v)) }
        try roundTrip(Date(timeIntervalSince1970: 1e12))
        try roundTrip(Date.distantFuture)
        try roundTrip(UUID())
        for v in [SQLValue.null, 1, 2.5, "t", .blob([1])] { try roundTrip(v) }
        for v: Int? in [nil, 5] { try roundTrip(v) }
        for v: String? in [nil, "x"] { try roundTrip(v) }
        for v: Date? in [nil, Date(timeIntervalSince1970: 12)] { try roundTrip(v) }
    }

    @Test func lenientWhereDatabasesDiffer() throws {
        #expect(try Int(sqlValue: .text("123")) == 123)
        #expect(try Int(sqlValue: .text("-7")) == -7)
        #expect(try Int(sqlValue: .text("12.00")) == 12, "a DECIMAL with no fraction")
        #expect(try Int(sqlValue: .real(2)) == 2)
        #expect(try Int64(sqlValue: .text("9223372036854775807")) == .max)
        #expect(try Double(sqlValue: .text("1.5")) == 1.5)
        #expect(try Double(sqlValue: .text("12.50")) == 12.5)
        #expect(try Double(sqlValue: .integer(3)) == 3)
        #expect(try Float(sqlValue: .integer(3)) == 3)
        #expect(try Bool(sqlValue: .text("1")) == true)
        #expect(try Bool(sqlValue: .text("0")) == false)
        #expect(try String(sqlValue: .blob(Bytes("abc".utf8))) == "abc")
        #expect(try Bytes(sqlValue: .text("ab")) == [0x61, 0x62])
        #expect(try Data(sqlValue: .text("ab")) == Data([0x61, 0x62]))
        let uuid = UUID()
        #expect(try UUID(sqlValue: .text(uuid.uuidString.uppercased())) == uuid)
        #expect(try UUID(sqlValue: .blob(uuid.kvEncoded())) == uuid)
        #expect(try Date(sqlValue: .text("2023-11-14 22:13:20")) == Date(timeIntervalSince1970: 1_700_000_000))
        #expect(try Date(sqlValue: .text("2023-11-14T22:13:20.5")) == Date(timeIntervalSince1970: 1_700_000_000.5))
        #expect(try Date(sqlValue: .text("2023-11-14 22:13:20.250000")) == Date(timeIntervalSince1970: 1_700_000_000.25))
        #expect(try Date(sqlValue: .real(1_700_000_000.5)) == Date(timeIntervalSince1970: 1_700_000_000.5))
        #expect(try Date(sqlValue: .integer(86_400)) == Date(timeIntervalSince1970: 86_400))
        #expect(try Int?(sqlValue: .null) == nil)
        #expect(try Int?(sqlValue: .text("4")) == 4)
    }

    @Test func decodeErrorsNameValueAndType() throws {
        #expect(errorText { _ = try Int(sqlValue: .real(1.5)) } == "cannot decode Int from 1.5: not an integer")
        #expect(errorText { _ = try Int(sqlValue: .text("1.5")) } == "cannot decode Int from '1.5': not an integer")
        #expect(errorText { _ = try Int(sqlValue: .text("abc")) } == "cannot decode Int from 'abc': not an integer")
        #expect(errorText { _ = try Int(sqlValue: .blob([1])) } == "cannot decode Int from x'01': a blob is not an integer")
        #expect(errorText { _ = try Int(sqlValue: .null) } == "cannot decode Int from NULL: NULL in a non-optional value (decode as `Int?` to allow NULL)")
        #expect(errorText { _ = try Int32(sqlValue: .integer(1 << 31)) } == "cannot decode Int32 from 2147483648: out of range for Int32")
        #expect(errorText { _ = try UInt32(sqlValue: .integer(-1)) } == "cannot decode UInt32 from -1: out of range for UInt32")
        #expect(errorText { _ = try Bool(sqlValue: .integer(2)) } == "cannot decode Bool from 2: expected 0 or 1")
        #expect(errorText { _ = try Bool(sqlValue: .text("true")) } == "cannot decode Bool from 'true': expected 0 or 1")
        #expect(errorText { _ = try Double(sqlValue: .text("x")) } == "cannot decode Double from 'x': not a number")
        #expect(errorText { _ = try Float(sqlValue: .real(1e300)) } == "cannot decode Float from 1e+300: out of range for Float")
        #expect(errorText { _ = try String(sqlValue: .integer(1)) } == "cannot decode String from 1: expected text")
        #expect(errorText { _ = try String(sqlValue: .blob([0xFF])) } == "cannot decode String from x'ff': the blob is not valid UTF-8")
        #expect(errorText { _ = try Bytes(sqlValue: .integer(1)) } == "cannot decode Array<UInt8> from 1: expected a blob")
        #expect(errorText { _ = try Date(sqlValue: .text("yesterday")) } == "cannot decode Date from 'yesterday': expected `yyyy-MM-dd HH:mm:ss.SSS` or seconds since 1970")
        #expect(errorText { _ = try Date(sqlValue: .text("2023-02-30 00:00:00")) } != nil, "no such day")
        #expect(errorText { _ = try Date(sqlValue: .text("2023-11-14 22:13:20.")) } != nil)
        #expect(errorText { _ = try UUID(sqlValue: .text("nope")) } == "cannot decode UUID from 'nope': not a UUID")
        #expect(errorText { _ = try UUID(sqlValue: .blob([1, 2])) } == "cannot decode UUID from x'0102': a blob of 2 bytes, expected 16")
        #expect(errorText { _ = try Int?(sqlValue: .text("x")) } == "cannot decode Int from 'x': not an integer")
    }

    @Test func rowDecodingByNameAndIndex() throws {
        let row = SQLRow(columns: ["id", "name", "note", "balance"], values: [.integer(1), .text("alice"), .null, .text("12.50")])
        #expect(try row.decode("id", as: Int.self) == 1)
        #expect(try row.decode("name", as: String.self) == "alice")
        #expect(try row.decode("note", as: String?.self) == nil)
        #expect(try row.decode("balance", as: Double.self) == 12.5)
        let name: String = try row.decode("name")
        #expect(name == "alice")
        #expect(try row.decode(0, as: Int64.self) == 1)
        #expect(try row.decode(2, as: Int?.self) == nil)
        #expect(try row.decode("note", as: SQLValue.self) == .null)

        #expect(errorText { _ = try row.decode("missing", as: Int.self) } == "cannot decode Int from column `missing`: no such column (the row has `id`, `name`, `note`, `balance`)")
        #expect(errorText { _ = try row.decode("missing", as: Int?.self) } == "cannot decode Optional<Int> from column `missing`: no such column (the row has `id`, `name`, `note`, `balance`)")
        #expect(errorText { _ = try row.decode("note", as: String.self) } == "cannot decode String from column `note` (NULL): NULL in a non-optional value (decode as `String?` to allow NULL)")
        #expect(errorText { _ = try row.decode("name", as: Int.self) } == "cannot decode Int from column `name` ('alice'): not an integer")
        #expect(errorText { _ = try row.decode("balance", as: Int.self) } == "cannot decode Int from column `balance` ('12.50'): not an integer")
        #expect(errorText { _ = try row.decode(1, as: Bool.self) } == "cannot decode Bool from column `name` ('alice'): expected 0 or 1")
        #expect(errorText { _ = try row.decode(4, as: Int.self) } == "cannot decode Int from column `#4`: no such column (the row has 4 columns)")
        #expect(errorText { _ = try SQLRow(columns: [], values: []).decode("x", as: Int.self) } == "cannot decode Int from column `x`: no such column (the row has no columns)")
        do { _ = try row.decode("note", as: Int.self); Issue.record("decoded") } catch let error as SQLDecodingError {
            #expect(error.column == "note" && error.value == .null && error.problem == .unexpectedNull && error.type == "Int")
        }
    }

    /// Every call form reaches an overload, and the arguments arrive as they should.
    @Test func argumentForms() throws {
        let e = RecordingExecutor()
        let x: Int64 = 3, y = "s", amount = 5, name = "n", flag = true
        let when = Date(timeIntervalSince1970: 0), uid = UUID(uuidString: "00112233-4455-6677-8899-AABBCCDDEEFF")!
        let data = Data([1]), bytes: Bytes = [2], missing: Int? = nil, present: String? = "p"
        let array: [SQLValue] = [.integer(9)]
        try e.execute("a", [.integer(x), .text(y)])
        #expect(e.last == [.integer(3), .text("s")])
        try e.execute("b", .text(y))
        #expect(e.last == [.text("s")])
        try e.execute("c", 5, "x", nil, 1.5, true)
        #expect(e.last == [.integer(5), .text("x"), .null, .real(1.5), .integer(1)])
        try e.execute("d", [])
        #expect(e.last == [])
        try e.execute("e", array)
        #expect(e.last == [.integer(9)])
        try e.execute("f", amount, name)
        #expect(e.last == [.integer(5), .text("n")])
        try e.execute("g", flag, when, uid, data, bytes, missing, present, x)
        #expect(e.last == [.integer(1), .text("1970-01-01 00:00:00.000"), .text("00112233-4455-6677-8899-aabbccddeeff"), .blob([1]), .blob([2]), .null, .text("p"), .integer(3)])
        try e.execute("h", amount, SQLValue.text(y), SQLValue.null)
        #expect(e.last == [.integer(5), .text("s"), .null])
        try e.execute("i", bytes)
        #expect(e.last == [.blob([2])], "one blob argument, not an argument list")
        _ = try e.query("j")
        #expect(e.last == [])
        _ = try e.query("k", amount, name)
        #expect(e.last == [.integer(5), .text("n")])
        _ = try e.query("l", [.text(y)])
        #expect(e.last == [.text("s")])
    }
}

// MARK: - End to end

@Suite("Values through real stores")
struct ValueEndToEndTests {
    @Test func kvAndSQLOnRocksDBAndSQLite() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.sqlExecute("CREATE TABLE vals (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, flag INTEGER NOT NULL, amount REAL, at TEXT NOT NULL, uid TEXT NOT NULL, payload BLOB NOT NULL, note TEXT)")
        let c = try env.coordinator()
        let account = Account(name: "alice", balance: 100, opened: Date(timeIntervalSince1970: 1_700_000_000.25), tags: ["x"], avatar: nil)
        let n = 42, flag = true, amount = 12.5, at = Date(timeIntervalSince1970: 1_700_000_000.123), uid = UUID()
        let payload = Data([0, 1, 254, 255]), note: String? = nil
        try c.run { saga in
            try saga.kv.put("account:alice", account)
            try saga.kv.put("balance:alice", 42 as Int64)
            try saga.kv.put(Bytes("uid".utf8), uid)
            try saga.kv.put("k", "v")  // the existing (String, String) form
            try saga.sql.execute("INSERT INTO vals (id, n, flag, amount, at, uid, payload, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 1, n, flag, amount, at, uid, payload, note)
        }
        // Read back in a saga, typed.
        let (read, bytes): (Account?, Bytes?) = try c.run { saga in
            #expect(try saga.kv.get("balance:alice", as: Int64.self) == 42)
            #expect(try saga.kv.get(Bytes("uid".utf8), as: UUID.self) == uid)
            #expect(try saga.kv.get("missing", as: Int64.self) == nil)
            let untyped = try saga.kv.get("k")  // still Bytes?
            return (try saga.kv.get("account:alice"), untyped)
        }
        #expect(read == account)
        #expect(bytes == Bytes("v".utf8))
        // And outside sagas, from the store.
        #expect(try env.kv.get(Bytes("balance:alice".utf8), as: Int64.self) == 42)
        #expect(try env.kv.get("account:alice", as: Account.self) == account)
        #expect(try env.kv.get(Bytes("balance:alice".utf8)) == [0, 0, 0, 0, 0, 0, 0, 42])

        let rows = try env.sqlQuery("SELECT id, n, flag, amount, at, uid, payload, note FROM vals")
        #expect(rows.count == 1)
        let row = try #require(rows.first)
        #expect(try row.decode("id", as: Int64.self) == 1)
        #expect(try row.decode("n", as: Int.self) == 42)
        #expect(try row.decode("flag", as: Bool.self) == true)
        #expect(try row.decode("amount", as: Double.self) == 12.5)
        #expect(try row.decode("at", as: Date.self) == at)
        #expect(try row.decode("at", as: String.self) == "2023-11-14 22:13:20.123")
        #expect(try row.decode("uid", as: UUID.self) == uid)
        #expect(try row.decode("payload", as: Data.self) == payload)
        #expect(try row.decode("note", as: String?.self) == nil)
        // SQLite's own date functions read the text.
        let check = try env.sqlQuery("SELECT strftime('%s', at) AS s FROM vals")
        #expect(try check[0].decode("s", as: Int.self) == 1_700_000_000)
        // Typed arguments inside a saga, read back in the saga.
        let updated = try c.run { saga in
            let changed = try saga.sql.execute("UPDATE vals SET note = ?, flag = ? WHERE uid = ?", "paid", false, uid)
            let rows = try saga.sql.query("SELECT note, flag FROM vals WHERE id = ?", 1)
            return (changed, try rows[0].decode("note", as: String?.self), try rows[0].decode("flag", as: Bool.self))
        }
        #expect(updated == (1, "paid", false))
    }

    /// A value that does not decode, inside a body: the saga ends `bodyFailed`, and nothing it
    /// staged or executed is written.
    @Test func decodeFailureInBodyWritesNothing() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("acct", #"{"name":"x"}"#), ("count", "abc")])
        let c = try env.coordinator()
        // A KV decode failure.
        var error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", "a", 1)
                try saga.kv.put("count", 7 as Int64)
                _ = try saga.kv.get("acct", as: Account.self)
            }
        }
        guard case .bodyFailed(_, let underlying) = error else { Issue.record("expected bodyFailed, got \(error)"); return }
        #expect(underlying is KVDecodingError)
        #expect(String(describing: underlying) == "cannot decode Account from 12 bytes: invalid JSON: missing key `balance`")
        #expect(try env.kvGet("count") == "abc" && env.kvGet("acct") == #"{"name":"x"}"#, "KV untouched")
        #expect(try env.row("a") == nil, "SQL untouched")
        // An SQL decode failure.
        error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", "b", 2)
                try saga.kv.put("count", 8 as Int64)
                let rows = try saga.sql.query("SELECT k FROM saga_test WHERE k = ?", "b")
                _ = try rows[0].decode("k", as: Int.self)
            }
        }
        guard case .bodyFailed(_, let underlying) = error else { Issue.record("expected bodyFailed, got \(error)"); return }
        #expect(String(describing: underlying) == "cannot decode Int from column `k` ('b'): not an integer")
        #expect(try env.kvGet("count") == "abc", "KV untouched")
        #expect(try env.row("b") == nil, "SQL untouched")
        #expect(try env.markers().isEmpty && env.journal().isEmpty)
    }
}

/// The same SQL round trip on MariaDB, through `SAGA_MYSQL_URL` (fails when it is missing).
@Suite("Values on MariaDB", .serialized)
struct MySQLValueTests {
    @Test func sqlRoundTripOnMariaDB() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.sqlExecute("""
            CREATE TABLE vals (
                id BIGINT PRIMARY KEY, flag TINYINT(1) NOT NULL, ratio DOUBLE NOT NULL, price DECIMAL(10,2) NOT NULL,
                whole DECIMAL(10,2) NOT NULL, name VARCHAR(64) NOT NULL, payload BLOB NOT NULL, raw VARBINARY(16) NOT NULL,
                at DATETIME(3) NOT NULL, uid CHAR(36) NOT NULL, note VARCHAR(64) NULL, small INT NOT NULL
            ) ENGINE=InnoDB
            """)
        let c = try env.coordinator()
        let id: Int64 = 9_007_199_254_740_993, flag = true, ratio = 0.1, price = "12.34", whole = 12, name = "ålice"
        let payload = Data([0, 1, 2, 255]), uid = UUID(), at = Date(timeIntervalSince1970: 1_700_000_000.123)
        let note: String? = nil, small: Int32 = -7
        try c.run { saga in
            try saga.kv.put("balance:alice", 42 as Int64)
            try saga.sql.execute("INSERT INTO vals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 id, flag, ratio, price, whole, name, payload, uid.kvEncoded(), at, uid, note, small)
        }
        #expect(try env.kv.get("balance:alice", as: Int64.self) == 42)
        let row = try #require(try env.sqlQuery("SELECT * FROM vals").first)
        #expect(try row.decode("id", as: Int64.self) == id)
        #expect(try row.decode("flag", as: Bool.self) == true)
        #expect(try row.decode("ratio", as: Double.self) == 0.1)
        #expect(row["price"] == .text("12.34"), "MySQL returns DECIMAL as text")
        #expect(try row.decode("price", as: Double.self) == 12.34)
        #expect(try row.decode("price", as: String.self) == "12.34")
        #expect(try row.decode("whole", as: Int.self) == 12)
        #expect(try row.decode("name", as: String.self) == name)
        #expect(try row.decode("payload", as: Data.self) == payload)
        #expect(try row.decode("raw", as: UUID.self) == uid)
        #expect(try row.decode("at", as: Date.self) == at)
        #expect(try row.decode("uid", as: UUID.self) == uid)
        #expect(try row.decode("note", as: String?.self) == nil)
        #expect(try row.decode("small", as: Int32.self) == -7)
        #expect(errorText { _ = try row.decode("price", as: Int.self) } == "cannot decode Int from column `price` ('12.34'): not an integer")
        // MySQL's own date functions read what was bound.
        let check = try env.sqlQuery("SELECT UNIX_TIMESTAMP(CONVERT_TZ(at, '+00:00', @@session.time_zone)) AS s, COUNT(*) AS n FROM vals WHERE at = ? AND uid = ? AND flag = ?", [at.sqlValue, uid.sqlValue, true])
        #expect(try check[0].decode("s", as: Double.self) == 1_700_000_000.123)
        #expect(try check[0].decode("n", as: Int.self) == 1)
        // Typed arguments and row decoding inside a saga.
        let read = try c.run { saga in
            try saga.sql.execute("UPDATE vals SET note = ?, flag = ? WHERE id = ?", Optional("paid"), false, id)
            let rows = try saga.sql.query("SELECT note, flag, price FROM vals WHERE uid = ?", uid)
            return (try rows[0].decode("note", as: String?.self), try rows[0].decode("flag", as: Bool.self), try rows[0].decode("price", as: Double.self))
        }
        #expect(read == ("paid", false, 12.34))
    }
}
