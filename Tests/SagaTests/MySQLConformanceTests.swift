import SagaTestKit
import Testing

/// The same conformance suite, unchanged, on RocksDB + MariaDB.
@Suite("Conformance: RocksDB + MariaDB")
struct MySQLConformanceTests {
    @Test(arguments: ConformanceSuite.cases)
    func conformance(_ testCase: ConformanceCase) throws {
        let env = try MySQLHarness().makeEnvironment()
        defer { env.destroy() }
        try testCase.run(env)
    }
}
