//! Any bytes: the STUN parser never panics, and every attribute decoder is safe on what it yields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnpike_proto::StunMsg;
use turnpike_proto::attr;
use turnpike_proto::stun::verify_message_integrity;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = StunMsg::parse(data) {
        let tid = msg.transaction_id();
        for a in msg.attrs() {
            let _ = attr::decode_xor_addr(a.value, &tid);
            let _ = attr::decode_plain_addr(a.value);
            let _ = attr::decode_error_code(a.value);
            let _ = attr::decode_u32(a.value);
            let _ = attr::decode_channel_number(a.value);
            let _ = attr::decode_even_port(a.value);
            let _ = attr::decode_family(a.value);
        }
        let _ = verify_message_integrity(&msg, b"key");
    }
});
