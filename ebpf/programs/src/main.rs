//! tollgate's kernel side.
//!
//! Every program first asks "is the current cgroup a governed session?" and
//! returns at once when it is not. For sessions it records exec, fork, exit
//! and connect, refuses execs of denied files and refuses connects that the
//! session's rules do not allow. All matching of names, claims and policy
//! happens in userspace; the maps hold only what must be decided here.
//!
//! Kernel structure offsets come from the agent (read from the running
//! kernel's BTF) through the `OFFSETS` read-only global.
//!
//! This file holds what every program shares (maps, globals, the event
//! header); the programs live by concern in [`process`] (exec, fork, exit),
//! [`network`] (connect, send, socket creation) and [`redirect`] (governed
//! connections to the proxy and their original destinations).
#![no_std]
#![no_main]
// BPF's atomic add (`lock ... +=`), for counters several CPUs update.
#![feature(asm_experimental_arch)]

mod network;
mod process;
mod redirect;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_ktime_get_boot_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};
use tollgate_common::{
    ConnectionKey, EventHeader, EventKind, ExecInProgress, ExecKey, FAIR_SHARE_DIVISOR, KernelOffsets,
    LOST_BUFFER_FULL, LOST_THROTTLED, LostKey, NetAnyPortKey, NetPortKey, NetRule, OriginalDst, ProxyAddr, SessionSlot,
    WAKEUP_DIVISOR,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets {
    task_mm: 0,
    task_real_parent: 0,
    task_pid: 0,
    task_tgid: 0,
    task_exit_code: 0,
    mm_exe_file: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    file_dentry: 0,
    dentry_inode: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    bprm_file: 0,
    bprm_filename: 0,
    bprm_interp: 0,
    reserved: 0,
    ready: 0,
};

/// The daemon's L7 proxy (127.0.0.1 and ::1 on this port), set before load.
#[unsafe(no_mangle)]
pub(crate) static PROXY: ProxyAddr = ProxyAddr { port: 0, reserved: 0 };

/// Redirected sockets: cookie -> where they were going.
#[map]
pub(crate) static ORIGINAL_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

/// Redirected connections once established, keyed as the proxy sees them.
#[map]
pub(crate) static ORIGINAL_BY_CONNECTION: LruHashMap<ConnectionKey, OriginalDst> =
    LruHashMap::with_max_entries(65536, 0);

/// Governed cgroups: cgroup id -> session.
#[map]
pub(crate) static SESSIONS: HashMap<u64, SessionSlot> = HashMap::with_max_entries(4096, 0);

/// Executables a session may not run, by (cgroup, device, inode).
#[map]
pub(crate) static EXEC_DENY: HashMap<ExecKey, u32> = HashMap::with_max_entries(16384, 0);

/// Index 0: 1 once the daemon has attached the LSM hook, which then
/// decides execs alone (the exec tracepoint only records).
#[map]
pub(crate) static LSM_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Execs whose first file an allow list admitted (a script): the
/// interpreter that takes over is judged by that file, not by itself.
#[map]
pub(crate) static ADMITTED_EXECS: LruHashMap<ExecInProgress, u32> = LruHashMap::with_max_entries(16384, 0);

/// For sessions with an allow list: the only executables they may run.
#[map]
pub(crate) static EXEC_ALLOW: HashMap<ExecKey, u32> = HashMap::with_max_entries(131072, 0);

/// Network rules that apply to every port of a prefix.
#[map]
pub(crate) static NET_ANY_PORT: LpmTrie<NetAnyPortKey, NetRule> = LpmTrie::with_max_entries(16384, 0);

/// Network rules for one port of a prefix.
#[map]
pub(crate) static NET_PORT: LpmTrie<NetPortKey, NetRule> = LpmTrie::with_max_entries(16384, 0);

#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Where each CPU builds an exec event before sending the part it used.
#[map]
pub(crate) static EXEC_SCRATCH: PerCpuArray<process::ExecScratch> = PerCpuArray::with_max_entries(1, 0);

/// Events not delivered, per session, kind and reason (per CPU: no atomics).
#[map]
pub(crate) static LOST: LruPerCpuHashMap<LostKey, u64> = LruPerCpuHashMap::with_max_entries(16384, 0);

/// Bytes of events each session has put into the ring buffer, ever.
#[map]
pub(crate) static SUBMITTED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// Bytes of each session's events the daemon has read, ever (it writes these).
#[map]
pub(crate) static CONSUMED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// `bpf_ringbuf_query` flags.
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;
/// `bpf_ringbuf_output` flags.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

#[inline(always)]
pub(crate) fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of our own global; volatile so the compiler does not
    // fold in the zeroes it was compiled with (the agent rewrites it before load).
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub(crate) fn is_governed(cgroup_id: u64) -> bool {
    // SAFETY: a map lookup; the value is only tested for presence.
    unsafe { SESSIONS.get(cgroup_id) }.is_some()
}

/// The port of the session's resolver (0 outside sessions, or with none).
#[inline(always)]
pub(crate) fn session_dns_port(cgroup_id: u64) -> u32 {
    // SAFETY: a map lookup; the value is copied out at once.
    unsafe { SESSIONS.get(cgroup_id) }.map_or(0, |slot| slot.dns_port)
}

/// The session's `SESSION_*` flags (0 outside sessions).
#[inline(always)]
pub(crate) fn session_flags(cgroup_id: u64) -> u32 {
    // SAFETY: a map lookup; the value is copied out at once.
    unsafe { SESSIONS.get(cgroup_id) }.map_or(0, |slot| slot.flags)
}

/// Counts an event of `cgroup_id` that was not delivered, and why.
#[inline(always)]
pub(crate) fn count_lost(cgroup_id: u64, kind: EventKind, reason: u32) {
    let key = LostKey { cgroup_id, kind: kind as u32, reason };
    match LOST.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot, so no other writer races with this one.
        Some(counter) => unsafe { *counter += 1 },
        None => {
            // Another CPU may create the entry first; then it is counted there.
            let _ = LOST.insert(&key, &1, 0);
        }
    }
}

/// May `cgroup_id` add an event of `size` bytes now? While the ring buffer
/// is less than half full, yes; past that, only while the session's events
/// the daemon has not read yet take less than its share of the buffer, so a
/// flooding session cannot push out the events of quiet ones. A refused
/// event is counted for its session as throttled. Returns the output flags
/// (wake the daemon only past a fill level), or `None` when refused.
#[inline(always)]
pub(crate) fn admit(cgroup_id: u64, kind: EventKind, size: u64) -> Option<u64> {
    let filled = EVENTS.query(BPF_RB_AVAIL_DATA);
    let ring = EVENTS.query(BPF_RB_RING_SIZE);
    let wake = if filled.saturating_mul(WAKEUP_DIVISOR) >= ring { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    if filled.saturating_mul(2) < ring {
        return Some(wake);
    }
    // SAFETY: plain reads of map values; a racing update only makes the estimate stale.
    let submitted = unsafe { SUBMITTED.get(&cgroup_id) }.copied().unwrap_or(0);
    // SAFETY: as above.
    let consumed = unsafe { CONSUMED.get(&cgroup_id) }.copied().unwrap_or(0);
    if submitted.saturating_sub(consumed) + size <= ring / FAIR_SHARE_DIVISOR {
        return Some(wake);
    }
    count_lost(cgroup_id, kind, LOST_THROTTLED);
    None
}

/// Notes `size` bytes of `cgroup_id`'s events put into the ring buffer.
#[inline(always)]
pub(crate) fn submitted(cgroup_id: u64, size: u64) {
    match SUBMITTED.get_ptr_mut(&cgroup_id) {
        // An atomic add: a session writing from several CPUs at once must not
        // lose increments, or it would look as if the daemon had read more.
        // SAFETY: the pointer is to a live, aligned u64 map value.
        Some(total) => unsafe {
            core::arch::asm!("lock *(u64 *)({0} + 0) += {1}", in(reg) total, in(reg) size);
        },
        None => {
            let _ = SUBMITTED.insert(&cgroup_id, &size, 0);
        }
    }
}

/// Writes a fixed-size event for `cgroup_id` if its session may add one now;
/// counts it as lost when the buffer has no room.
#[inline(always)]
pub(crate) fn emit<T: 'static>(cgroup_id: u64, kind: EventKind, event: &T) {
    let size = core::mem::size_of::<T>() as u64;
    let Some(flags) = admit(cgroup_id, kind, size) else {
        return;
    };
    if EVENTS.output::<T>(event, flags).is_ok() {
        submitted(cgroup_id, size);
    } else {
        count_lost(cgroup_id, kind, LOST_BUFFER_FULL);
    }
}

#[inline(always)]
pub(crate) fn header(kind: EventKind, cgroup_id: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        cgroup_id,
        // SAFETY: no arguments, always safe to call.
        boot_ns: unsafe { bpf_ktime_get_boot_ns() },
    }
}

/// Reads a field of type `T` at `offset` bytes into the kernel object at `base`.
#[inline(always)]
pub(crate) unsafe fn field<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an Err.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// An address the kernel hands over as four `u32` words, as bytes in network order.
#[inline(always)]
pub(crate) fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
