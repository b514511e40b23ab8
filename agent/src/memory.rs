//! The process's allocator, and how the daemon keeps its memory small.

/// mimalloc: the proxy allocates and frees per request on two worker
/// threads, and glibc's malloc spent a tenth of the daemon's time on it
/// (arena locks, consolidating freed chunks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hands memory that is freed but still held back to the system. mimalloc
/// returns it when the freeing thread allocates again, which an idle
/// daemon's main thread does not: after the start (the BPF object, the
/// kernel's BTF) that was 30 MB kept at rest.
pub fn give_back_freed() {
    // SAFETY: a collection of the allocator's own free pages; no pointer of
    // ours is involved.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Keeps this process on small pages: transparent huge pages (`always` on
/// many hosts) back the allocator's arenas with 2 MiB pages that a few live
/// objects keep whole, 20 MB more at rest. For the daemon only: the setting
/// is inherited by children, and `run`'s child is the governed command.
pub fn small_pages_only() {
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "transparent huge pages stay on for the daemon");
    }
}
