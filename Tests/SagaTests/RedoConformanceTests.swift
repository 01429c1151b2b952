import SagaTestKit
import Testing

/// The conformance suite in redo mode, on RocksDB + SQLite and on RocksDB + MariaDB. Each case
/// gets fresh stores.
@Suite("Conformance in redo mode: RocksDB + SQLite")
struct SQLiteRedoConformanceTests {
    @Test(arguments: ConformanceSuite.redoCases)
    func conformance(_ testCase: ConformanceCase) throws {
        let env = ModeEnvironment(try SQLiteHarness().makeEnvironment(), mode: .redo)
        defer { env.destroy() }
        try testCase.run(env)
    }
}

@Suite("Conformance in redo mode: RocksDB + MariaDB")
struct MySQLRedoConformanceTests {
    @Test(arguments: ConformanceSuite.redoCases)
    func conformance(_ testCase: ConformanceCase) throws {
        let env = ModeEnvironment(try MySQLHarness().makeEnvironment(), mode: .redo)
        defer { env.destroy() }
        try testCase.run(env)
    }
}
