//! Error and drop-reason types of the sans-IO core: all `Copy`, none allocates.

/// Why a byte string could not be read as a STUN message or ChannelData frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than the fixed header or a declared length needs.
    Truncated(&'static str),
    /// The two most significant bits of a STUN message are not zero.
    NotStun,
    /// The magic cookie is not 0x2112A442.
    BadMagicCookie,
    /// A length field is inconsistent with the bytes that carry it.
    BadLength(&'static str),
    /// An attribute value does not have the shape its type requires.
    BadAttribute(&'static str),
    /// FINGERPRINT is present but wrong, or not the last attribute.
    BadFingerprint,
    /// A ChannelData frame names a number outside 0x4000..=0x4FFF.
    BadChannelNumber,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated(what) => write!(f, "truncated: {what}"),
            Self::NotStun => f.write_str("not a STUN message"),
            Self::BadMagicCookie => f.write_str("bad magic cookie"),
            Self::BadLength(what) => write!(f, "bad length: {what}"),
            Self::BadAttribute(what) => write!(f, "bad attribute: {what}"),
            Self::BadFingerprint => f.write_str("bad FINGERPRINT"),
            Self::BadChannelNumber => f.write_str("bad channel number"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The caller's buffer was too small for the message being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoSpace;

/// A STUN/TURN error code (RFC 8489 §14.8, RFC 8656 §18.8, RFC 6156).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// 300: try the ALTERNATE-SERVER.
    TryAlternate = 300,
    /// 400: malformed request.
    BadRequest = 400,
    /// 401: missing or wrong credentials.
    Unauthorized = 401,
    /// 403: refused by policy (peer address, etc).
    Forbidden = 403,
    /// 420: comprehension-required attributes not understood.
    UnknownAttribute = 420,
    /// 437: the 5-tuple has no (or a different) allocation.
    AllocationMismatch = 437,
    /// 438: the NONCE is no longer valid.
    StaleNonce = 438,
    /// 440: the requested address family is not served.
    AddressFamilyNotSupported = 440,
    /// 441: the credentials differ from those that created the allocation.
    WrongCredentials = 441,
    /// 442: the requested transport is not supported.
    UnsupportedTransportProtocol = 442,
    /// 443: the peer's address family differs from the relayed address's.
    PeerAddressFamilyMismatch = 443,
    /// 486: the user or the server has reached its allocation quota.
    AllocationQuotaReached = 486,
    /// 500: internal failure.
    ServerError = 500,
    /// 508: no relay port or reservation is available.
    InsufficientCapacity = 508,
}

impl ErrorCode {
    /// The numeric code, 300..=699.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The reason phrase the RFCs suggest.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TryAlternate => "Try Alternate",
            Self::BadRequest => "Bad Request",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::UnknownAttribute => "Unknown Attribute",
            Self::AllocationMismatch => "Allocation Mismatch",
            Self::StaleNonce => "Stale Nonce",
            Self::AddressFamilyNotSupported => "Address Family not Supported",
            Self::WrongCredentials => "Wrong Credentials",
            Self::UnsupportedTransportProtocol => "Unsupported Transport Protocol",
            Self::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            Self::AllocationQuotaReached => "Allocation Quota Reached",
            Self::ServerError => "Server Error",
            Self::InsufficientCapacity => "Insufficient Capacity",
        }
    }
}

/// Why the engine dropped a datagram without answering. Counted per reason, never logged per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Not STUN and not ChannelData, or structurally malformed.
    Malformed,
    /// A STUN response or an indication the server does not expect from clients.
    Unexpected,
    /// A data packet from a 5-tuple with no allocation here.
    NoAllocation,
    /// ChannelData on a number that is not bound (or whose binding has expired).
    NoChannel,
    /// Data to or from a peer without an installed permission.
    NoPermission,
    /// A Send indication without a valid XOR-PEER-ADDRESS or DATA.
    BadIndication,
    /// Peer denied by policy (Send indication).
    PeerDenied,
    /// Over the allocation's (or the shard's share of the total) bandwidth budget.
    OverBandwidth,
    /// A source over its unauthenticated request rate.
    SourceRateLimited,
    /// The response could not be written (buffer too small).
    NoSpace,
    /// An unauthenticated Refresh smaller than the challenge it would get, while unauthenticated
    /// requests flood the server (no client sends one; answering would amplify).
    UnauthenticatedUnderFlood,
    /// The socket's send buffer was full (the host's, not the engine's, reason).
    SocketFull,
}

impl DropReason {
    /// All reasons, in counter order.
    pub const ALL: [Self; 12] = [
        Self::Malformed,
        Self::Unexpected,
        Self::NoAllocation,
        Self::NoChannel,
        Self::NoPermission,
        Self::BadIndication,
        Self::PeerDenied,
        Self::OverBandwidth,
        Self::SourceRateLimited,
        Self::NoSpace,
        Self::UnauthenticatedUnderFlood,
        Self::SocketFull,
    ];

    /// Every reason's [`DropReason::name`], in [`DropReason::ALL`] order.
    pub const NAMES: [&'static str; 12] = [
        "malformed",
        "unexpected",
        "no_allocation",
        "no_channel",
        "no_permission",
        "bad_indication",
        "peer_denied",
        "over_bandwidth",
        "source_rate_limited",
        "no_space",
        "unauthenticated_under_flood",
        "socket_full",
    ];

    /// Stable name used in metrics and logs.
    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// Index into per-reason counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_index_their_names() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(DropReason::NAMES.iter().filter(|n| **n == r.name()).count(), 1, "{}", r.name());
        }
    }
}
