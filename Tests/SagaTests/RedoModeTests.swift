import Foundation
@testable import Saga
import SagaTestKit
import Testing

/// What redo mode changes for a reader of the KV store outside sagas, shown against compensate
/// mode on the same real stores.
@Suite("Redo mode against compensate mode")
struct RedoModeTests {
    @Test func compensateModeLetsAReaderSeeAnUncommittedValue() throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let seen = try ConformanceSuite.readerSawUncommitted(env, sagas: 40)
        #expect(seen > 0, "compensate mode writes the KV side before COMMIT: a reader sees it until compensation undoes it")
    }

    @Test func redoModeNeverDoes() throws {
        let env = ModeEnvironment(try SQLiteHarness().makeEnvironment(), mode: .redo)
        defer { env.destroy() }
        #expect(try ConformanceSuite.readerSawUncommitted(env, sagas: 40) == 0)
    }

    @Test func redoModeIsRefusedOnACluster() throws {
        // A database that keeps aborted markers (a Galera cluster) is named in the error.
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let clustered = ClusterLike(env.sql)
        let error = try expectSagaError { try SagaCoordinator(kv: env.kv, sql: clustered, configuration: .init(mode: .redo)) }
        guard case .misuse(.invalidConfiguration(let why)) = error else { Issue.record("expected invalidConfiguration, got \(error)"); return }
        #expect(why.contains("redo mode is not supported on a clustered database"))
    }

    @Test func configurationOutOfRangeIsRefused() throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        for config in [SagaCoordinator.Configuration(mode: .redo, checkpointEvery: 0), .init(mode: .redo, checkpointInterval: .zero)] {
            let error = try expectSagaError { try env.coordinator(config) }
            guard case .misuse(.invalidConfiguration(let why)) = error else { Issue.record("expected invalidConfiguration, got \(error)"); continue }
            #expect(why.contains("checkpoint"), "the error names the setting: \(why)")
        }
    }
}

/// The same database, as a cluster's dialect would describe it.
final class ClusterLike: ForwardingWhatTheCompilerAsks, @unchecked Sendable {
    override var dialect: SQLDialect {
        var d = base.dialect
        d.keepsAbortedMarkers = true
        return d
    }
}
