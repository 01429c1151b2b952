// libFuzzer target for the journal record decoder (scripts/fuzz.sh builds and runs it).
//
// Each input is decoded twice: as it is, and with a valid CRC-32C appended, so that the
// fuzzer also reaches the structure behind the checksum. Properties: decoding never traps
// (no out-of-bounds read, no overflow, no huge allocation), and whatever decodes re-encodes
// to exactly the same bytes (one encoding per record).

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJournalDecoder(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    checkRoundTrip(input)
    var sealed = input
    sealed.appendBigEndian(CRC32C.checksum(input))
    checkRoundTrip(sealed)
    return 0
}

func checkRoundTrip(_ bytes: [UInt8]) {
    guard let record = try? JournalRecord(decoding: bytes) else { return }
    let again = record.encoded()
    if again != bytes {
        fatalError("decoded record re-encodes differently: \(bytes) -> \(again)")
    }
}

#if SEED_GENERATOR
import Glibc

/// Writes real records (from the real encoder) as the seed corpus.
@main
struct SeedGenerator {
    static func main() throws {
        let dir = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "Fuzz/corpus/journal"
        let records: [JournalRecord] = [
            JournalRecord(saga: SagaID(1), state: .committed),
            JournalRecord(saga: SagaID(0xFFFF_FFFF_FFFF_FFFF), state: .compensated),
            JournalRecord(saga: SagaID(42), state: .prepared, entries: []),
            JournalRecord(saga: SagaID(7), state: .prepared, entries: [
                .init(key: Array("st\nPJE3ZQGB2Y4GUO5KV3WGNDWDOXJ2JQ3F\nbalance".utf8), preImage: Array("n\n1000".utf8), afterImage: Array("n\n1250".utf8)),
                .init(key: Array("st\nPJE3ZQGB2Y4GUO5KV3WGNDWDOXJ2JQ3F\ncount".utf8), preImage: nil, afterImage: Array("n\n1".utf8)),
            ]),
            JournalRecord(saga: SagaID(65_536), state: .prepared, entries: [
                .init(key: [0x00, 0xFF, 0x10], preImage: [], afterImage: nil),
                .init(key: Array("a/00003".utf8), preImage: Array("-17".utf8), afterImage: Array("33".utf8)),
                .init(key: Array("t/991".utf8), preImage: nil, afterImage: Array("1".utf8)),
            ]),
            // Version 2: a prepared record that names its SQL session.
            JournalRecord(saga: SagaID(8), state: .prepared, entries: [
                .init(key: Array("st\nPJE3ZQGB2Y4GUO5KV3WGNDWDOXJ2JQ3F\nbalance".utf8), preImage: Array("n\n1250".utf8), afterImage: Array("n\n1500".utf8)),
            ], session: SQLSession(id: 4242, serverStart: 1_795_803_140, client: 0x0123_4567_89AB_CDEF)),
        ]
        for (i, r) in records.enumerated() {
            let bytes = r.encoded()
            let path = dir + "/seed-\(i)-\(r.state)"
            guard let f = fopen(path, "wb") else { fatalError("cannot write \(path)") }
            _ = bytes.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
            fclose(f)
        }
        print("wrote \(records.count) seeds to \(dir)")
    }
}
#endif
