/// Whose marker rows a statement may write: the coordinator's instance, and the claim its open
/// made on that instance (see `InstanceRecord`). Every write to marker rows (the saga's own
/// marker, the fence, GC's and orphan removal's deletes) checks in its own transaction that
/// the instance still holds the claim; once another journal has claimed it, nothing of this
/// coordinator reaches the marker table again.
package struct MarkerOwner: Hashable, Sendable, CustomStringConvertible {
    package let instance: InstanceID
    package let claim: UInt64
    package init(instance: InstanceID, claim: UInt64) { self.instance = instance; self.claim = claim }
    package var description: String { "\(instance) (claim \(claim))" }
}

/// A marker write was refused: the instance's claim moved to another journal since this
/// coordinator opened (a copy of its KV store was opened on the same database, or the like).
/// The coordinator stops: it must never decide or delete by a marker table that another
/// journal now writes.
public struct InstanceClaimLost: Error, CustomStringConvertible {
    package let owner: MarkerOwner
    /// The instance that another journal claimed.
    public var instance: InstanceID { owner.instance }
    package init(owner: MarkerOwner) { self.owner = owner }
    public var description: String {
        "\(owner.instance) was claimed by another journal (a copy of this KV store opened on the same SQL database?) after this coordinator opened with claim \(owner.claim): its marker writes are refused"
    }
}
