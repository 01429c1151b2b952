import Benchmark
@_spi(Benchmarks) import Saga

// The coordinator's hot pieces, one saga's worth per iteration: the AA trigger's 5 keys
// ("st\n<address>\n<var>", ~30 bytes). package-benchmark has no ratio between benchmarks; the
// pairs to compare (hashed vs plain dictionary keys) are named so that they sort together.

let benchmarks: @Sendable () -> Void = {
    let keys: [Bytes] = ["balance", "count", "last", "resp17", "hash"].map { Bytes("st\nAA0X1ADDRESSADDRESSADDRESS\n\($0)".utf8) }
    let config = Benchmark.Configuration(metrics: [.wallClock, .cpuTotal, .mallocCountTotal, .throughput], maxDuration: .seconds(2))

    Benchmark("key locks: lock 5 keys, release", configuration: config) { benchmark in
        let locks = MicroBenchmarks.Locks()
        for i in benchmark.scaledIterations { try locks.lockAndRelease(keys, saga: UInt64(i + 1)) }
    }

    Benchmark("journal record: encode 5 entries", configuration: config) { benchmark in
        for i in benchmark.scaledIterations { blackHole(MicroBenchmarks.encodedRecord(keys, saga: UInt64(i + 1))) }
    }

    let record = MicroBenchmarks.encodedRecord(keys, saga: 42)
    Benchmark("journal record: decode 5 entries", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(try MicroBenchmarks.decodeRecord(record)) }
    }

    Benchmark("kv key hashing: [UInt8] keys (byte by byte)", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(MicroBenchmarks.dictionaryRoundTrip(keys, hashed: false)) }
    }

    Benchmark("kv key hashing: HashedBytes keys (one combine)", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(MicroBenchmarks.dictionaryRoundTrip(keys, hashed: true)) }
    }

    Benchmark("marker statements: build (mysql) + GC id lists of 512", configuration: config) { benchmark in
        for _ in benchmark.scaledIterations { blackHole(MicroBenchmarks.markerStatements(mysql: true, ids: 512)) }
    }
}
