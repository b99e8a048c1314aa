//! Any bytes on the TFTP port: parsing and option negotiation never panic, and what parses
//! re-encodes to a packet that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::testing::fuzz::fuzz_tftp(data);
});
