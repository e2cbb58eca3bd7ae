//! Frame-level building blocks: header coding, masking, UTF-8 checking.
//!
//! Kept free of connection state so each piece can be tested (and later
//! benchmarked) on its own.

pub(crate) mod coding;
pub(crate) mod mask;
pub(crate) mod utf8;

pub(crate) use coding::{FrameHeader, OpCode};
