#![no_main]
//! `cargo +nightly fuzz run handshake`: see `wharf_fuzz_harness::handshake` for the input
//! layout and the invariants checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| wharf_fuzz_harness::handshake::check(data));
