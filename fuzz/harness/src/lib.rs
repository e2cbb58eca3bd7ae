//! The checks behind Wharf's fuzz targets, one function per target.
//!
//! Each function takes the raw fuzz input and panics when an invariant of
//! `wharf-protocol` does not hold. The libFuzzer targets in `fuzz/` (nightly,
//! outside the workspace) call them, and so does the stable test
//! `tests/corpus.rs`, which replays every committed corpus file through the
//! same function as part of `cargo test --workspace`: one definition of each
//! check.
//!
//! The checks lean on independent models where they can (a reference RFC
//! 6455 reader, a server-frame decoder, `std::str::from_utf8`, SHA-1 and
//! base64 composed here), so they catch wrong answers, not only crashes.

pub mod close;
pub mod frames;
pub mod handshake;
pub mod utf8;
pub mod wire;

/// A target's check: panics when an invariant does not hold.
pub type Check = fn(&[u8]);

/// The targets by name (the directory names under `fuzz/corpus/`).
pub const TARGETS: &[(&str, Check)] = &[
    ("handshake", handshake::check),
    ("frames", frames::check),
    ("utf8", utf8::check),
    ("close", close::check),
];

/// Chunk lengths for feeding input in pieces, from bytes of the fuzz input
/// (0 counts as 1, so every piece makes progress).
pub(crate) fn chunks<'a>(data: &'a [u8], lens: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let len = lens
            .get(i % lens.len().max(1))
            .map_or(rest.len(), |&l| usize::from(l).max(1));
        let (head, tail) = rest.split_at(len.min(rest.len()));
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}
