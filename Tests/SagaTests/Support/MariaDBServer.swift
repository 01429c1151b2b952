import Foundation
import MySQLBackend
import Testing

/// A throwaway MariaDB server for tests that kill or restart one: its own temporary datadir,
/// a loopback port and a socket, a real user and password. Started through
/// `scripts/mariadb.sh`, the same script CI uses.
final class MariaDBServer: @unchecked Sendable {
    let dir: String
    let port: Int
    private(set) var url: String = ""

    static var script: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("scripts/mariadb.sh").path
    }

    /// Starts a new server; `extraArguments` go to mariadbd (e.g. `--innodb-rollback-on-timeout`).
    init(extraArguments: [String] = []) throws {
        dir = try SQLiteEnvironment.makeTempDir("mariadb")
        port = Int.random(in: 41_000...59_000)
        self.extraArguments = extraArguments
        try start()
    }

    private let extraArguments: [String]

    func start() throws {
        let result = try Shell.run("/bin/bash", [Self.script, "start", dir, "\(port)"] , environment: ["MARIADBD_EXTRA": extraArguments.joined(separator: " ")])
        guard result.status == 0, let last = result.stdout.split(separator: "\n").last, last.hasPrefix("mysql://") else {
            throw TestSetupError("cannot start MariaDB in \(dir): \(result.stdout) \(result.stderr)")
        }
        url = String(last)
    }

    var pid: pid_t? {
        (try? String(contentsOfFile: dir + "/mariadbd.pid", encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// `kill -9` of the server process, and waits until it is gone.
    func kill9() {
        guard let pid else { return }
        kill(pid, SIGKILL)
        for _ in 0..<200 where kill(pid, 0) == 0 { usleep(10_000) }
        try? FileManager.default.removeItem(atPath: dir + "/mariadbd.pid")
    }

    func stop() {
        _ = try? Shell.run("/bin/bash", [Self.script, "stop", dir])
    }

    deinit {
        stop()
        try? FileManager.default.removeItem(atPath: dir)
    }
}

struct TestSetupError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The MariaDB server the suite shares: `SAGA_MYSQL_URL`, which `scripts/test.sh` sets after
/// starting a throwaway server. Without it the MySQL tests fail (never skip).
enum SharedMariaDB {
    static func url() throws -> String {
        guard let url = ProcessInfo.processInfo.environment["SAGA_MYSQL_URL"], !url.isEmpty else {
            throw TestSetupError("SAGA_MYSQL_URL is not set: the MySQL tests need a MariaDB server. Run scripts/test.sh (it starts one), or scripts/mariadb.sh start DIR and export the URL it prints.")
        }
        return url
    }
}

enum Shell {
    struct Result { let status: Int32; let stdout: String; let stderr: String }

    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> Result {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("sh-out-\(UUID().uuidString)")
        let err = FileManager.default.temporaryDirectory.appendingPathComponent("sh-err-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: out.path, contents: nil)
        _ = FileManager.default.createFile(atPath: err.path, contents: nil)
        defer {
            try? FileManager.default.removeItem(at: out)
            try? FileManager.default.removeItem(at: err)
        }
        p.standardOutput = try FileHandle(forWritingTo: out)
        p.standardError = try FileHandle(forWritingTo: err)
        p.standardInput = FileHandle.nullDevice
        try p.run()
        p.waitUntilExit()
        return Result(status: p.terminationStatus,
                      stdout: (try? String(contentsOf: out, encoding: .utf8)) ?? "",
                      stderr: (try? String(contentsOf: err, encoding: .utf8)) ?? "")
    }
}
