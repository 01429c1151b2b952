import Foundation
@testable import Saga
import Testing

@Suite("Key locks")
struct KeyLocksTests {
    let k1 = Bytes("k1".utf8), k2 = Bytes("k2".utf8)

    @Test func disjointKeysNeverWait() throws {
        let locks = KeyLocks()
        try locks.lock(k1, for: SagaID(1), timeout: .zero)
        // Zero timeout: any wait would fail.
        try locks.lock(k2, for: SagaID(2), timeout: .zero)
        try locks.lock(k1, for: SagaID(1), timeout: .zero)  // re-entrant
    }

    @Test func aHeldKeyTimesOutNamingTheHolder() throws {
        let locks = KeyLocks()
        try locks.lock(k1, for: SagaID(1), timeout: .zero)
        let start = Date()
        let error = #expect(throws: SagaError.self) { try locks.lock(k1, for: SagaID(2), timeout: .milliseconds(100)) }
        #expect(Date().timeIntervalSince(start) >= 0.09)
        guard case .lockTimeout(let saga, let keys, let holders)? = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(saga == SagaID(2) && keys == [k1] && holders == [SagaID(1)])
    }

    @Test func releaseWakesTheWaiter() throws {
        let locks = KeyLocks()
        try locks.lock(k1, for: SagaID(1), timeout: .zero)
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.05) { locks.releaseAll(SagaID(1)) }
        try locks.lock(k1, for: SagaID(2), timeout: .seconds(5))
        #expect(locks.keys(heldBy: SagaID(2)) == [k1])
    }

    @Test func aCycleIsRefusedAtOnce() throws {
        let locks = KeyLocks()
        try locks.lock(k1, for: SagaID(1), timeout: .zero)
        try locks.lock(k2, for: SagaID(2), timeout: .zero)
        let waiting = DispatchSemaphore(value: 0)
        Thread.detachNewThread {
            // Saga 1 waits for k2 (held by 2) until 2 gives up.
            waiting.signal()
            try? locks.lock(self.k2, for: SagaID(1), timeout: .seconds(5))
            locks.releaseAll(SagaID(1))
        }
        waiting.wait()
        Thread.sleep(forTimeInterval: 0.1)
        let start = Date()
        let error = #expect(throws: SagaError.self) { try locks.lock(k1, for: SagaID(2), timeout: .seconds(5)) }
        #expect(Date().timeIntervalSince(start) < 1, "refused without waiting for the timeout")
        guard case .deadlock(_, let keys, let cycle)? = error else { Issue.record("got \(String(describing: error))"); return }
        #expect(keys == [k1])
        #expect(cycle == [SagaID(2), SagaID(1), SagaID(2)])
        locks.releaseAll(SagaID(2))
    }
}
