//! Cutting STUN messages and ChannelData frames out of a TCP/TLS byte stream (RFC 8656 §12.5: over
//! streams, ChannelData is padded to a multiple of four bytes).

use crate::channel::CHANNEL_HEADER_LEN;
use crate::error::ParseError;
use crate::stun::{HEADER_LEN, MAGIC_COOKIE, pad4};

/// The length of the first complete frame in `buf`: `Ok(Some(len))` when one is there, `Ok(None)` when
/// more bytes are needed, and an error when the stream cannot be TURN (close the connection).
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ParseError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match first & 0xC0 {
        0x00 => {
            if buf.len() >= 8 && buf[4..8] != MAGIC_COOKIE.to_be_bytes() {
                return Err(ParseError::BadMagicCookie);
            }
            if buf.len() < 4 {
                return Ok(None);
            }
            let body = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
            if body % 4 != 0 {
                return Err(ParseError::BadLength("message length not a multiple of 4"));
            }
            let len = HEADER_LEN + body;
            Ok((buf.len() >= len).then_some(len))
        }
        0x40 => {
            if buf.len() < CHANNEL_HEADER_LEN {
                return Ok(None);
            }
            let len = CHANNEL_HEADER_LEN + pad4(usize::from(u16::from_be_bytes([buf[2], buf[3]])));
            Ok((buf.len() >= len).then_some(len))
        }
        _ => Err(ParseError::NotStun),
    }
}

/// The longest frame [`frame_len`] can report: a STUN header plus a 64 KiB body, or ChannelData.
pub const MAX_FRAME: usize = HEADER_LEN + 65_535 + 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::AttrType;
    use crate::{Class, Method, MsgWriter, TransactionId};

    fn stream() -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut lens = Vec::new();
        let mut buf = [0u8; 256];
        let mut w = MsgWriter::new(&mut buf, Method::ALLOCATE, Class::Request, TransactionId([1; 12]));
        w.add_bytes(AttrType::USERNAME, b"user");
        w.add_fingerprint();
        let n = w.finish().unwrap();
        out.extend_from_slice(&buf[..n]);
        lens.push(n);
        // ChannelData with 5 bytes of data, padded to 8.
        out.extend_from_slice(&[0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]);
        lens.push(12);
        out.extend_from_slice(&[0x40, 0x02, 0x00, 0x00]);
        lens.push(4);
        (out, lens)
    }

    /// Feeding the stream split at every byte boundary yields the same frames.
    #[test]
    fn frames_survive_every_split() {
        let (bytes, lens) = stream();
        for split in 0..=bytes.len() {
            let mut pending: Vec<u8> = Vec::new();
            let mut got = Vec::new();
            for chunk in [&bytes[..split], &bytes[split..]] {
                pending.extend_from_slice(chunk);
                while let Some(n) = frame_len(&pending).unwrap() {
                    got.push(n);
                    pending.drain(..n);
                }
            }
            assert_eq!(got, lens, "split at {split}");
            assert!(pending.is_empty());
        }
    }

    /// One byte at a time works too.
    #[test]
    fn byte_by_byte() {
        let (bytes, lens) = stream();
        let mut pending = Vec::new();
        let mut got = Vec::new();
        for b in bytes {
            pending.push(b);
            while let Some(n) = frame_len(&pending).unwrap() {
                got.push(n);
                pending.drain(..n);
            }
        }
        assert_eq!(got, lens);
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(frame_len(&[0x80, 1, 2, 3]), Err(ParseError::NotStun));
        // A TLS ClientHello on the plain port starts 0x16 0x03: STUN-shaped, but no magic cookie.
        assert_eq!(frame_len(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01]), Err(ParseError::BadMagicCookie));
        assert_eq!(frame_len(&[0, 1, 0, 0, 1, 2, 3, 4]), Err(ParseError::BadMagicCookie));
        assert!(frame_len(&[0, 1, 0, 3]).is_err());
        assert_eq!(frame_len(&[]), Ok(None));
    }
}
