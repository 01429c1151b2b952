/// What every SQL backend shares about the marker table: `(saga_id PRIMARY KEY, status)`, with
/// status `committed` (inserted in the saga's transaction) or `aborted` (the fencing insert).
public enum MarkerTable {
    /// Table names are spliced into SQL text, so only letters, digits and underscores, not
    /// starting with a digit.
    public static func isValidName(_ name: String) -> Bool {
        guard let first = name.first, first.isLetter || first == "_" else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    /// The decision a marker's status stands for, read right after the fencing insert.
    public static func decision(status: String?, saga: SagaID) throws -> FenceDecision {
        switch status {
        case "committed": return .committed
        case "aborted": return .aborted
        default: throw MissingMarker(saga: saga, status: status)
        }
    }

    public struct MissingMarker: Error, CustomStringConvertible {
        public let saga: SagaID
        public let status: String?
        public init(saga: SagaID, status: String?) { self.saga = saga; self.status = status }
        public var description: String { "marker for \(saga) missing right after the fencing insert (status \(status ?? "none"))" }
    }
}

extension MarkerTable {
    /// The statements every SQL backend runs on the marker table, in SQL that SQLite and MySQL
    /// both accept. Only the fencing insert's verb differs (`INSERT OR IGNORE`, `INSERT IGNORE`).
    public struct Statements: Sendable {
        public let table: String
        public let insertIgnore: String

        /// - Parameters:
        ///   - table: a name checked with ``MarkerTable/isValidName(_:)``.
        ///   - insertIgnore: the dialect's "insert unless the key exists".
        public init(table: String, insertIgnore: String) {
            self.table = table
            self.insertIgnore = insertIgnore
        }

        static func key(_ id: SagaID) -> SQLValue { .integer(Int64(bitPattern: id.rawValue)) }

        public func insertCommitted(_ id: SagaID, on db: any SQLExecutor) throws {
            try db.execute("INSERT INTO \(table) (saga_id, status) VALUES (?, 'committed')", [Self.key(id)])
        }

        /// The fencing insert, then the row that holds the id decides.
        public func fence(_ id: SagaID, on db: any SQLExecutor) throws -> FenceDecision {
            try db.execute("\(insertIgnore) INTO \(table) (saga_id, status) VALUES (?, 'aborted')", [Self.key(id)])
            let status = try db.query("SELECT status FROM \(table) WHERE saga_id = ?", [Self.key(id)]).first?[0].string
            return try MarkerTable.decision(status: status, saga: id)
        }

        /// Fences many ids inside the caller's transaction, in chunks of 256 bound ids: one
        /// multi-row fencing insert, then one read of the rows that hold the ids. The decisions
        /// hold once the caller's transaction has committed.
        public func fence(_ ids: [SagaID], on db: any SQLExecutor) throws -> [SagaID: FenceDecision] {
            var out: [SagaID: FenceDecision] = [:]
            for start in stride(from: 0, to: ids.count, by: 256) {
                let chunk = Array(ids[start..<min(start + 256, ids.count)])
                let rows = Array(repeating: "(?, 'aborted')", count: chunk.count).joined(separator: ",")
                try db.execute("\(insertIgnore) INTO \(table) (saga_id, status) VALUES \(rows)", chunk.map(Self.key))
                let placeholders = Array(repeating: "?", count: chunk.count).joined(separator: ",")
                var status: [SagaID: String] = [:]
                for row in try db.query("SELECT saga_id, status FROM \(table) WHERE saga_id IN (\(placeholders))", chunk.map(Self.key)) {
                    if let id = row[0].int64, let s = row[1].string { status[SagaID(UInt64(bitPattern: id))] = s }
                }
                for id in chunk { out[id] = try MarkerTable.decision(status: status[id], saga: id) }
            }
            return out
        }

        /// ``fence(_:on:)-(SagaID,_)`` for many ids in one transaction of its own on `conn`,
        /// committed before the decisions are returned.
        public func fenceInTransaction(_ ids: [SagaID], on conn: any SQLConnection) throws -> [SagaID: FenceDecision] {
            try conn.begin()
            let decisions: [SagaID: FenceDecision]
            do { decisions = try fence(ids, on: conn) } catch {
                try? conn.rollback()
                throw error
            }
            switch conn.commit() {
            case .committed: return decisions
            case .failed(let e), .unknown(let e): throw e
            }
        }

        public func ids(on db: any SQLExecutor) throws -> [SagaID] {
            try db.query("SELECT saga_id FROM \(table) ORDER BY saga_id", []).compactMap { $0[0].int64 }.map { SagaID(UInt64(bitPattern: $0)) }
        }

        public func maxID(on db: any SQLExecutor) throws -> SagaID? {
            try db.query("SELECT MAX(saga_id) FROM \(table)", []).first?[0].int64.map { SagaID(UInt64(bitPattern: $0)) }
        }

        /// Deletes in chunks of 256 bound ids.
        public func delete(_ ids: [SagaID], on db: any SQLExecutor) throws {
            for start in stride(from: 0, to: ids.count, by: 256) {
                let chunk = ids[start..<min(start + 256, ids.count)]
                let placeholders = Array(repeating: "?", count: chunk.count).joined(separator: ",")
                try db.execute("DELETE FROM \(table) WHERE saga_id IN (\(placeholders))", chunk.map(Self.key))
            }
        }
    }
}
