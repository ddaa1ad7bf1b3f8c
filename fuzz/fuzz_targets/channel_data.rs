//! Any bytes: ChannelData parsing never panics and never reads past the datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnpike_proto::ChannelData;

fuzz_target!(|data: &[u8]| {
    if let Ok(cd) = ChannelData::parse(data) {
        assert!(cd.data.len() + 4 <= data.len());
        assert!(cd.number.is_valid_legacy());
    }
});
