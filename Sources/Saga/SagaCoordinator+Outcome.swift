// Looking up whether a saga committed, by its id or by the caller's key (see <doc:Outcomes>).
// Committed only when SQL proves it (a key row or a marker row), or the outcome log that garbage
// collection wrote before the marker row went; unknown while anything could still change it.

/// What a coordinator can prove about a saga's outcome (``SagaCoordinator/outcome(of:)``,
/// ``SagaCoordinator/outcome(ofKey:)``).
public enum SagaOutcome: Sendable, Equatable, CustomStringConvertible {
    /// The saga committed (its SQL transaction, with its marker or key row): both stores hold
    /// its writes (in redo mode, the KV side once applied or replayed).
    case committed(SagaID)
    /// Provably not committed, and it never will be: nothing of it is in either store (or
    /// what reached the KV store was undone). For a key: no saga with this key committed
    /// within the retention, and none of this coordinator is running or undecided with it.
    case notCommitted
    /// Not known now; ``Reason`` says why and whether asking later can help.
    case unknown(Reason)

    public enum Reason: Sendable, Equatable, CustomStringConvertible {
        /// The saga is running in this process: ask again once `run` has returned.
        case running
        /// The saga's COMMIT outcome is undecided (``SagaError/inDoubt(saga:underlying:)``):
        /// ``SagaCoordinator/recover()`` (or the next open) decides it.
        case inDoubt
        /// The id is older than the outcome retention
        /// (``SagaCoordinator/Configuration/outcomeRetention``) and no record of it is left.
        case expired
        /// This coordinator's instance never handed out this id.
        case notIssued
        /// The SQL database or the journal could not be read; the message says why.
        case unavailable(String)

        public var description: String {
            switch self {
            case .running: "the saga is still running"
            case .inDoubt: "the saga's COMMIT outcome is undecided until recovery"
            case .expired: "past the outcome retention"
            case .notIssued: "no such saga id was issued by this instance"
            case .unavailable(let why): "cannot be read now: \(why)"
            }
        }
    }

    public var description: String {
        switch self {
        case .committed(let id): "committed (\(id))"
        case .notCommitted: "not committed"
        case .unknown(let reason): "unknown: \(reason)"
        }
    }
}

extension SagaCoordinator {
    /// Whether the saga run with caller key `key` (``run(key:_:)-4bh0f``) committed.
    ///
    /// - ``SagaOutcome/committed(_:)`` when the key's row is committed in SQL, with the saga
    ///   that holds it (of this instance, or of another coordinator sharing the database).
    /// - ``SagaOutcome/unknown(_:)`` while a saga of this coordinator with the key is running
    ///   or undecided (in doubt, until ``recover()`` or the next open decides it), or when the
    ///   database cannot be read.
    /// - ``SagaOutcome/notCommitted`` otherwise: no row. Rows are kept for
    ///   ``Configuration/outcomeRetention``; after that the key is forgotten and answers
    ///   `notCommitted` (and runs again). A saga with the key that another coordinator is
    ///   running right now may still commit.
    ///
    /// Blocking (one SQL read); throws only misuse (an empty or too long key).
    public func outcome(ofKey key: String) throws(SagaError) -> SagaOutcome {
        guard let bytes = try Self.callerKey(key) else { return .notCommitted }
        if let (_, standing) = book.withLock({ $0.standing(ofKey: bytes) }) {
            return .unknown(standing == .inDoubt ? .inDoubt : .running)
        }
        do {
            let row = try withLookupConnection { conn in try markers.keyRow(bytes, on: conn) }
            if let row { return .committed(row.saga) }
        } catch {
            return .unknown(.unavailable("\(error)"))
        }
        // A saga of this coordinator that took the key since the first look may still commit.
        if let (_, standing) = book.withLock({ $0.standing(ofKey: bytes) }) {
            return .unknown(standing == .inDoubt ? .inDoubt : .running)
        }
        return .notCommitted
    }

    /// Whether saga `id` of this coordinator's instance committed.
    ///
    /// - ``SagaOutcome/committed(_:)`` when its marker row says so, or, after garbage
    ///   collection deleted the marker, the outcome it recorded in the journal.
    /// - ``SagaOutcome/notCommitted`` when the id was issued by this instance, its outcome is
    ///   within the retention, and it has no committed marker, no recorded commit and no
    ///   undecided journal record.
    /// - ``SagaOutcome/unknown(_:)`` while it runs or is in doubt, for an id this instance never
    ///   issued, past ``Configuration/outcomeRetention`` (``SagaOutcome/Reason/expired``), or
    ///   when a store cannot be read.
    ///
    /// Blocking (one SQL read and a journal read or two). Costs the sagas nothing: garbage
    /// collection records one bit per committed saga, in a block per 4096 ids, in the synced
    /// batch it writes anyway.
    public func outcome(of id: SagaID) -> SagaOutcome {
        switch book.withLock({ $0.standing(of: id) }) {
        case .notIssued: return .unknown(.notIssued)
        case .running: return .unknown(.running)
        case .inDoubt: return .unknown(.inDoubt)
        case .settled: break
        }
        // Marker first, then the journal: garbage collection records the outcome and deletes
        // the record before it deletes the marker, so a marker found gone was recorded.
        do {
            let status = try withLookupConnection { conn in try markers.status(of: id, instance: instance, on: conn) }
            if status == "committed" { return .committed(id) }
        } catch {
            return .unknown(.unavailable("\(error)"))
        }
        do {
            if let raw = try kv.journalGet(JournalRecord.key(for: id)) {
                let record = try JournalRecord(decoding: raw)
                // Prepared, without a committed marker, and not in doubt here: being decided
                // right now (recovery holds it), or left by a crash this open has not decided.
                if record.state == .prepared { return .unknown(.inDoubt) }
                return .notCommitted
            }
            if try outcomes.isCommitted(id) { return .committed(id) }
        } catch {
            return .unknown(.unavailable("\(error)"))
        }
        return id.rawValue < outcomes.floor ? .unknown(.expired) : .notCommitted
    }

    /// `body` on a pooled connection, after the cluster's causal wait (a read on one node sees
    /// every write certified before it).
    private func withLookupConnection<T>(_ body: (any SQLConnection) throws -> T) throws -> T {
        let conn = try pool.take().connection
        do {
            if let causal = markers.dialect.causalWait { _ = try conn.query(causal, []) }
            let value = try body(conn)
            pool.giveBack(conn)
            return value
        } catch {
            conn.close()
            throw error
        }
    }
}
