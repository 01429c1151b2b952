import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga

/// Checks one node after a fault, Jepsen-style, against the outcome log (kept outside the
/// stores): recovery runs at open and leaves nothing unfinished; running it again changes
/// nothing; SQLite's integrity check passes; RocksDB reopens with paranoid checks; every saga
/// is in both stores or in neither; balances equal a serial replay of the sagas present; no
/// acknowledged saga is missing (lost) and no failed or never-begun saga is present
/// (unexpected). On a cluster, every node's copy of the database (the marker tables, the bank's
/// tables) must be identical, read with causal reads once the nodes are synced.
struct Checker {
    let site: NodeSite
    let spec: BankSpec
    let logPath: String

    struct Result {
        var lost: [Int64] = []
        var unexpected: [Int64] = []
        var divergences: [String] = []
        var present: Set<Int64> = []
        /// Galera: the three nodes' copies of the database were compared and are identical.
        var nodesIdentical = false
        var ok: Bool { lost.isEmpty && unexpected.isEmpty && divergences.isEmpty }
        var summary: String {
            var parts: [String] = []
            if !lost.isEmpty { parts.append("lost \(lost.sorted().prefix(10))") }
            if !unexpected.isEmpty { parts.append("unexpected \(unexpected.sorted().prefix(10))") }
            parts += divergences.prefix(10)
            return parts.joined(separator: "; ")
        }
    }

    /// - Parameter exact: no fault that leaves an outcome open happened, so the sagas present
    ///   must be exactly the ones acknowledged as committed.
    func check(exact: Bool = false) -> Result {
        var r = Result()
        var logger = Logger(label: "saga-torture.checker") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = .critical
        // 1. Recovery at open, then the state it leaves.
        let first: Snapshot
        do {
            first = try openRecoverAndRead(logger: logger, into: &r)
        } catch {
            r.divergences.append("first recovery: \(error)")
            return r
        }
        // 2. Recovery again: nothing may change.
        do {
            let second = try openRecoverAndRead(logger: logger, into: &r)
            if second != first { r.divergences.append("a second recovery changed the state") }
        } catch {
            r.divergences.append("second recovery: \(error)")
            return r
        }
        // 3. Every saga all or nothing; balances equal the replay of the sagas present.
        let kvOnly = first.kvTokens.subtracting(first.sqlTokens)
        let sqlOnly = first.sqlTokens.subtracting(first.kvTokens)
        for t in kvOnly.sorted().prefix(5) { r.divergences.append("saga txid \(t) is in KV only") }
        for t in sqlOnly.sorted().prefix(5) { r.divergences.append("saga txid \(t) is in SQL only") }
        r.present = first.kvTokens.intersection(first.sqlTokens)
        var model = [Int64](repeating: 0, count: spec.accounts)
        for t in r.present {
            for (account, delta) in spec.transfer(t).deltas where account < model.count { model[account] += delta }
        }
        var balanceDiffs = 0
        for a in 0..<spec.accounts {
            let kv = first.kvBalances[a] ?? 0, sql = first.sqlBalances[a] ?? 0
            if kv != sql || kv != model[a] {
                balanceDiffs += 1
                if balanceDiffs <= 5 { r.divergences.append("account \(a): KV \(kv), SQL \(sql), replay of the sagas present \(model[a])") }
            }
        }
        // 4. Against what the callers saw.
        do {
            let log = try OutcomeLog.read(logPath)
            r.lost = Array(log.committed.subtracting(r.present))
            r.unexpected = Array(log.failed.intersection(r.present)) + Array(r.present.subtracting(log.begun))
            if exact {
                let extra = r.present.subtracting(log.committed)
                for t in extra.sorted().prefix(5) { r.divergences.append("saga txid \(t) present but not acknowledged committed") }
            }
        } catch {
            r.divergences.append("cannot read the outcome log: \(error)")
        }
        // 5. Every node of a cluster holds the same rows.
        if site.backend == .galera {
            let differences = Self.compareNodes(site)
            r.divergences += differences
            r.nodesIdentical = differences.isEmpty
        }
        return r
    }

    /// Reads every table of the site's database on each node (causal reads: a node first
    /// applies every write certified before the read) and requires the copies identical;
    /// returns what differs (or could not be read).
    static func compareNodes(_ site: NodeSite) -> [String] {
        var differences: [String] = []
        var copies: [(node: String, tables: [String: [String]])] = []
        for url in site.serverURLs {
            let node = url.split(separator: "@").last.map(String.init) ?? url
            do {
                let conn = try MySQLDatabase(url: url).openConnection()
                defer { conn.close() }
                try conn.execute("SET SESSION wsrep_sync_wait = 1", [])
                var tables: [String: [String]] = [:]
                let names = try conn.query("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()", []).compactMap { $0[0].string }
                for name in names {
                    let columns = try conn.query("SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?", [.text(name)]).first?[0].int64 ?? 1
                    let order = (1...max(1, Int(columns))).map(String.init).joined(separator: ", ")
                    tables[name] = try conn.query("SELECT * FROM `\(name)` ORDER BY \(order)", []).map { "\($0.values)" }
                }
                copies.append((node, tables))
            } catch {
                return ["cannot read node \(node): \(error)"]
            }
        }
        guard let first = copies.first else { return ["no node to compare"] }
        for other in copies.dropFirst() {
            for name in Set(first.tables.keys).union(other.tables.keys).sorted() {
                let a = first.tables[name], b = other.tables[name]
                guard a != b else { continue }
                let detail: String
                if let a, let b {
                    let onlyFirst = Set(a).subtracting(b).sorted().prefix(3), onlyOther = Set(b).subtracting(a).sorted().prefix(3)
                    detail = "\(a.count) rows against \(b.count); only on \(first.node): \(Array(onlyFirst)); only on \(other.node): \(Array(onlyOther))"
                } else {
                    detail = "the table is missing on \(a == nil ? first.node : other.node)"
                }
                differences.append("nodes \(first.node) and \(other.node) differ in table \(name): \(detail)")
            }
        }
        return differences
    }

    struct Snapshot: Equatable {
        var kvBalances: [Int: Int64] = [:]
        var sqlBalances: [Int: Int64] = [:]
        var kvTokens: Set<Int64> = []
        var sqlTokens: Set<Int64> = []
    }

    private func openRecoverAndRead(logger: Logger, into r: inout Result) throws -> Snapshot {
        let sql = try site.openSQL()
        let kv: RocksDBStore
        do { kv = try RocksDBStore(path: site.kvPath) } catch {
            throw TortureError("RocksDB does not reopen cleanly (paranoid checks): \(error)")
        }
        defer { kv.close() }
        let coordinator: SagaCoordinator
        do { coordinator = try SagaCoordinator(kv: kv, sql: sql, logger: logger) } catch {
            throw TortureError("recovery at open failed: \(error)")
        }
        defer { coordinator.close() }
        let pending = coordinator.inDoubt
        if !pending.isEmpty { r.divergences.append("left unfinished after recovery: \(pending.prefix(5))") }
        for (key, value) in try kv.journalEntries() where JournalRecord.saga(fromKey: key) != nil {
            let record = try JournalRecord(decoding: value)
            if record.state == .prepared { r.divergences.append("\(record.saga) still prepared after recovery") }
        }
        // Recovery on demand right after the one at open finds nothing left to do.
        let again = try coordinator.recover()
        if !again.committed.isEmpty || !again.compensated.isEmpty || !again.isClean {
            r.divergences.append("recovery run again still acted: \(again)")
        }

        let conn = try sql.connect()
        defer { conn.close() }
        // Causal reads: what the workload committed through another node is applied here first.
        if site.backend == .galera { try conn.execute("SET SESSION wsrep_sync_wait = 1", []) }
        if site.backend == .sqlite {
            let verdict = try conn.query("PRAGMA integrity_check", []).first?[0].string ?? "no answer"
            if verdict != "ok" { r.divergences.append("SQLite integrity_check: \(verdict)") }
        }
        var s = Snapshot()
        for row in try conn.query("SELECT k, balance FROM tt_accounts", []) {
            if let k = row[0].int64, let b = row[1].int64 { s.sqlBalances[Int(k)] = b }
        }
        for row in try conn.query("SELECT txid FROM tt_sagas", []) {
            if let t = row[0].int64 { s.sqlTokens.insert(t) }
        }
        for (key, value) in try kv.scan(prefix: BankSpec.accountPrefix) {
            guard let a = Int(String(decoding: key.dropFirst(2), as: UTF8.self)) else { continue }
            s.kvBalances[a] = try BankSpec.decode(value)
        }
        for (key, _) in try kv.scan(prefix: BankSpec.tokenPrefix) {
            if let t = Int64(String(decoding: key.dropFirst(2), as: UTF8.self)) { s.kvTokens.insert(t) }
        }
        return s
    }
}
