//! Any bytes: the PROXY header parser never panics, never claims more bytes than it was given, and
//! gives the same answer for a complete header whatever follows it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnpike_proto::proxy::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(Parsed::Complete(h)) = parse(data) {
        assert!(h.len <= data.len());
        assert_eq!(parse(&data[..h.len]), Ok(Parsed::Complete(h)));
    }
});
