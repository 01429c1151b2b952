import Saga

/// SQLite runs one write transaction at a time. Connections of one ``SQLiteDatabase`` queue for
/// it here, in the process, instead of in SQLite's busy handler, which sleeps and retries with
/// growing pauses (1 ms, 2 ms, 5 ms ... 100 ms): under contention a writer waited long after the
/// lock was free. A waiter here wakes as soon as the holder commits or rolls back. Other
/// processes are still kept out by SQLite's own locks and busy timeout.
final class WriterGate: @unchecked Sendable {
    private let condition = MonotonicCondition()
    private var held = false

    /// Waits at most `timeout`; false when the gate stayed closed that long.
    func acquire(timeout: Duration) -> Bool {
        let deadline = MonotonicCondition.Deadline(after: timeout)
        condition.lock()
        defer { condition.unlock() }
        while held {
            if !condition.wait(until: deadline) && held { return false }
        }
        held = true
        return true
    }

    func release() {
        condition.lock()
        held = false
        condition.signal()
        condition.unlock()
    }
}
