import Foundation
import SagaFaultKit
import MySQLBackend
import SQLiteBackend
import Saga
import SagaTestKit
import Testing

/// `nothingWritten` says that running the work again cannot apply it twice; `isRetryable` says
/// that it may also succeed. A body's own "insufficient funds" is the first without the second:
/// a retry loop on it would spin for ever.
@Suite("Retry advice")
struct RetryAdviceTests {
    struct InsufficientFunds: Error {}
    static let id = SagaID(rawValue: 7)

    @Test func anErrorOfTheApplicationIsNotRetryable() {
        let error = SagaError.bodyFailed(saga: Self.id, underlying: InsufficientFunds())
        #expect(error.nothingWritten)
        #expect(!error.isRetryable)
    }

    @Test(arguments: [
        (SagaError.lockTimeout(saga: id, keys: [[1]], heldBy: [SagaID(rawValue: 1)]), true),
        (.deadlock(saga: id, keys: [[1]], cycle: []), true),
        (.transactionLost(saga: id, underlying: MySQLError(code: 1213, sqlState: "40001", message: "Deadlock found")), true),
        // The backends classify their own errors, wherever they reached the caller from.
        (.bodyFailed(saga: id, underlying: MySQLError(code: 1205, sqlState: "HY000", message: "Lock wait timeout exceeded")), true),
        (.bodyFailed(saga: id, underlying: SQLiteError(code: 5, message: "database is locked")), true),
        (.sqlFailed(saga: id, step: .begin, underlying: MySQLError(code: 2003, sqlState: "HY000", message: "Can't connect")), true),
        (.sqlFailed(saga: id, step: .begin, underlying: MySQLError(code: 1045, sqlState: "28000", message: "Access denied")), false),
        (.commitFailed(saga: id, underlying: MySQLError(code: 1213, sqlState: "40001", message: "Deadlock found"), restoredKeys: 1), true),
        (.commitFailed(saga: id, underlying: SQLiteError(code: 787, message: "FOREIGN KEY constraint failed"), restoredKeys: 1), false),
        (.bodyFailed(saga: id, underlying: SQLiteError(code: 1, message: "no such table: x")), false),
        // Cancelled in time: nothing written, and nothing to retry (the caller gave up).
        (.cancelled(saga: id), false),
        // A saga error thrown inside a body of an outer helper keeps its own advice.
        (.bodyFailed(saga: id, underlying: SagaError.deadlock(saga: id, keys: [], cycle: [])), true),
    ])
    func transientCausesAreRetryable(_ error: SagaError, _ retryable: Bool) {
        #expect(error.nothingWritten, "\(error)")
        #expect(error.isRetryable == retryable, "\(error)")
    }

    @Test(arguments: [
        SagaError.inDoubt(saga: id, underlying: MySQLError(code: 2013, sqlState: "HY000", message: "Lost connection")),
        .kvWriteFailed(saga: id, underlying: SQLiteError(code: 5, message: "busy")),
        .transactionEndedByStatement(saga: id, statement: "COMMIT", underlying: nil),
        .compensationFailed(saga: id, underlying: InsufficientFunds()),
        .stopped(reason: "fsync failed"),
    ])
    func somethingMayBeWrittenSoNeverRetryable(_ error: SagaError) {
        #expect(!error.nothingWritten, "\(error)")
        #expect(!error.isRetryable, "\(error)")
    }

    /// For real: a body whose UPDATE waits for a row another session holds gets MariaDB's lock
    /// wait timeout; the saga wrote nothing and may succeed once the other session is done.
    @Test func aLockWaitTimeoutInTheBodyIsRetryableOnMariaDB() throws {
        let env = try MySQLEnvironment(serverURL: try SharedMariaDB.url())
        defer { env.destroy() }
        try env.sqlExecute("INSERT INTO saga_test (k, v) VALUES ('w', 0)")
        let holder = try env.sql.connect()
        defer { holder.close() }
        try holder.begin()
        try holder.execute("UPDATE saga_test SET v = 1 WHERE k = 'w'", [])
        let c = try env.coordinator()
        let error = try expectSagaError {
            try c.run { saga in
                try saga.sql.execute("SET SESSION innodb_lock_wait_timeout = 1", [])
                try saga.sql.execute("UPDATE saga_test SET v = 2 WHERE k = 'w'", [])
                try saga.kv.put("w", "2")
            }
        }
        try holder.rollback()
        #expect(error.nothingWritten && error.isRetryable, "\(error)")
        #expect(try env.kvGet("w") == nil && env.row("w") == 0, "nothing written")
        // The retry the advice promises succeeds.
        try c.run { saga in
            try saga.sql.execute("UPDATE saga_test SET v = 2 WHERE k = 'w'", [])
            try saga.kv.put("w", "2")
        }
        #expect(try env.kvGet("w") == "2" && env.row("w") == 2)
    }
}
