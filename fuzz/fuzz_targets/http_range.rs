//! Any `Range` header against any length: a range, when accepted, lies inside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::testing::fuzz::fuzz_range(data);
});
