import Foundation
import Saga

// The cases of the conformance suite that are redo mode's own: where compensate mode undoes a
// KV write, redo mode never made it; where compensate mode's journal holds a record, redo
// mode's marker row holds the after-images, and a checkpoint the watermark.

extension ConformanceSuite {
    /// Compensate mode's cases that test its own mechanism (compensation, its journal records,
    /// their collection), replaced in redo mode by ``redoOwnCases``.
    static let compensateOnly: Set<String> = [
        "a failed KV write commits nothing", "a foreign write stops compensation",
        "garbage collection deletes journal first, then markers",
    ]

    static let redoOwnCases: [ConformanceCase] = [
        ConformanceCase(name: "redo: a failed KV apply after COMMIT is replayed at the next open", run: redoFailedApplyIsReplayed),
        ConformanceCase(name: "redo: KV writes lost after COMMIT come back from the redo rows", run: redoLostWritesAreReplayed),
        ConformanceCase(name: "redo: a checkpoint makes the watermark durable before deleting rows", run: redoCheckpointOrder),
        ConformanceCase(name: "redo: readers outside sagas never see a value SQL did not commit", run: redoReadersSeeOnlyCommitted),
        ConformanceCase(name: "redo: a damaged redo row stops the open", run: redoDamagedRowIsRefused),
    ]

    /// The redo rows of the environment's instance: saga id and sequence.
    static func redoRows(_ env: any HarnessEnvironment) throws -> [(saga: Int64, seq: Int64)] {
        let instance = Int64(bitPattern: try SagaCoordinator.instance(in: env.kv).rawValue)
        return try env.sqlQuery("SELECT saga_id, seq FROM saga_markers WHERE instance = ? AND seq IS NOT NULL ORDER BY seq", [.integer(instance)])
            .map { ($0[0].int64 ?? -1, $0[1].int64 ?? -1) }
    }

    static func redoFailedApplyIsReplayed(_ env: any HarnessEnvironment) throws {
        try env.kvSet([("k", "k0")])
        let c = try env.coordinator(.init(hooks: StepTrigger(.fail, at: .committed, phase: .run)))
        let id = try c.run { saga in
            try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("k"), .integer(1)])
            try saga.kv.put("k", "k1")
            return saga.id
        }
        try check(try env.row("k") == 1, "COMMIT succeeded: the saga is committed")
        try check(try env.kvGet("k") == "k0", "the KV batch was not written")
        let refused = try expectSagaError { try c.run { saga in try saga.kv.put("other", "v") } }
        guard case .stopped = refused else { throw ConformanceFailure(description: "nothing runs on top of a KV store that failed a write: \(refused)") }
        c.close()
        try env.reopen()
        let reopened = try env.coordinator()
        try check(try env.kvGet("k") == "k1", "replayed at open")
        try check(try redoRows(env).isEmpty, "the checkpoint after replay deleted the row")
        try check(reopened.inDoubt.isEmpty, "nothing in doubt")
        _ = id
        reopened.close()
    }

    static func redoLostWritesAreReplayed(_ env: any HarnessEnvironment) throws {
        // What a power loss of the KV store does to unsynced batches: written, then gone. The
        // rows above the durable watermark bring them back, in sequence order.
        var c: SagaCoordinator? = try env.coordinator(.init(checkpointEvery: 1_000_000, checkpointInterval: .seconds(3600)))
        for i in 0..<30 {
            try c?.run { saga in
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("r\(i)"), .integer(Int64(i))])
                try saga.kv.put("r\(i % 5)", "v\(i)")  // five keys, each written six times
                try saga.kv.put("s\(i)", "w\(i)")
            }
        }
        let rows = try redoRows(env).count
        try check(rows == 30, "30 rows above the watermark, got \(rows)")
        // The store loses every one of them (a reader outside sagas: no saga runs now).
        try env.kvSet((0..<5).map { ("r\($0)", nil) } + (0..<30).map { ("s\($0)", "stale") })
        // No checkpoint at close for this test: the coordinator is dropped, as a crash would.
        c = nil
        try env.reopen()
        let reopened = try env.coordinator()
        for k in 0..<5 { try check(try env.kvGet("r\(k)") == "v\(25 + k)", "r\(k): the last write in sequence order") }
        for i in 0..<30 { try check(try env.kvGet("s\(i)") == "w\(i)", "s\(i) replayed") }
        try check(try redoRows(env).isEmpty, "rows deleted once the new watermark is durable")
        reopened.close()
        try env.reopen()
        let again = try env.coordinator()
        try check(try env.kvGet("r0") == "v25", "a second open replays nothing that changes a value")
        again.close()
    }

    static func redoCheckpointOrder(_ env: any HarnessEnvironment) throws {
        // Rows stay when their deletion fails: a row may outlive the watermark, never the other
        // way round. The next open deletes the rows the watermark covers, replaying nothing.
        let failDelete = StepTrigger(.fail, at: .checkpointed, repeats: true)
        var c: SagaCoordinator? = try env.coordinator(.init(hooks: failDelete, checkpointEvery: 1_000_000, checkpointInterval: .seconds(3600)))
        for i in 0..<20 { try c?.run { saga in try saga.kv.put("g\(i)", "\(i)") } }
        try check(try redoRows(env).count == 20, "20 rows before the checkpoint")
        do { try c?.collectGarbage(); throw ConformanceFailure(description: "the checkpoint should have failed at checkpointed") } catch is SagaError {}
        try check(try redoRows(env).count == 20, "rows outlive the durable watermark")
        c = nil
        try env.kvSet((0..<20).map { ("g\($0)", "changed") })
        try env.reopen()
        c = try env.coordinator(.init(checkpointEvery: 8))
        try check(try redoRows(env).isEmpty, "rows at or below the watermark deleted at open")
        try check(try env.kvGet("g0") == "changed", "nothing at or below the durable watermark is replayed")
        for i in 0..<50 { try c?.run { saga in try saga.kv.put("g\(i)", "x") } }
        let left = try redoRows(env).count
        try check(left < 8, "checkpoints keep the rows below checkpointEvery: \(left)")
        c?.close()
        try check(try redoRows(env).isEmpty, "close checkpoints the rest")
    }

    static func redoReadersSeeOnlyCommitted(_ env: any HarnessEnvironment) throws {
        try check(try readerSawUncommitted(env) == 0, "a reader saw a value SQL did not commit")
    }

    /// Runs sagas of which every other one fails at COMMIT, while the KV store is read directly,
    /// outside sagas, all along: by another thread, and at every protocol step (so the moments
    /// between two steps are read for sure, whatever the scheduler does). Returns how many reads
    /// saw a value that SQL never committed. Redo mode: none. Compensate mode writes the KV side
    /// before COMMIT, and a reader sees it until compensation undoes it.
    public static func readerSawUncommitted(_ env: any HarnessEnvironment, sagas: Int = 200) throws -> Int {
        let seen = TestShared(0)
        let reads = TestShared(0)
        @Sendable func readAll() {
            for k in 0..<4 {
                if let v = try? env.kv.get(Bytes("u\(k)".utf8)), String(decoding: v, as: UTF8.self).hasPrefix("failed") { seen.add(1) }
                reads.add(1)
            }
        }
        struct Peek: SagaHooks {
            let read: @Sendable () -> Void
            func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws { read() }
        }
        let c = try env.coordinator(.init(hooks: Peek(read: readAll)))
        defer { c.close() }
        let done = TestShared(false)
        let reader = Thread { while !done.value { readAll() } }
        reader.start()
        for i in 0..<sagas {
            let fail = i % 2 == 1
            _ = try? c.run { saga in
                try saga.kv.put("u\(i % 4)", fail ? "failed\(i)" : "committed\(i)")
                try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("u\(i)"), .integer(Int64(i))])
                if fail { try env.arrangeCommitFailure(in: saga) }
            }
        }
        done.value = true
        while !reader.isFinished { Thread.sleep(forTimeInterval: 0.001) }
        try check(reads.value > sagas * 4, "the store was read all along (\(reads.value) reads)")
        let committed = try env.sqlQuery("SELECT COUNT(*) FROM saga_test WHERE k LIKE 'u%'").first?[0].int64 ?? -1
        try check(committed == Int64(sagas / 2), "half of the sagas committed (\(committed))")
        return seen.value
    }

    static func redoDamagedRowIsRefused(_ env: any HarnessEnvironment) throws {
        var c: SagaCoordinator? = try env.coordinator(.init(checkpointEvery: 1_000_000, checkpointInterval: .seconds(3600)))
        try c?.run { saga in try saga.kv.put("d", "1") }
        c = nil
        try env.sqlExecute("UPDATE saga_markers SET redo = ? WHERE seq IS NOT NULL", [.blob([0x53, 0x01, 0x04])])
        try env.reopen()
        let error = try expectSagaError { try env.coordinator() }
        guard case .journalCorrupt = error else { throw ConformanceFailure(description: "expected journalCorrupt, got \(error)") }
        try check("\(error)".contains("redo row"), "the error names the redo row: \(error)")
        try check(try redoRows(env).count == 1, "the row is kept for a human")
    }
}

/// A value shared between a test's threads.
public final class TestShared<Value: Sendable>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    public init(_ value: Value) { stored = value }
    public var value: Value {
        get { lock.withLock { stored } }
        set { lock.withLock { stored = newValue } }
    }
}

extension TestShared where Value == Int {
    public func add(_ n: Int) { lock.withLock { stored += n } }
}
