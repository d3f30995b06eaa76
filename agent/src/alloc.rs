//! The memory allocator, chosen per command.
//!
//! # Design
//! - **The agent keeps the C library's allocator.** musl's (the static binary) returns each
//!   large block to the kernel when it is freed, which keeps the agent's peak RSS at its part
//!   budget plus a few MiB (7.6 MiB on 5,000 small files). glibc's is tuned below to do the same.
//! - **The relay runs on mimalloc** (static musl binary only). Every byte the relay receives goes
//!   through a 64 KiB protocol message and into a part of several MiB, and musl mapped and
//!   unmapped each of those afresh: 375,000 page faults in 10 s, a third of the relay's CPU.
//!   mimalloc keeps freed memory for reuse: 21,000 page faults, and the relay's CPU for a 1 GiB
//!   file on loopback fell from about 10 s to 7.6 s (with the other changes of issue 17, to
//!   5.5 s). Its peak RSS rises with what it keeps (the assembly budget and the parts in
//!   flight bound it). The same allocator in the agent took its peak
//!   RSS on small files from 7.6 to 50 MiB, hence the choice per command.
//! - **The switch** happens once, in `main`, once the command line says `relay` and before
//!   the runtime starts any thread. Blocks allocated before it are musl's and stay so: a block
//!   is freed by mimalloc only if it lies in mimalloc's memory (`mi_is_in_heap_region`), and
//!   a reallocation of an older block moves it over.
//!
//! Must not break: every block is freed (or grown) by the allocator that gave it.

#[cfg(target_env = "musl")]
mod imp {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicBool, Ordering};

    use mimalloc::MiMalloc;

    /// Whether new blocks come from mimalloc.
    static MI: AtomicBool = AtomicBool::new(false);

    /// musl's allocator until `use_mimalloc`, then mimalloc (see the module's doc).
    pub struct Switch;

    /// Whether `p` was given by mimalloc.
    fn mimalloc_owns(p: *mut u8) -> bool {
        MI.load(Ordering::Relaxed)
            // SAFETY: a query on an address; it reads mimalloc's own maps, not `p`.
            && unsafe { libmimalloc_sys::mi_is_in_heap_region(p.cast()) }
    }

    // SAFETY: each call goes to one of two correct allocators; a block goes back to the one
    // that gave it (`mimalloc_owns`), and one of musl's is grown by moving it to mimalloc.
    unsafe impl GlobalAlloc for Switch {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if MI.load(Ordering::Relaxed) {
                unsafe { MiMalloc.alloc(layout) }
            } else {
                unsafe { System.alloc(layout) }
            }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if MI.load(Ordering::Relaxed) {
                unsafe { MiMalloc.alloc_zeroed(layout) }
            } else {
                unsafe { System.alloc_zeroed(layout) }
            }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            if mimalloc_owns(ptr) {
                unsafe { MiMalloc.dealloc(ptr, layout) }
            } else {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if mimalloc_owns(ptr) {
                return unsafe { MiMalloc.realloc(ptr, layout, new_size) };
            }
            if !MI.load(Ordering::Relaxed) {
                return unsafe { System.realloc(ptr, layout, new_size) };
            }
            // One of musl's, grown after the switch: moved to mimalloc.
            // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            let new = unsafe { MiMalloc.alloc(new_layout) };
            if !new.is_null() {
                unsafe {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    System.dealloc(ptr, layout);
                }
            }
            new
        }
    }

    /// From now on, new blocks come from mimalloc. Call before any other thread starts.
    pub fn use_mimalloc() {
        MI.store(true, Ordering::SeqCst);
    }

    /// Nothing to tune: musl returns large blocks to the kernel on its own.
    pub fn tune() {}
}

#[cfg(not(target_env = "musl"))]
mod imp {
    /// mimalloc is linked into the static (musl) binary only; elsewhere the C library's stays.
    pub fn use_mimalloc() {}

    /// glibc raises its mmap threshold after the first large buffer is freed; from then on freed
    /// part buffers stay in per-thread arenas, and peak RSS reached about 2.5 times the part
    /// budget (82 MiB for a 32 MiB budget on a 1 GiB upload). A fixed threshold keeps
    /// part-sized buffers in their own mappings, returned to the system when a part is done
    /// (42 MiB on the same run).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn tune() {
        // SAFETY: mallopt only changes allocator parameters; it runs before any other thread
        // exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn tune() {}
}

#[cfg(target_env = "musl")]
pub use imp::Switch;
pub use imp::{tune, use_mimalloc};
