#![no_main]
//! `cargo +nightly fuzz run frames`: see `wharf_fuzz_harness::frames` for the input
//! layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz_harness::frames::check(data));
