//! The `tollgate` binary: parse arguments, run, map the outcome to an exit code.

/// mimalloc: the proxy allocates and frees per request on two worker
/// threads, and glibc's malloc spent a tenth of the daemon's time on it
/// (arena locks, consolidating freed chunks); with mimalloc, keep-alive
/// throughput is about a tenth higher.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_t` (the same in its
/// versions 2 and 3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // The daemon's start frees tens of MB (the BPF object, kernel BTF), and
    // by default mimalloc returns freed memory to the system only when the
    // freeing thread allocates again, which an idle daemon does not: at
    // rest it kept 30 MB more than with freed memory returned at once.
    // SAFETY: sets a global option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    std::process::exit(tollgate::cli::main());
}
