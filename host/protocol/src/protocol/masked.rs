//! A binary message delivered with its payload still masked
//! ([`Config::deliver_masked_from`](super::Config::deliver_masked_from)).

use super::frame::mask::{apply_mask, unmask_into};

/// A complete binary message of one frame whose payload is still masked
/// as it came off the wire: its reader unmasks it while copying it where
/// it goes ([`unmask_into`](Self::unmask_into)), one pass over the payload
/// where unmasking it in place first took two.
///
/// Left masked, it is unmasked in place when it is held
/// ([`WebSocket::hold_message`](super::WebSocket::hold_message)), so what
/// [`WebSocket::held`](super::WebSocket::held) returns is always plain.
#[derive(Debug, PartialEq, Eq)]
pub struct Masked<'a> {
    payload: &'a mut [u8],
    /// The frame's mask, until the payload is unmasked in place.
    mask: &'a mut Option<[u8; 4]>,
}

impl<'a> Masked<'a> {
    pub(super) fn new(payload: &'a mut [u8], mask: &'a mut Option<[u8; 4]>) -> Self {
        Self { payload, mask }
    }

    /// The payload's length.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }

    /// Writes the unmasked payload into `dst`, which must be exactly
    /// [`len`](Self::len) bytes long.
    ///
    /// # Panics
    /// If `dst` is not as long as the payload.
    pub fn unmask_into(&self, dst: &mut [u8]) {
        match *self.mask {
            Some(mask) => unmask_into(dst, self.payload, mask),
            None => dst.copy_from_slice(self.payload),
        }
    }

    /// Unmasks the payload in place and returns it.
    pub fn unmask(self) -> &'a [u8] {
        if let Some(mask) = self.mask.take() {
            apply_mask(self.payload, mask, 0);
        }
        self.payload
    }
}
