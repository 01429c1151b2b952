import Foundation
import Saga
import SagaTestKit
import Testing

/// The pre-images of a saga's journal record come from the body's own reads where it read a key
/// before writing it (the key stayed locked since), and from one multi-get for the others.
@Suite("Pre-images from the body's reads")
struct PreImageTests {
    /// Counts the keys read from the store, outside and inside multi-gets.
    final class CountingKV: KVStore, @unchecked Sendable {
        let base: any KVStore
        private let lock = NSLock()
        private var keys: [[Bytes]] = []
        init(_ base: any KVStore) { self.base = base }
        var reads: [[Bytes]] { lock.withLock { keys } }
        func reset() { lock.withLock { keys = [] } }
        func multiGet(_ keys: [Bytes]) throws -> [Bytes?] {
            lock.withLock { self.keys.append(keys) }
            return try base.multiGet(keys)
        }
        func write(_ batch: KVWriteBatch, sync: Bool) throws { try base.write(batch, sync: sync) }
        func journalGet(_ key: Bytes) throws -> Bytes? { try base.journalGet(key) }
        func journalEntries() throws -> [(key: Bytes, value: Bytes)] { try base.journalEntries() }
    }

    @Test func keysReadFirstAreNotReadAgainAndAreRestoredToWhatWasRead() throws {
        let env = try SQLiteEnvironment()
        defer { env.destroy() }
        try env.kvSet([("a", "a0"), ("b", "b0"), ("c", "c0")])
        let kv = CountingKV(env.kv)
        let c = try SagaCoordinator(kv: kv, sql: env.sql)
        defer { c.close() }
        kv.reset()
        let error = try expectSagaError {
            try c.run { saga in
                for k in ["a", "b"] { _ = try saga.kv.get(k) }
                _ = try saga.kv.get("a")  // a second read: the value already read
                for k in ["a", "b", "c"] { try saga.kv.put(k, k + "1") }
                try env.arrangeCommitFailure(in: saga)
            }
        }
        guard case .commitFailed(_, _, let restored) = error else { Issue.record("expected commitFailed, got \(error)"); return }
        #expect(restored == 3)
        let read = kv.reads.map { $0.map { String(decoding: $0, as: UTF8.self) } }
        #expect(read == [["a"], ["b"], ["c"], ["a", "b", "c"]], "a and b read once by the body, c (written unread) by the pre-image multi-get; then compensation reads what it checks: \(read)")
        for k in ["a", "b", "c"] { #expect(try env.kvGet(k) == k + "0", "\(k) restored") }
    }
}
