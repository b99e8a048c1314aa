//! Any bytes on the TFTP port: parsing and option negotiation never panic, the OACK names each
//! option once, only options asked for, with values in range (timeout capped), and what parses
//! re-encodes to a packet that parses to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::testing::fuzz::fuzz_tftp(data);
});
