import Foundation

/// A loopback TCP proxy in front of a MySQL server that can lose a COMMIT's reply: it forwards
/// the client's `COMMIT` packet (alone, or ending a multi-statement query), lets the server
/// execute it, then drops the server's reply and closes both sides. The client sees error 2013 while the transaction **is committed**.
///
/// MySQL packets are a 3-byte little-endian length, a sequence byte and the payload; a query is
/// payload `0x03` followed by the SQL text.
public final class MySQLProxy: @unchecked Sendable {
    public enum Action {
        /// Forward COMMIT, drop the reply, close the connection.
        case loseReply
        /// Forward COMMIT, then run this (e.g. kill the server), then close the connection.
        case afterForwarding(@Sendable () -> Void)
        /// A network partition between the client and this server, with the COMMIT packet in
        /// flight: the packet is held (not forwarded), the server-side connection stays open
        /// (the server sees an idle session, nothing to kill it), and every new connection
        /// through the proxy is cut at once (2013 during the handshake) until ``release()``,
        /// which heals the partition and delivers the held packet late.
        case hold
    }

    private var partitioned = false
    private var held: [(pair: Pair, packet: [UInt8])] = []
    private var heldReplies = 0

    /// Ends a partition started by ``Action/hold``: new connections pass again, and the held
    /// COMMIT packets are delivered to the server now (their replies are dropped).
    public func release() {
        let packets = lock.withLock { () -> [(pair: Pair, packet: [UInt8])] in
            partitioned = false
            defer { held.removeAll() }
            return held
        }
        for (pair, packet) in packets { _ = writeAll(pair.server, packet) }
    }

    /// Ends the partition only: new connections pass again; held packets stay held.
    public func heal() { lock.withLock { partitioned = false } }

    /// How many held COMMIT packets the server has answered since their late delivery.
    public var heldRepliesArrived: Int { lock.withLock { heldReplies } }

    public let port: UInt16
    private var target: (host: String, port: UInt16)
    private let listener: Int32
    private let lock = NSLock()
    private var armed: Action?
    private var fired = 0

    public init(targetHost: String, targetPort: UInt16) throws {
        target = (targetHost, targetPort)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSetupError("proxy: socket() failed") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(fd, 64) == 0 else { close(fd); throw TestSetupError("proxy: bind/listen failed") }
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        listener = fd
        port = UInt16(bigEndian: addr.sin_port)
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    deinit { shutdown(listener, Int32(SHUT_RDWR)); close(listener) }

    /// New connections go to another port from now on.
    public func retarget(port: UInt16) { lock.withLock { target.port = port } }

    /// The next COMMIT through the proxy gets `action`.
    public func arm(_ action: Action) { lock.withLock { armed = action } }
    public var firedCount: Int { lock.withLock { fired } }

    /// From now on, lose the reply of about one COMMIT in `oneIn` (seeded, so a run replays);
    /// nil stops it.
    public func loseRepliesAtRandom(oneIn: Int?, seed: UInt64 = 1) {
        lock.withLock { randomLoss = oneIn.map { (max(1, $0), SplitMix64(seed: seed)) } }
    }
    private var randomLoss: (oneIn: Int, rng: SplitMix64)?

    /// Called with `lock` held, for every COMMIT.
    private func nextAction() -> Action? {
        if let a = armed { armed = nil; fired += 1; return a }
        guard var r = randomLoss else { return nil }
        let lose = r.rng.below(r.oneIn) == 0
        randomLoss = r
        guard lose else { return nil }
        fired += 1
        return .loseReply
    }

    private static func loopback(port: UInt16) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_port = port.bigEndian
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        return a
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 { return }
            if lock.withLock({ partitioned }) { shutdown(client, Int32(SHUT_RDWR)); close(client); continue }
            let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            let to = lock.withLock { target }
            var addr = Self.loopback(port: to.port)
            addr.sin_addr.s_addr = inet_addr(to.host)
            let ok = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if ok != 0 { close(client); close(server); continue }
            // No Nagle: small packets (a multi-statement reply is two) go out at once instead
            // of waiting for a delayed ACK.
            var one: Int32 = 1
            setsockopt(client, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            setsockopt(server, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            let pair = Pair(client: client, server: server)
            Thread.detachNewThread { [self] in clientToServer(pair) }
            Thread.detachNewThread { [self] in serverToClient(pair) }
        }
    }

    final class Pair: @unchecked Sendable {
        let client: Int32, server: Int32
        let lock = NSLock()
        var dropNextReply = false
        var heldCommit = false
        var pumpsDone = 0
        init(client: Int32, server: Int32) { self.client = client; self.server = server }
        /// Stops both directions. The descriptors are closed only once both pump threads have
        /// left them (`pumpDone`): closing earlier would let a new connection reuse the number
        /// while the other thread still reads from it.
        func closeBoth() {
            shutdown(client, Int32(SHUT_RDWR))
            shutdown(server, Int32(SHUT_RDWR))
        }
        func pumpDone() {
            let last = lock.withLock { () -> Bool in
                pumpsDone += 1
                return pumpsDone == 2
            }
            if last { close(client); close(server) }
        }
    }

    private func writeAll(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        var off = 0
        while off < bytes.count {
            let n = bytes[off...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return false }
            off += n
        }
        return true
    }

    private func clientToServer(_ pair: Pair) {
        defer { pair.pumpDone() }
        var pending: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(pair.client, $0.baseAddress, $0.count, 0) }
            if n <= 0 {
                // Partitioned: the client's goodbye never reaches the server either.
                if pair.lock.withLock({ pair.heldCommit }) { return }
                pair.closeBoth(); return
            }
            pending += buf[0..<n]
            // Forward whole packets, one at a time, so a COMMIT can be recognised.
            while pending.count >= 4 {
                let len = Int(pending[0]) | Int(pending[1]) << 8 | Int(pending[2]) << 16
                guard pending.count >= 4 + len else { break }
                let packet = Array(pending[0..<(4 + len)])
                pending.removeFirst(4 + len)
                // A plain COMMIT, or the coordinator's "INSERT marker; COMMIT" in one query.
                // Only the end of the text is read: a redo row's after-images make the query as
                // long as the saga's writes.
                let tail = packet[4] == 0x03 ? String(decoding: packet[max(5, packet.count - 8)...], as: UTF8.self).uppercased() : ""
                let isCommit = tail == "COMMIT" || tail.hasSuffix("; COMMIT")
                let action: Action? = isCommit ? lock.withLock { nextAction() } : nil
                // Either way the client must not hear the reply.
                if action != nil { pair.lock.withLock { pair.dropNextReply = true } }
                if case .hold? = action {
                    pair.lock.withLock { pair.heldCommit = true }
                    lock.withLock { partitioned = true; held.append((pair, packet)) }
                    continue
                }
                if !writeAll(pair.server, packet) { pair.closeBoth(); return }
                if case .afterForwarding(let after)? = action {
                    after()
                    pair.closeBoth()
                    return
                }
            }
        }
    }

    private func serverToClient(_ pair: Pair) {
        defer { pair.pumpDone() }
        var buf = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(pair.server, $0.baseAddress, $0.count, 0) }
            if n <= 0 { pair.closeBoth(); return }
            if pair.lock.withLock({ pair.heldCommit }) {
                // The late COMMIT's reply: the client gave up long ago.
                lock.withLock { heldReplies += 1 }
                pair.closeBoth()
                return
            }
            if pair.lock.withLock({ pair.dropNextReply }) {
                // The server answered the COMMIT: it is committed. The client never hears it.
                pair.closeBoth()
                return
            }
            if !writeAll(pair.client, Array(buf[0..<n])) { pair.closeBoth(); return }
        }
    }
}
