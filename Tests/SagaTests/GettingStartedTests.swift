import Foundation
import Testing

/// The getting-started example cannot rot: the code the README and the DocC article show is
/// the code of `Examples/GettingStarted/main.swift` between its `README: begin` and
/// `README: end` lines, character for character, and that program runs and checks itself.
@Suite("Getting started")
struct GettingStartedTests {
    /// The package root: this file is `Tests/SagaTests/GettingStartedTests.swift`.
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func read(_ path: String) throws -> [Substring] {
        let text = try String(contentsOf: root.appendingPathComponent(path), encoding: .utf8)
        return text.split(separator: "\n", omittingEmptySubsequences: false)
    }

    /// The lines strictly between the line `begin` and the next line `end`; nil if either is missing.
    static func lines(of text: [Substring], after begin: (Substring) -> Bool, until end: (Substring) -> Bool) -> [Substring]? {
        guard let first = text.firstIndex(where: begin),
              let last = text[(first + 1)...].firstIndex(where: end) else { return nil }
        return Array(text[(first + 1)..<last])
    }

    /// The lines of the first ```swift block after the line `anchor` (a heading, a marker).
    static func swiftBlock(in path: String, after anchor: String) throws -> [Substring]? {
        let text = try read(path)
        guard let start = text.firstIndex(where: { $0 == anchor }) else { return nil }
        return lines(of: Array(text[start...]), after: { $0 == "```swift" }, until: { $0 == "```" })
    }

    /// Nil if equal, else where and how they first differ.
    static func firstDifference(_ shown: [Substring], _ example: [Substring]) -> String? {
        for i in 0..<max(shown.count, example.count) {
            let a = i < shown.count ? "`\(shown[i])`" : "(no line: the block ends)"
            let b = i < example.count ? "`\(example[i])`" : "(no line: the excerpt ends)"
            if a != b { return "line \(i + 1) of the block differs:\n  shown:   \(a)\n  example: \(b)" }
        }
        return nil
    }

    static func excerpt() throws -> [Substring] {
        let example = try read("Examples/GettingStarted/main.swift")
        let excerpt = lines(of: example, after: { $0 == "// README: begin" }, until: { $0 == "// README: end" })
        return try #require(excerpt, "Examples/GettingStarted/main.swift has no `// README: begin` ... `// README: end` lines")
    }

    @Test("README's Use block is the example's excerpt")
    func readmeShowsTheExample() throws {
        let excerpt = try Self.excerpt()
        let block = try #require(try Self.swiftBlock(in: "README.md", after: "## Use"),
                                 "README.md has no ```swift block under `## Use`")
        let difference = Self.firstDifference(block, excerpt)
        #expect(difference == nil, """
            README.md's Use block is not Examples/GettingStarted/main.swift between its README markers; \
            copy the excerpt into the README. \(difference ?? "")
            """)
    }

    @Test("The DocC article's example is the example's excerpt")
    func articleShowsTheExample() throws {
        let excerpt = try Self.excerpt()
        let path = "Sources/Saga/Saga.docc/GettingStarted.md"
        let block = try #require(try Self.swiftBlock(in: path, after: "<!-- example: Examples/GettingStarted -->"),
                                 "\(path) has no ```swift block after `<!-- example: Examples/GettingStarted -->`")
        let difference = Self.firstDifference(block, excerpt)
        #expect(difference == nil, """
            \(path)'s example is not Examples/GettingStarted/main.swift between its README markers; \
            copy the excerpt into the article. \(difference ?? "")
            """)
    }

    /// The built program (`swift build` builds it next to the test bundle) runs, checks its own
    /// results (it ends on a failed precondition otherwise) and says what it did. On SQLite, or
    /// on MariaDB when `SAGA_MYSQL_URL` is set.
    @Test("getting-started runs and exits 0")
    func exampleRuns() throws {
        let binary = URL(fileURLWithPath: Demo.executable).deletingLastPathComponent()
            .appendingPathComponent("getting-started").path
        try #require(FileManager.default.isExecutableFile(atPath: binary),
                     "\(binary) is missing: run `swift build --build-tests` (it builds every product)")
        let r = try TimedDemo.run([], executable: binary, timeout: 600)  // a deadline against a hang; it takes well under a second alone
        #expect(r.exitCode == 0, "getting-started failed: \(r.tail)")
        let lines = r.stdout.split(separator: "\n")
        for expected in [
            "moved 30 from alice to bob; alice has 70 left",
            "bob has only 230: nothing written",
            "alice: 1 transfer(s), last -30",
            "alice 70",
            "bob 230",
            "async: moved 20 from bob to alice; bob has 210 left",
            "OK: balances and activity agree (alice 90, bob 210, total 300)",
        ] {
            #expect(lines.contains(Substring(expected)), "missing line `\(expected)`: \(r.tail)")
        }
        // The negative amount passes the application's check; the CHECK constraint refuses it.
        #expect(lines.contains { $0.hasPrefix("failed (") && $0.hasSuffix("): nothing written") && $0.contains("UPDATE accounts") },
                "no line for the transfer the CHECK constraint refused: \(r.tail)")
    }
}
