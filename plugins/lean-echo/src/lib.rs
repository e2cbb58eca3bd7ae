//! The leanest Rust handler: an echo that imports nothing but Wharf's own
//! interfaces.
//!
//! A Rust component built with the standard library imports thirteen WASI
//! interfaces (streams, stdio, environment, exit, terminals) whether it
//! uses them or not, and wasmtime wires every imported function into each
//! instance it creates: for the bundled [`echo`](../echo/src/lib.rs), about
//! 18k of the 126k instructions a connection costs the host with an
//! instance per connection (callgrind, 2026-12-04). This echo is
//! `#![no_std]`: it uses only `alloc` (`Vec`, `String`, `Box`), with the
//! allocator the standard library itself uses on wasm (dlmalloc), so its
//! component imports no WASI and an instance of it is that much cheaper to
//! set up. What it gives up: anything that needs the standard library, and
//! printing (with no stderr, a send the host refuses is dropped here; the
//! host counts it in `wharf_sends_refused_total`). A panic traps, as in any
//! handler: the host closes the connection with 1011.
//!
//! Otherwise it is the bundled echo without its "goodbye": messages come
//! packed when several arrive together and go back the same way, and it
//! declines `on-upgrade`, `on-open` and `on-close` (`lifecycle`).

// A test build (`cargo clippy --all-targets`) links the standard library
// for its harness, and with it a panic handler and an allocator.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

// `std_feature`: the generated bindings put what needs the standard
// library (an `Error` impl) behind this crate's `std` feature, which it
// does not have.
wit_bindgen::generate!({
    path: "../../wit",
    world: "packed-lifecycle-handler-world",
    std_feature,
});

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::lifecycle::{Calls, Guest as LifecycleGuest};
use exports::wharf::websocket::packed_handler::Guest as PackedGuest;
use wharf::websocket::connection::Connection;
use wharf::websocket::packed::Span;
use wharf::websocket::packed_send;
use wharf::websocket::types::{Accept, UpgradeRequest, UpgradeResponse};

#[cfg(not(test))]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// What the standard library otherwise provides: a panic ends the call.
#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator, through which the host copies strings
/// and lists into this component's memory. The standard library exports it
/// on `wasm32-wasip2`; without it, a handler must.
///
/// # Safety
/// Called by the host only, as the canonical ABI specifies: `old_ptr` and
/// `old_len` are a block this function returned (or null and 0), `align`
/// a power of two.
#[unsafe(no_mangle)]
unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{Layout, alloc, realloc};
    // SAFETY: the caller's promises above are what `alloc` and `realloc`
    // ask for.
    let ptr = unsafe {
        if old_len == 0 {
            if new_len == 0 {
                return align as *mut u8;
            }
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        // Out of memory (the tenant's memory limit): trap.
        core::arch::wasm32::unreachable()
    }
    ptr
}

struct Echo;

impl Guest for Echo {
    /// Only hosts older than WIT 0.1.10 call this (see `wanted`).
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    /// Only hosts older than WIT 0.1.10 call this.
    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        // A refused send is counted by the host; there is nowhere to log it.
        let _ = conn.send_text(&text);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        let _ = conn.send_binary(&data);
    }

    /// Only hosts older than WIT 0.1.10 call this.
    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

impl PackedGuest for Echo {
    /// Every message of the batch goes back as it came, in one call.
    fn on_packed(conn: &Connection, payloads: Vec<u8>, spans: Vec<Span>) {
        let _ = packed_send::send(conn, &payloads, &spans);
    }
}

impl LifecycleGuest for Echo {
    /// None of `on-upgrade`, `on-open` and `on-close`.
    fn wanted() -> Calls {
        Calls::empty()
    }
}

export!(Echo);
