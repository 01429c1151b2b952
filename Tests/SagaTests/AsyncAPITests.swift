import Saga
import SagaTestKit
import Testing

@Suite("Async API")
struct AsyncAPITests {
    @Test func runsSagasFromAsyncCode() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        let results = try await withThrowingTaskGroup(of: Int.self) { group in
            for i in 0..<8 {
                group.addTask {
                    try await c.run { saga in
                        try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text("a\(i)"), .integer(Int64(i))])
                        try saga.kv.put("a\(i)", "\(i)")
                        return i
                    }
                }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        #expect(results.sorted() == Array(0..<8))
        for i in 0..<8 {
            #expect(try env.row("a\(i)") == Int64(i))
            #expect(try env.kvGet("a\(i)") == "\(i)")
        }
    }

    @Test func asyncErrorsAreTyped() async throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let c = try env.coordinator()
        do {
            _ = try await c.run { saga in try saga.kv.put("", "x") }
            Issue.record("an empty key must be refused")
        } catch {
            guard case .misuse(.emptyKey) = error else { Issue.record("got \(error)"); return }
        }
    }
}
