//! The host side of `wharf:websocket/latin1`: binary messages a plugin
//! passes as strings of code points up to U+00FF, for toolchains that leak
//! `list<u8>` arguments (componentize-py 0.25) but free strings.

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::ErrorCode;
use super::bindings::wharf::websocket::latin1::Host;
use super::connection_host::ConnectionEntry;

/// The bytes `data`'s code points stand for; `None` if one is above U+00FF.
/// By the UTF-8 bytes, not by `char`: U+0000-U+007F are one byte, U+0080-
/// U+00FF two (lead 0xC2 or 0xC3). On random binary data the branch per
/// byte is mispredicted often: perf puts this at ~13% of a 1 KiB Python
/// binary echo (a branchless version measured slower, 17%).
pub fn bytes_of(data: &str) -> Option<Vec<u8>> {
    let utf8 = data.as_bytes();
    let mut out = vec![0u8; utf8.len()];
    let (mut i, mut n) = (0, 0);
    while let Some(&b) = utf8.get(i) {
        out[n] = match b {
            0..=0x7F => b,
            // `data` is valid UTF-8: a continuation byte follows.
            0xC2 | 0xC3 => {
                i += 1;
                ((b & 0x03) << 6) | (utf8.get(i)? & 0x3F)
            }
            _ => return None,
        };
        i += 1;
        n += 1;
    }
    out.truncate(n);
    Some(out)
}

impl Host for HostState {
    fn send_binary(
        &mut self,
        conn: Resource<ConnectionEntry>,
        data: String,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let Some(bytes) = bytes_of(&data) else {
            wasmtime::bail!("latin1.send-binary: a code point above U+00FF");
        };
        Ok(self.table.get_mut(&conn)?.outbox.send_binary(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_points_up_to_ff_are_the_bytes() {
        let all: String = (0u8..=255).map(char::from).collect();
        assert_eq!(bytes_of(&all), Some((0u8..=255).collect()));
        assert_eq!(bytes_of(""), Some(Vec::new()));
        assert_eq!(bytes_of("\u{100}"), None);
        assert_eq!(bytes_of("ok\u{20ac}"), None);
    }
}
