import SagaFaultKit
import SagaTestKit
import Testing

/// RocksDB + a real 3-node MariaDB Galera cluster: a fresh database on the shared cluster
/// (`SAGA_GALERA_URL`, started by `scripts/test.sh`), the saga's connections through a
/// ``MySQLProxy`` to node 1, everything else to the first node that answers.
struct GaleraHarness: SagaHarness {
    var name: String { "rocksdb+galera" }
    func makeEnvironment() throws -> any HarnessEnvironment { try MySQLEnvironment(serverURL: try SharedGalera.url()) }
}

/// The same conformance suite, unchanged, on RocksDB + a Galera cluster.
@Suite("Conformance: RocksDB + MariaDB Galera cluster")
struct GaleraConformanceTests {
    @Test(arguments: ConformanceSuite.cases)
    func conformance(_ testCase: ConformanceCase) throws {
        let env = try GaleraHarness().makeEnvironment()
        defer { env.destroy() }
        try testCase.run(env)
    }
}
