import Foundation

/// The checker's own record of what callers saw, kept outside the stores under test: one line
/// per event, appended with a single `write` to a file opened `O_APPEND`, so a SIGKILL loses at
/// most the line being written and never garbles another. A saga is `B`egun before it runs,
/// then `C`ommitted, `F`ailed or `U`nknown as its caller saw it.
final class OutcomeLog: @unchecked Sendable {
    enum Event: Character {
        case begun = "B", committed = "C", failed = "F", unknown = "U"
        /// A COMMIT outcome was resolved by fencing while the saga ran (MySQL: a lost reply).
        case fenced = "R"
        /// The database rolled a transaction back because a conflicting one won (1213): a
        /// saga's (its txid), or the other writer's on a cluster (txid 0).
        case conflict = "X"
    }
    private let fd: Int32
    let path: String

    init(path: String) throws {
        self.path = path
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw TortureError("cannot open the outcome log \(path): errno \(errno)") }
    }
    deinit { close(fd) }

    func record(_ event: Event, _ txid: Int64, _ note: String = "") {
        let line = Array("\(event.rawValue) \(txid)\(note.isEmpty ? "" : " " + note)\n".utf8)
        _ = line.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }

    /// What the log says, saga by saga.
    struct Summary {
        var begun: Set<Int64> = []
        var committed: Set<Int64> = []
        var failed: Set<Int64> = []
        var unknown: Set<Int64> = []
        var maxTxid: Int64 = 0
        var fenced = 0
        /// Sagas rolled back by a conflict (1213), and transactions of the cluster's other
        /// writer rolled back so.
        var sagaConflicts = 0
        var otherWriterConflicts = 0
        /// Failure notes, digits blanked, counted.
        var failureReasons: [String: Int] = [:]
        /// Begun and never answered (the process died first): either way is fine.
        var unanswered: Set<Int64> { begun.subtracting(committed).subtracting(failed).subtracting(unknown) }
    }

    /// Counts the `C`ommitted lines appended to a log since it was made, reading only what is
    /// new each time (a campaign polls a log that grows to hundreds of thousands of lines).
    final class CommitCounter {
        private let path: String
        private var offset: UInt64
        private var partial: [UInt8] = []
        private(set) var committed = 0

        /// Starts at the log's current end.
        init(path: String) {
            self.path = path
            offset = ((try? FileManager.default.attributesOfItem(atPath: path)[.size]) as? UInt64) ?? 0
        }

        /// Reads what was appended since the last call; returns the count so far.
        @discardableResult
        func poll() -> Int {
            guard let handle = FileHandle(forReadingAtPath: path) else { return committed }
            defer { try? handle.close() }
            guard (try? handle.seek(toOffset: offset)) != nil, let data = try? handle.readToEnd(), !data.isEmpty else { return committed }
            offset += UInt64(data.count)
            partial += data
            guard let lastNewline = partial.lastIndex(of: UInt8(ascii: "\n")) else { return committed }
            for line in partial[...lastNewline].split(separator: UInt8(ascii: "\n")) where line.first == UInt8(ascii: "C") {
                committed += 1
            }
            partial.removeSubrange(...lastNewline)
            return committed
        }
    }

    static func read(_ path: String) throws -> Summary {
        var s = Summary()
        guard FileManager.default.fileExists(atPath: path) else { return s }
        let text = try String(contentsOfFile: path, encoding: .utf8)
        for line in text.split(separator: "\n") {
            // A line cut short by SIGKILL has no number: skip it (the saga counts as unanswered).
            let fields = line.split(separator: " ", maxSplits: 2)
            guard fields.count >= 2, let txid = Int64(fields[1]) else { continue }
            switch line.first {
            case "B": s.begun.insert(txid); s.maxTxid = max(s.maxTxid, txid)
            case "C": s.committed.insert(txid)
            case "F":
                s.failed.insert(txid)
                if fields.count > 2 {
                    let reason = String(fields[2].prefix(90).map { $0.isNumber ? "N" : $0 })
                    s.failureReasons[reason, default: 0] += 1
                }
            case "U": s.unknown.insert(txid)
            case "R": s.fenced += 1
            case "X": if txid == 0 { s.otherWriterConflicts += 1 } else { s.sagaConflicts += 1 }
            default: continue
            }
        }
        return s
    }
}
