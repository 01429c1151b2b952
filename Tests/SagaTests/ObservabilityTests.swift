import Foundation
import InMemoryTracing
import Logging
import MetricsTestKit
@testable import Saga
import SagaTestKit
import Synchronization
import Testing
import Tracing

/// Metrics and spans after real sagas on RocksDB + SQLite (issue 14).
@Suite("Observability: metrics and tracing")
struct ObservabilityTests {
    /// A hook the test arms per step: fail the next few times a step is reached in a phase, or
    /// run an action there (a write behind the coordinator's back).
    final class ArmedHooks: SagaHooks, Sendable {
        private let failures = Mutex<[String: Int]>([:])
        private let actions = Mutex<[String: @Sendable () throws -> Void]>([:])
        /// How many armed failures were used, per step and phase.
        let used = Mutex<[String: Int]>([:])
        /// Every step reached, with its phase.
        let seen = Mutex<[SagaPhase: Set<SagaStep>]>([:])

        private static func key(_ step: SagaStep, _ phase: SagaPhase) -> String { "\(phase):\(step)" }

        func fail(_ step: SagaStep, _ phase: SagaPhase, times: Int) {
            failures.withLock { $0[Self.key(step, phase), default: 0] += times }
        }

        func once(_ step: SagaStep, _ phase: SagaPhase, _ action: @escaping @Sendable () throws -> Void) {
            actions.withLock { $0[Self.key(step, phase)] = action }
        }

        func usedFailures(_ step: SagaStep, _ phase: SagaPhase) -> Int { used.withLock { $0[Self.key(step, phase)] ?? 0 } }

        func reached(_ step: SagaStep, phase: SagaPhase, saga: SagaID?) throws {
            let key = Self.key(step, phase)
            seen.withLock { _ = $0[phase, default: []].insert(step) }
            if let action = actions.withLock({ $0.removeValue(forKey: key) }) { try action() }
            let fail = failures.withLock { f -> Bool in
                guard let n = f[key], n > 0 else { return false }
                f[key] = n - 1
                return true
            }
            if fail {
                used.withLock { $0[key, default: 0] += 1 }
                throw InjectedFault(step: step, phase: phase)
            }
        }
    }

    static func write(_ saga: Saga, _ key: String, _ value: Int) throws {
        try saga.sql.execute("INSERT INTO saga_test (k, v) VALUES (?, ?)", [.text(key), .integer(Int64(value))])
        try saga.kv.put(key, "\(value)")
    }

    static func outcome(_ o: String) -> [(String, String)] { [("outcome", o), ("mode", "compensate")] }
    static func step(_ s: SagaStep, _ p: SagaPhase) -> [(String, String)] { [("step", s.rawValue), ("phase", p.rawValue)] }

    /// Every outcome of `run` is counted once under its label, each step's time is recorded
    /// under its step and phase, the in-doubt gauges follow the in-doubt set, and recovery and
    /// garbage collection count what they did.
    @Test func metricsCountRealSagas() throws {
        let env = try SQLiteHarness().makeEnvironment() as! SQLiteEnvironment
        defer { env.destroy() }
        let metrics = TestMetrics()
        let hooks = ArmedHooks()
        let c = try env.coordinator(.init(hooks: hooks, metricsFactory: metrics))
        defer { c.close() }

        for i in 0..<3 { try c.run { try Self.write($0, "ok\(i)", i) } }
        // COMMIT fails (deferred foreign key): compensated.
        #expect(throws: SagaError.self) {
            try c.run { saga in try Self.write(saga, "cf", 1); try env.arrangeCommitFailure(in: saga) }
        }
        // The body throws: nothing written.
        struct Refused: Error {}
        #expect(throws: SagaError.self) { try c.run { saga in try Self.write(saga, "bf", 1); throw Refused() } }

        #expect(try metrics.expectCounter(SagaMetrics.sagasTotal, Self.outcome("committed")).totalValue == 3)
        #expect(try metrics.expectCounter(SagaMetrics.sagasTotal, Self.outcome("compensated")).totalValue == 1)
        #expect(try metrics.expectCounter(SagaMetrics.sagasTotal, Self.outcome("failed")).totalValue == 1)
        #expect(try metrics.expectTimer(SagaMetrics.sagaDuration, Self.outcome("committed")).values.count == 3)
        #expect(try metrics.expectGauge(SagaMetrics.inDoubtCount).lastValue == nil, "nothing was ever in doubt")

        // COMMIT fails and so does the compensation: in doubt until recovery.
        hooks.fail(.compensate, .run, times: 1)
        let doubtful: SagaID
        do {
            try c.run { saga in try Self.write(saga, "id", 1); try env.arrangeCommitFailure(in: saga) }
            Issue.record("the saga committed")
            return
        } catch {
            guard case .compensationFailedAfterCommit(let id, _, _) = error else { Issue.record("got \(error)"); return }
            doubtful = id
        }
        #expect(c.inDoubt == [doubtful])
        #expect(try metrics.expectCounter(SagaMetrics.sagasTotal, Self.outcome("in_doubt")).totalValue == 1)
        #expect(try metrics.expectGauge(SagaMetrics.inDoubtCount).lastValue == 1)
        let age = try #require(c.oldestInDoubtAge)
        c.refreshInDoubtGauges()
        let gaugeAge = try #require(try metrics.expectGauge(SagaMetrics.oldestInDoubt).lastValue)
        #expect(gaugeAge > 0 && gaugeAge >= age.seconds, "the age gauge (\(gaugeAge) s) is at least the age read before (\(age))")

        // Recovery decides it (no marker: compensated) and collects the finished sagas.
        let report = try c.recover()
        #expect(report.compensated == [doubtful])
        #expect(c.inDoubt.isEmpty && c.oldestInDoubtAge == nil)
        #expect(try metrics.expectGauge(SagaMetrics.inDoubtCount).lastValue == 0)
        #expect(try metrics.expectGauge(SagaMetrics.oldestInDoubt).lastValue == 0)
        #expect(try metrics.expectCounter(SagaMetrics.recoveryDecisions, [("decision", "compensated")]).totalValue == 1)
        #expect(try metrics.expectCounter(SagaMetrics.recoveryDecisions, [("decision", "committed")]).totalValue == 0)
        // 3 committed, 1 compensated at COMMIT, 1 compensated by recovery; the body failure left
        // nothing to collect.
        #expect(try metrics.expectCounter(SagaMetrics.gcCollected).totalValue == 5)
        #expect(try c.collectGarbage() == 0)
        #expect(try metrics.expectCounter(SagaMetrics.gcCollected).totalValue == 5)

        // A key changed behind the coordinator before the undo: a foreign write.
        hooks.once(.compensate, .run) {
            var batch = KVWriteBatch()
            batch.put(Bytes("fw".utf8), Bytes("intruder".utf8))
            try env.kv.write(batch, sync: true)
        }
        do {
            try c.run { saga in try Self.write(saga, "fw", 1); try env.arrangeCommitFailure(in: saga) }
            Issue.record("the saga committed")
        } catch {
            guard case .compensationFailedAfterCommit(_, _, .foreignWrite) = error else { Issue.record("got \(error)"); return }
        }
        #expect(try metrics.expectCounter(SagaMetrics.sagasTotal, Self.outcome("foreign_write")).totalValue == 1)
        #expect(try metrics.expectGauge(SagaMetrics.inDoubtCount).lastValue == 1, "the saga stays prepared, for a human")

        // Steps: all 7 sagas began, 6 reached COMMIT (not the failed body), 3 compensated in
        // the run (one undo then failed, one found a foreign write), 1 in recovery.
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.begin, .run)).values.count == 7)
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.commit, .run)).values.count == 6)
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.committed, .run)).values.count == 3)
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.compensate, .run)).values.count == 3)
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.compensate, .recovery)).values.count == 1)
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.gcJournal, .gc)).values.count >= 1)
        #expect(try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(.begin, .run)).values.allSatisfy { $0 >= 0 })
        // Bounded: no label value other than the fixed enums' (never a saga id or a key).
        let labels = Set(SagaMetrics.Outcome.allCases.map(\.rawValue) + SagaStep.allCases.map(\.rawValue) + SagaPhase.allCases.map(\.rawValue)
            + SagaMetrics.Decision.allCases.map(\.rawValue) + SagaCoordinator.Configuration.Mode.allCases.map(\.rawValue))
        for counter in metrics.counters { for (_, v) in counter.dimensions { #expect(labels.contains(v), "label value \(v)") } }
        for timer in metrics.timers { for (_, v) in timer.dimensions { #expect(labels.contains(v), "label value \(v)") } }
    }

    /// A saga left in doubt across a reopen counts its age from when it was prepared (its
    /// journal record says), not from the reopen: the age read after the reopen is at least the
    /// time since the saga had ended before it (less the record's millisecond rounding).
    @Test func inDoubtAgeCountsFromThePrepareAcrossAReopen() throws {
        let env = try SQLiteHarness().makeEnvironment() as! SQLiteEnvironment
        defer { env.destroy() }
        let hooks = ArmedHooks()
        let metrics = TestMetrics()
        var c = try env.coordinator(.init(hooks: hooks))
        hooks.fail(.compensate, .run, times: 1)
        _ = try? c.run { saga in try Self.write(saga, "a", 1); try env.arrangeCommitFailure(in: saga) }
        let ended = ContinuousClock.now
        #expect(c.inDoubt.count == 1)
        c.close()
        // Long enough that an age counted from the reopen would be far below the bound.
        Thread.sleep(forTimeInterval: 0.3)
        hooks.fail(.resolve, .recovery, times: 1)
        let reopening = ContinuousClock.now
        c = try env.coordinator(.init(hooks: hooks, metricsFactory: metrics))
        defer { c.close() }
        #expect(c.inDoubt.count == 1, "recovery at open could not decide it")
        let before = ContinuousClock.now
        let age = try #require(c.oldestInDoubtAge)
        #expect(age >= (before - ended) - .milliseconds(2), "age \(age), at least \(before - ended) since the saga ended")
        let gauge = try #require(try metrics.expectGauge(SagaMetrics.oldestInDoubt).lastValue)
        #expect(gauge >= ((reopening - ended) - .milliseconds(2)).seconds, "the gauge set at open (\(gauge) s) counts from the prepare too")
    }

    /// Every step a saga, recovery or GC reaches, in either mode, has a timer: the table of
    /// reachable steps per phase covers what the coordinator really does (with COMMIT failures,
    /// undos, recovery, checkpoints and GC).
    @Test(arguments: SagaCoordinator.Configuration.Mode.allCases)
    func everyStepReachedIsTimed(_ mode: SagaCoordinator.Configuration.Mode) throws {
        let env = try SQLiteHarness().makeEnvironment() as! SQLiteEnvironment
        defer { env.destroy() }
        let metrics = TestMetrics()
        let hooks = ArmedHooks()
        var c = try env.coordinator(.init(hooks: hooks, gcThreshold: 2, mode: mode, checkpointEvery: 2, metricsFactory: metrics))
        for i in 0..<4 { try c.run { try Self.write($0, "s\(i)", i) } }
        #expect(throws: SagaError.self) { try c.run { saga in try Self.write(saga, "f", 1); try env.arrangeCommitFailure(in: saga) } }
        // Compensate mode: an undo left to recovery.
        hooks.fail(.compensate, .run, times: 1)
        _ = try? c.run { saga in try Self.write(saga, "r", 1); try env.arrangeCommitFailure(in: saga) }
        try c.recover()
        try c.collectGarbage()
        c.close()
        c = try env.coordinator(.init(hooks: hooks, mode: mode, metricsFactory: metrics))
        c.close()
        let seen = hooks.seen.withLock { $0 }
        #expect(!seen.isEmpty)
        for (phase, steps) in seen {
            for step in steps {
                #expect(SagaMetrics.reachable[phase]?.contains(step) == true, "\(phase):\(step) is reached but has no timer")
                let timer = try metrics.expectTimer(SagaMetrics.stepDuration, Self.step(step, phase))
                #expect(!timer.values.isEmpty, "\(phase):\(step) was timed")
            }
        }
    }

    /// The metrics are documented in one place, OperatingANode.md: every name, and every
    /// value of the `outcome` and `decision` labels, is in its table or list.
    @Test func everyMetricIsDocumented() throws {
        let article = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Sources/Saga/Saga.docc/OperatingANode.md")
        let text = try String(contentsOf: article, encoding: .utf8)
        for name in SagaMetrics.allNames { #expect(text.contains("| `\(name)` |"), "\(name) is in the table") }
        for value in SagaMetrics.Outcome.allCases.map(\.rawValue) + SagaMetrics.Decision.allCases.map(\.rawValue) {
            #expect(text.contains("`\(value)`"), "label value \(value) is explained")
        }
    }

    /// The step index used on the hot path agrees with `allCases`.
    @Test func stepAndPhaseIndexesMatchAllCases() {
        #expect(SagaStep.allCases.map(\.index) == Array(0..<SagaStep.allCases.count))
        #expect(SagaPhase.allCases.map(\.index) == Array(0..<SagaPhase.allCases.count))
        #expect(SagaMetrics.Outcome.allCases.map(\.index) == Array(0..<SagaMetrics.Outcome.allCases.count))
    }

    /// A saga from async code gets one span, a child of the caller's span although the saga
    /// runs on another thread (the coordinator's pool); the span carries the saga id, the
    /// outcome and each step as an event; a failed saga's span has an error status.
    @Test func asyncSagaSpanIsAChildOfTheCallersSpan() async throws {
        let env = try SQLiteHarness().makeEnvironment() as! SQLiteEnvironment
        defer { env.destroy() }
        let tracer = InMemoryTracer()
        let c = try env.coordinator(.init(tracer: tracer))
        defer { c.close() }

        let (id, sagaThread, bodyContext) = try await tracer.withSpan("request") { _ in
            try await c.run { saga in
                try Self.write(saga, "t1", 1)
                return (saga.id, Thread.current.name ?? "", ServiceContext.current?.inMemorySpanContext)
            }
        }
        #expect(sagaThread.hasPrefix("saga-async-"), "the body ran on the coordinator's pool, not the caller's thread: \(sagaThread)")
        let failed: SagaID? = await tracer.withSpan("request-2") { (_: any Span) async -> SagaID? in
            do {
                try await c.run { saga in try Self.write(saga, "t2", 2); try env.arrangeCommitFailure(in: saga) }
                Issue.record("the saga committed")
                return nil
            } catch {
                guard case .commitFailed(let id, _, _)? = error as? SagaError else { Issue.record("got \(error)"); return nil }
                return id
            }
        }

        let spans = tracer.finishedSpans
        let request = try #require(spans.first { $0.operationName == "request" })
        let sagaSpans = spans.filter { $0.operationName == "saga" }
        #expect(sagaSpans.count == 2)
        let saga = try #require(sagaSpans.first { $0.attributes.get("saga.id") == .int64(Int64(id.rawValue)) })
        #expect(saga.traceID == request.traceID)
        #expect(saga.parentSpanID == request.spanID, "the saga's span is a child of the caller's")
        #expect(bodyContext?.spanID == saga.spanID, "in the body, the saga's span is the current one: the body's spans nest under it")
        #expect(saga.attributes.get("saga.outcome") == .string("committed"))
        #expect(saga.events.map { $0.name } == ["begin", "body", "prepare", "prepared", "marker", "commit", "committed"])
        #expect(saga.status == nil && saga.errors.isEmpty)

        let request2 = try #require(spans.first { $0.operationName == "request-2" })
        let failedID = Int64(try #require(failed).rawValue)
        let bad = try #require(sagaSpans.first { $0.attributes.get("saga.id") == .int64(failedID) })
        #expect(bad.parentSpanID == request2.spanID)
        #expect(bad.attributes.get("saga.outcome") == .string("compensated"))
        #expect(bad.status?.code == .error)
        #expect(bad.errors.count == 1)
        #expect(bad.events.map { $0.name }.suffix(3) == ["commit", "compensate", "compensated"])
    }

    /// Without a span around the call, the saga's span is a root.
    @Test func blockingSagaWithoutCallerSpanIsARoot() throws {
        let env = try SQLiteHarness().makeEnvironment()
        defer { env.destroy() }
        let tracer = InMemoryTracer()
        let c = try env.coordinator(.init(tracer: tracer))
        defer { c.close() }
        try c.run { try Self.write($0, "r", 1) }
        let span = try #require(tracer.finishedSpans.first)
        #expect(span.operationName == "saga" && span.parentSpanID == nil)
        #expect(span.attributes.get("saga.mode") == .string("compensate"))
    }
}

/// `aa-demo run --metrics-file F` writes the coordinator's metrics in Prometheus' text format
/// when the run ends.
@Suite("aa-demo: metrics file", .serialized)
struct AADemoMetricsTests {
    /// One sample of a Prometheus text exposition.
    struct Sample { let name: String; let labels: [String: String]; let value: Double }

    /// Parses the text exposition format (0.0.4) strictly enough to refuse a malformed file:
    /// every line is a comment, `# HELP`/`# TYPE`, or `name{label="value",...} number`, and
    /// every sample belongs to a family declared by a `# TYPE` line before it.
    static func parse(_ text: String) throws -> [Sample] {
        struct Malformed: Error, CustomStringConvertible { let line: String; var description: String { "malformed line: \(line)" } }
        let name = #/[a-zA-Z_:][a-zA-Z0-9_:]*/#
        let sampleLine = #/^(?<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?<labels>[^}]*)\})?[ ](?<value>\S+)(?:[ ]-?[0-9]+)?$/#
        let label = #/(?<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?<value>(?:[^"\\]|\\.)*)",?/#
        var types: [String: String] = [:]
        var samples: [Sample] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: true).map(String.init) {
            if line.hasPrefix("# TYPE ") {
                let parts = line.split(separator: " ")
                guard parts.count == 4, (try? name.wholeMatch(in: parts[2])) != nil,
                      ["counter", "gauge", "histogram", "summary", "untyped"].contains(parts[3]) else { throw Malformed(line: line) }
                types[String(parts[2])] = String(parts[3])
                continue
            }
            if line.hasPrefix("#") { continue }
            guard let m = try sampleLine.wholeMatch(in: line) else { throw Malformed(line: line) }
            let valueText = String(m.value)
            guard let value = Double(valueText) ?? ["+Inf": .infinity, "-Inf": -.infinity, "NaN": .nan][valueText] else { throw Malformed(line: line) }
            var labels: [String: String] = [:]
            if let text = m.labels {
                var rest = Substring(text)
                while !rest.isEmpty {
                    guard let l = try label.prefixMatch(in: rest) else { throw Malformed(line: line) }
                    labels[String(l.key)] = String(l.value)
                    rest = rest[l.range.upperBound...]
                }
            }
            let family = String(m.name)
            let base = ["_bucket", "_sum", "_count"].first(where: family.hasSuffix).map { String(family.dropLast($0.count)) }
            guard types[family] != nil || base.map({ types[$0] == "histogram" || types[$0] == "summary" }) == true else { throw Malformed(line: line) }
            samples.append(Sample(name: family, labels: labels, value: value))
        }
        return samples
    }

    /// 40 triggers, the COMMIT of one fails once (deferred foreign key; retried): the file
    /// parses, its committed counter equals the triggers processed, and the failed COMMIT is
    /// counted as compensated.
    @Test func runWritesPrometheusMetrics() throws {
        let node = try AADemoNode.sqlite("aa-metrics")
        defer { node.destroy() }
        let file = node.dir + "/metrics.prom"
        let r = try TimedDemo.run(node.runArguments(triggers: "40") + ["--fail-commit-at", "5", "--metrics-file", file], timeout: 120)
        #expect(r.exitCode == 0, "\(r.tail)")
        let processed = r.stdout.split(separator: "\n").compactMap { line -> Int? in
            guard line.hasPrefix("done: ") else { return nil }
            return Int(line.dropFirst(6).prefix { $0.isNumber })
        }.first
        #expect(processed == 40, "\(r.stdout.suffix(300))")

        let text = try String(contentsOfFile: file, encoding: .utf8)
        let samples = try Self.parse(text)
        func value(_ name: String, _ labels: [String: String]) -> Double? {
            samples.first { $0.name == name && $0.labels == labels }?.value
        }
        #expect(value("saga_sagas_total", ["outcome": "committed", "mode": "compensate"]) == Double(try #require(processed)))
        #expect(value("saga_sagas_total", ["outcome": "compensated", "mode": "compensate"]) == 1)
        #expect(value("saga_sagas_total", ["outcome": "in_doubt", "mode": "compensate"]) == 0)
        #expect(value("saga_duration_seconds_count", ["outcome": "committed", "mode": "compensate"]) == 40)
        #expect(value("saga_in_doubt", [:]) == 0)
        // At the end of the run everything finished was collected (the run ends with a GC).
        #expect(value("saga_gc_collected_total", [:]) == 41)
        #expect(samples.allSatisfy { !$0.labels.values.contains { $0.hasPrefix("saga#") } }, "no saga id as a label value")
    }

    @Test func parserRefusesMalformedText() {
        #expect(throws: (any Error).self) { try Self.parse("saga_x 1\n") }  // no TYPE
        #expect(throws: (any Error).self) { try Self.parse("# TYPE saga_x counter\nsaga_x{a=1} 1\n") }
        #expect(throws: (any Error).self) { try Self.parse("# TYPE saga_x counter\nsaga_x one\n") }
        #expect((try? Self.parse("# TYPE saga_x counter\nsaga_x{a=\"b\",c=\"d\"} 2\n"))?.first?.labels == ["a": "b", "c": "d"])
    }
}
