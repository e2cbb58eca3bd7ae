//! Close status codes (RFC 6455 section 7.4).

/// Named close codes, so call sites read as intent rather than numbers.
pub struct CloseCode;

impl CloseCode {
    /// The purpose of the connection was fulfilled.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, idle timeout).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The peer sent a data type we don't accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Reported (never sent) when a Close frame carried no code.
    pub const NO_STATUS: u16 = 1005;
    /// Reported (never sent) when the connection ended without a Close.
    pub const ABNORMAL: u16 = 1006;
    /// A message's data didn't match its type (bad UTF-8 in text).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message violated the application's policy.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame or message exceeded our limits.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The client expected an extension we didn't negotiate.
    pub const MANDATORY_EXTENSION: u16 = 1010;
    /// The server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The service is restarting.
    pub const SERVICE_RESTART: u16 = 1012;
    /// Try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// A gateway got a bad response upstream.
    pub const BAD_GATEWAY: u16 = 1014;

    /// Whether `code` is in the range left to applications: 3000-3999
    /// registered with IANA, 4000-4999 private use (section 7.4.2).
    pub fn is_application(code: u16) -> bool {
        matches!(code, 3000..=4999)
    }
}

/// Whether `code` may appear in a Close frame on the wire (received or
/// sent): 1000-1003, 1007-1014 and the registered/private range 3000-4999.
///
/// 1005 and 1006 are report-only, 1004 and 1015+ are reserved, and
/// 0-999 and 5000+ are undefined, so a frame carrying them is a protocol
/// error.
pub fn is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014) || CloseCode::is_application(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_table() {
        for code in 0..=u16::MAX {
            let expect = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert_eq!(is_valid(code), expect, "{code}");
        }
    }
}
