/// What a node's two stores hold about its sagas, read without deciding, writing or locking
/// anything: the journal records and their states, this instance's marker rows, and for every
/// saga still `prepared` what recovery would do with it and why. For operator tools (the `saga`
/// tool's `status`, `inspect` and `verify-journal`) on the stores of a node that is not running.
///
/// Nothing here opens a coordinator, runs recovery, creates the instance record or the marker
/// table: the KV store is only read, and the SQL side only through `SELECT`s on the connection
/// the caller passes (which the tool opens read-only).
package struct NodeInspection: Sendable {
    /// A marker row of this instance.
    package struct Marker: Sendable, Equatable {
        /// `committed` or `aborted`.
        package let status: String
        /// Redo mode's commit sequence: the row is a redo row (it carries after-images).
        package let sequence: UInt64?
    }

    /// What recovery would do with a `prepared` saga.
    package enum Verdict: String, Sendable, CaseIterable {
        /// Its marker says committed: recovery only records it (the KV side holds its writes),
        /// garbage collection then deletes record and marker. Nothing in doubt.
        case committed
        /// No marker: the COMMIT outcome is undecided. Recovery fences it (an `aborted` row, or
        /// finds the saga's own `committed` row if a late COMMIT landed) and compensates.
        case undecided
        /// An `aborted` marker holds its id (fenced): its transaction can never commit.
        /// Recovery compensates it.
        case fenced
        /// A key holds bytes that are neither the saga's pre- nor its after-image. If recovery
        /// has to undo the saga, it stops there and leaves it held: a human repairs the key.
        case foreignWrite
        /// The SQL database could not be read: nothing can be decided until it is back.
        case databaseUnreachable
    }

    /// One key of a prepared saga, with the value the KV store holds now.
    package struct Key: Sendable {
        package let entry: JournalRecord.Entry
        /// The current value (nil: absent); nil when the KV store could not be read.
        package let current: Bytes?
        /// Whether ``current`` equals the pre-image, the after-image, or neither; or whether a
        /// newer prepared saga wrote the key since (then its value is that saga's: the older one
        /// finished before the newer could lock the key, so it committed).
        package enum Match: String, Sendable { case afterImage, preImage, neither, newerSaga }
        package let match: Match
    }

    /// A saga still `prepared` in the journal.
    package struct Pending: Sendable {
        package let record: JournalRecord
        /// This instance's marker row for the saga (nil: none, or the database was not read).
        package let marker: Marker?
        package let keys: [Key]
        package let verdict: Verdict
        /// Why, in one sentence for an operator.
        package let reason: String
        /// Milliseconds since ``JournalRecord/preparedAt`` (records of format version 3).
        package let ageMilliseconds: UInt64?
        package var saga: SagaID { record.saga }
        /// Whether anything about it is undecided or held: everything but ``Verdict/committed``.
        package var inDoubt: Bool { verdict != .committed }
    }

    /// A journal entry that cannot be decoded.
    package struct Damaged: Sendable {
        package let key: Bytes
        package let saga: SagaID?
        package let reason: String
    }

    /// The journal's instance (nil: the journal has no instance record yet, or it is damaged).
    package let instance: InstanceID?
    /// Journal records by state (`prepared`, `committed`, `compensated`), plus `damaged`.
    package let journalCounts: [String: Int]
    /// This instance's marker rows: `committed`, `aborted` (markers) and `redo` (redo rows);
    /// nil when the database could not be read.
    package let markerCounts: [String: Int]?
    /// Why the SQL side could not be read, if it could not.
    package let sqlError: String?
    /// Whether the instance table holds a claim this journal made (nil: not read). false means
    /// another journal opened this instance since (see ``SagaError/Misuse/instanceClaimedByAnotherJournal(_:)``).
    package let claimIsThisJournals: Bool?
    /// Redo mode's durable watermark (nil: none in the journal).
    package let redoWatermark: UInt64?
    /// Every saga still `prepared`, oldest id first.
    package let pending: [Pending]
    /// Journal entries that cannot be decoded (every one of the journal, not only records).
    package let damaged: [Damaged]

    /// The pending sagas that are not known committed.
    package var inDoubt: [Pending] { pending.filter(\.inDoubt) }
    /// Milliseconds since the oldest in-doubt saga was prepared (records that carry the time).
    package var oldestInDoubtAgeMilliseconds: UInt64? { inDoubt.compactMap(\.ageMilliseconds).max() }
    /// Whether a human (or at least a recovery run) is needed: anything in doubt, damaged, a
    /// database that cannot be read, or an instance claimed by another journal.
    package var needsAttention: Bool {
        !inDoubt.isEmpty || !damaged.isEmpty || sqlError != nil || claimIsThisJournals == false
    }

    /// Reads the node.
    ///
    /// - Parameters:
    ///   - kv: the node's KV store (only read).
    ///   - sql: a connection to its SQL database, or why there is none (unreachable); only
    ///     `SELECT`s run on it.
    ///   - markerTable: the marker table's name (the backend's ``SQLDatabase/markerTable``).
    ///   - now: milliseconds since 1970, for ages.
    package static func read(kv: any KVStore, sql: Result<any SQLExecutor, any Error>, markerTable: String, now: UInt64 = JournalRecord.now()) throws -> NodeInspection {
        guard MarkerTable.isValidName(markerTable) else {
            throw SagaError.misuse(.invalidConfiguration("invalid marker table name \"\(markerTable)\": use letters, digits and underscores, not starting with a digit"))
        }
        let journal = try kv.journalEntries()
        let (records, damaged) = decode(journal)
        var instanceRecord: InstanceRecord?
        if let raw = journal.first(where: { $0.key == InstanceID.journalKey })?.value {
            instanceRecord = try? InstanceRecord(decoding: raw)
        }
        var counts: [String: Int] = ["prepared": 0, "committed": 0, "compensated": 0, "damaged": damaged.filter { $0.saga != nil }.count]
        for r in records { counts["\(r.state)", default: 0] += 1 }
        let watermark = journal.contains { $0.key == RedoLog.watermarkKey } ? try? RedoLog.durableWatermark(in: kv) : nil

        // The SQL side: this instance's marker rows and its claim.
        var markers: [SagaID: Marker]?
        var markerCounts: [String: Int]?
        var sqlError: String?
        var claimMatches: Bool?
        switch sql {
        case .failure(let error):
            sqlError = "\(error)"
        case .success(let db):
            if let instanceRecord {
                do {
                    let key = MarkerTable.Statements.key(instanceRecord.id)
                    var found: [SagaID: Marker] = [:]
                    var c = ["committed": 0, "aborted": 0, "redo": 0]
                    for row in try db.query("SELECT saga_id, status, seq FROM \(markerTable) WHERE instance = ?", [key]) {
                        guard let id = row[0].int64, let status = row[1].string else { continue }
                        let marker = Marker(status: status, sequence: row[2].int64.map { UInt64(bitPattern: $0) })
                        found[SagaID(UInt64(bitPattern: id))] = marker
                        c[marker.sequence != nil ? "redo" : status, default: 0] += 1
                    }
                    markers = found
                    markerCounts = c
                    let held = try db.query("SELECT claim FROM \(markerTable)_instances WHERE instance = ?", [key]).first?[0].int64
                        .map { UInt64(bitPattern: $0) }
                    // No row yet: no journal has claimed it (nothing to contradict).
                    claimMatches = held.map { ([instanceRecord.current] + instanceRecord.pending).contains($0) } ?? true
                } catch {
                    sqlError = "\(error)"
                }
            } else {
                // A journal without an instance record has never been opened by a coordinator
                // (or its record is damaged, listed in `damaged`): no marker row can be its own.
                markers = [:]
                markerCounts = ["committed": 0, "aborted": 0, "redo": 0]
            }
        }

        // Newest first, as recovery adopts locks: a key a newer prepared saga wrote is that
        // saga's, and its value says nothing about an older saga.
        let prepared = records.filter { $0.state == .prepared }.sorted { $0.saga > $1.saga }
        let currents = try kv.multiGet(prepared.flatMap { $0.entries.map(\.key) })
        var next = currents.makeIterator()
        var newer: Set<Bytes> = []
        var pending: [Pending] = []
        for record in prepared {
            let keys = record.entries.map { entry -> Key in
                let current = next.next() ?? nil
                let match: Key.Match = newer.contains(entry.key) ? .newerSaga
                    : current == entry.afterImage ? .afterImage : current == entry.preImage ? .preImage : .neither
                return Key(entry: entry, current: current, match: match)
            }
            newer.formUnion(record.entries.map(\.key))
            let marker = markers?[record.saga]
            let age = record.preparedAt.flatMap { $0 > 0 ? now &- min(now, $0) : nil }
            let (verdict, reason) = judge(marker: marker, keys: keys, markersRead: markers != nil)
            pending.append(Pending(record: record, marker: marker, keys: keys, verdict: verdict, reason: reason, ageMilliseconds: age))
        }
        pending.reverse()
        return NodeInspection(
            instance: instanceRecord?.id, journalCounts: counts, markerCounts: markerCounts, sqlError: sqlError,
            claimIsThisJournals: claimMatches, redoWatermark: watermark, pending: pending, damaged: damaged)
    }

    private static func judge(marker: Marker?, keys: [Key], markersRead: Bool) -> (Verdict, String) {
        if marker?.status == "committed" {
            return (.committed, "committed in SQL (marker row present): recovery or garbage collection only removes the record")
        }
        if let foreign = keys.first(where: { $0.match == .neither }) {
            return (.foreignWrite, "key \"\(foreign.entry.key.debugText)\" holds \(describe(foreign.current)), neither the pre-image \(describe(foreign.entry.preImage)) nor the after-image \(describe(foreign.entry.afterImage)): written behind the saga; recovery leaves the saga held until the key is repaired (to the pre- or the after-image)")
        }
        if !markersRead {
            return (.databaseUnreachable, "database unreachable: its marker row cannot be read, so the COMMIT outcome cannot be decided until the database is back (it may well be committed)")
        }
        if marker?.status == "aborted" {
            return (.fenced, "fenced (an aborted marker holds its id: its transaction can never commit); recovery will compensate")
        }
        return (.undecided, "no marker: COMMIT outcome undecided, recovery will fence (and compensate unless a late COMMIT landed)")
    }

    /// Decodes every journal entry; returns the saga records and the entries that are damaged.
    private static func decode(_ journal: [(key: Bytes, value: Bytes)]) -> ([JournalRecord], [Damaged]) {
        var records: [JournalRecord] = []
        var damaged: [Damaged] = []
        for (key, value) in journal {
            if let id = JournalRecord.saga(fromKey: key) {
                do {
                    guard id.isValid else { throw JournalRecord.DecodingError(reason: "saga id \(id.rawValue) is outside 1...\(SagaID.maxValid.rawValue)") }
                    let record = try JournalRecord(decoding: value)
                    guard record.saga == id else { throw JournalRecord.DecodingError(reason: "record names \(record.saga) but is stored under \(id)") }
                    guard record.state != .redo else { throw JournalRecord.DecodingError(reason: "a redo record in the journal") }
                    records.append(record)
                } catch {
                    damaged.append(Damaged(key: key, saga: id, reason: "\(error)"))
                }
                continue
            }
            do {
                switch key {
                case InstanceID.journalKey: _ = try InstanceRecord(decoding: value)
                case IDLease.ceilingKey: _ = try IDLease.decode(value)
                case RedoLog.watermarkKey: _ = try RedoLog.decodeWatermark(value)
                case OutcomeLog.floorKey: _ = try OutcomeLog.decodeFloor(value)
                case _ where OutcomeLog.block(fromKey: key) != nil: _ = try OutcomeLog.decode(value, key: key)
                default: throw JournalRecord.DecodingError(reason: "not a key Saga writes in the journal")
                }
            } catch let SagaError.journalCorrupt(_, _, reason) {
                damaged.append(Damaged(key: key, saga: nil, reason: reason))
            } catch {
                damaged.append(Damaged(key: key, saga: nil, reason: "\(error)"))
            }
        }
        return (records, damaged)
    }

    /// Every journal entry that cannot be decoded, with the reason (what `verify-journal`
    /// reports), and how many entries were checked.
    package static func verifyJournal(_ kv: any KVStore) throws -> (checked: Int, damaged: [Damaged]) {
        let journal = try kv.journalEntries()
        return (journal.count, decode(journal).1)
    }
}
