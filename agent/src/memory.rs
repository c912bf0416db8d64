//! Keeps glibc's allocator from holding memory the agent has freed.
//!
//! Loading the eBPF object allocates big and briefly: aya's
//! `EbpfLoader::new` reads the kernel's BTF (~5 MiB) and parses it (tens
//! of thousands of types) before `.btf(None)` can decline it, once per
//! load, so once per pod. glibc answers a large freed block by raising its
//! mmap and trim thresholds (to twice the block, ~11 MiB), after which a
//! thread's heap is never trimmed below that: each thread that ran a load
//! kept ~10 MiB resident, two thirds of an idle agent. Fixing the
//! thresholds at start and trimming after each load gives it back.

/// Below this an allocation comes from the heap, above it from its own
/// mapping, returned whole when freed (glibc's initial default, kept
/// rather than raised).
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// Free memory at the top of a heap beyond this goes back to the kernel.
const TRIM_THRESHOLD: libc::c_int = 256 * 1024;

/// Fixes the allocator's thresholds; called once, as the agent starts.
pub fn fix_thresholds() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets glibc's own tunables, under the main
    // arena's lock; it reads or writes no caller memory.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Hands the free pages of every heap back to the kernel; called after a
/// burst of short-lived allocations such as an object load.
pub(crate) fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks,
    // and advises the kernel of pages that are free; it reads or writes no
    // caller memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
