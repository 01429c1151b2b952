import Foundation

// MARK: - Protocol and error

/// A Swift value that converts to and from an ``SQLValue``: a statement argument, or what a
/// result column is decoded as (see `SQLRow.decode(_:as:)`).
///
/// Conversions in both directions are fixed and documented on each conformance. Decoding is
/// lenient where databases differ in what they return for the same column (MySQL returns
/// `DECIMAL` as text, SQLite may return an integer for a `REAL` column) and strict where a
/// value would be lost: an integer is never decoded from `1.5`.
public protocol SQLValueConvertible {
    /// The value bound to a statement.
    var sqlValue: SQLValue { get }
    /// Decodes a value read from a result column; throws ``SQLDecodingError`` if it cannot.
    init(sqlValue: SQLValue) throws
}

/// A column value could not be decoded as the type asked for.
///
/// The description names the column (when known), the value and the target type, e.g.
/// "cannot decode Int from column `balance` (1.5): not an integer".
public struct SQLDecodingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// What was wrong.
    public enum Problem: Sendable, Equatable {
        /// The row has no column of that name; `columns` lists those it has.
        case noSuchColumn(columns: [String])
        /// The row has no column at that index; it has `count` columns.
        case indexOutOfRange(count: Int)
        /// The value is NULL and the type is not optional.
        case unexpectedNull
        /// The value cannot be converted to the type; the text says why.
        case mismatch(String)
    }

    /// The name of the type the value was decoded as.
    public let type: String
    /// The column, when known (by name, or by index as `#0`, `#1`...).
    public internal(set) var column: String?
    /// The value that could not be decoded; nil if there was none (no such column).
    public let value: SQLValue?
    /// What was wrong.
    public let problem: Problem

    /// Makes an error for a value that could not be decoded as `type`.
    public init(type: Any.Type, column: String? = nil, value: SQLValue?, problem: Problem) {
        self.type = String(describing: type)
        self.column = column
        self.value = value
        self.problem = problem
    }

    /// What could not be decoded, and why, e.g. "cannot decode Int from column `balance` (1.5): not an integer".
    public var description: String {
        var text = "cannot decode \(type)"
        if let column { text += " from column `\(column)`" }
        if let value { text += column == nil ? " from \(value)" : " (\(value))" }
        switch problem {
        case .noSuchColumn(let columns):
            text += ": no such column (the row has \(columns.isEmpty ? "no columns" : columns.map { "`\($0)`" }.joined(separator: ", ")))"
        case .indexOutOfRange(let count): text += ": no such column (the row has \(count) column\(count == 1 ? "" : "s"))"
        case .unexpectedNull: text += ": NULL in a non-optional value (decode as `\(type)?` to allow NULL)"
        case .mismatch(let reason): text += ": \(reason)"
        }
        return text
    }
}

extension SQLDecodingError {
    static func mismatch<T>(_ type: T.Type, _ value: SQLValue, _ reason: String) -> SQLDecodingError {
        SQLDecodingError(type: type, value: value, problem: value == .null ? .unexpectedNull : .mismatch(reason))
    }
}

// MARK: - Row decoding

extension SQLRow {
    /// Decodes the value of the named column as `V`. Throws ``SQLDecodingError`` if the row
    /// has no such column (listing the columns it has), if the value is NULL and `V` is not
    /// optional, or if the value does not convert to `V`. Names are matched exactly; with
    /// several columns of the same name, the first counts.
    public func decode<V: SQLValueConvertible>(_ column: String, as type: V.Type = V.self) throws -> V {
        guard let index = columns.firstIndex(of: column) else {
            throw SQLDecodingError(type: V.self, column: column, value: nil, problem: .noSuchColumn(columns: columns))
        }
        return try decode(at: index, named: column)
    }

    /// Decodes the value at a column index (from 0) as `V`; throws ``SQLDecodingError`` as
    /// `decode(_:as:)` by name does.
    public func decode<V: SQLValueConvertible>(_ index: Int, as type: V.Type = V.self) throws -> V {
        guard values.indices.contains(index) else {
            throw SQLDecodingError(type: V.self, column: "#\(index)", value: nil, problem: .indexOutOfRange(count: values.count))
        }
        return try decode(at: index, named: index < columns.count ? columns[index] : "#\(index)")
    }

    private func decode<V: SQLValueConvertible>(at index: Int, named name: String) throws -> V {
        do {
            return try V(sqlValue: values[index])
        } catch var error as SQLDecodingError {
            if error.column == nil { error.column = name }
            throw error
        }
    }
}

// MARK: - Literals and statement arguments

/// A `Double` literal is a `.real`.
extension SQLValue: ExpressibleByFloatLiteral {
    /// `.real(value)`.
    public init(floatLiteral value: Double) { self = .real(value) }
}

/// `true` and `false` are the integers 1 and 0 (SQLite and MySQL have no boolean type).
extension SQLValue: ExpressibleByBooleanLiteral {
    /// `.integer(1)` for true, `.integer(0)` for false.
    public init(booleanLiteral value: Bool) { self = .integer(value ? 1 : 0) }
}

extension SQLExecutor {
    /// Runs a statement with arguments of any convertible types, e.g.
    /// `execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", amount, name)`.
    /// Returns the number of rows it changed. (Arguments that are all ``SQLValue``s or
    /// literals go to the `SQLValue...` form; mixing a variable with `.text(...)` needs the
    /// type spelled out: `SQLValue.text(...)`, `SQLValue.null`.)
    @discardableResult
    public func execute(_ sql: String, _ arguments: any SQLValueConvertible...) throws -> Int {
        try execute(sql, arguments.map(\.sqlValue))
    }

    /// Runs a query with arguments of any convertible types and returns all its rows.
    public func query(_ sql: String, _ arguments: any SQLValueConvertible...) throws -> [SQLRow] {
        try query(sql, arguments.map(\.sqlValue))
    }
}

// MARK: - Conformances

/// Itself, NULL included.
extension SQLValue: SQLValueConvertible {
    /// The value itself.
    public var sqlValue: SQLValue { self }
    /// The value itself; never fails.
    public init(sqlValue: SQLValue) { self = sqlValue }
}

/// The exact integer of a value: an integer, a real with no fraction, or text of an integer
/// (MySQL returns `DECIMAL` and some integer results as text; trailing zeros after a
/// decimal point are accepted, `"12.00"`). Anything else throws.
private func exactInteger<T>(_ value: SQLValue, as type: T.Type) throws -> Int64 {
    switch value {
    case .integer(let v): return v
    case .real(let v):
        guard let int = Int64(exactly: v) else { throw SQLDecodingError.mismatch(type, value, "not an integer") }
        return int
    case .text(let text):
        var digits = Substring(text.trimmingCharacters(in: .whitespaces))
        if digits.contains("."), digits.last != "." {
            while digits.last == "0" { digits.removeLast() }
            if digits.last == "." { digits.removeLast() }
        }
        guard let int = Int64(digits) else { throw SQLDecodingError.mismatch(type, value, "not an integer") }
        return int
    case .blob: throw SQLDecodingError.mismatch(type, value, "a blob is not an integer")
    case .null: throw SQLDecodingError.mismatch(type, value, "")
    }
}

/// Converts an exact integer to a narrower integer type, or throws "out of range".
private func narrowed<T: FixedWidthInteger>(_ value: SQLValue, as type: T.Type) throws -> T {
    let wide = try exactInteger(value, as: type)
    guard let narrow = T(exactly: wide) else { throw SQLDecodingError.mismatch(type, value, "out of range for \(type)") }
    return narrow
}

/// An `.integer`. Decodes an integer, a real with no fraction, or text of an integer.
extension Int64: SQLValueConvertible {
    /// `.integer(self)`.
    public var sqlValue: SQLValue { .integer(self) }
    /// Decodes an integer, a real with no fraction, or text of an integer.
    public init(sqlValue: SQLValue) throws { self = try exactInteger(sqlValue, as: Int64.self) }
}

/// An `.integer`. Decodes as `Int64` does.
extension Int: SQLValueConvertible {
    /// `.integer(Int64(self))`.
    public var sqlValue: SQLValue { .integer(Int64(self)) }
    /// Decodes as `Int64` does; throws if the value is out of `Int`'s range.
    public init(sqlValue: SQLValue) throws { self = try narrowed(sqlValue, as: Int.self) }
}

/// An `.integer`. Decodes as `Int64` does, checking the range.
extension Int32: SQLValueConvertible {
    /// `.integer(Int64(self))`.
    public var sqlValue: SQLValue { .integer(Int64(self)) }
    /// Decodes as `Int64` does; throws if the value is out of `Int32`'s range.
    public init(sqlValue: SQLValue) throws { self = try narrowed(sqlValue, as: Int32.self) }
}

/// An `.integer`. Decodes as `Int64` does, checking the range.
extension UInt32: SQLValueConvertible {
    /// `.integer(Int64(self))`.
    public var sqlValue: SQLValue { .integer(Int64(self)) }
    /// Decodes as `Int64` does; throws if the value is negative or too large.
    public init(sqlValue: SQLValue) throws { self = try narrowed(sqlValue, as: UInt32.self) }
}

/// The integer 1 or 0. Decodes the integer 0 or 1, or the text "0" or "1".
extension Bool: SQLValueConvertible {
    /// `.integer(1)` for true, `.integer(0)` for false.
    public var sqlValue: SQLValue { .integer(self ? 1 : 0) }
    /// Decodes the integer 0 or 1, or the text "0" or "1"; anything else throws.
    public init(sqlValue: SQLValue) throws {
        switch sqlValue {
        case .integer(0), .text("0"): self = false
        case .integer(1), .text("1"): self = true
        default: throw SQLDecodingError.mismatch(Bool.self, sqlValue, "expected 0 or 1")
        }
    }
}

/// A `.real`. Decodes a real, an integer, or text of a number (MySQL returns `DECIMAL` as
/// text).
extension Double: SQLValueConvertible {
    /// `.real(self)`.
    public var sqlValue: SQLValue { .real(self) }
    /// Decodes a real, an integer, or text of a number; anything else throws.
    public init(sqlValue: SQLValue) throws {
        switch sqlValue {
        case .real(let v): self = v
        case .integer(let v): self = Double(v)
        case .text(let text):
            guard let v = Double(text.trimmingCharacters(in: .whitespaces)) else {
                throw SQLDecodingError.mismatch(Double.self, sqlValue, "not a number")
            }
            self = v
        case .blob, .null: throw SQLDecodingError.mismatch(Double.self, sqlValue, "a blob is not a number")
        }
    }
}

/// A `.real`. Decodes as `Double` does, then rounds to the nearest `Float`.
extension Float: SQLValueConvertible {
    /// `.real(Double(self))`.
    public var sqlValue: SQLValue { .real(Double(self)) }
    /// Decodes as `Double` does and rounds to the nearest `Float`; throws if the value is
    /// finite but beyond `Float`'s range.
    public init(sqlValue: SQLValue) throws {
        let double = try Double(sqlValue: sqlValue)
        let float = Float(double)
        if float.isInfinite, double.isFinite { throw SQLDecodingError.mismatch(Float.self, sqlValue, "out of range for Float") }
        self = float
    }
}

/// A `.text`. Decodes text, or a blob of valid UTF-8 (MySQL returns binary-collated strings
/// as blobs); numbers are not converted.
extension String: SQLValueConvertible {
    /// `.text(self)`.
    public var sqlValue: SQLValue { .text(self) }
    /// Decodes text, or a blob of valid UTF-8; anything else throws.
    public init(sqlValue: SQLValue) throws {
        switch sqlValue {
        case .text(let v): self = v
        case .blob(let bytes):
            guard let v = String(validating: bytes, as: UTF8.self) else {
                throw SQLDecodingError.mismatch(String.self, sqlValue, "the blob is not valid UTF-8")
            }
            self = v
        default: throw SQLDecodingError.mismatch(String.self, sqlValue, "expected text")
        }
    }
}

/// A `.blob`. Decodes a blob, or text as its UTF-8 bytes.
extension Data: SQLValueConvertible {
    /// `.blob` of the bytes.
    public var sqlValue: SQLValue { .blob(Bytes(self)) }
    /// Decodes a blob, or text as its UTF-8 bytes; anything else throws.
    public init(sqlValue: SQLValue) throws { self.init(try Bytes(sqlValue: sqlValue)) }
}

/// A `.blob`. Decodes a blob, or text as its UTF-8 bytes.
extension Array: SQLValueConvertible where Element == UInt8 {
    /// `.blob(self)`.
    public var sqlValue: SQLValue { .blob(self) }
    /// Decodes a blob, or text as its UTF-8 bytes; anything else throws.
    public init(sqlValue: SQLValue) throws {
        switch sqlValue {
        case .blob(let v): self = v
        case .text(let v): self = Bytes(v.utf8)
        default: throw SQLDecodingError.mismatch(Bytes.self, sqlValue, "expected a blob")
        }
    }
}

/// Text `yyyy-MM-dd HH:mm:ss.SSS` in UTC (GRDB's format, which SQLite's date functions and
/// MySQL's `DATETIME(3)` and `TIMESTAMP(3)` columns take), rounded to the millisecond.
/// Decodes that text, also with no or other numbers of fractional digits (up to 9) and with
/// `T` between date and time, or a real or integer of seconds since 1970. A date outside the
/// years 0001 to 9999 (which that text cannot hold) is a `.real` of seconds since 1970.
extension Date: SQLValueConvertible {
    /// `.text("yyyy-MM-dd HH:mm:ss.SSS")`, in UTC, rounded to the millisecond; a `.real` of
    /// seconds since 1970 outside the years 0001 to 9999. Millisecond precision: a date reads
    /// back within half a millisecond of the one written, not bit for bit. The text is UTC; a
    /// MariaDB `TIMESTAMP` column converts it from the session's time zone, a `DATETIME(3)`
    /// column keeps it as it is.
    public var sqlValue: SQLValue { SQLDateText.format(self).map { .text($0) } ?? .real(timeIntervalSince1970) }
    /// Decodes `yyyy-MM-dd HH:mm:ss[.fraction]` text (UTC), or seconds since 1970.
    public init(sqlValue: SQLValue) throws {
        switch sqlValue {
        case .real(let v): self.init(timeIntervalSince1970: v)
        case .integer(let v): self.init(timeIntervalSince1970: Double(v))
        case .text(let text):
            guard let seconds = SQLDateText.parse(text) else {
                throw SQLDecodingError.mismatch(Date.self, sqlValue, "expected `yyyy-MM-dd HH:mm:ss.SSS` or seconds since 1970")
            }
            self.init(timeIntervalSince1970: seconds)
        default: throw SQLDecodingError.mismatch(Date.self, sqlValue, "expected `yyyy-MM-dd HH:mm:ss.SSS` or seconds since 1970")
        }
    }
}

/// Text of 36 characters, lowercased (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`). Decodes that
/// text (in either case), or a blob of the 16 raw bytes.
extension UUID: SQLValueConvertible {
    /// `.text` of the lowercased 36-character form.
    public var sqlValue: SQLValue { .text(uuidString.lowercased()) }
    /// Decodes the 36-character text, or a 16-byte blob.
    public init(sqlValue: SQLValue) throws {
        switch sqlValue {
        case .text(let text):
            guard let uuid = UUID(uuidString: text) else { throw SQLDecodingError.mismatch(UUID.self, sqlValue, "not a UUID") }
            self = uuid
        case .blob(let bytes) where bytes.count == 16:
            self = try UUID(kvEncoded: bytes)
        case .blob(let bytes):
            throw SQLDecodingError.mismatch(UUID.self, sqlValue, "a blob of \(bytes.count) bytes, expected 16")
        default: throw SQLDecodingError.mismatch(UUID.self, sqlValue, "expected text or a 16-byte blob")
        }
    }
}

/// nil is NULL; a value is the wrapped value's.
extension Optional: SQLValueConvertible where Wrapped: SQLValueConvertible {
    /// `.null` for nil, else the wrapped value's.
    public var sqlValue: SQLValue { self?.sqlValue ?? .null }
    /// nil for NULL, else decodes as `Wrapped` does.
    public init(sqlValue: SQLValue) throws {
        self = sqlValue == .null ? nil : try Wrapped(sqlValue: sqlValue)
    }
}

// MARK: - Date text

/// `yyyy-MM-dd HH:mm:ss.SSS` in UTC, converted by hand (proleptic Gregorian calendar,
/// days from civil dates as in Howard Hinnant's algorithms): no formatter, no locale.
enum SQLDateText {
    /// The text of a date in the years 0001 to 9999; nil for any other.
    static func format(_ date: Date) -> String? {
        let scaled = (date.timeIntervalSince1970 * 1000).rounded()
        // 0001-01-01 00:00:00.000 ... 9999-12-31 23:59:59.999
        guard scaled >= -62_135_596_800_000, scaled <= 253_402_300_799_999 else { return nil }
        let millis = Int64(scaled)
        let (seconds, ms) = floorDivide(millis, 1000)
        let (days, secondOfDay) = floorDivide(seconds, 86_400)
        let (year, month, day) = civil(fromDays: days)
        return "\(pad(year, 4))-\(pad(month, 2))-\(pad(day, 2)) \(pad(secondOfDay / 3600, 2)):\(pad(secondOfDay / 60 % 60, 2)):\(pad(secondOfDay % 60, 2)).\(pad(ms, 3))"
    }

    /// Seconds since 1970 of `yyyy-MM-dd[ T]HH:mm:ss[.f{1,9}]`, or nil.
    static func parse(_ text: String) -> Double? {
        let b = Array(text.utf8)
        guard b.count >= 19, b[4] == 0x2D, b[7] == 0x2D, b[10] == 0x20 || b[10] == 0x54,
              b[13] == 0x3A, b[16] == 0x3A else { return nil }
        func number(_ range: Range<Int>) -> Int64? {
            var n: Int64 = 0
            for i in range {
                guard b[i] >= 0x30, b[i] <= 0x39 else { return nil }
                n = n * 10 + Int64(b[i] - 0x30)
            }
            return n
        }
        guard let year = number(0..<4), let month = number(5..<7), let day = number(8..<10),
              let hour = number(11..<13), let minute = number(14..<16), let second = number(17..<19),
              (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 60 else { return nil }
        var fraction: (digits: Int64, count: Int) = (0, 0)
        if b.count > 19 {
            guard b[19] == 0x2E, (21...29).contains(b.count), let digits = number(20..<b.count) else { return nil }
            fraction = (digits, b.count - 20)
        }
        let days = self.days(fromCivil: year, month, day)
        guard civil(fromDays: days) == (year, month, day) else { return nil }  // 2023-02-30
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second
        if fraction.count <= 3 {
            // Exactly the Double nearest to the millisecond: what format(_:) rounded to.
            var millis = fraction.digits
            for _ in fraction.count..<3 { millis *= 10 }
            return Double(seconds * 1000 + millis) / 1000
        }
        var scale: Double = 1
        for _ in 0..<fraction.count { scale *= 10 }
        return Double(seconds) + Double(fraction.digits) / scale
    }

    private static func pad(_ n: Int64, _ width: Int) -> String {
        let digits = String(n)
        return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
    }

    private static func floorDivide(_ a: Int64, _ b: Int64) -> (Int64, Int64) {
        let q = a / b, r = a % b
        return r < 0 ? (q - 1, r + b) : (q, r)
    }

    private static func days(fromCivil year: Int64, _ month: Int64, _ day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = floorDivide(y, 400).0
        let yoe = y - era * 400
        let doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    private static func civil(fromDays days: Int64) -> (Int64, Int64, Int64) {
        let z = days + 719_468
        let era = floorDivide(z, 146_097).0
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let day = doy - (153 * mp + 2) / 5 + 1
        let month = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (month <= 2 ? 1 : 0), month, day)
    }
}
