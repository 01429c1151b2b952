import Foundation
import MySQLBackend
import RocksDBBackend
import Saga

/// What one operation does, written once and run three ways: the unsafe sequence, a saga, and
/// XA around the KV write. `reads` are KV keys read first; `writes` are computed from them.
struct Operation {
    var reads: [Bytes]
    /// Given the values read, the KV writes.
    var writes: ([Bytes?]) -> [(Bytes, Bytes)]
    var statements: [(String, [SQLValue])]
}

protocol Workload: Sendable {
    var name: String { get }
    func schema(mysql: Bool) -> [String]
    /// Rows the statements update (created once, before the run).
    func seedStatements(threads: Int, mysql: Bool) -> [(String, [SQLValue])]
    func operation(thread: Int, seq: Int) -> Operation
}

func decodeInt(_ b: Bytes?) -> Int64 { b.flatMap { Int64(String(decoding: $0, as: UTF8.self)) } ?? 0 }
func encodeInt(_ v: Int64) -> Bytes { Bytes(String(v).utf8) }

/// The example's AA trigger: read 3 state variables of the AA, write 5, and 3 SQL statements
/// (the response row, the balance, the trigger counter). Each thread has its own AAs.
struct AATriggerWorkload: Workload {
    let name = "aa-trigger"
    func schema(mysql: Bool) -> [String] {
        let engine = mysql ? " ENGINE=InnoDB" : ""
        let text = mysql ? "VARCHAR(64)" : "TEXT"
        return [
            "CREATE TABLE IF NOT EXISTS bench_aa_balances (address \(text) PRIMARY KEY, balance BIGINT NOT NULL, triggers BIGINT NOT NULL)\(engine)",
            "CREATE TABLE IF NOT EXISTS bench_aa_responses (thread INT NOT NULL, seq BIGINT NOT NULL, address \(text) NOT NULL, response \(text) NOT NULL, PRIMARY KEY (thread, seq))\(engine)",
        ]
    }
    func address(_ thread: Int, _ seq: Int) -> String { "AA\(thread)X\(seq % 4)" }
    func seedStatements(threads: Int, mysql: Bool) -> [(String, [SQLValue])] {
        (0..<threads).flatMap { t in (0..<4).map { j in
            ("\(mysql ? "INSERT IGNORE" : "INSERT OR IGNORE") INTO bench_aa_balances (address, balance, triggers) VALUES (?, 0, 0)", [SQLValue.text(address(t, j))])
        } }
    }
    func operation(thread: Int, seq: Int) -> Operation {
        let a = address(thread, seq)
        let balance = Bytes("st\n\(a)\nbalance".utf8), count = Bytes("st\n\(a)\ncount".utf8), last = Bytes("st\n\(a)\nlast".utf8)
        let amount = Int64(1000 + seq % 997)
        return Operation(
            reads: [balance, count, last],
            writes: { v in [
                (balance, encodeInt(decodeInt(v[0]) + amount)),
                (count, encodeInt(decodeInt(v[1]) + 1)),
                (last, Bytes("u\(thread)-\(seq)".utf8)),
                (Bytes("st\n\(a)\nresp\(seq % 64)".utf8), Bytes("{\"paid\":\(amount)}".utf8)),
                (Bytes("st\n\(a)\nhash".utf8), Bytes(String(UInt64(bitPattern: Int64(seq)) &* 0x9E37_79B9_7F4A_7C15, radix: 16).utf8)),
            ] },
            statements: [
                ("INSERT INTO bench_aa_responses (thread, seq, address, response) VALUES (?, ?, ?, ?)",
                 [.integer(Int64(thread)), .integer(Int64(seq)), .text(a), .text("{\"paid\":\(amount)}")]),
                ("UPDATE bench_aa_balances SET balance = balance + ? WHERE address = ?", [.integer(amount), .text(a)]),
                ("UPDATE bench_aa_balances SET triggers = triggers + 1 WHERE address = ?", [.text(a)]),
            ])
    }
}

/// A bank transfer: 2 KV balances and 2 SQL rows.
struct TransferWorkload: Workload {
    let name = "transfer"
    func schema(mysql: Bool) -> [String] {
        ["CREATE TABLE IF NOT EXISTS bench_accounts (id BIGINT PRIMARY KEY, balance BIGINT NOT NULL)\(mysql ? " ENGINE=InnoDB" : "")"]
    }
    func account(_ thread: Int, _ j: Int) -> Int64 { Int64(thread * 1000 + j % 8) }
    func seedStatements(threads: Int, mysql: Bool) -> [(String, [SQLValue])] {
        (0..<threads).flatMap { t in (0..<8).map { j in
            ("\(mysql ? "INSERT IGNORE" : "INSERT OR IGNORE") INTO bench_accounts (id, balance) VALUES (?, 1000000)", [SQLValue.integer(account(t, j))])
        } }
    }
    func operation(thread: Int, seq: Int) -> Operation {
        let from = account(thread, seq), to = account(thread, seq + 1)
        let kf = Bytes("acct/\(from)".utf8), kt = Bytes("acct/\(to)".utf8)
        let amount = Int64(1 + seq % 100)
        return Operation(
            reads: [kf, kt],
            writes: { v in [(kf, encodeInt(decodeInt(v[0]) - amount)), (kt, encodeInt(decodeInt(v[1]) + amount))] },
            statements: [
                ("UPDATE bench_accounts SET balance = balance - ? WHERE id = ?", [.integer(amount), .integer(from)]),
                ("UPDATE bench_accounts SET balance = balance + ? WHERE id = ?", [.integer(amount), .integer(to)]),
            ])
    }
}

/// The three ways to run an operation.
enum Mode: String, CaseIterable, Codable, Sendable {
    /// KV batch synced, then COMMIT: the motivating bug, as the floor.
    case unsafe
    /// The coordinator as shipped.
    case saga
    /// XA START .. XA END, XA PREPARE, KV batch synced together with the commit decision,
    /// XA COMMIT, then the decision record dropped (unsynced). Recovery would XA COMMIT every
    /// prepared xid whose decision is in the KV store and XA ROLLBACK the others.
    case xa
    /// The unsafe sequence plus one more row inserted in the transaction, like Saga's marker:
    /// measures what the marker row alone costs (not a safe mode; run it by name).
    case unsafeWithRow = "unsafe+row"
    /// The coordinator in redo mode: after-images in the marker row, COMMIT the only synced
    /// write, the KV batch unsynced after it (checkpoints every 256 sagas or 200 ms).
    case redo
    // A mode that runs sagas through a coordinator is one case here and one line in
    // `coordinatorConfiguration` below: the runner, the stores (one RocksDB store per
    // coordinator) and the tables follow.

    /// The configuration of the coordinator this mode runs its sagas through; nil for a mode
    /// that runs the stores directly.
    var coordinatorConfiguration: SagaCoordinator.Configuration? {
        switch self {
        case .saga: .init()
        case .redo: .init(mode: .redo)
        case .unsafe, .xa, .unsafeWithRow: nil
        }
    }
}

extension Operation {
    func runUnsafe(kv: RocksDBStore, conn: any SQLConnection, extraRow: Int64? = nil) throws {
        try conn.begin()
        do {
            for (sql, args) in statements { try conn.execute(sql, args) }
            if let extraRow { try conn.execute("INSERT INTO bench_extra_rows (id) VALUES (?)", [.integer(extraRow)]) }
            let values = try kv.multiGet(reads)
            var batch = KVWriteBatch()
            for (k, v) in writes(values) { batch.put(k, v) }
            try kv.write(batch, sync: true)
        } catch {
            try? conn.rollback()
            throw error
        }
        switch conn.commit() {
        case .committed: return
        case .failed(let e), .unknown(let e): throw e
        }
    }

    func runSaga(_ coordinator: SagaCoordinator) throws {
        try coordinator.run { saga in
            var values: [Bytes?] = []
            for k in reads { values.append(try saga.kv.get(k)) }
            for (sql, args) in statements { try saga.sql.execute(sql, args) }
            for (k, v) in writes(values) { try saga.kv.put(k, v) }
        }
    }

    func runXA(kv: RocksDBStore, conn: MySQLConnection, xid: String) throws {
        try conn.xa(.start, xid: xid)
        do {
            for (sql, args) in statements { try conn.execute(sql, args) }
            try conn.xa(.end, xid: xid)
            try conn.xa(.prepare, xid: xid)
        } catch {
            try? conn.xa(.end, xid: xid)
            try? conn.xa(.rollback, xid: xid)
            throw error
        }
        let values = try kv.multiGet(reads)
        var batch = KVWriteBatch()
        for (k, v) in writes(values) { batch.put(k, v) }
        let decision = Bytes("xa-decision/\(xid)".utf8)
        batch.put(decision, Bytes("commit".utf8))
        try kv.write(batch, sync: true)  // the commit point: the decision is durable with the KV writes
        try conn.xa(.commit, xid: xid)
        var done = KVWriteBatch()
        done.delete(decision)
        try kv.write(done, sync: false)
    }
}
