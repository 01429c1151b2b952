import ArgumentParser
import Foundation
import RocksDBBackend
import Saga

// MARK: - status

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "What the journal and the marker table hold, and what needs a human. Read-only: decides, writes and locks nothing.",
        discussion: "Exit 0: nothing in doubt (committed sagas may await garbage collection). Exit 1: sagas in doubt or held, damaged journal entries, or the database unreachable. Exit 2: error. Exit 3: a running node holds the KV store.")

    @OptionGroup var stores: StoreOptions

    func run() throws {
        try perform(stores) {
            let node = try stores.inspect { node, _ in node }
            return (statusJSON(node), statusText(node), node.needsAttention ? 1 : 0)
        }
    }

    func statusJSON(_ node: NodeInspection) -> [String: Any] {
        [
            "kv": stores.kv, "sql": stores.sqlDescription, "table": stores.table,
            "instance": node.instance.map { $0.rawValue } ?? NSNull(),
            "database": ["reachable": node.sqlError == nil, "error": node.sqlError ?? NSNull()] as [String: Any],
            "claimIsThisJournals": node.claimIsThisJournals ?? NSNull(),
            "journal": node.journalCounts,
            "markers": node.markerCounts ?? NSNull(),
            "redoWatermark": node.redoWatermark ?? NSNull(),
            "pending": node.pending.count,
            "committedAwaitingGC": ids(node.pending.filter { !$0.inDoubt }.map(\.saga)),
            "inDoubt": node.inDoubt.map(pendingJSON),
            "oldestInDoubtAgeSeconds": seconds(node.oldestInDoubtAgeMilliseconds),
            "damaged": node.damaged.map { ["key": jsonValue($0.key), "saga": $0.saga?.rawValue ?? NSNull(), "reason": $0.reason] as [String: Any] },
            "needsAttention": node.needsAttention,
        ]
    }

    func pendingJSON(_ p: NodeInspection.Pending) -> [String: Any] {
        [
            "saga": p.saga.rawValue, "verdict": p.verdict.rawValue, "reason": p.reason,
            "ageSeconds": seconds(p.ageMilliseconds), "preparedAt": iso8601(p.record.preparedAt),
            "keys": p.record.entries.map { jsonValue($0.key) },
            "callerKey": jsonValue(p.record.callerKey),
            "marker": p.marker?.status ?? NSNull(),
        ]
    }

    func statusText(_ node: NodeInspection) -> String {
        var out = "node: KV \(stores.kv), SQL \(stores.sqlDescription), marker table \(stores.table)\n"
        out += "instance: \(node.instance.map { "\($0.rawValue)" } ?? "none (no coordinator has opened this journal)")\n"
        if let e = node.sqlError { out += "database: UNREACHABLE: \(e)\n" }
        if node.claimIsThisJournals == false {
            out += "instance claim: held by ANOTHER journal (a copy of this KV store opened on this database); a coordinator will refuse to open\n"
        }
        let j = node.journalCounts
        out += "journal records: \(j["prepared"] ?? 0) prepared, \(j["committed"] ?? 0) committed, \(j["compensated"] ?? 0) compensated, \(j["damaged"] ?? 0) damaged\n"
        if let m = node.markerCounts {
            out += "marker rows: \(m["committed"] ?? 0) committed, \(m["aborted"] ?? 0) aborted, \(m["redo"] ?? 0) redo\n"
        } else {
            out += "marker rows: not read\n"
        }
        if let w = node.redoWatermark { out += "redo watermark: \(w)\n" }
        let committed = node.pending.filter { !$0.inDoubt }
        out += "pending: \(node.pending.count) saga(s) prepared in the journal, \(committed.count) of them committed in SQL (awaiting garbage collection)\n"
        let doubt = node.inDoubt
        if doubt.isEmpty {
            out += "in doubt: none\n"
        } else {
            out += "in doubt: \(doubt.count) saga(s)\(node.oldestInDoubtAgeMilliseconds.map { ", the oldest \(ageText($0))" } ?? "")\n"
            for p in doubt.prefix(50) {
                out += "  \(p.saga) (\(ageText(p.ageMilliseconds))), keys \(p.record.entries.map { textValue($0.key) }.joined(separator: ", ")): \(p.reason)\n"
            }
            if doubt.count > 50 { out += "  … and \(doubt.count - 50) more (--json lists them all)\n" }
        }
        for d in node.damaged {
            out += "damaged journal entry \(textValue(d.key))\(d.saga.map { " (\($0))" } ?? ""): \(d.reason)\n"
        }
        out += node.needsAttention
            ? "NEEDS ATTENTION: run `saga recover` once the database is reachable; see `saga inspect ID` for a saga\n"
            : "nothing needs attention\n"
        return out
    }
}

// MARK: - inspect

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One saga: its journal record decoded, its marker row, the current KV values, and what recovery would do. Read-only.",
        discussion: "Exit 0: committed (or nothing left of it). Exit 1: in doubt or held. Exit 2: no journal record and no marker row, or an error.")

    @OptionGroup var stores: StoreOptions
    @Argument(help: "The saga id (as in saga#42: 42).")
    var id: UInt64

    func run() throws {
        try perform(stores) {
            try stores.inspect { node, sql in try report(node, sql) }
        }
    }

    func report(_ node: NodeInspection, _ sql: Result<any SQLExecutor, any Error>) throws -> (json: [String: Any], text: String, exit: Int32) {
        let saga = SagaID(id)
        if let damaged = node.damaged.first(where: { $0.saga == saga }) {
            return (["saga": id, "state": "damaged", "reason": damaged.reason],
                    "\(saga): its journal record is DAMAGED: \(damaged.reason)\nrecovery refuses to guess: restore the record from a backup or a copy of the store", 1)
        }
        guard let p = node.pending.first(where: { $0.saga == saga }) else {
            let marker = try? sql.get().query("SELECT status, seq FROM \(stores.table) WHERE instance = ? AND saga_id = ?",
                                               [.integer(Int64(bitPattern: node.instance?.rawValue ?? 0)), .integer(Int64(bitPattern: id))]).first
            let status = marker?[0].string
            return (["saga": id, "state": "absent", "marker": status ?? NSNull(), "database": ["reachable": node.sqlError == nil, "error": node.sqlError ?? NSNull()] as [String: Any]],
                    "\(saga): no prepared record in the journal (finished and collected, or never run)\(status.map { "; marker row: \($0)" } ?? "")",
                    status == nil ? 2 : 0)
        }
        return (json(p, node), text(p, node), p.inDoubt ? 1 : 0)
    }

    func json(_ p: NodeInspection.Pending, _ node: NodeInspection) -> [String: Any] {
        [
            "saga": id, "state": "prepared",
            "preparedAt": iso8601(p.record.preparedAt), "ageSeconds": seconds(p.ageMilliseconds),
            "callerKey": jsonValue(p.record.callerKey),
            "session": p.record.session.map { ["id": $0.id, "serverStart": $0.serverStart] as [String: Any] } ?? NSNull(),
            "keys": p.keys.map { k in
                ["key": jsonValue(k.entry.key), "preImage": jsonValue(k.entry.preImage), "afterImage": jsonValue(k.entry.afterImage),
                 "current": jsonValue(k.current), "currentMatches": k.match.rawValue] as [String: Any]
            },
            "marker": p.marker.map { ["status": $0.status, "sequence": $0.sequence ?? NSNull()] as [String: Any] } ?? NSNull(),
            "database": ["reachable": node.sqlError == nil, "error": node.sqlError ?? NSNull()] as [String: Any],
            "verdict": p.verdict.rawValue, "recoveryWould": p.reason,
        ]
    }

    func text(_ p: NodeInspection.Pending, _ node: NodeInspection) -> String {
        var out = "\(p.saga): prepared, \(ageText(p.ageMilliseconds))\(p.record.preparedAt.flatMap { iso8601($0) as? String }.map { " (prepared at \($0))" } ?? "")\n"
        if let key = p.record.callerKey { out += "caller key: \(textValue(key))\n" }
        if let s = p.record.session { out += "SQL \(s)\n" }
        out += "marker row: \(p.marker.map { $0.status + ($0.sequence.map { " (redo, sequence \($0))" } ?? "") } ?? (node.sqlError == nil ? "none" : "not read (database unreachable)"))\n"
        out += "keys:\n"
        for k in p.keys {
            out += "  \(textValue(k.entry.key))\n"
            out += "    pre-image:   \(textValue(k.entry.preImage))\n"
            out += "    after-image: \(textValue(k.entry.afterImage))\n"
            out += "    current:     \(textValue(k.current))  [\(matchText(k.match))]\n"
        }
        out += "recovery would: \(p.reason)\n"
        return out
    }
}

func matchText(_ match: NodeInspection.Key.Match) -> String {
    switch match {
    case .afterImage: "the after-image"
    case .preImage: "the pre-image"
    case .neither: "NEITHER: written behind the saga"
    case .newerSaga: "a newer prepared saga wrote it since"
    }
}

// MARK: - recover

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Runs recovery (opens a coordinator on the stores, then closes it) and prints its report.",
        discussion: "Exit 0: nothing left in doubt. Exit 1: sagas stay in doubt or held (the database unreachable, a foreign write, a damaged record). Exit 2: error. Exit 3: a running node holds the stores.")

    @OptionGroup var stores: StoreOptions

    func run() throws {
        try perform(stores) { try recoverAndReport(stores, focus: nil) }
    }
}

/// Recovery at open, reported; `focus` narrows the verdict (and exit code) to one saga.
func recoverAndReport(_ stores: StoreOptions, focus: SagaID?) throws -> (json: [String: Any], text: String, exit: Int32) {
    let kv = try stores.openKV()
    defer { kv.close() }
    let sql: any SQLDatabase
    do {
        sql = try stores.openSQL()
    } catch let failure as ToolFailure where failure.unreachable {
        return unreachable(kv, stores, failure, focus: focus)
    }
    let outcome: (RecoveryReport, [SagaID])
    do {
        outcome = try stores.withCoordinator(kv: kv, sql: sql) { c in (c.recoveryAtOpen, c.inDoubt) }
    } catch let failure as ToolFailure where failure.unreachable {
        return unreachable(kv, stores, failure, focus: focus)
    }
    let (report, inDoubt) = outcome
    let problems = report.problems.map { "\($0)" }
    let clean = report.isClean && inDoubt.isEmpty
    var json: [String: Any] = [
        "kv": stores.kv, "sql": stores.sqlDescription,
        "committed": ids(report.committed), "compensated": ids(report.compensated), "replayed": ids(report.replayed),
        "inDoubt": ids(inDoubt), "problems": problems, "clean": clean,
        "database": ["reachable": true, "error": NSNull()] as [String: Any],
    ]
    var text = "\(report)\n"
    text += inDoubt.isEmpty ? "nothing in doubt\n" : "still in doubt: \(inDoubt.map { "\($0)" }.joined(separator: ", "))\n"
    var exit: Int32 = clean ? 0 : 1
    if let focus {
        let outcome: String
        if report.committed.contains(focus) { outcome = "committed" }
        else if report.compensated.contains(focus) { outcome = "compensated" }
        else if inDoubt.contains(focus) || report.problems.contains(where: { $0.saga == focus }) { outcome = "held" }
        else { outcome = "notPending" }
        json["saga"] = focus.rawValue
        json["outcome"] = outcome
        exit = outcome == "held" ? 1 : 0
        let line = switch outcome {
        case "committed": "\(focus): committed in SQL; recovery finished it\n"
        case "compensated": "\(focus): not committed (fenced); its KV writes were undone\n"
        case "held": "\(focus): STILL HELD: \(report.problems.first { $0.saga == focus }.map { "\($0)" } ?? "in doubt (the database could not decide it)")\n"
        default: "\(focus): was not prepared in the journal: nothing to resolve\n"
        }
        text += line
    }
    return (json, text, exit)
}

/// The database cannot be reached: nothing is decided; the journal says what stays in doubt.
func unreachable(_ kv: RocksDBStore, _ stores: StoreOptions, _ failure: ToolFailure, focus: SagaID?) -> (json: [String: Any], text: String, exit: Int32) {
    let node = try? NodeInspection.read(kv: kv, sql: .failure(failure), markerTable: stores.table)
    let held = node?.pending.map(\.saga) ?? []
    var json: [String: Any] = [
        "kv": stores.kv, "sql": stores.sqlDescription,
        "committed": [UInt64](), "compensated": [UInt64](), "replayed": [UInt64](),
        "inDoubt": ids(held), "problems": [failure.description], "clean": false,
        "database": ["reachable": false, "error": failure.description] as [String: Any],
    ]
    if let focus { json["saga"] = focus.rawValue; json["outcome"] = "held" }
    let text = "\(failure.description)\nnothing was decided (only the database can prove a COMMIT outcome): \(held.count) saga(s) stay in doubt\(held.isEmpty ? "" : ": " + held.prefix(20).map { "\($0)" }.joined(separator: ", "))\nrun `saga recover` again once the database is back\n"
    return (json, text, 1)
}

// MARK: - resolve

struct Resolve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "After a human repaired the key of a saga held by a foreign write: runs recovery, which checks the keys again and finishes the saga.",
        discussion: "Never decides a COMMIT outcome the database cannot prove: the decision is recovery's fencing insert. Exit 0: the saga is finished. Exit 1: it stays held (key still foreign, database unreachable). Exit 2: error. Exit 3: a running node holds the stores.")

    @OptionGroup var stores: StoreOptions
    @Argument(help: "The saga id (as in saga#42: 42).")
    var id: UInt64

    func run() throws {
        try perform(stores) { try recoverAndReport(stores, focus: SagaID(id)) }
    }
}

// MARK: - gc

struct GC: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gc",
        abstract: "Opens a coordinator (recovery runs first), collects garbage, and reports what went.",
        discussion: "Exit 0: done and nothing in doubt. Exit 1: recovery left sagas in doubt. Exit 2: error. Exit 3: a running node holds the stores.")

    @OptionGroup var stores: StoreOptions

    func run() throws {
        try perform(stores) {
            let kv = try stores.openKV()
            defer { kv.close() }
            let before = try counts(kv)
            let sql = try stores.openSQL()
            let (report, collected, inDoubt) = try stores.withCoordinator(kv: kv, sql: sql) { c in
                (c.recoveryAtOpen, try c.collectGarbage(), c.inDoubt)
            }
            let after = try counts(kv)
            let journalRemoved = before.journal - after.journal
            let markersRemoved = before.markers.map { b in after.markers.map { b - $0 } ?? 0 } ?? 0
            return ([
                "kv": stores.kv, "sql": stores.sqlDescription,
                "recovery": ["committed": report.committed.count, "compensated": report.compensated.count, "replayed": report.replayed.count, "inDoubt": ids(inDoubt)] as [String: Any],
                "collected": collected, "journalRecordsRemoved": journalRemoved, "markerRowsRemoved": markersRemoved,
                "journalRecordsLeft": after.journal, "markerRowsLeft": after.markers ?? NSNull(),
            ], "\(report)\ngarbage collection: \(journalRemoved) journal record(s) and \(markersRemoved) marker row(s) removed (\(collected) by the explicit pass; recovery at open collects too); left: \(after.journal) record(s), \(after.markers.map(String.init) ?? "?") marker row(s)\(inDoubt.isEmpty ? "" : "\nstill in doubt: \(inDoubt.map { "\($0)" }.joined(separator: ", "))")",
               inDoubt.isEmpty ? 0 : 1)
        }
    }

    /// Saga records in the journal, and this instance's marker rows (nil: not read).
    func counts(_ kv: RocksDBStore) throws -> (journal: Int, markers: Int?) {
        let node = try stores.inspect(kv) { node, _ in node }
        return (node.journalCounts.values.reduce(0, +), node.markerCounts.map { $0.values.reduce(0, +) })
    }
}

// MARK: - verify-journal

struct VerifyJournal: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify-journal",
        abstract: "Decodes every journal entry and checks its checksum; lists the damaged ones with the reason. Read-only; needs no --sql.",
        discussion: "Exit 0: every entry decodes. Exit 1: damaged entries. Exit 2: error. Exit 3: a running node holds the KV store.")

    @OptionGroup var stores: StoreOptions

    func run() throws {
        try perform(stores) {
            let kv = try stores.openKV()
            defer { kv.close() }
            let (checked, damaged) = try NodeInspection.verifyJournal(kv)
            var text = "\(checked) journal entr\(checked == 1 ? "y" : "ies") checked, \(damaged.count) damaged\n"
            for d in damaged { text += "  \(textValue(d.key))\(d.saga.map { " (\($0))" } ?? ""): \(d.reason)\n" }
            return ([
                "kv": stores.kv, "checked": checked,
                "damaged": damaged.map { ["key": jsonValue($0.key), "saga": $0.saga?.rawValue ?? NSNull(), "reason": $0.reason] as [String: Any] },
            ], text, damaged.isEmpty ? 0 : 1)
        }
    }
}
