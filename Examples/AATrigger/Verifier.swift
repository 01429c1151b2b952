import Foundation
import RocksDBBackend
import Saga
import SQLiteBackend

/// Checks, without the library's help, that the KV and SQL sides of a node agree, and computes
/// a digest of the whole state.
struct Verifier {
    struct Report {
        var differences: [String] = []
        var digest: String = ""
        var addresses = 0
        var responses = 0
        var queued = 0
        var agree: Bool { differences.isEmpty }
    }

    static func check(kv: RocksDBStore, sql: any SQLExecutor) throws -> Report {
        var report = Report()
        var vars: [String: [String: String]] = [:]
        var lines: [String] = []
        for (key, value) in try kv.scan(prefix: StateVar.prefix) {
            guard let (address, name) = StateVar.parse(key) else {
                report.differences.append("KV key \"\(key.debugText)\" is not a state variable key")
                continue
            }
            let text = String(decoding: value, as: UTF8.self)
            vars[address, default: [:]][name] = text
            lines.append("kv \(key.debugText)=\(value.debugText)")
        }
        var balances: [String: Int64] = [:]
        for row in try sql.query("SELECT address, asset, balance FROM aa_balances ORDER BY address, asset", []) {
            let address = row[0].string ?? "", asset = row[1].string ?? "", balance = row[2].int64 ?? 0
            if asset == "base" { balances[address] = balance }
            lines.append("balance \(address) \(asset) \(balance)")
        }
        var counts: [String: Int64] = [:]
        var lastUnit: [String: String] = [:]
        for row in try sql.query("SELECT mci, trigger_unit, aa_address FROM aa_responses ORDER BY mci", []) {
            let unit = row[1].string ?? "", address = row[2].string ?? ""
            counts[address, default: 0] += 1
            lastUnit[address] = unit
            lines.append("response \(row[0].int64 ?? 0) \(unit) \(address)")
            report.responses += 1
        }
        report.queued = Int(try sql.query("SELECT COUNT(*) FROM aa_triggers", []).first?[0].int64 ?? 0)
        lines.append("queued \(report.queued)")

        let addresses = Set(vars.keys).union(balances.keys).union(counts.keys).sorted()
        report.addresses = addresses.count
        for address in addresses {
            let v = vars[address] ?? [:]
            let kvBalance = v["balance"].flatMap { $0.hasPrefix("n\n") ? Int64($0.dropFirst(2)) : nil } ?? 0
            let kvCount = v["count"].flatMap { $0.hasPrefix("n\n") ? Int64($0.dropFirst(2)) : nil } ?? 0
            let sqlBalance = balances[address] ?? 0
            let sqlCount = counts[address] ?? 0
            if kvBalance != sqlBalance {
                report.differences.append("\(address): balance KV \(kvBalance) != SQL \(sqlBalance)")
            }
            if kvCount != sqlCount {
                report.differences.append("\(address): count KV \(kvCount) != SQL responses \(sqlCount)")
            }
            let kvLast = v["last_unit"].map { String($0.dropFirst(2)) }
            if kvLast != lastUnit[address] {
                report.differences.append("\(address): last_unit KV \(kvLast ?? "<absent>") != SQL \(lastUnit[address] ?? "<absent>")")
            }
            let oddExpected = kvCount % 2 == 1
            if (v["odd"] == "n\n1") != oddExpected {
                report.differences.append("\(address): odd is \(v["odd"].map { "\"\($0)\"" } ?? "<absent>") but count is \(kvCount)")
            }
        }
        report.digest = fnv1a(lines.joined(separator: "\n"))
        return report
    }

    /// FNV-1a, 64 bits, hex: a stable fingerprint of the canonical state listing.
    static func fnv1a(_ text: String) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        let hex = String(h, radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }
}
