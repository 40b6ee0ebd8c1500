//! Tunes glibc's allocator for a proxy's allocation pattern, and gives
//! free heap back to the kernel after bursts.
//!
//! Carrying a bulk stream allocates and frees buffers of 16 to 64 KiB at a
//! high rate (HTTP/2 frames, TLS records). With glibc's defaults, each time
//! more than 128 KiB is free at the top of the heap it is given back to the
//! kernel, and the next allocations fault it in again, zeroed: measured as
//! about one page fault per 17 KiB carried and 13 % of the agent's CPU in a
//! one-stream bulk transfer. Keeping up to 4 MiB of free heap and serving
//! only blocks from 512 KiB up with mmap (above the splice buffers' 256
//! KiB) removes those faults.
//!
//! glibc only ever gives back free memory at the top of the heap, though:
//! once many connections have come and gone, the free memory is spread over
//! the heap between live blocks and stays resident (measured: 10,000
//! connections held and closed left an agent at 95 MiB resident instead of
//! the 25 MiB it started with). [`trim_after_bursts`] looks at the free
//! heap every few seconds and, when it has grown by [`TRIM_GROWTH`] since
//! the last trim, calls `malloc_trim(0)`, which releases every free page
//! wherever it is (`MADV_DONTNEED`), so a burst's memory goes back to the
//! kernel within seconds of its end without a trim per free.

use std::time::Duration;

/// Free heap kept instead of being returned to the kernel (bytes): room
/// for the splice buffers of eight bulk streams freed at once.
const TRIM_THRESHOLD: i32 = 4 * 1024 * 1024;
/// Allocations at least this large get their own mapping (bytes). Above
/// the splice buffers' largest size (256 KiB): a mapped buffer is faulted
/// in anew, zeroed, each time a stream grows one (measured: 5 % of the
/// agent's samples in page faults under eight bulk streams at 256 KiB).
const MMAP_THRESHOLD: i32 = 512 * 1024;
/// Free heap growth since the last trim that makes the next one worth it.
pub const TRIM_GROWTH: usize = 8 * 1024 * 1024;
/// How often [`trim_after_bursts`] looks at the free heap.
pub const TRIM_PERIOD: Duration = Duration::from_secs(5);

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

/// When free heap is worth trimming: once it has grown by [`TRIM_GROWTH`]
/// over its lowest level since the last trim.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    /// Free bytes at the last trim, or the lowest seen since.
    low: usize,
}

impl TrimPolicy {
    /// Notes `free` bytes of free heap; `true` when a trim is due now.
    pub fn due(&mut self, free: usize) -> bool {
        self.low = self.low.min(free);
        if free >= self.low.saturating_add(TRIM_GROWTH) {
            self.low = free;
            return true;
        }
        false
    }
}

/// Free bytes in the heap's arenas (not counting mmapped blocks), where the
/// C library can tell.
pub fn free_heap() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives every free page of the heap back to the kernel; `true` if any was.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Every [`TRIM_PERIOD`], trims the heap when [`TrimPolicy`] says so.
/// Runs until dropped; returns at once where the C library cannot tell
/// its free heap.
pub async fn trim_after_bursts() {
    if free_heap().is_none() {
        return;
    }
    let mut policy = TrimPolicy::default();
    let mut ticks = tokio::time::interval(TRIM_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(free) = free_heap() else { return };
        if policy.due(free) {
            let started = std::time::Instant::now();
            let released = trim();
            tracing::debug!(
                free_mib = free / (1024 * 1024),
                released,
                took = ?started.elapsed(),
                "heap trimmed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{free_heap, trim, TrimPolicy, TRIM_GROWTH};

    #[test]
    fn a_trim_is_due_when_free_heap_grew_by_the_step() {
        let mut p = TrimPolicy::default();
        assert!(!p.due(0));
        assert!(!p.due(TRIM_GROWTH - 1));
        assert!(p.due(TRIM_GROWTH), "the first step");
        // The same free heap again: already trimmed.
        assert!(!p.due(TRIM_GROWTH));
        assert!(!p.due(2 * TRIM_GROWTH - 1));
        assert!(p.due(2 * TRIM_GROWTH));
        // Reused, then freed again: due once it grew a step over the low.
        assert!(!p.due(TRIM_GROWTH / 2));
        assert!(!p.due(TRIM_GROWTH));
        assert!(p.due(TRIM_GROWTH / 2 + TRIM_GROWTH));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn free_heap_is_seen_and_trimmed() {
        // Many small blocks freed, the first one kept: the free memory lies
        // below a live block, where only malloc_trim reaches it.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 * 1024]).collect();
        let before = free_heap().unwrap();
        let mut blocks = blocks.into_iter();
        let keep = blocks.next();
        let last = blocks.next_back();
        drop(blocks);
        assert!(free_heap().unwrap() > before, "freeing did not show");
        let _ = trim();
        drop((keep, last));
    }
}
