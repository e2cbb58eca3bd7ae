//! Building the server's handshake responses.

use std::fmt::Write as _;

use super::accept_key;

/// Why a header (or status) handed to a response builder was refused.
///
/// Refusing instead of sanitizing keeps a header-injection bug in the host
/// from ever reaching the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHeader {
    /// The name is empty or not an RFC 9110 token.
    #[error("invalid header name {0:?}")]
    InvalidName(String),
    /// The value holds CR, LF, NUL or another control character.
    #[error("invalid value for header {0:?}")]
    InvalidValue(String),
    /// The header is one this crate writes itself (framing or upgrade
    /// semantics), so a second copy would be contradictory.
    #[error("header {0:?} is set by the server itself")]
    Reserved(String),
    /// The status code can't be used for a rejection (only 200-599,
    /// and never 101, which would mean the upgrade happened).
    #[error("invalid status code {0}")]
    InvalidStatus(u16),
    /// The headers (or a refusal's body) are larger than 16 KiB
    /// (64 KiB; `MAX_EXTRA_HEADER_BYTES`, `MAX_REJECT_BODY_BYTES`): a response
    /// is written in one piece, before any limit on the connection applies.
    #[error("{what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// `"headers"` or `"body"`.
        what: &'static str,
        /// Its size, in bytes.
        size: usize,
        /// The limit it is over, in bytes.
        limit: usize,
    },
}

/// Largest total of the extra headers (names, values, `: ` and CRLF) a
/// handshake response may carry: as much as a client may send us.
pub const MAX_EXTRA_HEADER_BYTES: usize = 16 * 1024;
/// Largest body of a refusal.
pub const MAX_REJECT_BODY_BYTES: usize = 64 * 1024;

/// Validates every header in `extra` and bounds their total size.
fn validate_extra(extra: &[(String, String)]) -> Result<(), InvalidHeader> {
    let mut size = 0usize;
    for (n, v) in extra {
        validate_header(n, v)?;
        size = size.saturating_add(n.len() + v.len() + 4);
    }
    if size > MAX_EXTRA_HEADER_BYTES {
        return Err(InvalidHeader::TooLarge {
            what: "headers",
            size,
            limit: MAX_EXTRA_HEADER_BYTES,
        });
    }
    Ok(())
}

/// Checks that `name: value` can be written into a response safely.
///
/// Refuses names the handshake owns (`Upgrade`, `Connection`,
/// `Sec-WebSocket-*`, `Content-Length`, `Transfer-Encoding`), because a
/// duplicate would let the host contradict the framing or the upgrade.
pub fn validate_header(name: &str, value: &str) -> Result<(), InvalidHeader> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(InvalidHeader::InvalidName(name.to_owned()));
    }
    let lower = name.to_ascii_lowercase();
    if matches!(
        lower.as_str(),
        "upgrade" | "connection" | "content-length" | "transfer-encoding"
    ) || lower.starts_with("sec-websocket-")
    {
        return Err(InvalidHeader::Reserved(name.to_owned()));
    }
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(InvalidHeader::InvalidValue(name.to_owned()));
    }
    Ok(())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Builds the `101 Switching Protocols` response that completes the upgrade.
///
/// `subprotocol` should be one the client offered; it is validated like any
/// header value but not checked against the offer, which is the host's call.
pub fn accept_response(
    client_key: &str,
    subprotocol: Option<&str>,
    extra: &[(String, String)],
) -> Result<Vec<u8>, InvalidHeader> {
    validate_extra(extra)?;
    if let Some(p) = subprotocol
        && (p.is_empty() || !p.bytes().all(is_tchar))
    {
        // Subprotocol names are tokens (RFC 6455 section 4.1), and a
        // non-token could smuggle a second header.
        return Err(InvalidHeader::InvalidValue("Sec-WebSocket-Protocol".into()));
    }
    let mut out = String::with_capacity(160);
    out.push_str(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    let _ = write!(out, "Sec-WebSocket-Accept: {}\r\n", accept_key(client_key));
    if let Some(p) = subprotocol {
        let _ = write!(out, "Sec-WebSocket-Protocol: {p}\r\n");
    }
    for (n, v) in extra {
        let _ = write!(out, "{n}: {v}\r\n");
    }
    out.push_str("\r\n");
    Ok(out.into_bytes())
}

/// Builds a complete refusal (status, headers, text body) ending with
/// `Connection: close`.
///
/// A `Content-Type` in `extra` replaces the default
/// `text/plain; charset=utf-8`.
pub fn reject_response(
    status: u16,
    extra: &[(String, String)],
    body: &str,
) -> Result<Vec<u8>, InvalidHeader> {
    if !(200..=599).contains(&status) {
        return Err(InvalidHeader::InvalidStatus(status));
    }
    validate_extra(extra)?;
    if body.len() > MAX_REJECT_BODY_BYTES {
        return Err(InvalidHeader::TooLarge {
            what: "body",
            size: body.len(),
            limit: MAX_REJECT_BODY_BYTES,
        });
    }
    Ok(write_response(
        status,
        extra.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        body,
    ))
}

/// Writes a response without validating `extra`: for callers in this crate
/// whose headers are fixed strings (including reserved ones like `Upgrade`).
pub(crate) fn write_response<'a>(
    status: u16,
    extra: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    body: &str,
) -> Vec<u8> {
    let mut out = String::with_capacity(128 + body.len());
    let _ = write!(out, "HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    if !extra
        .clone()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    }
    for (n, v) in extra {
        let _ = write!(out, "{n}: {v}\r\n");
    }
    let _ = write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    out.push_str(body);
    out.into_bytes()
}

/// The canonical reason phrase, so status lines read as clients expect.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}
