import SagaFaultKit
import Foundation
import MySQLBackend
import Saga
import SQLiteBackend
import Testing

/// Crash tests: `aa-demo` runs as a child process and SIGKILLs itself at a named protocol step;
/// the parent then recovers (a fresh `aa-demo recover`), checks that both stores agree and that
/// every trigger the child reported committed is there, and finally lets the node finish the
/// queue and compares its state digest with an uninterrupted run's.
@Suite("Crash at every step", .serialized)
struct CrashTests {
    static let triggers = "12"
    static let seed = "7"

    /// The reference: the digest of an uninterrupted run of the same trigger stream.
    static let referenceDigest: String = {
        do {
            let dir = try SQLiteEnvironment.makeTempDir("crash-ref")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let run = try Demo.run(["run", "--data", dir, "--triggers", triggers, "--seed", seed])
            guard run.exitCode == 0 else { return "reference run failed: \(run.stderr)" }
            return try Demo.verify(dir).digest
        } catch {
            return "reference run failed: \(error)"
        }
    }()

    struct Scenario: Sendable, CustomStringConvertible {
        let crashAt: String
        let occurrence: Int
        let extra: [String]
        var description: String { "\(crashAt)#\(occurrence)\(extra.isEmpty ? "" : " " + extra.joined(separator: " "))" }
    }

    /// Every step of a saga's own run, each with what it takes to reach it.
    static let runScenarios: [Scenario] = [
        Scenario(crashAt: "begin", occurrence: 4, extra: []),
        Scenario(crashAt: "body", occurrence: 4, extra: []),
        Scenario(crashAt: "prepare", occurrence: 4, extra: []),
        Scenario(crashAt: "prepared", occurrence: 4, extra: []),
        Scenario(crashAt: "marker", occurrence: 4, extra: []),
        Scenario(crashAt: "commit", occurrence: 4, extra: []),
        Scenario(crashAt: "committed", occurrence: 4, extra: []),
        // Compensation happens after a failed COMMIT (deferred FK) ...
        Scenario(crashAt: "compensate", occurrence: 1, extra: ["--fail-commit-at", "3"]),
        Scenario(crashAt: "compensated", occurrence: 1, extra: ["--fail-commit-at", "3"]),
        // ... an unknown one (fsync error at COMMIT) stops the node; the reopened node fences.
        Scenario(crashAt: "resolve", occurrence: 1, extra: ["--fail-commit-at", "3", "--fail-mode", "io"]),
        Scenario(crashAt: "recovery:compensate", occurrence: 1, extra: ["--fail-commit-at", "3", "--fail-mode", "io"]),
        Scenario(crashAt: "gc:gcJournal", occurrence: 2, extra: ["--gc-every", "3"]),
        Scenario(crashAt: "gc:gcMarkers", occurrence: 2, extra: ["--gc-every", "3"]),
    ]

    @Test func everyStepIsCovered() {
        let covered = Set(Self.runScenarios.map { $0.crashAt.split(separator: ":").last.map(String.init) ?? "" })
        let missing = SagaStep.steps(of: .compensate).map(\.rawValue).filter { !covered.contains($0) }
        #expect(missing.isEmpty, "steps without a crash test: \(missing)")
    }

    @Test(arguments: runScenarios)
    func crashAtStep(_ scenario: Scenario) throws {
        let dir = try SQLiteEnvironment.makeTempDir("crash")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = ["run", "--data", dir, "--triggers", Self.triggers, "--seed", Self.seed]

        let crashed = try Demo.run(base + scenario.extra + ["--crash-at", scenario.crashAt, "--crash-occurrence", "\(scenario.occurrence)"])
        #expect(crashed.killed, "the child reached \(scenario) and SIGKILLed itself (exit \(crashed.exitCode), stderr: \(crashed.stderr))")
        let acknowledged = crashed.committedUnits
        try Demo.checkRecovered(dir, acknowledged: acknowledged)

        let finish = try Demo.run(base + scenario.extra)
        #expect(finish.exitCode == 0, "the restarted node finishes: \(finish.stderr)")
        #expect(try Demo.verify(dir).digest == Self.referenceDigest, "state equals an uninterrupted run's")
    }

    /// A crash in the middle of recovery, at each of its steps in turn, on a node that crashed
    /// with a saga prepared but not committed (recovery compensates it) or committed but not
    /// recorded (recovery keeps it).
    @Test(arguments: [
        ("prepared", ["resolve", "compensate", "compensated", "gcJournal", "gcMarkers"]),
        ("committed", ["resolve", "committed", "gcJournal", "gcMarkers"]),
        ("marker", ["resolve", "compensate"]),
    ])
    func crashInsideRecovery(_ firstCrash: String, _ recoveryCrashes: [String]) throws {
        let dir = try SQLiteEnvironment.makeTempDir("crash-rec")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = ["run", "--data", dir, "--triggers", Self.triggers, "--seed", Self.seed]
        let crashed = try Demo.run(base + ["--crash-at", firstCrash, "--crash-occurrence", "5"])
        #expect(crashed.killed)
        for step in recoveryCrashes {
            let r = try Demo.run(["recover", "--data", dir, "--crash-at", step])
            #expect(r.killed, "recovery crashed at \(step) (exit \(r.exitCode): \(r.stdout) \(r.stderr))")
        }
        try Demo.checkRecovered(dir, acknowledged: crashed.committedUnits)
        // Recovery again: nothing changes.
        let before = try Demo.verify(dir).digest
        let again = try Demo.run(["recover", "--data", dir])
        #expect(again.exitCode == 0)
        #expect(try Demo.verify(dir).digest == before, "a second recovery changes nothing")
        let finish = try Demo.run(base)
        #expect(finish.exitCode == 0)
        #expect(try Demo.verify(dir).digest == Self.referenceDigest)
    }

    /// Every trigger runs with the caller key `mci-N`. SIGKILL at a step of the 4th trigger's
    /// saga (or of garbage collection after the 6th: its journal records are gone, its markers
    /// not yet), then `aa-demo outcome` on the reopened node (recovery at open decides): each
    /// key answers committed exactly when the stores hold the trigger, never unknown; the
    /// triggers never reached answer not committed. Then the node finishes (a key that did not
    /// commit runs again) and ends in the uninterrupted run's state.
    @Test(arguments: [
        ("prepared", 4, false), ("marker", 4, false), ("commit", 4, false), ("committed", 4, true), ("gc:gcMarkers", 2, true),
    ])
    func keyedOutcomeAfterACrash(_ step: String, _ occurrence: Int, _ crashedCommitted: Bool) throws {
        let dir = try SQLiteEnvironment.makeTempDir("crash-key")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = ["run", "--data", dir, "--triggers", Self.triggers, "--seed", Self.seed, "--gc-every", "3"]
        let crashed = try Demo.run(base + ["--crash-at", step, "--crash-occurrence", "\(occurrence)"])
        #expect(crashed.killed, "the child reached \(step) and SIGKILLed itself: \(crashed.stderr)")
        // The saga the crash hit: the 4th trigger, or (in GC after the 6th saga) the 6th.
        let hit: Int64 = step.hasPrefix("gc:") ? 6 : 4
        let looked = try Demo.run(["outcome", "--data", dir, "--mci"] + (1...(hit + 2)).map { "\($0)" })
        #expect(looked.exitCode == 0, "\(looked.stdout) \(looked.stderr)")
        let answers = Dictionary(uniqueKeysWithValues: looked.stdout.split(separator: "\n").compactMap { line -> (Int64, String)? in
            let f = line.split(separator: " ")
            guard f.count >= 3, f[0] == "outcome", let m = Int64(f[1]) else { return nil }
            return (m, String(f[2]))
        })
        // What the stores hold, read directly: the trigger's row is gone from the queue and its
        // response is there exactly when its saga committed; KV and SQL agree (verify).
        let db = try SQLiteDatabase(path: dir + "/ledger.sqlite")
        let conn = try db.openConnection()
        defer { conn.close() }
        let queued = Set(try conn.query("SELECT mci FROM aa_triggers", []).compactMap { $0[0].int64 })
        #expect(try Demo.verify(dir).agree, "KV and SQL agree after recovery")
        for m in 1...(hit + 2) {
            let committedInStores = !queued.contains(m)
            #expect(answers[m] == (committedInStores ? "committed" : "notCommitted"), "mci \(m): \(answers[m] ?? "no answer"), stores say committed=\(committedInStores)")
        }
        #expect(!queued.contains(hit) == crashedCommitted, "the crashed saga committed: \(crashedCommitted)")
        let finish = try Demo.run(base)
        #expect(finish.exitCode == 0, "the restarted node finishes: \(finish.stderr)")
        #expect(try Demo.verify(dir).digest == Self.referenceDigest, "state equals an uninterrupted run's")
    }

    /// Any number of crashes at seeded random steps, each followed by a restart: the final
    /// state equals an uninterrupted run's.
    @Test func manyCrashesThenTheSameState() throws {
        try Self.manyCrashes(steps: ["begin", "body", "prepare", "prepared", "marker", "commit", "committed", "gc:gcJournal", "gc:gcMarkers"],
                             modes: ["compensate"], triggers: 20, rng: 0xC0FFEE)
    }

    /// Crashes at seeded random steps of `steps`, each followed by a restart in the next of
    /// `modes` (in turn), until a run finishes the queue; then recovery, and the digest of an
    /// uninterrupted run.
    static func manyCrashes(steps: [String], modes: [String], triggers: Int, rng seed: UInt64) throws {
        let dir = try SQLiteEnvironment.makeTempDir("crash-many")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let refDir = try SQLiteEnvironment.makeTempDir("crash-many-ref")
        defer { try? FileManager.default.removeItem(atPath: refDir) }
        #expect(try Demo.run(["run", "--data", refDir, "--triggers", "\(triggers)", "--seed", Self.seed]).exitCode == 0)
        let reference = try Demo.verify(refDir).digest

        var rng = seed
        var crashes = 0, acknowledged: [String] = []
        for round in 0..<40 {
            rng = rng &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            let step = steps[Int(rng >> 33) % steps.count]
            let occurrence = Int(rng >> 45) % 3 + 1
            let r = try Demo.run(["run", "--data", dir, "--triggers", "\(triggers)", "--seed", Self.seed, "--gc-every", "2",
                                  "--mode", modes[round % modes.count], "--crash-at", step, "--crash-occurrence", "\(occurrence)"])
            acknowledged += r.committedUnits
            if r.killed { crashes += 1; continue }
            #expect(r.exitCode == 0, "\(r.stderr)")
            break
        }
        #expect(crashes >= 5, "crashed \(crashes) times")
        try Demo.checkRecovered(dir, acknowledged: acknowledged)
        #expect(try Demo.verify(dir).digest == reference, "after \(crashes) crashes the state equals an uninterrupted run's")
    }
}

/// Runs the `aa-demo` executable built next to the test binary.
enum Demo {
    struct Result {
        let exitCode: Int32
        let killed: Bool
        let stdout: String
        let stderr: String
        /// Triggers the child reported committed before it died.
        var committedUnits: [String] {
            stdout.split(separator: "\n").compactMap { line in
                line.hasPrefix("committed ") ? String(line.split(separator: " ")[1]) : nil
            }
        }
    }

    static var executable: String {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        return URL(fileURLWithPath: me).deletingLastPathComponent().appendingPathComponent("aa-demo").path
    }

    static func run(_ arguments: [String]) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("aa-out-\(UUID().uuidString)")
        let err = FileManager.default.temporaryDirectory.appendingPathComponent("aa-err-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: out.path, contents: nil)
        _ = FileManager.default.createFile(atPath: err.path, contents: nil)
        defer {
            try? FileManager.default.removeItem(at: out)
            try? FileManager.default.removeItem(at: err)
        }
        process.standardOutput = try FileHandle(forWritingTo: out)
        process.standardError = try FileHandle(forWritingTo: err)
        try process.run()
        process.waitUntilExit()
        let killed = process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGKILL
        return Result(
            exitCode: process.terminationStatus, killed: killed,
            stdout: (try? String(contentsOf: out, encoding: .utf8)) ?? "",
            stderr: (try? String(contentsOf: err, encoding: .utf8)) ?? "")
    }

    struct Verification { let agree: Bool; let digest: String; let output: String }

    static func verify(_ dir: String) throws -> Verification {
        let r = try run(["verify", "--data", dir])
        let digest = r.stdout.split(separator: "\n").first { $0.hasPrefix("digest ") }.map { String($0.dropFirst(7)) } ?? "none"
        return Verification(agree: r.exitCode == 0, digest: digest, output: r.stdout + r.stderr)
    }

    /// Recovers the node without processing anything, then demands: both stores agree, and
    /// every acknowledged trigger has its response row.
    static func checkRecovered(_ dir: String, acknowledged: [String]) throws {
        let r = try run(["recover", "--data", dir])
        #expect(r.exitCode == 0, "recovery leaves nothing in doubt: \(r.stdout) \(r.stderr)")
        let v = try verify(dir)
        #expect(v.agree, "KV and SQL agree after recovery: \(v.output)")
        let db = try SQLiteDatabase(path: dir + "/ledger.sqlite")
        let conn = try db.openConnection()
        defer { conn.close() }
        let present = Set(try conn.query("SELECT trigger_unit FROM aa_responses", []).compactMap { $0[0].string })
        let lost = acknowledged.filter { !present.contains($0) }
        #expect(lost.isEmpty, "acknowledged triggers lost: \(lost)")
    }
}

/// The example node with its SQL side in MariaDB: crashes at the steps around COMMIT, a COMMIT
/// that fails on a killed connection, then the same final state as the SQLite node's.
@Suite("Crash: aa-demo on MariaDB", .serialized)
struct MySQLCrashTests {
    @Test(arguments: ["prepared", "marker", "commit", "committed"].map { ($0, "compensate") }
            + ["marker", "commit", "committed", "applied", "resolve"].map { ($0, "redo") })
    func crashAtStepOnMariaDB(_ step: String, _ mode: String) throws {
        let (sql, drop) = try Self.freshDatabase()
        defer { drop() }
        let dir = try SQLiteEnvironment.makeTempDir("crash-my")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = ["run", "--data", dir, "--sql", sql, "--triggers", CrashTests.triggers, "--seed", CrashTests.seed, "--mode", mode]
        // The killed connection makes COMMIT's outcome unknown: the fence (resolve) decides.
        let crashed = try Demo.run(base + ["--fail-commit-at", "2", "--fail-mode", "kill", "--crash-at", step, "--crash-occurrence", step == "resolve" ? "1" : "4"])
        #expect(crashed.killed, "\(crashed.stderr)")
        let recovered = try Demo.run(["recover", "--data", dir, "--sql", sql, "--mode", mode])
        #expect(recovered.exitCode == 0, "\(recovered.stdout) \(recovered.stderr)")
        let verify = try Demo.run(["verify", "--data", dir, "--sql", sql])
        #expect(verify.exitCode == 0, "agree after recovery: \(verify.stdout)")
        let finish = try Demo.run(base)
        #expect(finish.exitCode == 0, "\(finish.stderr)")
        let final = try Demo.run(["verify", "--data", dir, "--sql", sql])
        #expect(final.stdout.contains("digest \(CrashTests.referenceDigest)"), "same state as the SQLite node's uninterrupted run: \(final.stdout)")
    }

    /// A database of its own on the test server, as a URL for aa-demo, and what drops it.
    static func freshDatabase() throws -> (url: String, drop: () -> Void) {
        let server = try MySQLURL(try SharedMariaDB.url())
        let database = "aa_crash_" + UUID().uuidString.prefix(8).lowercased()
        let admin = try MySQLDatabase(url: server).openConnection()
        try admin.execute("CREATE DATABASE \(database)", [])
        var url = server
        url.database = database
        return ("mysql://\(url.user):\(url.password)@\(url.host):\(url.port)/\(database)", {
            _ = try? admin.execute("DROP DATABASE IF EXISTS \(database)", [])
            admin.close()
        })
    }

    /// `aa-demo run --mode redo` over 100 triggers, one COMMIT failing on the way, on SQLite and
    /// on MariaDB: the same digest as compensate mode's run of the same stream.
    @Test(arguments: ["sqlite", "mariadb"])
    func redoModeEndsWithTheCompensateDigest(_ backend: String) throws {
        var digests: [String: String] = [:]
        for mode in ["compensate", "redo"] {
            let dir = try SQLiteEnvironment.makeTempDir("aa-\(mode)")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            var args = ["run", "--data", dir, "--triggers", "100", "--seed", "3", "--mode", mode, "--fail-commit-at", "40"]
            var drop: (() -> Void)?
            if backend == "mariadb" {
                let (url, d) = try Self.freshDatabase()
                drop = d
                args += ["--sql", url, "--fail-mode", "kill"]
            }
            defer { drop?() }
            let r = try Demo.run(args)
            #expect(r.exitCode == 0, "\(mode): \(r.stderr)")
            #expect(r.stdout.contains("1 failed attempt(s)"), "\(mode): the COMMIT of mci 40 failed once: \(r.stdout.suffix(300))")
            if let done = r.stdout.split(separator: "\n").last(where: { $0.hasPrefix("done: ") }), let at = done.range(of: "digest ") {
                digests[mode] = String(done[at.upperBound...].prefix(16))
            }
        }
        #expect(digests["redo"] != nil && digests["redo"] == digests["compensate"], "\(digests)")
    }
}

/// The crash tests in redo mode: `aa-demo --mode redo` SIGKILLs itself at each of redo mode's
/// steps, in a saga, in a checkpoint and inside replay at open; recovery then leaves both
/// stores agreeing with every acknowledged trigger there, and the finished queue has the digest
/// of an uninterrupted compensate-mode run.
@Suite("Crash at every step of redo mode", .serialized)
struct RedoCrashTests {
    static let runScenarios: [CrashTests.Scenario] = [
        .init(crashAt: "begin", occurrence: 4, extra: []),
        .init(crashAt: "body", occurrence: 4, extra: []),
        .init(crashAt: "marker", occurrence: 4, extra: []),
        .init(crashAt: "commit", occurrence: 4, extra: []),
        // COMMIT succeeded, the KV batch not written: replay at open writes it.
        .init(crashAt: "committed", occurrence: 4, extra: []),
        .init(crashAt: "applied", occurrence: 4, extra: []),
        // A failed COMMIT, and one whose fsync failed (the node stops and reopens).
        .init(crashAt: "committed", occurrence: 4, extra: ["--fail-commit-at", "3"]),
        .init(crashAt: "committed", occurrence: 3, extra: ["--fail-commit-at", "3", "--fail-mode", "io"]),
        .init(crashAt: "gc:checkpoint", occurrence: 2, extra: ["--gc-every", "3"]),
        .init(crashAt: "gc:checkpointed", occurrence: 2, extra: ["--gc-every", "3"]),
        // Replay at open: the first crash leaves rows above the watermark.
        .init(crashAt: "recovery:replay", occurrence: 1, extra: ["--crash-first-at", "committed"]),
        .init(crashAt: "recovery:checkpoint", occurrence: 1, extra: ["--crash-first-at", "committed"]),
        .init(crashAt: "recovery:checkpointed", occurrence: 1, extra: ["--crash-first-at", "committed"]),
    ]

    @Test func everyRedoStepIsCovered() {
        // resolve needs a COMMIT whose outcome is unknown without an I/O error: MariaDB's
        // killed connection (MySQLRedoCrashTests).
        let covered = Set(Self.runScenarios.map { $0.crashAt.split(separator: ":").last.map(String.init) ?? "" } + ["resolve"])
        let missing = SagaStep.steps(of: .redo).map(\.rawValue).filter { !covered.contains($0) }
        #expect(missing.isEmpty, "redo steps without a crash test: \(missing)")
    }

    @Test(arguments: runScenarios)
    func crashAtStep(_ scenario: CrashTests.Scenario) throws {
        let dir = try SQLiteEnvironment.makeTempDir("crash-redo")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let base = ["run", "--data", dir, "--triggers", CrashTests.triggers, "--seed", CrashTests.seed, "--mode", "redo"]
        var extra = scenario.extra
        var acknowledged: [String] = []
        if let i = extra.firstIndex(of: "--crash-first-at") {
            // A first crash right after a COMMIT leaves a row to replay; the scenario's crash
            // is then inside recovery at the next open.
            let first = try Demo.run(base + ["--crash-at", extra[i + 1], "--crash-occurrence", "5"])
            #expect(first.killed, "the first crash: \(first.stderr)")
            acknowledged += first.committedUnits
            extra.removeSubrange(i...(i + 1))
            let r = try Demo.run(["recover", "--data", dir, "--mode", "redo", "--crash-at", scenario.crashAt.split(separator: ":").last.map(String.init) ?? ""])
            #expect(r.killed, "recovery reached \(scenario) and SIGKILLed itself (exit \(r.exitCode): \(r.stdout) \(r.stderr))")
        } else {
            let crashed = try Demo.run(base + extra + ["--crash-at", scenario.crashAt, "--crash-occurrence", "\(scenario.occurrence)"])
            #expect(crashed.killed, "the child reached \(scenario) and SIGKILLed itself (exit \(crashed.exitCode), stderr: \(crashed.stderr))")
            acknowledged += crashed.committedUnits
        }
        try Demo.checkRecovered(dir, acknowledged: acknowledged)
        let before = try Demo.verify(dir).digest
        #expect(try Demo.run(["recover", "--data", dir, "--mode", "redo"]).exitCode == 0)
        #expect(try Demo.verify(dir).digest == before, "a second recovery changes nothing")
        let finish = try Demo.run(base + extra)
        #expect(finish.exitCode == 0, "the restarted node finishes: \(finish.stderr)")
        #expect(try Demo.verify(dir).digest == CrashTests.referenceDigest, "state equals an uninterrupted compensate-mode run's")
    }

    /// Crashes at seeded random redo steps, each followed by a restart (in redo mode, or in
    /// compensate mode every third time: a node may switch), then the same final state.
    @Test func manyCrashesThenTheSameState() throws {
        // A step of recovery is only reached when the crash before left rows to replay.
        try CrashTests.manyCrashes(steps: ["begin", "body", "marker", "commit", "committed", "applied", "committed", "gc:checkpoint", "gc:checkpointed", "recovery:replay"],
                                   modes: ["redo", "redo", "compensate"], triggers: 40, rng: 0xBADC0DE)
    }
}
