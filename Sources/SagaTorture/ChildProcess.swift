import Foundation
import SagaFaultKit

/// A child process started with `posix_spawn`, its output going to files; it can be waited for
/// or SIGKILLed at any moment.
final class ChildProcess {
    let pid: pid_t
    let stdoutPath: String
    let stderrPath: String
    private(set) var status: Termination?

    enum Termination: Equatable, CustomStringConvertible {
        case exited(Int32)
        case signaled(Int32)
        var description: String {
            switch self {
            case .exited(let c): "exit \(c)"
            case .signaled(let s): "signal \(s)"
            }
        }
    }

    /// This program's own executable (the parent starts itself as the worker).
    static var selfPath: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    init(_ executable: String, _ arguments: [String], outputIn dir: String, tag: String) throws {
        stdoutPath = dir + "/\(tag).out"
        stderrPath = dir + "/\(tag).err"
        pid = try spawnProcess(executable, arguments, stdoutPath: stdoutPath, stderrPath: stderrPath)
        Cleanup.childStarted(pid)
    }

    /// Waits for the child to end.
    @discardableResult
    func wait() -> Termination {
        if let status { return status }
        var raw: Int32 = 0
        while waitpid(pid, &raw, 0) < 0 && errno == EINTR {}
        let t: Termination = (raw & 0x7F) == 0 ? .exited((raw >> 8) & 0xFF) : .signaled(raw & 0x7F)
        status = t
        Cleanup.childEnded(pid)
        return t
    }

    /// Waits at most `seconds` for the child to end; nil if it is still running.
    func wait(timeout seconds: Double) -> Termination? {
        let deadline = Date().addingTimeInterval(seconds)
        while !hasEnded {
            if Date() >= deadline { return nil }
            usleep(20_000)
        }
        return status
    }

    /// Whether the child has ended, without waiting.
    var hasEnded: Bool {
        if status != nil { return true }
        var raw: Int32 = 0
        let r = waitpid(pid, &raw, WNOHANG)
        guard r == pid else { return false }
        status = (raw & 0x7F) == 0 ? .exited((raw >> 8) & 0xFF) : .signaled(raw & 0x7F)
        Cleanup.childEnded(pid)
        return true
    }

    /// SIGKILL, then reap.
    @discardableResult
    func killNow() -> Termination {
        if status == nil { kill(pid, SIGKILL) }
        return wait()
    }

    var stdout: String { (try? String(contentsOfFile: stdoutPath, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOfFile: stderrPath, encoding: .utf8)) ?? "" }
    var lastOutput: String {
        let lines = (stdout + stderr).split(separator: "\n").suffix(6)
        return lines.joined(separator: "\n")
    }
}
