import Foundation
import MySQLBackend

/// A throwaway MariaDB server for tests and the torture program, which kill or restart one: its
/// own temporary datadir, a loopback port and a socket, a real user and password, and its own
/// temporary directory (``tmpDir``, given to mariadb-install-db and mariadbd as `--tmpdir`: two
/// installs sharing the system's one were seen to fail with "Unknown table
/// 'mysql.tmp_proxies_priv'"). Started through `scripts/mariadb.sh`, the same script CI uses.
public final class MariaDBServer: @unchecked Sendable {
    public let dir: String
    public private(set) var port: Int
    public private(set) var url: String = ""
    /// The server's own `--tmpdir` (the script creates it and passes it to both programs).
    public var tmpDir: String { dir + "/tmp" }

    /// `scripts/mariadb.sh` of this checkout (`SAGA_MARIADB_SCRIPT` overrides it).
    public static var script: String {
        if let path = ProcessInfo.processInfo.environment["SAGA_MARIADB_SCRIPT"], !path.isEmpty { return path }
        return URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("scripts/mariadb.sh").path
    }

    /// A new directory under the system's temporary directory.
    public static func makeTempDir(_ tag: String) throws -> String {
        let dir = FileManager.default.temporaryDirectory
            .appendingPathComponent("\(tag)-\(getpid())-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    /// Starts a new server; `extraArguments` go to mariadbd (e.g. `--innodb-rollback-on-timeout`),
    /// `environment` to the script that starts it (e.g. `MARIADBD_PRELOAD`, a library the
    /// server alone is started with).
    public init(extraArguments: [String] = [], environment: [String: String] = [:]) throws {
        dir = try Self.makeTempDir("mariadb")
        port = Int.random(in: 20_000...32_000)  // below the ephemeral range (32768+)
        self.extraArguments = extraArguments
        self.environment = environment
        try start()
    }

    private let extraArguments: [String]
    private let environment: [String: String]

    /// Restarts on a new port (the data stays): clients that still try the old one fail
    /// instead of reaching the restarted server by accident.
    public func restartOnNewPort() throws {
        port = port >= 31_000 ? port - 1_000 : port + 1
        try start()
    }

    public func start() throws {
        // TMPDIR too, for anything else the script starts (the mariadb client).
        try FileManager.default.createDirectory(atPath: tmpDir, withIntermediateDirectories: true)
        let result = try Shell.run("/bin/bash", [Self.script, "start", dir, "\(port)"],
                                   environment: environment.merging(["MARIADBD_EXTRA": extraArguments.joined(separator: " "), "TMPDIR": tmpDir]) { $1 })
        guard result.status == 0, let last = result.stdout.split(separator: "\n").last, last.hasPrefix("mysql://") else {
            throw TestSetupError("cannot start MariaDB in \(dir): \(result.stdout) \(result.stderr)")
        }
        url = String(last)
        // The script pings through the socket; wait until TCP answers too.
        var lastError = ""
        for _ in 0..<100 {
            do { _ = try MySQLDatabase(url: url); return } catch { lastError = "\(error)" }
            usleep(100_000)
        }
        throw TestSetupError("MariaDB in \(dir) does not answer on port \(port): \(lastError)")
    }

    public var pid: pid_t? {
        (try? String(contentsOfFile: dir + "/mariadbd.pid", encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// `kill -9` of the server process, and waits until it is gone.
    public func kill9() {
        guard let pid else { return }
        kill(pid, SIGKILL)
        for _ in 0..<200 where kill(pid, 0) == 0 { usleep(10_000) }
        try? FileManager.default.removeItem(atPath: dir + "/mariadbd.pid")
    }

    /// Stops the server and removes its directory. Tests call it in a `defer`: hooks may keep
    /// the object alive past the test, and deinit does not run at process exit.
    public func stop() {
        _ = try? Shell.run("/bin/bash", [Self.script, "stop", dir])
        if ProcessInfo.processInfo.environment["SAGA_KEEP_SERVERS"] == nil { try? FileManager.default.removeItem(atPath: dir) }
    }

    deinit {
        stop()
        if ProcessInfo.processInfo.environment["SAGA_KEEP_SERVERS"] == nil { try? FileManager.default.removeItem(atPath: dir) }
    }
}

/// A fault-injection fixture could not be set up (server, proxy, child process).
public struct TestSetupError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The MariaDB server the suite shares: `SAGA_MYSQL_URL`, which `scripts/test.sh` sets after
/// starting a throwaway server. Without it the MySQL tests fail (never skip).
public enum SharedMariaDB {
    public static func url() throws -> String {
        guard let url = ProcessInfo.processInfo.environment["SAGA_MYSQL_URL"], !url.isEmpty else {
            throw TestSetupError("SAGA_MYSQL_URL is not set: the MySQL tests need a MariaDB server. Run scripts/test.sh (it starts one), or scripts/mariadb.sh start DIR and export the URL it prints.")
        }
        return url
    }
}

/// Runs a command and waits for it with `posix_spawn` and `waitpid`. (Foundation's `Process`
/// was seen to miss the exit of a script that leaves a daemon behind, and wait forever.)
public enum Shell {
    public struct Result: Sendable { public let status: Int32; public let stdout: String; public let stderr: String }

    public static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> Result {
        let tmp = FileManager.default.temporaryDirectory
        let out = tmp.appendingPathComponent("sh-out-\(UUID().uuidString)").path
        let err = tmp.appendingPathComponent("sh-err-\(UUID().uuidString)").path
        defer {
            try? FileManager.default.removeItem(atPath: out)
            try? FileManager.default.removeItem(atPath: err)
        }
        let pid = try spawnProcess(executable, arguments, stdoutPath: out, stderrPath: err, environment: environment)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exited = (status & 0x7F) == 0
        return Result(status: exited ? (status >> 8) & 0xFF : 128 + (status & 0x7F),
                      stdout: (try? String(contentsOfFile: out, encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOfFile: err, encoding: .utf8)) ?? "")
    }
}
