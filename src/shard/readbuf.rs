//! The read buffer of a stream connection: bytes read but not yet handed out as frames.
//!
//! Frames are handed out from the front by moving a cursor, not by moving the bytes behind them: a read
//! of 16 KiB can hold a hundred small frames, and shifting the rest of the buffer after each one would
//! copy the buffer a hundred times. What is left (at most a partial frame) moves to the front only when
//! the next read needs room. The buffer is zeroed once, when it grows, not on every read.

/// Bytes `buf[start..end]` are waiting; `buf[end..]` is room for the next read.
#[derive(Debug, Default)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// The bytes waiting, oldest first.
    pub fn waiting(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Hands out the first `len` waiting bytes (fewer if fewer wait).
    pub fn consume(&mut self, len: usize) {
        self.start += len.min(self.end - self.start);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for a read of up to `want` bytes, behind the waiting bytes, such that no more than `limit`
    /// bytes wait in all. Moves the waiting bytes to the front first when that makes room, and grows
    /// the buffer (zeroing only the new part) when it must. Empty when `limit` bytes already wait.
    pub fn room(&mut self, want: usize, limit: usize) -> &mut [u8] {
        let want = want.min(limit.saturating_sub(self.end - self.start));
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..self.end + want]
    }

    /// Marks `n` bytes of the last [`room`](Self::room) as read.
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    proptest! {
        /// Any sequence of reads and consumes hands out exactly the bytes read, in order, and never
        /// lets more than the limit wait or the buffer grow past it (a queue of bytes as the model).
        #[test]
        fn behaves_as_a_bounded_byte_queue(ops in proptest::collection::vec((any::<bool>(), 0usize..300), 1..200)) {
            const LIMIT: usize = 500;
            let mut b = ReadBuf::default();
            let mut model: VecDeque<u8> = VecDeque::new();
            let mut next = 0u8;
            for (is_read, n) in ops {
                if is_read {
                    let room = b.room(n, LIMIT);
                    prop_assert_eq!(room.len(), n.min(LIMIT - model.len()));
                    for byte in room.iter_mut() {
                        *byte = next;
                        model.push_back(next);
                        next = next.wrapping_add(1);
                    }
                    let len = room.len();
                    b.filled(len);
                } else {
                    b.consume(n);
                    model.drain(..n.min(model.len()));
                }
                prop_assert!(b.waiting().iter().eq(model.iter()));
                prop_assert!(b.buf.len() <= LIMIT, "the buffer grew to {}", b.buf.len());
            }
        }
    }

    fn read(b: &mut ReadBuf, bytes: &[u8], limit: usize) -> usize {
        let room = b.room(bytes.len(), limit);
        let n = room.len();
        room.copy_from_slice(&bytes[..n]);
        b.filled(n);
        n
    }

    #[test]
    fn frames_come_out_in_order_across_reads() {
        let mut b = ReadBuf::default();
        assert_eq!(read(&mut b, b"abcdefgh", 100), 8);
        assert_eq!(b.waiting(), b"abcdefgh");
        b.consume(3);
        assert_eq!(b.waiting(), b"defgh");
        assert_eq!(read(&mut b, b"ij", 100), 2);
        assert_eq!(b.waiting(), b"defghij");
        b.consume(7);
        assert!(b.waiting().is_empty());
        b.consume(5);
        assert!(b.waiting().is_empty());
    }

    #[test]
    fn consuming_moves_a_cursor_and_reading_compacts_once() {
        let mut b = ReadBuf::default();
        read(&mut b, &[7u8; 64], 1000);
        let capacity = b.buf.len();
        for _ in 0..15 {
            b.consume(4);
        }
        // The bytes did not move: 15 frames handed out from the same place.
        assert_eq!(b.start, 60);
        assert_eq!(b.waiting(), &[7u8; 4]);
        // A read that needs the room moves the 4 waiting bytes to the front instead of growing.
        assert_eq!(read(&mut b, &[9u8; 60], 1000), 60);
        assert_eq!(b.buf.len(), capacity);
        assert_eq!(&b.waiting()[..4], &[7u8; 4]);
        assert_eq!(&b.waiting()[4..], &[9u8; 60]);
    }

    #[test]
    fn the_limit_bounds_what_waits() {
        let mut b = ReadBuf::default();
        assert_eq!(read(&mut b, &[1u8; 50], 40), 40);
        assert!(b.room(10, 40).is_empty());
        b.consume(30);
        assert_eq!(b.room(100, 40).len(), 30);
        assert!(b.buf.len() <= 40 + 30);
    }
}
