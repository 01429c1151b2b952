import ArgumentParser
import Foundation
import Logging
import MySQLBackend
import RocksDBBackend
import Saga
import SQLiteBackend

@main
struct SagaTool: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "saga",
        abstract: "Look at and repair the saga state of a node's stores (a RocksDB directory and its SQL database).",
        discussion: """
            Run it on the stores of a node that is stopped: a running node holds them, and the \
            tool refuses (exit 3). `status`, `inspect` and `verify-journal` only read; `recover`, \
            `resolve` and `gc` open a coordinator, which runs recovery.

            Exit codes:
              0  nothing needs attention (the command did what it was asked)
              1  needs attention: sagas in doubt or held (foreign write), damaged journal \
            entries, the database unreachable, or recovery left something undecided
              2  error: a store cannot be opened, the saga is unknown, the open was refused \
            (instance claimed by another journal)
              3  refused: the stores are in use by a running node (RocksDB's LOCK, or the \
            instance held in the SQL database)
              64 the command line is wrong

            With --json every command prints one JSON object on stdout (keys in \
            Saga.docc/OperatingANode.md, "The saga tool"), also when it fails.
            """,
        subcommands: [Status.self, Inspect.self, Recover.self, Resolve.self, GC.self, VerifyJournal.self])
}

// MARK: - Stores

/// Where a node's stores are: shared by every subcommand.
struct StoreOptions: ParsableArguments {
    @Option(name: .customLong("kv"), help: "The node's RocksDB directory.")
    var kv: String

    @Option(name: .customLong("sql"), help: "The node's SQL database: an SQLite file path, or mysql://user:password@host:port/database.")
    var sql: String?

    @Option(name: .customLong("table"), help: "The marker table's name (the backend's markerTable).")
    var table: String = "saga_markers"

    @Flag(help: "Print one JSON object (stable keys) instead of text.")
    var json = false

    @Flag(help: "Log the coordinator's steps to stderr (commands that open one).")
    var verbose = false

    var isMySQL: Bool { sql?.hasPrefix("mysql://") ?? false }

    func requireSQL() throws -> String {
        guard let sql else { throw ToolFailure(.error, "this command needs --sql (an SQLite file path or a mysql:// URL)") }
        return sql
    }

    /// The KV store, never created: a path that holds no store is an error, a locked one a refusal.
    func openKV() throws -> RocksDBStore {
        // RocksDB creates the directory even when told not to create the store: look first.
        guard FileManager.default.fileExists(atPath: kv + "/CURRENT") else {
            throw ToolFailure(.error, "cannot open the KV store at \(kv): no RocksDB store there (no CURRENT file)")
        }
        var options = RocksDBStore.Options()
        options.createIfMissing = false
        do {
            return try RocksDBStore(path: kv, options: options)
        } catch let e as RocksDBError where e.isLocked {
            throw ToolFailure(.inUse, "the KV store at \(kv) is open in another process (a running node): stop it first, or look at that node's state through its metrics and logs")
        } catch {
            throw ToolFailure(.error, "cannot open the KV store at \(kv): \(error)")
        }
    }

    /// A read-only connection to the SQL database, or why there is none.
    func readOnlySQL() -> Result<any SQLExecutor, any Error> {
        Result {
            let sql = try requireSQL()
            if isMySQL {
                var c = MySQLDatabase.Configuration()
                c.markerTable = table
                c.connectTimeout = .seconds(3)
                return try MySQLDatabase.openReadOnly(url: try MySQLURL(sql), configuration: c)
            }
            guard FileManager.default.fileExists(atPath: sql) else { throw ToolFailure(.error, "no SQLite database at \(sql)") }
            var c = SQLiteDatabase.Configuration()
            c.markerTable = table
            return try SQLiteDatabase.openReadOnly(path: sql, configuration: c)
        }
    }

    /// Reads the node read-only (``NodeInspection``) with the KV store `kv` (nil: opened and
    /// closed here) and a read-only SQL connection, which `body` may query too.
    func inspect<T>(_ kv: RocksDBStore? = nil, _ body: (NodeInspection, Result<any SQLExecutor, any Error>) throws -> T) throws -> T {
        let store = try kv ?? openKV()
        defer { if kv == nil { store.close() } }
        let sql = readOnlySQL()
        defer { if case .success(let c as any SQLConnection) = sql { c.close() } }
        return try body(try NodeInspection.read(kv: store, sql: sql, markerTable: table), sql)
    }

    /// The SQL database as a coordinator opens it (creates the marker table if missing).
    func openSQL() throws -> any SQLDatabase {
        let sql = try requireSQL()
        do {
            if isMySQL {
                var c = MySQLDatabase.Configuration()
                c.markerTable = table
                c.connectTimeout = .seconds(3)
                return try MySQLDatabase(url: sql, configuration: c)
            }
            guard FileManager.default.fileExists(atPath: sql) else { throw ToolFailure(.error, "no SQLite database at \(sql)") }
            var c = SQLiteDatabase.Configuration()
            c.markerTable = table
            return try SQLiteDatabase(path: sql, configuration: c)
        } catch let failure as ToolFailure {
            throw failure
        } catch {
            throw ToolFailure(.attention, "database unreachable: \(error)", unreachable: true)
        }
    }

    /// The SQL side as the output names it (a URL without its password).
    var sqlDescription: Any {
        guard let sql else { return NSNull() }
        if isMySQL { return (try? MySQLURL(sql)).map { "\($0)" } ?? "mysql://…" }
        return sql
    }

    var logger: Logger {
        var logger = Logger(label: "saga") { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = verbose ? .debug : .error
        return logger
    }

    /// Opens a coordinator (recovery runs), gives it to `body`, closes it. Turns the refusals
    /// of a store in use into ``ToolFailure/Kind/inUse``.
    func withCoordinator<T>(kv: RocksDBStore, sql: any SQLDatabase, _ body: (SagaCoordinator) throws -> T) throws -> T {
        let coordinator: SagaCoordinator
        do {
            coordinator = try SagaCoordinator(kv: kv, sql: sql, logger: logger)
        } catch .misuse(.instanceInUse(let instance)) {
            throw ToolFailure(.inUse, "\(instance) is held by a running coordinator on this SQL database (another process, on a copy of this KV store): stop that node first")
        } catch .misuse(.storeInUse) {
            throw ToolFailure(.inUse, "the KV store at \(self.kv) is in use by another coordinator")
        } catch .sqlFailed(_, _, let underlying) {
            throw ToolFailure(.attention, "database unreachable: \(underlying)", unreachable: true)
        } catch .journalCorrupt(let saga, let key, let reason) {
            throw ToolFailure(.attention, "the journal holds a damaged entry (\(saga.map { "\($0)" } ?? "key \"\(key.debugText)\""): \(reason)); recovery decided the other prepared sagas but refuses to guess this one and stops: run `saga verify-journal`, and restore the entry from a backup or a copy of the store")
        } catch {
            throw ToolFailure(.error, "cannot open a coordinator: \(error)")
        }
        defer { coordinator.close() }
        return try body(coordinator)
    }
}

/// Why a command ends with a non-zero exit, and which.
struct ToolFailure: Error, CustomStringConvertible {
    enum Kind: Int32 { case attention = 1, error = 2, inUse = 3 }
    let kind: Kind
    let description: String
    /// The database could not be reached (the sagas stay in doubt).
    var unreachable = false
    init(_ kind: Kind, _ description: String, unreachable: Bool = false) {
        self.kind = kind; self.description = description; self.unreachable = unreachable
    }
}

/// Runs a command body: prints what it returns (JSON or text) and exits with its code; a
/// failure prints its message (stderr, and a JSON object with `error` and `exitCode`).
func perform(_ options: StoreOptions, _ body: () throws -> (json: [String: Any], text: String, exit: Int32)) throws {
    do {
        let result = try body()
        var object = result.json
        object["exitCode"] = Int(result.exit)
        emit(options, object, result.text)
        if result.exit != 0 { throw ExitCode(result.exit) }
    } catch let failure as ToolFailure {
        if options.json {
            emit(options, ["error": failure.description, "exitCode": Int(failure.kind.rawValue), "kv": options.kv, "sql": options.sqlDescription], "")
        }
        FileHandle.standardError.write(Data("saga: \(failure.description)\n".utf8))
        throw ExitCode(failure.kind.rawValue)
    }
}

func emit(_ options: StoreOptions, _ object: [String: Any], _ text: String) {
    if options.json {
        let data = (try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? Data("{}".utf8)
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    } else if !text.isEmpty {
        FileHandle.standardOutput.write(Data((text.hasSuffix("\n") ? text : text + "\n").utf8))
    }
}

// MARK: - Rendering bytes

/// A KV value for JSON: `{"text": ..., "hex": ...}` (`text` null unless the bytes are printable
/// UTF-8), or null for an absent value.
func jsonValue(_ bytes: Bytes?) -> Any {
    guard let bytes else { return NSNull() }
    return ["text": printable(bytes) ?? NSNull(), "hex": hex(bytes)] as [String: Any]
}

func hex(_ bytes: Bytes) -> String { bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() }

/// The bytes as text if they are valid UTF-8 with no control characters but newline and tab.
func printable(_ bytes: Bytes) -> String? {
    guard let s = String(validating: bytes, as: UTF8.self) else { return nil }
    return s.unicodeScalars.allSatisfy { $0 == "\n" || $0 == "\t" || !($0.properties.generalCategory == .control) } ? s : nil
}

/// A KV value for text output: quoted text (newlines as \n) where printable, else 0x + hex.
func textValue(_ bytes: Bytes?) -> String {
    guard let bytes else { return "absent" }
    if let s = printable(bytes) {
        return "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\n", with: "\\n").replacingOccurrences(of: "\t", with: "\\t") + "\""
    }
    return "0x" + hex(bytes) + " (\(bytes.count) bytes)"
}

func ageText(_ ms: UInt64?) -> String {
    guard let ms else { return "age unknown (record of format version 1 or 2)" }
    let s = Double(ms) / 1000
    if s < 120 { return String(format: "%.1f s old", s) }
    if s < 7200 { return String(format: "%.1f min old", s / 60) }
    return String(format: "%.1f h old", s / 3600)
}

func seconds(_ ms: UInt64?) -> Any { ms.map { Double($0) / 1000 } ?? NSNull() }

func iso8601(_ ms: UInt64?) -> Any {
    guard let ms, ms > 0 else { return NSNull() }
    let f = ISO8601DateFormatter()
    f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
    return f.string(from: Date(timeIntervalSince1970: Double(ms) / 1000))
}

func ids(_ list: [SagaID]) -> [UInt64] { list.map(\.rawValue) }
