import SagaTestKit
import Testing

/// The conformance suite on RocksDB + SQLite. Each case gets fresh stores.
@Suite("Conformance: RocksDB + SQLite")
struct SQLiteConformanceTests {
    @Test(arguments: ConformanceSuite.cases)
    func conformance(_ testCase: ConformanceCase) throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        try testCase.run(env)
    }
}
