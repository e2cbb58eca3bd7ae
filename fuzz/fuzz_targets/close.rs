#![no_main]
//! `cargo +nightly fuzz run close`: see `wharf_fuzz_harness::close` for the input
//! layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz_harness::close::check(data));
