import Saga

/// The example's storage contract, kept exactly like ocore's so that anyone can check the
/// stores without this library:
/// - KV: state variables under `"st\n" + address + "\n" + name`; numbers as `"n\n<decimal>"`,
///   strings as `"s\n<text>"`; a variable set to false is deleted.
/// - SQL: `aa_balances(address, asset, balance)`, `aa_triggers(mci, unit, address, amount)` (the
///   queue), `aa_responses(mci, trigger_unit, aa_address, ...)`.
enum StateVar {
    static func key(_ address: String, _ name: String) -> Bytes { Bytes("st\n\(address)\n\(name)".utf8) }
    static let prefix: Bytes = Bytes("st\n".utf8)

    static func number(_ n: Int64) -> Bytes { Bytes("n\n\(n)".utf8) }
    static func string(_ s: String) -> Bytes { Bytes("s\n\(s)".utf8) }

    /// Decodes a number variable; absent (false) is 0.
    static func decodeNumber(_ raw: Bytes?, key: Bytes) throws -> Int64 {
        guard let raw else { return 0 }
        let text = String(decoding: raw, as: UTF8.self)
        guard text.hasPrefix("n\n"), let n = Int64(text.dropFirst(2)) else {
            throw DemoError("state var \"\(key.debugText)\" is not a number: \"\(raw.debugText)\"")
        }
        return n
    }

    /// Splits a KV key into (address, name), if it is a state variable key.
    static func parse(_ key: Bytes) -> (address: String, name: String)? {
        let parts = String(decoding: key, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[0] == "st" else { return nil }
        return (String(parts[1]), String(parts[2]))
    }
}

struct DemoError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// One queued AA trigger.
struct Trigger: Sendable {
    let mci: Int64
    let unit: String
    let address: String
    let amount: Int64
}

/// The SQL schema of the example.
enum Schema {
    static let mysql = [
        """
        CREATE TABLE IF NOT EXISTS aa_balances (
            address VARCHAR(64) NOT NULL, asset VARCHAR(64) NOT NULL, balance BIGINT NOT NULL,
            PRIMARY KEY (address, asset)) ENGINE=InnoDB
        """,
        """
        CREATE TABLE IF NOT EXISTS aa_triggers (
            mci BIGINT NOT NULL, unit VARCHAR(64) NOT NULL PRIMARY KEY, address VARCHAR(64) NOT NULL,
            amount BIGINT NOT NULL) ENGINE=InnoDB
        """,
        """
        CREATE TABLE IF NOT EXISTS aa_responses (
            mci BIGINT NOT NULL, trigger_unit VARCHAR(64) NOT NULL PRIMARY KEY, aa_address VARCHAR(64) NOT NULL,
            bounced TINYINT NOT NULL DEFAULT 0, response TEXT) ENGINE=InnoDB
        """,
        "CREATE TABLE IF NOT EXISTS demo_meta (name VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL) ENGINE=InnoDB",
    ]

    static let sqlite = [
        """
        CREATE TABLE IF NOT EXISTS aa_balances (
            address TEXT NOT NULL, asset TEXT NOT NULL, balance INTEGER NOT NULL,
            PRIMARY KEY (address, asset))
        """,
        """
        CREATE TABLE IF NOT EXISTS aa_triggers (
            mci INTEGER NOT NULL, unit TEXT NOT NULL PRIMARY KEY, address TEXT NOT NULL, amount INTEGER NOT NULL)
        """,
        """
        CREATE TABLE IF NOT EXISTS aa_responses (
            mci INTEGER NOT NULL, trigger_unit TEXT NOT NULL PRIMARY KEY, aa_address TEXT NOT NULL,
            bounced INTEGER NOT NULL DEFAULT 0, response TEXT)
        """,
        "CREATE TABLE IF NOT EXISTS demo_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
        // A real deferred constraint, used to make a chosen COMMIT fail: a probe row that points
        // at a parent that does not exist is only rejected at COMMIT.
        "CREATE TABLE IF NOT EXISTS fault_parent (id TEXT PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS fault_probe (ref TEXT REFERENCES fault_parent(id) DEFERRABLE INITIALLY DEFERRED)",
    ]
}

/// Deterministic pseudo-random numbers (SplitMix64): the same seed gives the same triggers.
struct SplitMix64 {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func base32(_ n: Int) -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        return String((0..<n).map { _ in alphabet[Int(next() % 32)] })
    }
}

/// The AA: what one trigger does to the state. Shared by the saga and the unsafe sequence, so
/// that the two differ only in how they commit.
enum AA {
    struct Writes {
        var kv: [(Bytes, Bytes?)] = []
    }

    /// Runs the trigger's logic: reads state vars through `read`, runs its SQL on `sql`, and
    /// returns the KV writes.
    static func apply(_ t: Trigger, sql: any SQLExecutor, read: (Bytes) throws -> Bytes?) throws -> Writes {
        let balanceKey = StateVar.key(t.address, "balance")
        let countKey = StateVar.key(t.address, "count")
        let balance = try StateVar.decodeNumber(try read(balanceKey), key: balanceKey) + t.amount
        let count = try StateVar.decodeNumber(try read(countKey), key: countKey) + 1

        let changed = try sql.execute(
            "UPDATE aa_balances SET balance = balance + ? WHERE address = ? AND asset = 'base'",
            [.integer(t.amount), .text(t.address)])
        if changed == 0 {
            try sql.execute("INSERT INTO aa_balances (address, asset, balance) VALUES (?, 'base', ?)", [.text(t.address), .integer(t.amount)])
        }
        try sql.execute(
            "INSERT INTO aa_responses (mci, trigger_unit, aa_address, bounced, response) VALUES (?, ?, ?, 0, ?)",
            [.integer(t.mci), .text(t.unit), .text(t.address), .text("{\"count\":\(count),\"balance\":\(balance)}")])
        try sql.execute("DELETE FROM aa_triggers WHERE unit = ?", [.text(t.unit)])

        var w = Writes()
        w.kv.append((balanceKey, StateVar.number(balance)))
        w.kv.append((countKey, StateVar.number(count)))
        w.kv.append((StateVar.key(t.address, "last_unit"), StateVar.string(t.unit)))
        w.kv.append((StateVar.key(t.address, "odd"), count % 2 == 1 ? StateVar.number(1) : nil))
        return w
    }
}
