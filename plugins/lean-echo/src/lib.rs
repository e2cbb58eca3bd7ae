//! The leanest Rust handler: an echo that imports nothing but Wharf's own
//! interfaces.
//!
//! A Rust component built with the standard library imports thirteen WASI
//! interfaces (streams, stdio, environment, exit, terminals) whether it
//! uses them or not, and wasmtime wires every imported function into each
//! instance it creates: for the bundled [`echo`](../echo/src/lib.rs),
//! about 22k of the 121k instructions a connection costs the host with an
//! instance per connection, and 8.6 KiB of the 41.5 an idle one holds
//! (2026-12-05). This echo is
//! `#![no_std]`: it uses only `alloc` (`Vec`, `String`, `Box`), with
//! dlmalloc as its allocator (see `heap`), so its
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
static ALLOCATOR: heap::Heap = heap::Heap::new();

/// dlmalloc over the memory the instance starts with.
///
/// dlmalloc's own `System` on `wasm32-wasip2` takes its first memory with
/// `memory.grow`, which the host serves with two `mprotect` calls and a
/// reset per instance: 83 against 75 µs of server CPU per connection,
/// although an instance of this echo runs fewer instructions than the
/// bundled one's (callgrind, 2026-12-04). The standard library's allocator
/// (wasi-libc's) starts instead in the space the linker leaves between the
/// end of the data and the end of the initial memory (`__heap_base` to
/// `__heap_end`), as this one does; it grows the memory only past that.
#[cfg(not(test))]
mod heap {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::{Cell, UnsafeCell};
    use core::ptr;

    use dlmalloc::{Allocator, Dlmalloc};

    unsafe extern "C" {
        static __heap_base: u8;
        static __heap_end: u8;
    }

    const PAGE: usize = 64 * 1024;

    /// Memory for dlmalloc: the initial heap once, then grown pages.
    pub struct System {
        heap_given: Cell<bool>,
    }

    // SAFETY: every method but `alloc` has the meaning dlmalloc documents
    // for a system that never gives memory back; `alloc` returns a region
    // nothing else uses: the initial heap (which the linker leaves to the
    // allocator) once, then pages `memory.grow` adds. Both are zeroed when
    // first handed out.
    unsafe impl Allocator for System {
        fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
            if !self.heap_given.replace(true) {
                // Only the symbols' addresses, which the linker sets.
                let (base, end) = (&raw const __heap_base, &raw const __heap_end);
                let len = (end as usize).saturating_sub(base as usize);
                if len >= size {
                    return (base.cast_mut(), len, 0);
                }
            }
            let pages = size.div_ceil(PAGE);
            match core::arch::wasm32::memory_grow(0, pages) {
                usize::MAX => (ptr::null_mut(), 0, 0),
                first => ((first * PAGE) as *mut u8, pages * PAGE, 0),
            }
        }

        fn remap(&self, _: *mut u8, _: usize, _: usize, _: bool) -> *mut u8 {
            ptr::null_mut()
        }

        fn free_part(&self, _: *mut u8, _: usize, _: usize) -> bool {
            false
        }

        fn free(&self, _: *mut u8, _: usize) -> bool {
            false
        }

        fn can_release_part(&self, _: u32) -> bool {
            false
        }

        fn allocates_zeros(&self) -> bool {
            true
        }

        fn page_size(&self) -> usize {
            PAGE
        }
    }

    pub struct Heap(UnsafeCell<Dlmalloc<System>>);

    impl Heap {
        pub const fn new() -> Self {
            let mut dlmalloc = Dlmalloc::new_with_allocator(System {
                heap_given: Cell::new(false),
            });
            // dlmalloc asks its system for multiples of this: a 64 KiB
            // page, its default, would not fit in the initial heap, which
            // is what is left of the initial memory's last page.
            assert!(dlmalloc.set_granularity(4096));
            Self(UnsafeCell::new(dlmalloc))
        }
    }

    // SAFETY: a component instance runs on one thread, and dlmalloc never
    // calls back into the global allocator, so no two calls overlap.
    unsafe impl Sync for Heap {}

    // SAFETY: dlmalloc's methods take what `GlobalAlloc`'s do.
    unsafe impl GlobalAlloc for Heap {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).malloc(layout.size(), layout.align()) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).calloc(layout.size(), layout.align()) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { (*self.0.get()).free(ptr, layout.size(), layout.align()) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            unsafe { (*self.0.get()).realloc(ptr, layout.size(), layout.align(), new_size) }
        }
    }
}

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
