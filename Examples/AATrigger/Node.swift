import CoreMetrics
import SagaFaultKit
import SagaTestKit
import Foundation
import Logging
import Synchronization
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend

/// An ocore-style node: a RocksDB directory for state variables and an SQL database for
/// balances and the trigger queue, processing one trigger per saga.
final class Node {
    enum FailMode: String, CaseIterable, Sendable {
        /// A deferred foreign key violated at COMMIT: SQLite proves the failure.
        case fk
        /// An fsync failure injected through the fault VFS at COMMIT: the outcome is unknown.
        case io
        /// MySQL: the saga's connection is killed from another session right before COMMIT.
        case kill
    }

    let dir: String
    let kv: RocksDBStore
    /// The SQL database, behind a counter of the connections opened to it.
    let sql: CountingDatabase
    /// The node's own connection (the queue, seeding, the checks), not a saga's: see
    /// ``withAdmin(_:)``.
    private var admin: any SQLConnection
    let isMySQL: Bool
    let coordinator: SagaCoordinator?
    let logger: Logger
    /// Protected nodes: the sagas that were prepared in the journal when the node opened
    /// (recovery at open decided them, or left them in doubt).
    let preparedAtOpen: [SagaID]
    private let commitFault: CommitFaultHook
    private var pendingKill: Int64?
    /// Unprotected nodes: the one connection every trigger runs on, opened with the node (and
    /// again only if the database dropped it), like the coordinator's pooled connection.
    private var work: (any SQLConnection)?

    static func kvPath(_ dir: String) -> String { dir + "/kv" }
    static func sqlPath(_ dir: String) -> String { dir + "/ledger.sqlite" }

    /// Opens the node's stores; in protected mode also the coordinator (which recovers).
    /// - Parameter sqlURL: a `mysql://` URL, or nil for the SQLite file `DIR/ledger.sqlite`.
    init(dir: String, sqlURL: String? = nil, mode: SagaCoordinator.Configuration.Mode = .compensate, protected: Bool, hooks: (any SagaHooks)? = nil, gcEvery: Int = 512,
         metricsFactory: (any MetricsFactory)? = nil, logger: Logger) throws {
        self.dir = dir
        self.logger = logger
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        if let sqlURL {
            sql = CountingDatabase(try MySQLDatabase(url: sqlURL))
            isMySQL = true
            admin = try Self.openAdmin(sql)
            for statement in Schema.mysql { try admin.execute(statement, []) }
        } else {
            try SQLiteFaults.register()
            var config = SQLiteDatabase.Configuration()
            config.vfs = SQLiteFaults.vfsName  // forwards everything unless armed
            sql = CountingDatabase(try SQLiteDatabase(path: Self.sqlPath(dir), configuration: config))
            isMySQL = false
            admin = try Self.openAdmin(sql)
            for statement in Schema.sqlite { try admin.execute(statement, []) }
        }
        kv = try RocksDBStore(path: Self.kvPath(dir))
        commitFault = CommitFaultHook(path: Self.sqlPath(dir), database: sql)
        if protected {
            preparedAtOpen = try kv.journalEntries().compactMap { entry in
                guard JournalRecord.saga(fromKey: entry.key) != nil,
                      let record = try? JournalRecord(decoding: entry.value), record.state == .prepared else { return nil }
                return record.saga
            }
            let all: [any SagaHooks] = [commitFault] + (hooks.map { [$0] } ?? [])
            coordinator = try SagaCoordinator(
                kv: kv, sql: sql,
                configuration: .init(hooks: CombinedHooks(all), gcThreshold: gcEvery, mode: mode, checkpointEvery: gcEvery, metricsFactory: metricsFactory),
                logger: logger)
        } else {
            preparedAtOpen = []
            coordinator = nil
            work = try sql.connect()
        }
    }

    /// The admin connection.
    private static func openAdmin(_ sql: any SQLDatabase) throws -> any SQLConnection {
        try sql.connect()
    }

    /// Runs `body` on the admin connection. If the connection was lost meanwhile (its server
    /// died or restarted), opens a new one (with several servers in the URL: on the first that
    /// answers and is ready) and runs `body` once more: every caller's body can run again (a
    /// read, or a transaction that checks first whether it already committed).
    ///
    /// On a cluster each body first waits until its node has applied every write the cluster
    /// committed (the dialect's causal wait): a trigger that a saga committed through another
    /// node is never read as still queued.
    func withAdmin<T>(_ body: (any SQLConnection) throws -> T) throws -> T {
        let causal = sql.dialect.causalWait
        do {
            if let causal { _ = try admin.query(causal, []) }
            return try body(admin)
        } catch where admin.isBroken {
            admin.close()
            admin = try Self.openAdmin(sql)
            if let causal { _ = try admin.query(causal, []) }
            return try body(admin)
        }
    }

    func close() {
        coordinator?.close()
        work?.close()
        work = nil
        admin.close()
        kv.close()
    }

    /// Seeds `count` deterministic triggers for a handful of AA addresses, once.
    @discardableResult
    func seed(triggers count: Int, seed: UInt64) throws -> Bool {
        try withAdmin { admin in try Self.seed(triggers: count, seed: seed, on: admin) }
    }

    private static func seed(triggers count: Int, seed: UInt64, on admin: any SQLConnection) throws -> Bool {
        if try !admin.query("SELECT value FROM demo_meta WHERE name = 'seed'", []).isEmpty { return false }
        var rng = SplitMix64(state: seed)
        let addresses = (0..<5).map { _ in rng.base32(32) }
        try admin.begin()
        do {
            for mci in 1...max(1, count) where count > 0 {
                let unit = rng.base32(44)
                let address = addresses[Int(rng.next() % UInt64(addresses.count))]
                let amount = Int64(1_000 + rng.next() % 100_000)
                try admin.execute("INSERT INTO aa_triggers (mci, unit, address, amount) VALUES (?, ?, ?, ?)",
                                  [.integer(Int64(mci)), .text(unit), .text(address), .integer(amount)])
            }
            try admin.execute("INSERT INTO demo_meta (name, value) VALUES ('seed', ?)", [.text("\(seed):\(count)")])
            if case .failed(let e) = admin.commit() { throw e }
        } catch {
            try? admin.rollback()
            throw error
        }
        return true
    }

    /// ``Verifier/check(kv:sql:)`` of this node's stores.
    func check() throws -> Verifier.Report {
        try withAdmin { try Verifier.check(kv: kv, sql: $0) }
    }

    /// The head of the queue.
    func nextTrigger() throws -> Trigger? {
        let head = try withAdmin { try $0.query("SELECT mci, unit, address, amount FROM aa_triggers ORDER BY mci LIMIT 1", []) }
        guard let row = head.first else { return nil }
        guard let mci = row[0].int64, let unit = row[1].string, let address = row[2].string, let amount = row[3].int64 else {
            throw DemoError("malformed trigger row \(row.values)")
        }
        return Trigger(mci: mci, unit: unit, address: address, amount: amount)
    }

    // MARK: Processing

    /// Processes one trigger as one saga; `fail` makes its COMMIT fail for real.
    func process(_ t: Trigger, fail: FailMode?) throws(SagaError) {
        guard let coordinator else { preconditionFailure("process(_:fail:) needs a protected node") }
        if let fail, fail != .fk { commitFault.armForNextCommit(fail) }
        defer { commitFault.disarm() }
        let commitFault = self.commitFault
        // The trigger's caller key: a trigger is never applied twice, and `aa-demo outcome`
        // tells after a crash whether it committed.
        try coordinator.run(key: Self.callerKey(mci: t.mci)) { saga in
            let writes = try Self.triggerBody(t, fail: fail, sql: saga.sql, read: { try saga.kv.get($0) }) {
                commitFault.connectionID = $0
            }
            for (key, value) in writes.kv {
                if let value { try saga.kv.put(key, value) } else { try saga.kv.delete(key) }
            }
        }
    }

    /// The caller key a trigger runs with.
    static func callerKey(mci: Int64) -> String { "mci-\(mci)" }

    /// One trigger's statements, the same on both paths (so that a timing of the two compares
    /// the commit sequences only): with `kill`, the connection's id first; the AA's SQL and KV
    /// reads; with `fk`, the probe row that fails at COMMIT.
    static func triggerBody(_ t: Trigger, fail: FailMode?, sql: any SQLExecutor, read: (Bytes) throws -> Bytes?,
                            connectionID: (Int64?) -> Void) throws -> AA.Writes {
        if fail == .kill { connectionID(try sql.query("SELECT CONNECTION_ID()", []).first?[0].int64) }
        let writes = try AA.apply(t, sql: sql, read: read)
        if fail == .fk { try sql.execute("INSERT INTO fault_probe (ref) VALUES ('missing-parent')", []) }
        return writes
    }

    /// Where the unsafe sequence failed.
    enum UnprotectedFailure: Error, CustomStringConvertible {
        /// The AA itself (or one of its statements) threw: nothing written anywhere.
        case body(any Error)
        /// BEGIN, the KV batch or COMMIT failed; after a KV batch, it stays (the bug).
        case commit(any Error)
        var description: String {
            switch self {
            case .body(let e): "the AA body failed: \(e)"
            case .commit(let e): "\(e)"
            }
        }
    }

    /// The unsafe sequence of the motivating bug: SQL writes, the KV batch synced, then COMMIT,
    /// on the node's one connection.
    func processUnprotected(_ t: Trigger, fail: FailMode?) throws(UnprotectedFailure) {
        let conn: any SQLConnection
        do {
            if let open = work, !open.isBroken {
                conn = open
            } else {
                work?.close()
                work = nil
                conn = try sql.connect()
                work = conn
            }
            try conn.begin()
        } catch {
            throw .commit(error)
        }
        defer {
            SQLiteFaults.disarm()
            if conn.isBroken {
                conn.close()
                work = nil
            } else if conn.isInTransaction {
                try? conn.rollback()
            }
        }
        let writes: AA.Writes
        do {
            writes = try Self.triggerBody(t, fail: fail, sql: conn, read: { try kv.get($0) }) { pendingKill = $0 }
        } catch {
            throw .body(error)
        }
        do {
            var batch = KVWriteBatch()
            for (key, value) in writes.kv { batch.set(key, to: value) }
            try kv.write(batch, sync: true)
            if fail == .io { SQLiteFaults.arm(.sync, pathPrefix: Self.sqlPath(dir)) }
            if fail == .kill, let id = pendingKill { try Self.kill(id, on: sql) }
        } catch {
            throw .commit(error)
        }
        switch conn.commit() {
        case .committed: return
        case .failed(let e), .unknown(let e): throw .commit(e)
        }
    }
}

/// An SQL database that counts the connections opened to it: `aa-demo run` reports the count,
/// so that one can see both paths keep their connections (the coordinator's pool, the
/// unprotected node's one connection) instead of opening one per trigger.
final class CountingDatabase: SQLDatabase {
    let base: any SQLDatabase
    private let count = Atomic<Int>(0)
    init(_ base: any SQLDatabase) { self.base = base }
    var opened: Int { count.load(ordering: .relaxed) }
    func connect() throws -> any SQLConnection {
        let conn = try base.connect()
        count.add(1, ordering: .relaxed)
        return conn
    }
    // Everything else is the real database's: its writer queue, its instance hold, its tables.
    func connect(replacing failed: any SQLConnection) throws -> any SQLConnection {
        let conn = try base.connect(replacing: failed)
        count.add(1, ordering: .relaxed)
        return conn
    }
    func holdInstance(_ instance: InstanceID) throws -> (any InstanceHold)? { try base.holdInstance(instance) }
    var markerTable: String { base.markerTable }
    var dialect: SQLDialect { base.dialect }
}

/// Makes the COMMIT of a chosen saga fail for real, right before it is sent: an fsync failure
/// in SQLite's fault VFS, or (MySQL) the saga's connection killed from another session.
final class CommitFaultHook: SagaHooks, @unchecked Sendable {
    private let lock = NSLock()
    private var armed: Node.FailMode?
    private var killID: Int64?
    private let path: String
    private let database: any SQLDatabase
    init(path: String, database: any SQLDatabase) { self.path = path; self.database = database }

    var connectionID: Int64? {
        get { lock.withLock { killID } }
        set { lock.withLock { killID = newValue } }
    }

    func armForNextCommit(_ mode: Node.FailMode) { lock.withLock { armed = mode } }
    func disarm() {
        lock.withLock { armed = nil; killID = nil }
        SQLiteFaults.disarm()
    }

    func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
        guard step == .commit, phase == .run else { return }
        let (mode, id) = lock.withLock { () -> (Node.FailMode?, Int64?) in
            defer { armed = nil }
            return (armed, killID)
        }
        switch mode {
        case .io?: SQLiteFaults.arm(.sync, pathPrefix: path)
        case .kill?: if let id { try Node.kill(id, on: database) }
        default: break
        }
    }
}

extension Node {
    /// `KILL CONNECTION` from another session (MySQL).
    static func kill(_ connectionID: Int64, on database: any SQLDatabase) throws {
        let side = try database.connect()
        defer { side.close() }
        try side.execute("KILL CONNECTION ?", [.integer(connectionID)])
    }
}
