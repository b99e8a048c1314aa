//! Any text as YAML/JSON from outside kiln (manifests, SealedSecrets, `kiln seal` input, seeds):
//! the size/depth pre-check and the name checks never panic, and the pre-check never passes
//! a text nested deeper than the parser's own limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::testing::fuzz::fuzz_yaml_limits(data);
});
