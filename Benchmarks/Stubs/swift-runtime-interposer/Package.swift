// swift-tools-version:6.1
// An empty stand-in for ordo-one/swift-runtime-interposer, which is not among the packages
// available offline here. package-benchmark 1.38.1 declares it on Linux with Swift 6.3 whatever
// its traits say, but links it only with its `RuntimeInterposer` trait, which this package turns
// off: the stand-in only lets the dependency graph resolve. Used through
// RUNTIME_INTERPOSER_LOCAL_PATH (package-benchmark's own switch for a local checkout).
import PackageDescription

let package = Package(
    name: "swift-runtime-interposer",
    products: [.library(name: "SwiftRuntimeInterposerSwift", targets: ["SwiftRuntimeInterposerSwift"])],
    targets: [.target(name: "SwiftRuntimeInterposerSwift")]
)
