import Foundation

/// What every SQL backend shares about the marker table: `(instance, saga_id, status)`, keyed by
/// `(instance, saga_id)`, with status `committed` (inserted in the saga's transaction) or
/// `aborted` (the fencing insert). Tables of earlier versions, keyed by `saga_id` alone, are
/// migrated on open: their rows belong to ``InstanceID/legacy``.
package enum MarkerTable {
    /// Table names are spliced into SQL text, so only letters, digits and underscores, not
    /// starting with a digit.
    package static func isValidName(_ name: String) -> Bool {
        guard let first = name.first, first.isLetter || first == "_" else { return false }
        return name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "_") }
    }

    /// The decision a marker's status stands for, read right after the fencing insert.
    package static func decision(status: String?, saga: SagaID) throws -> FenceDecision {
        switch status {
        case "committed": return .committed
        case "aborted": return .aborted
        default: throw MissingMarker(saga: saga, status: status)
        }
    }

    package struct MissingMarker: Error, CustomStringConvertible {
        package let saga: SagaID
        package let status: String?
        package init(saga: SagaID, status: String?) { self.saga = saga; self.status = status }
        package var description: String { "marker for \(saga) missing right after the fencing insert (status \(status ?? "none"))" }
    }
}

extension MarkerTable {
    /// The statements every SQL backend runs on the marker table, in SQL that SQLite and MySQL
    /// both accept. Every row is keyed by `(instance, saga_id)`, and every statement names its
    /// instance: coordinators that share the table never touch each other's rows. Only the
    /// fencing insert's verb and the locking read differ between dialects.
    ///
    /// Lists of ids are bound in a few fixed sizes (``listSizes``, padded by repeating the
    /// last id), so a backend's statement cache holds a handful of texts, not one per length.
    package struct Statements: Sendable {
        package let table: String
        /// What differs between databases: the insert-ignore verb, the locking read, and how a
        /// NOT NULL violation looks.
        package let dialect: SQLDialect
        /// The saga's marker insert: one text for every saga (prepared once per connection),
        /// built once; the instance, id and claim are bound.
        private let insertCommittedText: String
        /// Redo mode's marker: the same row, with the saga's sequence and after-images.
        private let insertRedoText: String

        /// The statements for `database`'s marker table (a name checked with
        /// ``MarkerTable/isValidName(_:)``), in its dialect.
        package init(for database: any SQLDatabase) {
            table = database.markerTable
            dialect = database.dialect
            let committedIfClaimed = "(SELECT 'committed' FROM \(table)_instances WHERE instance = ? AND claim = ?\(dialect.lockingRead))"
            insertCommittedText = "INSERT INTO \(table) (instance, saga_id, status) VALUES (?, ?, \(committedIfClaimed))"
            insertRedoText = "INSERT INTO \(table) (instance, saga_id, status, seq, redo) VALUES (?, ?, \(committedIfClaimed), ?, ?)"
        }

        private var insertIgnore: String { dialect.insertIgnore }
        private var lockingRead: String { dialect.lockingRead }

        /// The saga's marker, then `COMMIT`: the decision point (one round trip where the
        /// backend can). A marker the claim check refused is ``InstanceClaimLost``.
        package func commit(insertingMarker id: SagaID, owner: MarkerOwner, on conn: any SQLConnection) -> CommitResult {
            commit(id, running: insertCommittedText, insertCommittedArguments(id, owner: owner), owner: owner, on: conn)
        }

        /// Redo mode: the saga's marker row carrying its sequence and after-images (a `redo`
        /// ``JournalRecord``), then `COMMIT`.
        package func commit(insertingRedo id: SagaID, sequence: UInt64, record: Bytes, owner: MarkerOwner, on conn: any SQLConnection) -> CommitResult {
            commit(id, running: insertRedoText, insertCommittedArguments(id, owner: owner) + [.integer(Int64(bitPattern: sequence)), .blob(record)], owner: owner, on: conn)
        }

        private func commit(_ id: SagaID, running text: String, _ arguments: [SQLValue], owner: MarkerOwner, on conn: any SQLConnection) -> CommitResult {
            switch conn.commit(afterRunning: text, arguments) {
            case .failed(let e) where dialect.isNotNullViolation(e): return .failed(InstanceClaimLost(owner: owner))
            case .committed where dialect.causalWait != nil:
                // On a cluster, a success is read back on the same connection (its node applied
                // its own commit): a marker that does not say `committed` means a replicated
                // write aborted the transaction unseen. Unknown: the fence decides.
                do {
                    let status = try statuses([id], instance: owner.instance, on: conn)[id]
                    return status == "committed" ? .committed : .unknown(UnconfirmedCommit(saga: id, status: status))
                } catch {
                    return .unknown(error)
                }
            case let outcome: return outcome
            }
        }

        // MARK: Caller keys

        /// The caller-key table beside the marker table: `(caller_key PRIMARY KEY, instance,
        /// saga_id, created_ms)`. Its row is inserted in the saga's own transaction, so it
        /// commits if and only if the saga commits; the primary key refuses a second saga of a
        /// key, whichever instance runs it.
        package var keyTable: String { table + "_keys" }

        /// The saga's caller-key row, inside its open transaction (the first statement after
        /// `BEGIN`). A key a committed saga holds fails with a duplicate key
        /// (``SQLDialect/isDuplicateKey``); one an open transaction holds waits for it.
        package func insertKey(_ key: Bytes, saga: SagaID, owner: MarkerOwner, createdAt: UInt64, on db: any SQLExecutor) throws {
            try db.execute("INSERT INTO \(keyTable) (caller_key, instance, saga_id, created_ms) VALUES (?, ?, ?, ?)",
                           [.blob(key), Self.key(owner.instance), Self.key(saga), .integer(Int64(clamping: createdAt))])
        }

        /// The committed row of `key`: the instance and saga that hold it, by a plain read (or
        /// a locking one, inside a transaction: the newest committed row).
        /// Stamps the key's row with the time of its COMMIT, in the saga's transaction right
        /// before it: the retention counts from when the caller hears the outcome, not from
        /// BEGIN (a long body, or a long wait, must not let the key expire at once).
        package func touchKey(_ key: Bytes, at time: UInt64, on db: any SQLExecutor) throws {
            try db.execute("UPDATE \(keyTable) SET created_ms = ? WHERE caller_key = ?", [.integer(Int64(clamping: time)), .blob(key)])
        }

        package func keyRow(_ key: Bytes, locking: Bool = false, on db: any SQLExecutor) throws -> (instance: InstanceID, saga: SagaID)? {
            guard let row = try db.query("SELECT instance, saga_id FROM \(keyTable) WHERE caller_key = ?\(locking ? lockingRead : "")", [.blob(key)]).first,
                  let instance = row[0].int64, let saga = row[1].int64 else { return nil }
            return (InstanceID(rawValue: UInt64(bitPattern: instance)), SagaID(UInt64(bitPattern: saga)))
        }

        /// Deletes `owner`'s key rows created before `cutoff` (milliseconds since 1970), in a
        /// transaction of its own on `conn`. Returns how many went.
        package func pruneKeys(createdBefore cutoff: UInt64, owner: MarkerOwner, on conn: any SQLConnection) throws -> Int {
            try inTransaction(on: conn) {
                try checkClaim(owner, on: conn)
                return try conn.execute("DELETE FROM \(keyTable) WHERE instance = ? AND created_ms < ?", [Self.key(owner.instance), .integer(Int64(clamping: cutoff))])
            }
        }

        /// Those of `ids` whose marker says `committed`, by a plain read.
        package func committed(among ids: [SagaID], instance: InstanceID, on db: any SQLExecutor) throws -> [SagaID] {
            let status = try statuses(ids, instance: instance, on: db)
            return Set(ids).filter { status[$0] == "committed" }.sorted()
        }

        /// The marker status of `id` (`committed`, `aborted`, or nil: no row), by a plain read.
        package func status(of id: SagaID, instance: InstanceID, on db: any SQLExecutor) throws -> String? {
            try statuses([id], instance: instance, on: db)[id]
        }

        // MARK: Redo rows

        /// Up to `limit` redo rows of `instance` with a sequence above `watermark`, in sequence
        /// order. A row whose record cannot be decoded is ``DamagedRedoRow``.
        package func redoRows(instance: InstanceID, above watermark: UInt64, limit: Int, on db: any SQLExecutor) throws -> [RedoRow] {
            let rows = try db.query("SELECT saga_id, seq, redo FROM \(table) WHERE instance = ? AND seq > ? ORDER BY seq LIMIT \(limit)",
                                    [Self.key(instance), .integer(Int64(bitPattern: watermark))])
            return try rows.map { row in
                let id = SagaID(UInt64(bitPattern: row[0].int64 ?? 0))
                guard let seq = row[1].int64, case .blob(let bytes) = row[2] else {
                    throw DamagedRedoRow(saga: id, reason: "no sequence or no after-images")
                }
                do {
                    let record = try JournalRecord(decoding: bytes)
                    guard record.saga == id, record.state == .redo else {
                        throw JournalRecord.DecodingError(reason: "the record is a \(record.state) record of \(record.saga)")
                    }
                    return RedoRow(saga: id, sequence: UInt64(bitPattern: seq), record: record)
                } catch {
                    throw DamagedRedoRow(saga: id, reason: "\(error)")
                }
            }
        }

        /// The largest sequence of `instance`'s redo rows.
        package func maxSequence(instance: InstanceID, on db: any SQLExecutor) throws -> UInt64? {
            try db.query("SELECT MAX(seq) FROM \(table) WHERE instance = ?", [Self.key(instance)])
                .first?[0].int64.map { UInt64(bitPattern: $0) }
        }

        /// The claim check and the deletion of the redo rows at or below `watermark`, in one
        /// transaction of its own on `conn`.
        package func deleteRedo(upTo watermark: UInt64, owner: MarkerOwner, on conn: any SQLConnection) throws {
            try inTransaction(on: conn) {
                try checkClaim(owner, on: conn)
                try conn.execute("DELETE FROM \(table) WHERE instance = ? AND seq <= ?", [Self.key(owner.instance), .integer(Int64(bitPattern: watermark))])
            }
        }

        /// A redo row that cannot be read back: recovery refuses to guess.
        package struct DamagedRedoRow: Error, CustomStringConvertible {
            package let saga: SagaID
            package let reason: String
            package var description: String { "the redo row of \(saga) is damaged: \(reason)" }
        }

        /// The sizes id lists are bound in.
        package static let listSizes = [1, 4, 16, 64, 256]

        static func key(_ id: SagaID) -> SQLValue { .integer(Int64(bitPattern: id.rawValue)) }
        static func key(_ instance: InstanceID) -> SQLValue { .integer(Int64(bitPattern: instance.rawValue)) }

        /// Splits `ids` into chunks of at most 256, each padded to one of ``listSizes``.
        static func chunks(_ ids: [SagaID]) -> [[SagaID]] {
            stride(from: 0, to: ids.count, by: 256).map { start in
                var chunk = Array(ids[start..<min(start + 256, ids.count)])
                let size = listSizes.first { $0 >= chunk.count } ?? chunk.count
                if let last = chunk.last { chunk += Array(repeating: last, count: size - chunk.count) }
                return chunk
            }
        }

        /// `(?, ?), (?, ?)...` or `?, ?...` for `count` ids.
        private static func list(_ item: String, _ count: Int) -> String {
            Array(repeating: item, count: count).joined(separator: ",")
        }

        /// The table of instance claims beside the marker table: `(instance PRIMARY KEY, claim)`.
        package var instanceTable: String { table + "_instances" }

        /// Moves the instance's claim to `claim` if the table holds none yet, or one of
        /// `accepting` (the journal's own), in a transaction of its own on `conn`. Returns nil
        /// when the claim is made, or the claim the table holds for another journal.
        package func claim(_ instance: InstanceID, accepting: [UInt64], claim: UInt64, on conn: any SQLConnection) throws -> UInt64? {
            try conn.begin()
            do {
                try conn.execute("\(insertIgnore) INTO \(instanceTable) (instance, claim) VALUES (?, ?)", [Self.key(instance), Self.claimKey(claim)])
                let held = try conn.query("SELECT claim FROM \(instanceTable) WHERE instance = ?\(lockingRead)", [Self.key(instance)])
                    .first?[0].int64.map { UInt64(bitPattern: $0) }
                guard let held else { throw MissingMarker(saga: SagaID(0), status: "no instance row for \(instance)") }
                if held != claim {
                    guard accepting.contains(held) else {
                        try conn.rollback()
                        return held
                    }
                    try conn.execute("UPDATE \(instanceTable) SET claim = ? WHERE instance = ?", [Self.claimKey(claim), Self.key(instance)])
                }
            } catch {
                try? conn.rollback()
                throw error
            }
            switch conn.commit() {
            case .committed: return nil
            case .failed(let e), .unknown(let e): throw e
            }
        }

        /// The saga's marker inside the open transaction, without committing; a refused claim
        /// check is ``InstanceClaimLost``.
        package func insertCommitted(_ id: SagaID, owner: MarkerOwner, on db: any SQLExecutor) throws {
            do { try db.execute(insertCommittedText, insertCommittedArguments(id, owner: owner)) } catch where dialect.isNotNullViolation(error) {
                throw InstanceClaimLost(owner: owner)
            }
        }

        private func insertCommittedArguments(_ id: SagaID, owner: MarkerOwner) -> [SQLValue] {
            [Self.key(owner.instance), Self.key(id), Self.key(owner.instance), Self.claimKey(owner.claim)]
        }

        static func claimKey(_ claim: UInt64) -> SQLValue { .integer(Int64(bitPattern: claim)) }

        /// Inside the caller's transaction: throws ``InstanceClaimLost`` unless the instance
        /// still holds the owner's claim (a locking read: a new claim waits for this
        /// transaction, and this one sees any claim committed before it).
        package func checkClaim(_ owner: MarkerOwner, on db: any SQLExecutor) throws {
            let held = try db.query("SELECT claim FROM \(instanceTable) WHERE instance = ?\(lockingRead)", [Self.key(owner.instance)])
                .first?[0].int64.map { UInt64(bitPattern: $0) }
            guard held == owner.claim else { throw InstanceClaimLost(owner: owner) }
        }

        /// Fences ids inside the caller's transaction, in chunks of at most 256: one
        /// multi-row fencing insert, then one locking read of the rows that hold the ids (a
        /// locking read sees rows committed since the transaction's first read). The decisions
        /// hold once the caller's transaction has committed.
        package func fence(_ ids: [SagaID], instance: InstanceID, on db: any SQLExecutor) throws -> [SagaID: FenceDecision] {
            var out: [SagaID: FenceDecision] = [:]
            for chunk in Self.chunks(ids) {
                let rows = Self.list("(?, ?, 'aborted')", chunk.count)
                let inserted = try db.execute("\(insertIgnore) INTO \(table) (instance, saga_id, status) VALUES \(rows)", chunk.flatMap { [Self.key(instance), Self.key($0)] })
                // Every id got its `aborted` row: none had a marker (the insert waited for any
                // transaction holding one), so there is nothing to read. (On a cluster this also
                // keeps the locking read away from the moment a replicated write aborts the
                // fence: measured on MariaDB 10.11, such a read sometimes never got its reply.)
                let distinct = Set(chunk)
                if inserted == distinct.count {
                    for id in distinct { out[id] = .aborted }
                    continue
                }
                var status: [SagaID: String] = [:]
                let read = "SELECT saga_id, status FROM \(table) WHERE instance = ? AND saga_id IN (\(Self.list("?", chunk.count)))\(lockingRead)"
                for row in try db.query(read, [Self.key(instance)] + chunk.map(Self.key)) {
                    if let id = row[0].int64, let s = row[1].string { status[SagaID(UInt64(bitPattern: id))] = s }
                }
                for id in chunk { out[id] = try MarkerTable.decision(status: status[id], saga: id) }
            }
            return out
        }

        /// The claim check and ``fence(_:instance:on:)`` in one transaction of its own on
        /// `conn`, committed before the decisions are returned: a decision counts only once the
        /// fence's own COMMIT succeeded. On a cluster the fencing insert does not wait for a
        /// saga's open transaction on another node; whichever COMMIT is certified first wins,
        /// and the other is rolled back whole. So each attempt first waits until its node has
        /// applied every write certified before it (the dialect's ``SQLDialect/causalWait``),
        /// and a fence rolled back by a conflict (``SQLDialect/isRolledBackByConflict``) is run
        /// again, and then sees the write it lost to. (The wait runs outside the transaction:
        /// measured on MariaDB 10.11, a locking read under `wsrep_sync_wait` inside a
        /// transaction that a replicated write aborted sometimes never got its reply, and the
        /// client waited out its read timeout.)
        package func fenceInTransaction(_ ids: [SagaID], owner: MarkerOwner, on conn: any SQLConnection) throws -> [SagaID: FenceDecision] {
            var attempt = 1
            while true {
                if let causal = dialect.causalWait { _ = try conn.query(causal, []) }
                do {
                    let decisions = try inTransaction(on: conn) {
                        try checkClaim(owner, on: conn)
                        return try fence(ids, instance: owner.instance, on: conn)
                    }
                    try confirm(decisions, instance: owner.instance, on: conn)
                    return decisions
                } catch where attempt < Self.fenceAttempts && !conn.isBroken && isLostToConflict(error) {
                    attempt += 1
                    Thread.sleep(forTimeInterval: Double(attempt) * 0.005)
                }
            }
        }

        /// Whether a fence's transaction was lost to a conflicting write, so that fencing again
        /// can decide: rolled back by a conflict, or, on a cluster, a transaction a replicated
        /// write aborted without the client being told (its own fencing insert gone by the
        /// time it was read, or decisions its commit did not make).
        private func isLostToConflict(_ error: any Error) -> Bool {
            if let lost = error as? TransactionLost { return dialect.isRolledBackByConflict(lost.cause) }
            return dialect.causalWait != nil && (error is MissingMarker || error is UnconfirmedCommit)
        }

        /// On a cluster, what a COMMIT reported is read back: the marker rows as every write
        /// certified so far left them (after the causal wait) must say what `decisions` say.
        /// Measured on MariaDB 10.11 Galera, under 200 races between a saga's COMMIT and a
        /// fence on another node, run beside other load: once a fence's locking read found no
        /// row right after its own fencing insert, and once a saga's `INSERT marker; COMMIT`
        /// reported success while the cluster kept the fence's `aborted` row and none of the
        /// saga's writes. A replicated write had aborted the transaction, and no statement said
        /// so. Nothing on a single server.
        private func confirm(_ decisions: [SagaID: FenceDecision], instance: InstanceID, on conn: any SQLConnection) throws {
            guard let causal = dialect.causalWait else { return }
            _ = try conn.query(causal, [])
            let status = try statuses(Array(decisions.keys), instance: instance, on: conn)
            for (id, decision) in decisions where (try? MarkerTable.decision(status: status[id], saga: id)) != decision {
                throw UnconfirmedCommit(saga: id, status: status[id])
            }
        }

        /// The marker status of each of `ids` that has a row, by a plain read.
        private func statuses(_ ids: [SagaID], instance: InstanceID, on db: any SQLExecutor) throws -> [SagaID: String] {
            var status: [SagaID: String] = [:]
            for chunk in Self.chunks(ids) {
                let read = "SELECT saga_id, status FROM \(table) WHERE instance = ? AND saga_id IN (\(Self.list("?", chunk.count)))"
                for row in try db.query(read, [Self.key(instance)] + chunk.map(Self.key)) {
                    if let id = row[0].int64, let s = row[1].string { status[SagaID(UInt64(bitPattern: id))] = s }
                }
            }
            return status
        }

        /// A COMMIT that reported success, whose marker row does not say what it committed.
        package struct UnconfirmedCommit: Error, CustomStringConvertible {
            package let saga: SagaID
            package let status: String?
            package var description: String {
                "the COMMIT for \(saga) reported success, but its marker row reads \(status.map { "'\($0)'" } ?? "missing") (a cluster aborted the transaction without saying so)"
            }
        }

        /// How many times a fence rolled back by a conflict is run before its error is thrown
        /// (the sagas stay in doubt, for the next recovery).
        static let fenceAttempts = 10

        /// A transaction of ``inTransaction(on:_:)`` that the database rolled back: at a
        /// statement, or a COMMIT that failed (``CommitResult/failed(_:)``, never
        /// ``CommitResult/unknown(_:)``).
        struct TransactionLost: Error, CustomStringConvertible {
            let cause: any Error
            var description: String { "\(cause)" }
        }

        /// The claim check and the deletes, in chunks of at most 256 bound ids, in one
        /// transaction of its own on `conn`.
        package func deleteInTransaction(_ ids: [SagaID], owner: MarkerOwner, on conn: any SQLConnection) throws {
            guard !ids.isEmpty else { return }
            try inTransaction(on: conn) {
                try checkClaim(owner, on: conn)
                for chunk in Self.chunks(ids) {
                    try conn.execute("DELETE FROM \(table) WHERE instance = ? AND saga_id IN (\(Self.list("?", chunk.count)))\(keptRows)", [Self.key(owner.instance)] + chunk.map(Self.key))
                }
            }
        }

        /// `body` in a transaction of its own on `conn`: committed when it returns, rolled back
        /// when it throws.
        func inTransaction<T>(on conn: any SQLConnection, _ body: () throws -> T) throws -> T {
            try conn.begin()
            let value: T
            do { value = try body() } catch {
                try? conn.rollback()
                if dialect.isRolledBackByConflict(error) { throw TransactionLost(cause: error) }
                throw error
            }
            switch conn.commit() {
            case .committed: return value
            case .failed(let e) where dialect.isRolledBackByConflict(e): throw TransactionLost(cause: e)
            case .failed(let e), .unknown(let e): throw e
            }
        }

        /// On a database that keeps `aborted` rows (``SQLDialect/keepsAbortedMarkers``), the
        /// condition that leaves them out of deletes and of the orphan scan.
        private var keptRows: String { dialect.keepsAbortedMarkers ? " AND status = 'committed'" : "" }

        /// The saga ids of `instance`'s marker rows, redo rows left out (they go by the
        /// watermark, not by the journal).
        package func ids(instance: InstanceID, on db: any SQLExecutor) throws -> [SagaID] {
            try db.query("SELECT saga_id FROM \(table) WHERE instance = ? AND seq IS NULL\(keptRows) ORDER BY saga_id", [Self.key(instance)])
                .compactMap { $0[0].int64 }.map { SagaID(UInt64(bitPattern: $0)) }
        }

        package func maxID(instance: InstanceID, on db: any SQLExecutor) throws -> SagaID? {
            try db.query("SELECT MAX(saga_id) FROM \(table) WHERE instance = ?", [Self.key(instance)])
                .first?[0].int64.map { SagaID(UInt64(bitPattern: $0)) }
        }
    }
}
