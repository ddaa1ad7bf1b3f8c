//! ChannelData framing (RFC 8656 §12.4): a 4-byte header (channel number, length) and the application data.

use crate::error::ParseError;

/// Size of the ChannelData header.
pub const CHANNEL_HEADER_LEN: usize = 4;
/// Lowest valid channel number.
pub const MIN_CHANNEL: u16 = 0x4000;
/// Highest channel number RFC 8656 allows.
pub const MAX_CHANNEL: u16 = 0x4FFF;
/// Highest channel number RFC 5766 allowed; deployed clients (coturn's among them) still use it.
pub const MAX_LEGACY_CHANNEL: u16 = 0x7FFF;

/// A channel number in 0x4000..=0x4FFF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelNumber(pub u16);

impl ChannelNumber {
    /// Whether the number lies in the range RFC 8656 allows.
    pub fn is_valid(self) -> bool {
        (MIN_CHANNEL..=MAX_CHANNEL).contains(&self.0)
    }

    /// Whether the number lies in RFC 5766's wider range, 0x4000..=0x7FFF.
    pub fn is_valid_legacy(self) -> bool {
        (MIN_CHANNEL..=MAX_LEGACY_CHANNEL).contains(&self.0)
    }
}

/// Returns true when the first byte marks a ChannelData message (top two bits 01).
pub fn looks_like_channel_data(bytes: &[u8]) -> bool {
    bytes.first().is_some_and(|b| b & 0xC0 == 0x40)
}

/// A borrowed view of one ChannelData message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel number.
    pub number: ChannelNumber,
    /// The application data.
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData datagram. Over UDP the datagram may carry padding after the data (RFC 8656
    /// §12.5), so only `len <= datagram - 4` is required. Numbers in RFC 5766's range are accepted here;
    /// only bound numbers ever match an allocation.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ParseError> {
        if bytes.len() < CHANNEL_HEADER_LEN {
            return Err(ParseError::Truncated("ChannelData header"));
        }
        let number = ChannelNumber(u16::from_be_bytes([bytes[0], bytes[1]]));
        if !number.is_valid_legacy() {
            return Err(ParseError::BadChannelNumber);
        }
        let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        let data = bytes
            .get(CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + len)
            .ok_or(ParseError::BadLength("ChannelData length exceeds the datagram"))?;
        Ok(Self { number, data })
    }
}

/// Writes a ChannelData header for `len` bytes of data into `slot` (4 bytes).
pub fn write_header(slot: &mut [u8; CHANNEL_HEADER_LEN], number: ChannelNumber, len: u16) {
    slot[0..2].copy_from_slice(&number.0.to_be_bytes());
    slot[2..4].copy_from_slice(&len.to_be_bytes());
}
