@testable import Saga
import Testing

@Suite("Journal record format")
struct JournalRecordTests {
    let sample = JournalRecord(saga: SagaID(0x0102_0304_0506_0708), state: .prepared, entries: [
        .init(key: Bytes("st\nADDR\nbalance".utf8), preImage: Bytes("n\n5".utf8), afterImage: Bytes("n\n6".utf8)),
        .init(key: [0x00, 0xFF], preImage: nil, afterImage: []),
        .init(key: Bytes("gone".utf8), preImage: Bytes("x".utf8), afterImage: nil),
    ])

    @Test func roundTripsEveryState() throws {
        #expect(try JournalRecord(decoding: sample.encoded()) == sample)
        for state in [JournalRecord.State.committed, .compensated] {
            let r = JournalRecord(saga: SagaID(9), state: state)
            #expect(try JournalRecord(decoding: r.encoded()) == r)
            #expect(r.encoded().count == 15, "a finished record is 15 bytes")
        }
    }

    /// A prepared record that names its SQL session is version 2; one without stays version 1,
    /// byte for byte as before, so records of earlier versions re-encode unchanged.
    @Test func theSessionMakesVersionTwo() throws {
        let session = SQLSession(id: 0xDEAD_BEEF, serverStart: 1_795_803_140, client: SQLSession.clientHash("127.0.0.1:51234"))
        let withSession = JournalRecord(saga: sample.saga, state: .prepared, entries: sample.entries, session: session)
        let bytes = withSession.encoded()
        #expect(bytes[1] == 2 && sample.encoded()[1] == 1)
        #expect(bytes.count == sample.encoded().count + 24)
        let decoded = try JournalRecord(decoding: bytes)
        #expect(decoded == withSession && decoded.session == session)
        // Only prepared records carry one; a finished record of version 2 is damage.
        #expect(JournalRecord(saga: SagaID(9), state: .compensated, session: session).encoded()[1] == 1)
        var finished = JournalRecord(saga: SagaID(9), state: .compensated).encoded().dropLast(4)
        finished[finished.startIndex + 1] = 2
        let refused = Array(finished) + crc(Array(finished))
        #expect { try JournalRecord(decoding: refused) } throws: { "\($0)".contains("only prepared records name a session") }
        for cut in 0..<bytes.count { #expect(throws: JournalRecord.DecodingError.self) { try JournalRecord(decoding: Array(bytes[..<cut])) } }
    }

    /// Version 3: a prepared record that carries when it was prepared (how long a saga has been
    /// in doubt), with or without a session and a caller key; every combination round-trips,
    /// every cut is refused, and unknown flags are damage.
    @Test func theTimeAndTheCallerKeyMakeVersionThree() throws {
        let session = SQLSession(id: 7, serverStart: 1_795_803_140, client: 3)
        for (s, key) in [(nil, nil), (session, nil), (nil, Bytes("req-42".utf8)), (session, Bytes())] as [(SQLSession?, Bytes?)] {
            let r = JournalRecord(saga: sample.saga, state: .prepared, entries: sample.entries, session: s, preparedAt: 1_795_900_000_123, callerKey: key)
            let bytes = r.encoded()
            #expect(bytes[1] == 3)
            #expect(bytes.count == sample.encoded().count + 9 + (s == nil ? 0 : 24) + (key.map { 4 + $0.count } ?? 0))
            let decoded = try JournalRecord(decoding: bytes)
            #expect(decoded == r && decoded.preparedAt == 1_795_900_000_123 && decoded.callerKey == key && decoded.session == s)
            for cut in 0..<bytes.count { #expect(throws: JournalRecord.DecodingError.self) { try JournalRecord(decoding: Array(bytes[..<cut])) } }
        }
        // Only prepared records carry the time; a finished record never becomes version 3.
        #expect(JournalRecord(saga: SagaID(9), state: .committed, preparedAt: 5).encoded()[1] == 1)
        var flagged = JournalRecord(saga: SagaID(9), state: .prepared, preparedAt: 5).encoded().dropLast(4)
        flagged[flagged.startIndex + 11] = 4
        #expect { try JournalRecord(decoding: Array(flagged) + crc(Array(flagged))) } throws: { "\($0)".contains("unknown flags 4") }
    }

    private func crc(_ body: Bytes) -> Bytes {
        var out: Bytes = []
        out.appendBigEndian(CRC32C.checksum(body))
        return out
    }

    @Test func distinguishesAbsentFromEmpty() throws {
        let decoded = try JournalRecord(decoding: sample.encoded())
        #expect(decoded.entries[1].preImage == nil)
        #expect(decoded.entries[1].afterImage == [])
    }

    @Test func everySingleBitFlipIsDetected() {
        let bytes = sample.encoded()
        for i in bytes.indices {
            for bit in 0..<8 {
                var damaged = bytes
                damaged[i] ^= UInt8(1 << bit)
                #expect(throws: JournalRecord.DecodingError.self) { try JournalRecord(decoding: damaged) }
            }
        }
    }

    @Test func everyTruncationIsDetected() {
        let bytes = sample.encoded()
        for n in 0..<bytes.count {
            #expect(throws: JournalRecord.DecodingError.self) { try JournalRecord(decoding: Array(bytes.prefix(n))) }
        }
    }

    @Test func unknownVersionIsNamed() throws {
        var bytes = Array(JournalRecord(saga: SagaID(1), state: .committed).encoded().dropLast(4))
        bytes[1] = 2
        bytes.appendBigEndian(CRC32C.checksum(bytes))
        let error = #expect(throws: JournalRecord.DecodingError.self) { try JournalRecord(decoding: bytes) }
        #expect(error?.reason.contains("version 2") == true)
    }

    @Test func crc32cMatchesTheStandardCheckValue() {
        #expect(CRC32C.checksum(Bytes("123456789".utf8)) == 0xE306_9283)
    }

    @Test func recordKeysSortByID() {
        #expect(JournalRecord.key(for: SagaID(2)).lexicographicallyPrecedes(JournalRecord.key(for: SagaID(256))))
        #expect(JournalRecord.saga(fromKey: JournalRecord.key(for: SagaID(77))) == SagaID(77))
        #expect(JournalRecord.saga(fromKey: IDLease.ceilingKey) == nil)
    }
}
