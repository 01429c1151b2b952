import Logging

/// The coordinator's logger for one saga, with the saga's id as metadata, built only when a
/// message is actually logged: setting metadata on a `Logger` goes through its handler (which
/// may re-render its metadata), and it was done for every saga although the saga path logs
/// only on failures.
struct SagaLog {
    let base: Logger
    let saga: SagaID?

    init(_ base: Logger, saga: SagaID? = nil) { self.base = base; self.saga = saga }

    private func log(_ level: Logger.Level, _ message: () -> Logger.Message, file: String, function: String, line: UInt) {
        guard base.logLevel <= level else { return }
        var logger = base
        if let saga { logger[metadataKey: "saga"] = "\(saga.rawValue)" }
        logger.log(level: level, message(), file: file, function: function, line: line)
    }

    func debug(_ message: @autoclosure () -> Logger.Message, file: String = #fileID, function: String = #function, line: UInt = #line) {
        log(.debug, message, file: file, function: function, line: line)
    }
    func notice(_ message: @autoclosure () -> Logger.Message, file: String = #fileID, function: String = #function, line: UInt = #line) {
        log(.notice, message, file: file, function: function, line: line)
    }
    func warning(_ message: @autoclosure () -> Logger.Message, file: String = #fileID, function: String = #function, line: UInt = #line) {
        log(.warning, message, file: file, function: function, line: line)
    }
    func error(_ message: @autoclosure () -> Logger.Message, file: String = #fileID, function: String = #function, line: UInt = #line) {
        log(.error, message, file: file, function: function, line: line)
    }
}

extension SagaLog {
    /// Keys for a log line: the first few, quoted (hex escapes where not printable), and how
    /// many more; a saga of thousands of keys still logs one short line.
    static func keys(_ keys: some Collection<Bytes>, shown: Int = 8) -> String {
        let quoted = keys.prefix(shown).map { "\"\($0.debugText)\"" }.joined(separator: ", ")
        return keys.count > shown ? "\(quoted) and \(keys.count - shown) more" : quoted
    }
}
