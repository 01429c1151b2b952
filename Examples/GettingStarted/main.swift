// Getting started with Saga: a small ledger. Balances live in SQL, each account's recent
// activity in RocksDB, and every transfer updates both stores as one saga.
//
//     swift run getting-started                                  # RocksDB + SQLite
//     SAGA_MYSQL_URL=mysql://user:pw@127.0.0.1:3306/db swift run getting-started   # + MariaDB
//
// The part between the `README: begin` and `README: end` lines is the code README.md and the
// DocC article show, character for character (Tests/SagaTests/GettingStartedTests.swift checks
// it). The rest shows the async API and checks the results, so that a run proves it works.

// README: begin
import Foundation
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend

// The two stores, in a fresh directory (RocksDB creates its own directory, not the parents).
let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ledger-\(UUID())").path
try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
let kv = try RocksDBStore(path: dir + "/kv")
let sql: any SQLDatabase = if let url = ProcessInfo.processInfo.environment["SAGA_MYSQL_URL"] {
    try MySQLDatabase(url: url)                         // MariaDB: the rest is the same
} else {
    try SQLiteDatabase(path: dir + "/ledger.sqlite")    // WAL, synchronous=FULL
}

// The schema, on a plain connection, outside any saga; then the coordinator (it recovers).
let admin = try sql.connect()
try admin.execute("CREATE TABLE accounts (name VARCHAR(64) PRIMARY KEY, balance INTEGER NOT NULL CHECK (balance >= 0))")
try admin.execute("INSERT INTO accounts (name, balance) VALUES ('alice', 100), ('bob', 200)")
admin.close()
let coordinator = try SagaCoordinator(kv: kv, sql: sql)

struct Activity: Codable, KVCodable { var transfers = 0; var lastChange = 0 }  // KV: JSON
struct InsufficientFunds: Error { let account: String; let balance: Int }
struct NoSuchAccount: Error { let name: String }

/// The saga's body: both balances in SQL and both activity records in KV, all or nothing.
func move(_ amount: Int, from: String, to: String, in saga: Saga) throws -> Int {
    let row = try saga.sql.query("SELECT balance FROM accounts WHERE name = ?", from).first
    guard let balance = try row?.decode("balance", as: Int.self) else { throw NoSuchAccount(name: from) }
    guard balance >= amount else { throw InsufficientFunds(account: from, balance: balance) }
    try saga.sql.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?", amount, from)
    let credited = try saga.sql.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", amount, to)
    guard credited == 1 else { throw NoSuchAccount(name: to) }
    for (name, change) in [(from, -amount), (to, amount)] {
        let old = try saga.kv.get("activity:\(name)", as: Activity.self) ?? Activity()  // locks the key
        try saga.kv.put("activity:\(name)", Activity(transfers: old.transfers + 1, lastChange: change))
    }
    return balance - amount
}

/// Reruns the whole saga, reads included, only when that may help: nothing was written and
/// the cause was transient (`isRetryable`). At most 5 attempts, 20 ms, 40 ms... apart.
func withRetries<T>(_ body: (Saga) throws -> T) throws(SagaError) -> T {
    var attempt = 1
    while true {
        do { return try coordinator.run(body) }
        catch where error.isRetryable && attempt < 5 {
            Thread.sleep(forTimeInterval: 0.01 * Double(1 << attempt))
            attempt += 1
        }
    }
}

func transfer(_ amount: Int, from: String, to: String) {
    do {
        let left = try withRetries { saga in try move(amount, from: from, to: to, in: saga) }
        print("moved \(amount) from \(from) to \(to); \(from) has \(left) left")
    } catch .bodyFailed(_, let error as InsufficientFunds) {     // the app's own error
        print("\(error.account) has only \(error.balance): nothing written")
    } catch .bodyFailed(_, let error) {          // a failed statement (the CHECK), NoSuchAccount...
        print("failed (\(error)): nothing written")
    } catch .commitFailed(_, let error, _) {     // COMMIT refused (a deferred constraint...)
        print("COMMIT failed (\(error)): KV undone, both stores as before")
    } catch .lockTimeout, .deadlock {            // still contended after 5 attempts
        print("busy: nothing written, try again later")
    } catch .inDoubt(let saga, _) {              // the database is unreachable
        print("\(saga) in doubt, its keys stay locked: call coordinator.recover() later")
    } catch .stopped {                           // an fsync or a write failed
        print("stopped: reopen both stores, recovery decides")
    } catch .misuse(let what) {                  // a bug in the calling code
        print("misuse: \(what)")
    } catch {
        print("\(error.nothingWritten ? "nothing written" : "left for recovery"): \(error)")
    }
}

transfer(30, from: "alice", to: "bob")     // moved
transfer(500, from: "bob", to: "alice")    // refused by the app: bob has 230
transfer(-500, from: "alice", to: "bob")   // refused by the CHECK: bob would go negative

// Reads outside any saga: KV directly, SQL on a plain connection.
let activity = try kv.get("activity:alice", as: Activity.self)
print("alice:", activity?.transfers ?? 0, "transfer(s), last", activity?.lastChange ?? 0)
let reader = try sql.connect()
for row in try reader.query("SELECT name, balance FROM accounts ORDER BY name") {
    print(try row.decode("name", as: String.self), try row.decode("balance", as: Int.self))
}
reader.close()
// README: end

// The async API, for async code: the saga runs on the coordinator's own bounded thread pool,
// off Swift's cooperative pool, in this task (task-local values reach the body; cancellation
// is honoured until the KV batch is written). Call it from an async function: in top-level
// code `try await coordinator.run {...}` resolves to the blocking overload, which the compiler
// refuses in async code.
func transferAsync(_ amount: Int, from: String, to: String) async throws(SagaError) -> Int {
    try await coordinator.run { saga in try move(amount, from: from, to: to, in: saga) }
}
let left = try await transferAsync(20, from: "bob", to: "alice")
print("async: moved 20 from bob to alice; bob has \(left) left")

// A statement that ends the transaction is refused before it runs: the saga owns it.
func commitInsideASaga() throws(SagaError) {
    try coordinator.run { saga in _ = try saga.sql.execute("COMMIT") }
}
do {
    try commitInsideASaga()
    preconditionFailure("COMMIT inside a saga ran")
} catch .misuse(let what) {
    print("refused: \(what)")
} catch {
    preconditionFailure("\(error)")
}

// Check what the run did: 30 moved, two transfers refused with nothing written, 20 moved back.
let check = try sql.connect()
let balances = try Dictionary(uniqueKeysWithValues: check.query("SELECT name, balance FROM accounts").map {
    (try $0.decode("name", as: String.self), try $0.decode("balance", as: Int.self))
})
precondition(balances == ["alice": 90, "bob": 210], "balances: \(balances)")
precondition(balances.values.reduce(0, +) == 300, "money created or lost: \(balances)")
let alice = try kv.get("activity:alice", as: Activity.self)
let bob = try kv.get("activity:bob", as: Activity.self)
precondition(alice?.transfers == 2 && alice?.lastChange == 20, "alice's activity: \(String(describing: alice))")
precondition(bob?.transfers == 2 && bob?.lastChange == -20, "bob's activity: \(String(describing: bob))")
if sql is MySQLDatabase { try check.execute("DROP TABLE accounts") }  // the server outlives the run
check.close()

coordinator.close()
kv.close()
try FileManager.default.removeItem(atPath: dir)
print("OK: balances and activity agree (alice 90, bob 210, total 300)")
