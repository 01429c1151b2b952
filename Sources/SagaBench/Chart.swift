import Foundation

/// Throughput against added fsync latency as an SVG: one panel per backend (columns) and per
/// workload and thread count (rows), one line per mode. No dependency: the SVG is text.
struct FsyncChart {
    let report: BenchReport

    private struct PanelKey: Hashable { var workload: String; var threads: Int; var backend: BenchBackend }

    static let colors: [Mode: String] = [.unsafe: "#7f7f7f", .unsafeWithRow: "#2ca02c", .saga: "#1f77b4", .xa: "#d62728"]
    static let fallbackColors = ["#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]

    func svg() -> String {
        let cells = report.cells
        let backends = BenchBackend.allCases.filter { b in cells.contains { $0.backend == b } }
        var rows: [(workload: String, threads: Int)] = []
        for c in cells where !rows.contains(where: { $0.workload == c.workload && $0.threads == c.threads }) { rows.append((c.workload, c.threads)) }
        let modes = Mode.allCases.filter { m in cells.contains { $0.modes.contains { $0.mode == m } } }
        let panelW = 420.0, panelH = 260.0, left = 70.0, top = 50.0, gapX = 40.0, gapY = 70.0
        let width = left + Double(backends.count) * (panelW + gapX) + 20
        let height = top + Double(rows.count) * (panelH + gapY) + 40
        var out = """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" font-family="sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="22" font-size="15">Throughput against added fsync latency (median of \(report.rounds) rounds × \(report.secondsPerRound) s per mode)</text>

            """
        func color(_ m: Mode) -> String { Self.colors[m] ?? Self.fallbackColors[(modes.firstIndex(of: m) ?? 0) % Self.fallbackColors.count] }
        // Legend.
        for (i, m) in modes.enumerated() {
            let x = left + Double(i) * 110
            out += "<line x1=\"\(x)\" y1=\"36\" x2=\"\(x + 20)\" y2=\"36\" stroke=\"\(color(m))\" stroke-width=\"2.5\"/>"
            out += "<text x=\"\(x + 25)\" y=\"40\">\(m.rawValue)</text>\n"
        }
        for (r, row) in rows.enumerated() {
            for (b, backend) in backends.enumerated() {
                let panel = cells.filter { $0.backend == backend && $0.workload == row.workload && $0.threads == row.threads }
                    .sorted { ($0.fsyncDelayMs ?? 0) < ($1.fsyncDelayMs ?? 0) }
                guard !panel.isEmpty else { continue }
                let x0 = left + Double(b) * (panelW + gapX), y0 = top + 20 + Double(r) * (panelH + gapY)
                let maxX = max(panel.compactMap(\.fsyncDelayMs).max() ?? 1, 0.001)
                let maxY = niceCeiling(panel.flatMap(\.modes).map(\.medianPerSecond).max() ?? 1)
                func px(_ v: Double) -> Double { x0 + v / maxX * panelW }
                func py(_ v: Double) -> Double { y0 + panelH - v / maxY * panelH }
                out += "<text x=\"\(x0)\" y=\"\(y0 - 8)\" font-size=\"13\" font-weight=\"bold\">\(backend.rawValue), \(row.workload), \(row.threads) thread\(row.threads == 1 ? "" : "s")</text>\n"
                out += "<rect x=\"\(x0)\" y=\"\(y0)\" width=\"\(panelW)\" height=\"\(panelH)\" fill=\"none\" stroke=\"#444\"/>\n"
                for i in 0...4 {
                    let v = maxY * Double(i) / 4
                    out += "<line x1=\"\(x0)\" y1=\"\(py(v))\" x2=\"\(x0 + panelW)\" y2=\"\(py(v))\" stroke=\"#ddd\"/>"
                    out += "<text x=\"\(x0 - 6)\" y=\"\(py(v) + 4)\" text-anchor=\"end\">\(Int(v))</text>\n"
                }
                for d in Set(panel.compactMap(\.fsyncDelayMs)).sorted() {
                    out += "<line x1=\"\(px(d))\" y1=\"\(y0 + panelH)\" x2=\"\(px(d))\" y2=\"\(y0 + panelH + 4)\" stroke=\"#444\"/>"
                    out += "<text x=\"\(px(d))\" y=\"\(y0 + panelH + 16)\" text-anchor=\"middle\">\(format(d))</text>\n"
                }
                out += "<text x=\"\(x0 + panelW / 2)\" y=\"\(y0 + panelH + 32)\" text-anchor=\"middle\">added fsync latency, ms</text>\n"
                out += "<text transform=\"translate(\(x0 - 48),\(y0 + panelH / 2)) rotate(-90)\" text-anchor=\"middle\">sagas/s</text>\n"
                for m in modes {
                    let points = panel.compactMap { c in c.modes.first { $0.mode == m }.map { (c.fsyncDelayMs ?? 0, $0.medianPerSecond) } }
                    guard !points.isEmpty else { continue }
                    let path = points.map { "\(String(format: "%.1f", px($0.0))),\(String(format: "%.1f", py($0.1)))" }.joined(separator: " ")
                    out += "<polyline points=\"\(path)\" fill=\"none\" stroke=\"\(color(m))\" stroke-width=\"2\"/>"
                    for p in points { out += "<circle cx=\"\(String(format: "%.1f", px(p.0)))\" cy=\"\(String(format: "%.1f", py(p.1)))\" r=\"3\" fill=\"\(color(m))\"/>" }
                    out += "\n"
                }
            }
        }
        return out + "</svg>\n"
    }

    private func format(_ d: Double) -> String { d == d.rounded() ? String(Int(d)) : String(d) }

    /// A round number at or above `v` for the top of an axis.
    private func niceCeiling(_ v: Double) -> Double {
        guard v > 0 else { return 1 }
        let p = pow(10, floor(log10(v)))
        for m in [1.0, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10] where m * p >= v { return m * p }
        return 10 * p
    }
}
