//! Protocol violations by the peer and refusals of our own sends.

use super::close::CloseCode;

/// A violation of RFC 6455 by the peer; the connection fails with
/// [`ProtocolError::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Clients must mask every frame (section 5.1).
    #[error("unmasked client frame")]
    UnmaskedFrame,
    /// RSV bits are only meaningful with an extension, and none is
    /// negotiated.
    #[error("reserved bits set")]
    ReservedBits,
    /// Opcodes 3-7 and 0xB-0xF are reserved.
    #[error("reserved opcode")]
    ReservedOpcode(u8),
    /// Control frames carry at most 125 bytes.
    #[error("control frame too long")]
    ControlFrameTooLong,
    /// Control frames must not be fragmented.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A continuation frame with no message to continue.
    #[error("unexpected continuation frame")]
    UnexpectedContinuation,
    /// A new Text/Binary frame while a fragmented message is unfinished.
    #[error("expected continuation frame")]
    ExpectedContinuation,
    /// A Close payload of one byte can't hold a code.
    #[error("close payload of 1 byte")]
    CloseFrameOneByte,
    /// The Close frame's code is reserved or undefined.
    #[error("invalid close code")]
    InvalidCloseCode(u16),
    /// The 64-bit length had its most significant bit set.
    #[error("frame length MSB set")]
    LengthMsbSet,
    /// A frame header announced more than `max_frame_size`.
    #[error("frame too big")]
    FrameTooBig,
    /// A message grew past `max_message_size`.
    #[error("message too big")]
    MessageTooBig,
    /// Text message payload is not UTF-8.
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// Close reason is not UTF-8.
    #[error("invalid UTF-8 in close reason")]
    InvalidCloseReason,
}

impl ProtocolError {
    /// The close code this violation is reported with.
    pub fn close_code(&self) -> u16 {
        match self {
            ProtocolError::FrameTooBig | ProtocolError::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                CloseCode::INVALID_PAYLOAD
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short fixed description, used as the Close reason we send so the
    /// peer's developer can see what went wrong (always under 123 bytes).
    pub fn reason(&self) -> &'static str {
        match self {
            ProtocolError::UnmaskedFrame => "unmasked client frame",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpcode(_) => "reserved opcode",
            ProtocolError::ControlFrameTooLong => "control frame too long",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::UnexpectedContinuation => "unexpected continuation frame",
            ProtocolError::ExpectedContinuation => "expected continuation frame",
            ProtocolError::CloseFrameOneByte => "close payload of 1 byte",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::LengthMsbSet => "frame length MSB set",
            ProtocolError::FrameTooBig => "frame too big",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::InvalidUtf8 => "invalid UTF-8 in text message",
            ProtocolError::InvalidCloseReason => "invalid UTF-8 in close reason",
        }
    }
}

/// Why a `send_*` or `close` call was refused; nothing was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// We already sent a Close (or the connection is closed): RFC 6455
    /// forbids data after our Close.
    #[error("connection is closing or closed")]
    Closed,
    /// The message exceeds `max_message_size` (or 125 bytes for a Ping).
    #[error("message too big")]
    MessageTooBig,
    /// Queued output is at or above `send_queue_bytes`; flush first.
    #[error("send queue full")]
    QueueFull,
    /// Close reasons must fit in 123 bytes (125 minus the code).
    #[error("close reason longer than 123 bytes")]
    ReasonTooLong,
    /// The code can't be sent in a Close frame.
    #[error("close code not sendable")]
    InvalidCode,
}
