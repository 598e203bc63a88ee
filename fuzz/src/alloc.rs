//! A counting global allocator that refuses unbounded allocations, soundly.
//!
//! The fuzzer's binary installs [`CountingAlloc`] as its `#[global_allocator]`. A request for
//! more than [`limit`] bytes at once, or one that would take the live total past it, is
//! *refused*: the allocator records it and returns null.
//!
//! Why null, and not a panic or a dummy block: `GlobalAlloc::alloc` must not unwind (a panic
//! there is undefined behaviour at the FFI-like boundary the standard library assumes), and a
//! dummy block smaller than the request would be written past its end. Null is the one answer
//! the `GlobalAlloc` contract allows for "cannot allocate". Then either
//! * the caller handles it (`try_reserve`, `Vec::try_with_capacity`): the input goes on, and the
//!   worker reports the recorded refusal after the input as an "unbounded allocation"; or
//! * the caller does not (`Vec::with_capacity`, `vec![..]`, `Box::new`): the standard library's
//!   `handle_alloc_error` aborts the process. The fuzzer runs inputs in a child process for
//!   exactly this reason: the supervising parent sees the abort and reads the refusal the
//!   allocator wrote into the shared flight recorder (`crate::engine::Recorder`), and reports
//!   the input as an "unbounded allocation" instead of a bare crash.
//!
//! The allocator itself never allocates and uses only atomics, so it is safe to call from any
//! thread at any time, including from inside the panic machinery.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// The default limit: 1 GiB at once or live in total.
pub const DEFAULT_LIMIT: usize = 1 << 30;

static LIMIT: AtomicUsize = AtomicUsize::new(DEFAULT_LIMIT);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Size of the last refused request (0: none since the last [`take_refusal`]).
static REFUSED: AtomicU64 = AtomicU64::new(0);
/// Where the refusal is also written, so it outlives an abort (two u64s: size, live total).
static SHARED: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());

/// Sets the limit (bytes).
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

pub fn limit() -> usize {
    LIMIT.load(Ordering::Relaxed)
}

/// Bytes allocated now, when [`CountingAlloc`] is the global allocator (0 otherwise).
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The highest live total of the process so far.
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// The size of a request refused since the last call, if any; clears it (here and in the
/// shared record).
pub fn take_refusal() -> Option<u64> {
    let shared = SHARED.load(Ordering::Acquire);
    if !shared.is_null() {
        // SAFETY: `share_refusals` requires the two slots to stay valid for the process.
        unsafe {
            (*shared).store(0, Ordering::Relaxed);
            (*shared.add(1)).store(0, Ordering::Relaxed);
        }
    }
    match REFUSED.swap(0, Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// Also writes every refusal to `slots[0]` (size) and `slots[1]` (live total then).
///
/// # Safety
/// `slots` must point at two `AtomicU64`s that stay valid until the process exits (the worker
/// passes a slot of its memory-mapped flight recorder, which it never unmaps).
pub unsafe fn share_refusals(slots: *mut AtomicU64) {
    SHARED.store(slots, Ordering::Release);
}

fn refuse(size: usize) {
    REFUSED.store(size as u64, Ordering::Relaxed);
    let shared = SHARED.load(Ordering::Acquire);
    if !shared.is_null() {
        // SAFETY: `share_refusals`'s contract.
        unsafe {
            (*shared).store(size as u64, Ordering::Relaxed);
            (*shared.add(1)).store(live() as u64, Ordering::Relaxed);
        }
    }
}

/// [`System`] with a byte count and a limit; see the module docs.
pub struct CountingAlloc;

impl CountingAlloc {
    /// Admits a block of `size` bytes that adds `growth` bytes to the live total (`size` for a
    /// new block, the difference for a `realloc`), or records a refusal of `size`.
    fn admit(size: usize, growth: usize) -> bool {
        let limit = limit();
        if size > limit {
            refuse(size);
            return false;
        }
        let before = LIVE.fetch_add(growth, Ordering::Relaxed);
        if before + growth > limit {
            LIVE.fetch_sub(growth, Ordering::Relaxed);
            refuse(size);
            return false;
        }
        PEAK.fetch_max(before + growth, Ordering::Relaxed);
        true
    }
}

// SAFETY: every method forwards to `System` with the caller's layout, or returns null before
// calling it (allowed by `GlobalAlloc`); the counters never affect the blocks themselves.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size(), layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size(), layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !Self::admit(new_size, new_size - old) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Ordering::Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Ordering::Relaxed);
        }
        p
    }
}
