//! Tunes glibc's allocator for a proxy's allocation pattern.
//!
//! Carrying a bulk stream allocates and frees buffers of 16 to 64 KiB at a
//! high rate (HTTP/2 frames, TLS records). With glibc's defaults, each time
//! more than 128 KiB is free at the top of the heap it is given back to the
//! kernel, and the next allocations fault it in again, zeroed: measured as
//! about one page fault per 17 KiB carried and 13 % of the agent's CPU in a
//! one-stream bulk transfer. Keeping up to 1 MiB of free heap and serving
//! only blocks from 256 KiB up with mmap removes those faults.

/// Free heap kept instead of being returned to the kernel (bytes).
const TRIM_THRESHOLD: i32 = 1024 * 1024;
/// Allocations at least this large get their own mapping (bytes).
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Applies the settings above; call once, first thing in `main`. A no-op
/// where the C library is not glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
