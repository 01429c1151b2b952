import Foundation
@testable import Saga
import Testing

/// Replays the fuzzer's corpus (Fuzz/corpus/journal, grown by scripts/fuzz.sh) through the
/// journal decoder: nothing traps, and whatever decodes re-encodes to the same bytes.
@Suite("Journal decoder corpus")
struct JournalCorpusTests {
    static var corpusDir: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Fuzz/corpus/journal").path
    }

    @Test func everyCorpusInputDecodesSafely() throws {
        let files = try FileManager.default.contentsOfDirectory(atPath: Self.corpusDir).sorted()
        #expect(files.count >= 20, "the committed corpus is there (\(files.count) inputs)")
        var decoded = 0, refused = 0
        for name in files {
            let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: Self.corpusDir + "/" + name)))
            for input in [bytes, bytes + crcTrailer(bytes)] {
                switch Result(catching: { () throws(JournalRecord.DecodingError) in try JournalRecord(decoding: input) }) {
                case .success(let record):
                    decoded += 1
                    #expect(record.encoded() == input, "\(name) re-encodes to the same bytes")
                case .failure(let error):
                    refused += 1
                    #expect(!error.reason.isEmpty, "\(name): a refusal says why")
                }
            }
        }
        #expect(decoded >= 5 && refused >= 5, "the corpus holds valid and invalid records (\(decoded) decoded, \(refused) refused)")
    }

    @Test func theSeedsAreRealRecords() throws {
        let seeds = try FileManager.default.contentsOfDirectory(atPath: Self.corpusDir).filter { $0.hasPrefix("seed-") }
        #expect(seeds.count == 6)
        for name in seeds {
            let bytes = Array(try Data(contentsOf: URL(fileURLWithPath: Self.corpusDir + "/" + name)))
            let record = try JournalRecord(decoding: bytes)
            #expect(name.hasSuffix("-\(record.state)"))
        }
    }

    func crcTrailer(_ bytes: Bytes) -> Bytes {
        var out: Bytes = []
        out.appendBigEndian(CRC32C.checksum(bytes))
        return out
    }
}
