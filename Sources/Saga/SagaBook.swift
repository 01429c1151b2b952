/// What a coordinator knows about its sagas: which are running, prepared, in doubt, finished
/// and waiting for garbage collection, and whether the coordinator is closed or stopped. One
/// value behind one lock (``SagaCoordinator`` keeps it in a ``Locked``); every change is one of
/// the named transitions below, so the rules live here and are tested without a store.
///
/// A saga moves like this (see <doc:Protocol>):
///
///     entered ──► prepared ──► finished ──► collected (journal) ──► markers deleted
///        │            │
///        │            └──► in doubt ──► finished (recovery)
///        └──► abandoned (nothing reached the KV store)
struct SagaBook: Sendable {
    /// Finished sagas whose journal records are still to be deleted, oldest first.
    private(set) var finished: [SagaID] = []
    /// The same ids, for lookups: a committed saga's record stays `prepared` until garbage
    /// collection deletes it, and recovery on demand must leave it alone.
    private(set) var recentlyFinished: Set<SagaID> = []
    /// Sagas whose journal records are gone but whose marker rows are still to be deleted.
    private(set) var markersToDelete: [SagaID] = []
    /// Sagas past `prepare` and not yet finished in this process.
    private(set) var active: Set<SagaID> = []
    /// Prepared sagas whose outcome could not be decided or finished, with since when each is
    /// in doubt (for one found prepared by recovery: when it was prepared); recovery retries them.
    private(set) var inDoubtSince: [SagaID: ContinuousClock.Instant] = [:]
    /// Bumped by every change of the in-doubt set, so that a caller can tell whether a
    /// transition moved it (and refresh its gauges) without comparing sets.
    private(set) var inDoubtChanges = 0
    private(set) var closed = false
    /// Sagas inside `run`: the KV store stays claimed until the last one has ended, also after
    /// `close()`.
    private(set) var running = 0
    /// Set when a store failed a write (or the instance claim was lost): nothing may run on top
    /// of it until a reopen lets recovery decide. The first reason is kept.
    private(set) var stopped: String?

    /// Prepared sagas whose outcome could not be decided or finished.
    var inDoubt: Set<SagaID> { Set(inDoubtSince.keys) }

    /// How many sagas are in doubt, and since when the oldest of them is.
    var inDoubtSummary: (count: Int, oldest: ContinuousClock.Instant?) {
        (inDoubtSince.count, inDoubtSince.values.min())
    }

    // MARK: What outcome lookups need

    /// Sagas inside `run` that have an id: their outcome is not known yet.
    private(set) var inFlight: Set<SagaID> = []
    /// The highest id handed out (in this open, or before it: the lease's start less one).
    var highestIssued: UInt64 = 0
    /// The caller keys of sagas in flight or in doubt, both ways.
    private(set) var keyOf: [SagaID: Bytes] = [:]
    /// Every saga of a key, not just the newest: a second run of a key that fails early must
    /// not hide the first one, still running or in doubt.
    private(set) var sagasOfKey: [Bytes: Set<SagaID>] = [:]
    /// Finished sagas that committed, until garbage collection records their outcome.
    private(set) var committedFinished: Set<SagaID> = []
    /// Sagas whose COMMIT outcome is unknown and that left no journal record (they wrote no KV
    /// key): nothing decides them in this open, and a late COMMIT may still land. The next open
    /// moves the instance's claim, after which none can.
    private(set) var unrecorded: Set<SagaID> = []

    // MARK: The coordinator

    /// A saga enters `run`; refused once the coordinator is closed.
    mutating func enter() throws(SagaError) {
        if closed { throw .misuse(.closed) }
        running += 1
    }

    /// A saga left `run`. Returns whether the stores are to be let go now: the coordinator is
    /// closed and this was the last saga running.
    mutating func leave() -> Bool {
        precondition(running > 0, "leave without enter")
        running -= 1
        return closed && release()
    }

    /// Closes the coordinator. Returns whether the stores can be let go at once (no saga
    /// running); otherwise the last one to ``leave()`` lets them go. True once only: a second
    /// close finds them let go already.
    mutating func close() -> Bool {
        closed = true
        return release()
    }

    /// Whether the stores were let go (the closing work is done once).
    private(set) var released = false

    private mutating func release() -> Bool {
        guard running == 0, !released else { return false }
        released = true
        return true
    }

    /// Stops the coordinator for good (until the stores are reopened); the first reason stays.
    mutating func stop(_ reason: String) {
        if stopped == nil { stopped = reason }
    }

    // MARK: A saga

    /// It got its id (called under the id lease's lock, so ids are registered in order).
    mutating func began(_ id: SagaID, key: Bytes?) {
        inFlight.insert(id)
        highestIssued = max(highestIssued, id.rawValue)
        if let key { keyOf[id] = key; sagasOfKey[key, default: []].insert(id) }
    }

    /// It left `run`: its key is forgotten unless it stays in doubt.
    mutating func left(_ id: SagaID) {
        inFlight.remove(id)
        if inDoubtSince[id] == nil { forgetKey(id) }
    }

    private mutating func forgetKey(_ id: SagaID) {
        guard let key = keyOf.removeValue(forKey: id) else { return }
        sagasOfKey[key]?.remove(id)
        if sagasOfKey[key]?.isEmpty == true { sagasOfKey[key] = nil }
    }

    /// Its COMMIT outcome is unknown and it has no journal record: see ``unrecorded``.
    mutating func undecidedWithoutRecord(_ id: SagaID) {
        unrecorded.insert(id)
    }

    /// Where `id` stands in this process, for ``SagaCoordinator/outcome(of:)``.
    func standing(of id: SagaID) -> Standing {
        if id.rawValue > highestIssued { return .notIssued }
        if inFlight.contains(id) && inDoubtSince[id] == nil { return .running }
        if inDoubtSince[id] != nil || unrecorded.contains(id) { return .inDoubt }
        return .settled
    }

    /// A saga that runs or is in doubt with caller key `key` (one in doubt first), and where
    /// it stands.
    func standing(ofKey key: Bytes) -> (SagaID, Standing)? {
        guard let ids = sagasOfKey[key], let any = ids.min() else { return nil }
        if let doubtful = ids.filter({ inDoubtSince[$0] != nil }).min() { return (doubtful, .inDoubt) }
        return (any, .running)
    }

    enum Standing: Equatable { case notIssued, running, inDoubt, settled }

    /// The lowest id not yet settled here (in flight, prepared, in doubt or finished and not
    /// collected), or the next id to hand out: outcome blocks are pruned only below it.
    var lowestUnsettled: UInt64 {
        let mins = [inFlight.min(), active.min(), inDoubtSince.keys.min(), finished.min()].compactMap { $0?.rawValue }
        return min(highestIssued + 1, mins.min() ?? .max)
    }

    /// Its forward batch is about to be written: from here it is this process's to finish.
    mutating func prepared(_ id: SagaID) {
        active.insert(id)
    }

    /// Prepared and undecided (or not undoable): kept until recovery decides it.
    mutating func heldInDoubt(_ id: SagaID, key: Bytes? = nil, at now: ContinuousClock.Instant = .now) {
        active.insert(id)
        if inDoubtSince[id] == nil {
            inDoubtSince[id] = now
            inDoubtChanges += 1
        }
        if let key { keyOf[id] = key; sagasOfKey[key, default: []].insert(id) }
    }

    /// No longer in doubt (decided, or nothing of it left).
    private mutating func leaveDoubt(_ id: SagaID) {
        if inDoubtSince.removeValue(forKey: id) != nil { inDoubtChanges += 1 }
    }

    /// Nothing of it is in the KV store: forgotten, nothing to collect.
    mutating func abandoned(_ id: SagaID) {
        active.remove(id)
        leaveDoubt(id)
        forgetKey(id)
    }

    /// Committed or compensated: its journal record waits for garbage collection. Returns
    /// whether `gcThreshold` finished sagas are now waiting.
    mutating func finished(_ id: SagaID, committed: Bool, gcThreshold: Int) -> Bool {
        active.remove(id)
        leaveDoubt(id)
        forgetKey(id)
        if committed { committedFinished.insert(id) }
        finished.append(id)
        recentlyFinished.insert(id)
        return finished.count >= gcThreshold
    }

    /// A record found finished (`compensated`) when the journal was read at open.
    mutating func foundFinished(_ id: SagaID) {
        finished.append(id)
        recentlyFinished.insert(id)
    }

    /// Whether a `prepared` record belongs to a saga this process runs or has finished, and
    /// is therefore not recovery's to decide. In-doubt sagas are recovery's.
    func isOwnedHere(_ id: SagaID) -> Bool {
        (active.contains(id) && inDoubtSince[id] == nil) || recentlyFinished.contains(id)
    }

    // MARK: Garbage collection

    /// The finished sagas whose journal records are to be deleted now; they leave the book
    /// until ``collected(_:)`` or ``notCollected(_:)`` says how that went.
    mutating func takeFinished() -> [SagaID] {
        defer { finished.removeAll() }
        return finished
    }

    /// Which of `ids` (taken by ``takeFinished()``) committed: their outcome is recorded when
    /// their journal records are deleted.
    func committed(among ids: [SagaID]) -> [SagaID] {
        ids.filter(committedFinished.contains)
    }

    /// Their journal records are deleted (synced): their marker rows are next.
    mutating func collected(_ ids: [SagaID]) {
        for id in ids { recentlyFinished.remove(id); committedFinished.remove(id) }
        markersToDelete.append(contentsOf: ids)
    }

    /// Deleting their journal records failed: they wait for the next collection, first.
    mutating func notCollected(_ ids: [SagaID]) {
        finished.insert(contentsOf: ids, at: 0)
    }

    /// The marker rows to delete now.
    mutating func takeMarkersToDelete() -> [SagaID] {
        defer { markersToDelete.removeAll() }
        return markersToDelete
    }

    /// Deleting them failed: they wait for the next collection.
    mutating func markersNotDeleted(_ ids: [SagaID]) {
        markersToDelete.append(contentsOf: ids)
    }
}
