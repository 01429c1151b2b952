@testable import Saga
import Testing

/// The coordinator's bookkeeping, without a store: every transition and the rules between them.
@Suite("Saga book")
struct SagaBookTests {
    let a = SagaID(rawValue: 1), b = SagaID(rawValue: 2), c = SagaID(rawValue: 3)

    @Test func closingRefusesNewSagasAndLetsTheLastOneReleaseTheStores() throws {
        var book = SagaBook()
        try book.enter()
        try book.enter()
        let idle = book.close()
        #expect(!idle, "two sagas still run: the stores stay claimed")
        #expect(throws: SagaError.self) { try book.enter() }
        let first = book.leave(), last = book.leave()
        #expect(!first)
        #expect(last, "the last saga to leave a closed coordinator releases the stores")
        #expect(book.running == 0)
    }

    @Test func anIdleCloseReleasesAtOnce() {
        var book = SagaBook()
        let idle = book.close()
        #expect(idle)
    }

    @Test func theFirstStopReasonStays() {
        var book = SagaBook()
        book.stop("fsync failed")
        book.stop("something later")
        #expect(book.stopped == "fsync failed")
    }

    @Test func aPreparedSagaIsOwnedHereUntilItIsInDoubt() {
        var book = SagaBook()
        book.prepared(a)
        #expect(book.isOwnedHere(a), "running here: not recovery's")
        book.heldInDoubt(a)
        #expect(!book.isOwnedHere(a), "in doubt: recovery's to decide")
        #expect(book.inDoubt == [a])
        _ = book.finished(a, committed: true, gcThreshold: 100)
        #expect(book.inDoubt.isEmpty && book.active.isEmpty)
        #expect(book.isOwnedHere(a), "finished, record not yet collected: not recovery's either")
    }

    @Test func anAbandonedSagaLeavesNoTrace() {
        var book = SagaBook()
        book.prepared(a)
        book.heldInDoubt(b)
        book.abandoned(a)
        book.abandoned(b)
        #expect(book.active.isEmpty && book.inDoubt.isEmpty && book.finished.isEmpty)
        #expect(!book.isOwnedHere(a) && !book.isOwnedHere(b))
    }

    @Test func garbageCollectionIsDueAtTheThreshold() {
        var book = SagaBook()
        let due = [a, b, c].map { book.finished($0, committed: true, gcThreshold: 3) }
        #expect(due == [false, false, true])
    }

    @Test func journalFirstThenMarkers() {
        var book = SagaBook()
        _ = book.finished(a, committed: true, gcThreshold: 9)
        _ = book.finished(b, committed: true, gcThreshold: 9)
        let taken = book.takeFinished()
        #expect(taken == [a, b] && book.finished.isEmpty)
        let early = book.takeMarkersToDelete()
        #expect(early.isEmpty, "no marker goes before its journal record")
        book.collected(taken)
        #expect(!book.isOwnedHere(a), "the record is gone: nothing left for recovery to confuse")
        let markers = book.takeMarkersToDelete(), again = book.takeMarkersToDelete()
        #expect(markers == [a, b] && again.isEmpty)
    }

    @Test func failedCollectionsAreRetriedInOrder() {
        var book = SagaBook()
        _ = book.finished(a, committed: true, gcThreshold: 9)
        let first = book.takeFinished()
        _ = book.finished(b, committed: true, gcThreshold: 9)
        book.notCollected(first)
        #expect(book.finished == [a, b], "the failed ones come first")
        #expect(book.isOwnedHere(a))
        book.collected(book.takeFinished())
        let markers = book.takeMarkersToDelete()
        book.markersNotDeleted(markers)
        let retried = book.takeMarkersToDelete()
        #expect(retried == [a, b])
    }

    @Test func recordsFoundFinishedAtOpenAreCollected() {
        var book = SagaBook()
        book.foundFinished(c)
        #expect(book.isOwnedHere(c))
        let taken = book.takeFinished()
        #expect(taken == [c])
    }

    // MARK: What outcome lookups need

    @Test func aSagaStandsRunningThenInDoubtThenSettled() {
        var book = SagaBook()
        book.highestIssued = 0
        #expect(book.standing(of: a) == .notIssued)
        book.began(a, key: Array("k".utf8))
        #expect(book.standing(of: a) == .running)
        #expect(book.standing(ofKey: Array("k".utf8)).map { $0.1 } == .running)
        book.prepared(a)
        book.heldInDoubt(a)
        book.left(a)
        #expect(book.standing(of: a) == .inDoubt, "left run, undecided")
        #expect(book.standing(ofKey: Array("k".utf8)).map { $0.1 } == .inDoubt, "its key stays known while in doubt")
        _ = book.finished(a, committed: true, gcThreshold: 9)
        #expect(book.standing(of: a) == .settled)
        #expect(book.standing(ofKey: Array("k".utf8)) == nil, "decided: the key is SQL's to answer")
        #expect(book.committed(among: [a]) == [a])
    }

    @Test func aKeyIsForgottenWhenItsSagaLeavesDecided() {
        var book = SagaBook()
        book.began(b, key: Array("x".utf8))
        book.abandoned(b)
        book.left(b)
        #expect(book.standing(ofKey: Array("x".utf8)) == nil)
        #expect(book.standing(of: b) == .settled)
        #expect(book.standing(of: c) == .notIssued, "an id above the highest issued")
    }

    @Test func outcomesArePrunedOnlyBelowEverySagaNotSettled() {
        var book = SagaBook()
        book.began(a, key: nil)
        book.began(b, key: nil)
        book.began(c, key: nil)
        #expect(book.lowestUnsettled == 1)
        book.left(a)
        book.prepared(b)
        book.left(b)
        #expect(book.lowestUnsettled == 2, "b is prepared")
        _ = book.finished(b, committed: false, gcThreshold: 9)
        #expect(book.lowestUnsettled == 2, "finished, not yet collected")
        _ = book.takeFinished()
        book.collected([b])
        #expect(book.lowestUnsettled == 3, "c still runs")
        book.left(c)
        #expect(book.lowestUnsettled == 4, "everything issued is settled")
        #expect(book.committed(among: [b]).isEmpty, "b did not commit")
    }
}
