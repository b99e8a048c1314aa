//! Any bytes on UDP 67/4011: the frame check, decoding, classification and the reply path
//! never panic, nothing the frame check refuses is answered, and a reply, when there is one,
//! encodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::testing::fuzz::fuzz_dhcp(data);
});
