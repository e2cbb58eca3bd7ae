//! Frame header decoding and encoding (RFC 6455 section 5.2).

use crate::protocol::error::ProtocolError;

/// Longest possible header: 2 fixed bytes, 8 length bytes, 4 mask bytes.
pub(crate) const MAX_HEADER_LEN: usize = 14;

/// Largest payload a control frame may carry.
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;

/// The frame opcodes RFC 6455 defines; reserved ones never get a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    pub(crate) fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    pub(crate) fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub(crate) fin: bool,
    pub(crate) opcode: OpCode,
    pub(crate) mask: [u8; 4],
    pub(crate) len: u64,
}

/// Checks what the first two bytes alone can tell, so a bad frame fails
/// before we wait for the rest of its header; returns the full header
/// length.
///
/// Server role: an unmasked frame is an error here, so the returned length
/// always includes the 4 mask bytes.
pub(crate) fn check_start(b0: u8, b1: u8) -> Result<usize, ProtocolError> {
    if b0 & 0x70 != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let opcode = OpCode::from_bits(b0 & 0x0F)?;
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::UnmaskedFrame);
    }
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if b0 & 0x80 == 0 {
            return Err(ProtocolError::FragmentedControlFrame);
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(ProtocolError::ControlFrameTooLong);
        }
    }
    Ok(match len7 {
        126 => 2 + 2 + 4,
        127 => 2 + 8 + 4,
        _ => 2 + 4,
    })
}

/// Decodes a complete header; `buf` must be exactly as long as
/// [`check_start`] said (anything else is reported as a protocol error,
/// never a panic).
pub(crate) fn decode(buf: &[u8]) -> Result<FrameHeader, ProtocolError> {
    let (&b0, rest) = buf
        .split_first()
        .ok_or(ProtocolError::UnexpectedContinuation)?;
    let (&b1, rest) = rest
        .split_first()
        .ok_or(ProtocolError::UnexpectedContinuation)?;
    let expected = check_start(b0, b1)?;
    if buf.len() != expected {
        // Only reachable through a bug in the caller; fail the connection
        // rather than misread the stream.
        return Err(ProtocolError::UnexpectedContinuation);
    }
    let (len, mask_bytes) = match b1 & 0x7F {
        126 => {
            let (l, m) = rest.split_at(2);
            (u64::from(u16::from_be_bytes([l[0], l[1]])), m)
        }
        127 => {
            let (l, m) = rest.split_at(8);
            let mut b = [0u8; 8];
            b.copy_from_slice(l);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(ProtocolError::LengthMsbSet);
            }
            (len, m)
        }
        n => (u64::from(n), rest),
    };
    let mut mask = [0u8; 4];
    mask.copy_from_slice(mask_bytes);
    Ok(FrameHeader {
        fin: b0 & 0x80 != 0,
        opcode: OpCode::from_bits(b0 & 0x0F)?,
        mask,
        len,
    })
}

/// Encodes an unmasked (server) header with the minimal length form;
/// returns the buffer and how many bytes of it are used.
pub(crate) fn encode(fin: bool, opcode: OpCode, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = if fin { 0x80 } else { 0 } | opcode.bits();
    let used = if len < 126 {
        h[1] = len as u8;
        2
    } else if let Ok(l16) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&l16.to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_minimal_lengths() {
        let (h, n) = encode(true, OpCode::Text, 5);
        assert_eq!(&h[..n], &[0x81, 5]);
        let (h, n) = encode(false, OpCode::Binary, 126);
        assert_eq!(&h[..n], &[0x02, 126, 0, 126]);
        let (h, n) = encode(true, OpCode::Continuation, 65535);
        assert_eq!(&h[..n], &[0x80, 126, 0xFF, 0xFF]);
        let (h, n) = encode(true, OpCode::Binary, 65536);
        assert_eq!(&h[..n], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn decode_non_minimal_length_is_accepted() {
        let h = decode(&[0x82, 0xFE, 0, 5, 1, 2, 3, 4]).unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(h.mask, [1, 2, 3, 4]);
        let h = decode(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4]).unwrap();
        assert_eq!(h.len, 5);
    }

    #[test]
    fn decode_rejects_length_msb() {
        let e = decode(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]).unwrap_err();
        assert_eq!(e, ProtocolError::LengthMsbSet);
    }

    #[test]
    fn decode_wrong_length_is_error_not_panic() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[0x82]).is_err());
        assert!(decode(&[0x82, 0xFE, 0]).is_err());
    }
}
