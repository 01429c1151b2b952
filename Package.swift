// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Saga",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Saga", targets: ["Saga"]),
        .library(name: "RocksDBBackend", targets: ["RocksDBBackend"]),
        .library(name: "SQLiteBackend", targets: ["SQLiteBackend"]),
        .library(name: "MySQLBackend", targets: ["MySQLBackend"]),
        // A swift-service-lifecycle `Service` around a coordinator; apart so the core does not
        // depend on swift-service-lifecycle.
        .library(name: "SagaServiceLifecycle", targets: ["SagaServiceLifecycle"]),
        // For tests only, never a shipping program: the conformance suite every backend runs,
        // step hooks that crash or fail the process, SQLite's fault VFS, throwaway servers.
        .library(name: "SagaTesting", targets: ["SagaTestKit", "SagaFaultKit"]),
        .executable(name: "aa-demo", targets: ["AATrigger"]),
        .executable(name: "getting-started", targets: ["GettingStarted"]),
        .executable(name: "saga-torture", targets: ["SagaTorture"]),
        .executable(name: "saga-bench", targets: ["SagaBench"]),
        .executable(name: "saga", targets: ["SagaTool"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // `swift package generate-documentation`: the DocC catalog in Sources/Saga/Saga.docc.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
        // Observability: the core emits metrics and spans through these APIs; the caller picks
        // the backends.
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.7.3"),
        .package(url: "https://github.com/apple/swift-service-context", from: "1.5.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        // aa-demo's --metrics-file: Prometheus text exposition.
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // C libraries from Debian's packages, found through pkg-config.
        .systemLibrary(
            name: "CRocksDB", path: "Sources/CShims/CRocksDB", pkgConfig: "rocksdb",
            providers: [.apt(["librocksdb-dev"])]),
        .systemLibrary(
            name: "CSQLite", path: "Sources/CShims/CSQLite", pkgConfig: "sqlite3",
            providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(
            name: "CMariaDB", path: "Sources/CShims/CMariaDB", pkgConfig: "libmariadb",
            providers: [.apt(["libmariadb-dev"])]),
        // Small C helpers: the fault-injecting SQLite VFS (opt-in by VFS name) ...
        .target(name: "CSagaFaults", dependencies: ["CSQLite"], path: "Sources/CShims/CSagaFaults"),
        // ... and an fsync and write-family interposer, linked into test programs only (it
        // replaces fsync, write, pwrite...).
        .target(name: "CFsyncFaults", path: "Sources/CShims/CFsyncFaults", linkerSettings: [.linkedLibrary("dl")]),

        // The core: protocols, coordinator, journal, locks, recovery. Knows no backend.
        .target(name: "Saga", dependencies: [
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Tracing", package: "swift-distributed-tracing"),
            .product(name: "ServiceContextModule", package: "swift-service-context"),
        ]),
        // The coordinator as a swift-service-lifecycle service: in-doubt retries, background
        // garbage collection, graceful shutdown.
        .target(name: "SagaServiceLifecycle", dependencies: [
            "Saga",
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "RocksDBBackend", dependencies: ["Saga", "CRocksDB"], path: "Sources/Backends/RocksDBBackend"),
        .target(name: "SQLiteBackend", dependencies: ["Saga", "CSQLite"], path: "Sources/Backends/SQLiteBackend"),
        .target(name: "MySQLBackend", dependencies: ["Saga", "CMariaDB"], path: "Sources/Backends/MySQLBackend"),

        // Faults made around real stores, shared by the tests and the torture program: a
        // throwaway MariaDB server, a TCP proxy that loses COMMIT replies, a process runner.
        // SQLite's fault VFS (SQLiteFaults) lives here too: out of the shipping backend.
        // KVPowerLoss wraps CFsyncFaults' power-loss simulation for RocksDB's files, so every
        // program that links this kit gets the interposers (they forward when unarmed).
        .target(name: "SagaFaultKit", dependencies: ["Saga", "MySQLBackend", "SQLiteBackend", "CSQLite", "CSagaFaults", "CFsyncFaults"]),

        // The conformance suite, written against the protocols only; every backend runs it. Also
        // StepTrigger, the hooks that crash the process or fail a step.
        .target(name: "SagaTestKit", dependencies: ["Saga", .product(name: "Logging", package: "swift-log")]),

        .executableTarget(
            name: "AATrigger",
            dependencies: [
                // The demo fails COMMITs and crashes on purpose: it uses the testing kits.
                "Saga", "RocksDBBackend", "SQLiteBackend", "MySQLBackend", "SagaFaultKit", "SagaTestKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            path: "Examples/AATrigger"),

        // The README's "Use" code, runnable: `swift run getting-started`. The README and the
        // DocC article show the part between its `README: begin`/`end` markers, and a test
        // keeps them identical.
        .executableTarget(
            name: "GettingStarted",
            dependencies: ["Saga", "RocksDBBackend", "SQLiteBackend", "MySQLBackend"],
            path: "Examples/GettingStarted"),

        // Tries hard to break the guarantee: crash points, random kills, I/O errors, power loss,
        // server kills, replicas. Prints its figures; exits 1 on anything lost or divergent.
        .executableTarget(
            name: "SagaTorture",
            dependencies: [
                "Saga", "RocksDBBackend", "SQLiteBackend", "MySQLBackend", "SagaFaultKit", "SagaTestKit", "CFsyncFaults",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // Saga against the unsafe sequence and XA; prints figures and ratios, never asserts times.
        .executableTarget(
            name: "SagaBench",
            dependencies: [
                "Saga", "RocksDBBackend", "SQLiteBackend", "MySQLBackend", "SagaFaultKit", "CFsyncFaults",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        // The operator's tool: status, inspect, recover, resolve, gc, verify-journal on a
        // stopped node's stores. Ships: it links no testing kit.
        .executableTarget(
            name: "SagaTool",
            dependencies: [
                "Saga", "RocksDBBackend", "SQLiteBackend", "MySQLBackend",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),

        .testTarget(
            name: "SagaTests",
            dependencies: ["Saga", "SagaTestKit", "SagaFaultKit", "RocksDBBackend", "SQLiteBackend", "MySQLBackend", "CFsyncFaults", "AATrigger", "SagaTool",
                           "SagaServiceLifecycle",
                           .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                           .product(name: "MetricsTestKit", package: "swift-metrics"),
                           .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                           .product(name: "Tracing", package: "swift-distributed-tracing"),
                          ]),
    ],
    swiftLanguageModes: [.v6]
)
