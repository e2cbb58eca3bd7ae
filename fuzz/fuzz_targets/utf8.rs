#![no_main]
//! `cargo +nightly fuzz run utf8`: see `wharf_fuzz_harness::utf8` for the input
//! layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz_harness::utf8::check(data));
