// swift-tools-version:6.1
// Micro-benchmarks of the coordinator's hot pieces, with ordo-one's package-benchmark, in a
// package of their own so that the library's dependencies stay small. Run from this directory:
//     swift package --disable-sandbox benchmark
// (see the README's "Micro-benchmarks"). The cases reach the library's internals through
// `@_spi(Benchmarks) import Saga`.
import PackageDescription

let package = Package(
    name: "SagaBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "Saga", path: ".."),
        // Without its RuntimeInterposer trait (its package is not available offline: see Stubs/).
        .package(url: "https://github.com/ordo-one/package-benchmark", exact: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .executableTarget(
            name: "SagaMicro",
            dependencies: [
                .product(name: "Benchmark", package: "package-benchmark"),
                .product(name: "Saga", package: "Saga"),
            ],
            path: "Benchmarks/SagaMicro",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "package-benchmark")]),
    ],
    swiftLanguageModes: [.v6]
)
