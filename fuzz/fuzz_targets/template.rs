//! Any text as an overlay or seed template: kiln's pre-checks (size, brackets, nested tags,
//! operators per tag), tera's parser and kiln's AST checks (no include/import/extends, no
//! recursive macros, nesting) never panic and never overflow the stack. Rendering is not
//! fuzzed: a template may still spend memory on values it never prints (docs/guide/recipes.md).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::testing::fuzz::fuzz_template(data);
});
