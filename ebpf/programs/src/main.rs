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
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{
            bpf_get_current_task, bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_probe_read_user, bpf_send_signal,
        },
    },
    macros::{cgroup_sock, cgroup_sock_addr, lsm, map, raw_tracepoint, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{LsmContext, RawTracePointContext, SockAddrContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use tollgate_common::{
    ARGV_LEN, ConnectEvent, ConnectionKey, EXEC_ARGV_TRUNCATED, EXEC_ARGV_UNREADABLE, EXEC_FILENAME_TRUNCATED,
    EventHeader, EventKind, ExecEvent, ExecKey, ExitEvent, FILENAME_LEN, ForkEvent, KernelOffsets, LOST_SLOTS,
    NET_ANY_PORT_FIXED_BITS, NET_PORT_FIXED_BITS, NO_RULE, NetAnyPortKey, NetPortKey, NetRule, OriginalDst, ProxyAddr,
    SessionSlot, SocketEvent, Verdict,
};

const SIGKILL: u32 = 9;
const EPERM: i32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
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
    ready: 0,
};

/// The daemon's L7 proxy (127.0.0.1 and ::1 on this port), set before load.
#[unsafe(no_mangle)]
static PROXY: ProxyAddr = ProxyAddr { port: 0, reserved: 0 };

/// Redirected sockets: cookie -> where they were going.
#[map]
static ORIGINAL_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

/// Redirected connections once established, keyed as the proxy sees them.
#[map]
static ORIGINAL_BY_CONNECTION: LruHashMap<ConnectionKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

/// Governed cgroups: cgroup id -> session.
#[map]
static SESSIONS: HashMap<u64, SessionSlot> = HashMap::with_max_entries(4096, 0);

/// Executables a session may not run, by (cgroup, device, inode).
#[map]
static EXEC_DENY: HashMap<ExecKey, u32> = HashMap::with_max_entries(16384, 0);

/// Network rules that apply to every port of a prefix.
#[map]
static NET_ANY_PORT: LpmTrie<NetAnyPortKey, NetRule> = LpmTrie::with_max_entries(16384, 0);

/// Network rules for one port of a prefix.
#[map]
static NET_PORT: LpmTrie<NetPortKey, NetRule> = LpmTrie::with_max_entries(16384, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Events that found the ring buffer full, per event kind.
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SLOTS, 0);

#[inline(always)]
fn offsets() -> KernelOffsets {
    // SAFETY: a plain read of our own global; volatile so the compiler does not
    // fold in the zeroes it was compiled with (the agent rewrites it before load).
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn is_governed(cgroup_id: u64) -> bool {
    // SAFETY: a map lookup; the value is only tested for presence.
    unsafe { SESSIONS.get(cgroup_id) }.is_some()
}

#[inline(always)]
fn count_lost(kind: EventKind) {
    if let Some(counter) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, so no other writer races with this one.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn header(kind: EventKind, cgroup_id: u64) -> EventHeader {
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
unsafe fn field<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an Err.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// Device and inode of the file an exec is loading, as `stat()` reports them
/// for the path (the dentry's inode, not a stacked filesystem's real one).
#[inline(always)]
unsafe fn file_identity(file: *const u8, off: &KernelOffsets) -> Result<(u32, u64), i32> {
    // SAFETY: every step is a checked kernel read.
    unsafe {
        let dentry: *const u8 = field(file, off.file_dentry)?;
        let inode: *const u8 = field(dentry, off.dentry_inode)?;
        let ino: u64 = field(inode, off.inode_ino)?;
        let sb: *const u8 = field(inode, off.inode_sb)?;
        let dev: u32 = field(sb, off.sb_dev)?;
        Ok((dev, ino))
    }
}

#[inline(always)]
fn exec_denied(cgroup_id: u64, dev: u32, ino: u64) -> bool {
    let key = ExecKey { cgroup_id, ino, dev, reserved: 0 };
    // SAFETY: presence test only.
    unsafe { EXEC_DENY.get(key) }.is_some()
}

/// Writes an exec event straight into ring buffer memory: the event is larger
/// than the 512-byte BPF stack.
#[inline(always)]
unsafe fn emit_exec(cgroup_id: u64, bprm: *const u8, verdict: Verdict, dev: u32, ino: u64, read_argv: bool) {
    let off = offsets();
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_lost(EventKind::Exec);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer slot.
    unsafe {
        (*event).header = header(EventKind::Exec, cgroup_id);
        (*event).uid = bpf_get_current_uid_gid() as u32;
        (*event).verdict = verdict as u32;
        (*event).dev = dev;
        (*event).ino = ino;
        (*event).flags = 0;
        (*event).argv_len = 0;
        (*event).ppid = 0;
        (*event).filename[0] = 0;

        let task = bpf_get_current_task() as *const u8;
        if let Ok(parent) = field::<*const u8>(task, off.task_real_parent)
            && let Ok(ppid) = field::<u32>(parent, off.task_tgid)
        {
            (*event).ppid = ppid;
        }
        if let Ok(name) = field::<*const u8>(bprm, off.bprm_filename)
            && let Ok(bytes) = bpf_probe_read_kernel_str_bytes(name, &mut (*event).filename)
        {
            // The helper stops one short of the buffer when it had to cut.
            if bytes.len() >= FILENAME_LEN - 1 {
                (*event).flags |= EXEC_FILENAME_TRUNCATED;
            }
        }
        // Arguments exist only once the new image is set up: in the exec
        // tracepoint, not in the LSM hook that runs before it.
        if read_argv {
            read_args(task, &off, event);
        }
    }
    entry.submit(0);
}

#[inline(always)]
unsafe fn read_args(task: *const u8, off: &KernelOffsets, event: *mut ExecEvent) {
    // SAFETY: checked kernel and user reads into our reserved slot.
    unsafe {
        let Ok(mm) = field::<*const u8>(task, off.task_mm) else {
            (*event).flags |= EXEC_ARGV_UNREADABLE;
            return;
        };
        let (Ok(start), Ok(end)) = (field::<u64>(mm, off.mm_arg_start), field::<u64>(mm, off.mm_arg_end)) else {
            (*event).flags |= EXEC_ARGV_UNREADABLE;
            return;
        };
        let total = end.saturating_sub(start);
        let mut len = total;
        if len > ARGV_LEN as u64 {
            len = ARGV_LEN as u64;
            (*event).flags |= EXEC_ARGV_TRUNCATED;
        }
        let len = (len as u32) & (2 * ARGV_LEN as u32 - 1);
        if len > ARGV_LEN as u32 {
            return;
        }
        let dst = (*event).argv.as_mut_ptr().cast();
        if bpf_probe_read_user(dst, len, start as *const _) == 0 {
            (*event).argv_len = len;
        } else {
            (*event).flags |= EXEC_ARGV_UNREADABLE;
        }
    }
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`:
/// the new image is loaded but has not run. A denied file is killed here,
/// so not one instruction of it executes (the fallback when BPF LSM is absent).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_governed(cgroup_id) {
        return 0;
    }
    let off = offsets();
    let bprm: *const u8 = ctx.arg(2);
    // SAFETY: checked kernel reads.
    let identity = unsafe { field::<*const u8>(bprm, off.bprm_file).and_then(|f| file_identity(f, &off)) };
    let (dev, ino) = identity.unwrap_or((0, 0));
    let verdict = if identity.is_ok() && exec_denied(cgroup_id, dev, ino) {
        // SAFETY: signals the current task; delivered before it returns to user mode.
        unsafe { bpf_send_signal(SIGKILL) };
        warn!(&ctx, "killed denied exec: pid {} inode {}", (bpf_get_current_pid_tgid() >> 32) as u32, ino);
        Verdict::Killed
    } else {
        Verdict::Allow
    };
    // SAFETY: bprm comes from the tracepoint's own arguments.
    unsafe { emit_exec(cgroup_id, bprm, verdict, dev, ino, true) };
    0
}

/// `bprm_check_security(struct linux_binprm *bprm)`: refuses a denied exec
/// with EPERM before the new image replaces the caller. Needs BPF LSM.
#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_governed(cgroup_id) {
        return 0;
    }
    let off = offsets();
    // SAFETY: the hook's first argument is the bprm.
    let bprm: *const u8 = ctx.arg(0);
    // SAFETY: checked kernel reads.
    let Ok((dev, ino)) = (unsafe { field::<*const u8>(bprm, off.bprm_file).and_then(|f| file_identity(f, &off)) })
    else {
        return 0;
    };
    if !exec_denied(cgroup_id, dev, ino) {
        return 0;
    }
    warn!(&ctx, "refused denied exec: pid {} inode {}", (bpf_get_current_pid_tgid() >> 32) as u32, ino);
    // SAFETY: bprm is the hook's argument.
    unsafe { emit_exec(cgroup_id, bprm, Verdict::Deny, dev, ino, false) };
    -EPERM
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_governed(cgroup_id) {
        return 0;
    }
    let off = offsets();
    let child: *const u8 = ctx.arg(1);
    // SAFETY: checked kernel reads.
    let (Ok(pid), Ok(tgid)) =
        (unsafe { field::<u32>(child, off.task_pid) }, unsafe { field::<u32>(child, off.task_tgid) })
    else {
        return 0;
    };
    if pid != tgid {
        return 0; // a thread, not a process
    }
    let event = ForkEvent {
        header: header(EventKind::Fork, cgroup_id),
        child_pid: tgid,
        uid: bpf_get_current_uid_gid() as u32,
    };
    if EVENTS.output::<ForkEvent>(&event, 0).is_err() {
        count_lost(EventKind::Fork);
    }
    0
}

/// `sched_process_exit(struct task_struct *p, ...)`: reported once per
/// process, when its thread group leader exits.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit(_ctx: RawTracePointContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_governed(cgroup_id) {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if pid_tgid as u32 != (pid_tgid >> 32) as u32 {
        return 0;
    }
    let off = offsets();
    // SAFETY: the current task is valid for the whole program.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    // SAFETY: checked kernel read.
    let exit_code = unsafe { field::<u32>(task, off.task_exit_code) }.unwrap_or(0);
    let event = ExitEvent { header: header(EventKind::Exit, cgroup_id), exit_code, reserved: 0 };
    if EVENTS.output::<ExitEvent>(&event, 0).is_err() {
        count_lost(EventKind::Exit);
    }
    0
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    decide(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    decide(&ctx, true, true)
}

/// Returns 1 to allow, 0 to refuse with EPERM. These programs are attached to
/// the sessions parent cgroup, so a cgroup below it with no session (one
/// being torn down, say) is refused: fail closed.
#[inline(always)]
fn decide(ctx: &SockAddrContext, ipv6: bool, send: bool) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; 4-byte
    // reads of the fields this attach type may read (v4 programs may not
    // touch user_ip6 and the reverse, so the branch is on the program, not
    // on user_family).
    let (family, protocol, port_be, addr) = unsafe {
        let addr = if ipv6 {
            words_to_bytes([(*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]])
        } else {
            mapped_v4((*sa).user_ip4)
        };
        (if ipv6 { AF_INET6 } else { AF_INET }, (*sa).protocol, (*sa).user_port as u16, addr)
    };
    // Connecting to 0.0.0.0 or :: reaches this host's loopback; decide (and
    // record) it as the loopback address it becomes, so it cannot slip past
    // rules written for 127.0.0.1 or ::1.
    let addr = loopback_for_unspecified(addr);
    // user_port holds the port in network order in its low 16 bits.
    let port_bytes = port_be.to_ne_bytes();
    let port = u16::from_be_bytes(port_bytes);

    let (rule_verdict, rule_id) = if is_governed(cgroup_id) {
        lookup_rule(cgroup_id, port_bytes, &addr)
    } else {
        (Verdict::Deny as u32, NO_RULE)
    };
    let mut verdict = if rule_verdict == Verdict::Allow as u32 { Verdict::Allow } else { Verdict::Deny };
    // Only TCP connects go to the proxy; a UDP send or connect to a governed
    // destination has nowhere safe to go, so it is refused.
    if rule_verdict == Verdict::Redirect as u32 && !send && protocol == IPPROTO_TCP {
        // SAFETY: read-only global.
        let proxy = unsafe { core::ptr::read_volatile(&PROXY) };
        if proxy.port != 0 && redirect(ctx, ipv6, &addr, port, cgroup_id, rule_id, proxy.port) {
            verdict = Verdict::Redirect;
        }
    }

    let event = ConnectEvent {
        header: header(EventKind::Connect, cgroup_id),
        uid: bpf_get_current_uid_gid() as u32,
        verdict: verdict as u32,
        family: if family == AF_INET6 { 6 } else { 4 },
        protocol,
        port: port as u32,
        send: send as u32,
        rule_id,
        reserved: 0,
        addr,
    };
    if EVENTS.output::<ConnectEvent>(&event, 0).is_err() {
        count_lost(EventKind::Connect);
    }
    (verdict == Verdict::Allow || verdict == Verdict::Redirect) as i32
}

/// Saves where the socket was going and points it at the proxy instead.
/// Returns false (and the connect is refused) if the socket has no cookie slot.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    ipv6: bool,
    addr: &[u8; 16],
    port: u16,
    cgroup_id: u64,
    rule_id: u32,
    proxy_port: u32,
) -> bool {
    // SAFETY: the context is a socket address context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst { addr: *addr, cgroup_id, port: port as u32, rule_id };
    if ORIGINAL_BY_COOKIE.insert(&cookie, &original, 0).is_err() {
        return false;
    }
    let sa = ctx.sock_addr;
    let proxy_port_be = (proxy_port as u16).to_be() as u32;
    // SAFETY: writes to the fields this attach type may write.
    unsafe {
        if ipv6 {
            let mapped = addr[0..10].iter().all(|&b| b == 0) && addr[10] == 0xff && addr[11] == 0xff;
            if mapped {
                // ::ffff:127.0.0.1, so a dual-stack socket stays on IPv4.
                (*sa).user_ip6 = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([127, 0, 0, 1])];
            } else {
                (*sa).user_ip6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
            }
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        }
        (*sa).user_port = proxy_port_be;
    }
    true
}

/// Once a redirected connection is established, keys its original
/// destination by the addresses the proxy will see on accept.
#[sock_ops]
pub fn track_established(ctx: SockOpsContext) -> u32 {
    const ACTIVE_ESTABLISHED: u32 = 4;
    let ops = ctx.ops;
    // Read every context field up front, straight from the context pointer:
    // the verifier refuses context reads through a pointer the compiler has
    // offset and kept in a register.
    // SAFETY: the context is valid for the program's run; 4-byte reads.
    let (op, family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).op),
            core::ptr::read_volatile(&(*ops).family),
            core::ptr::read_volatile(&(*ops).local_ip4),
            core::ptr::read_volatile(&(*ops).remote_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&(*ops).remote_ip6[0]),
                core::ptr::read_volatile(&(*ops).remote_ip6[1]),
                core::ptr::read_volatile(&(*ops).remote_ip6[2]),
                core::ptr::read_volatile(&(*ops).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
            core::ptr::read_volatile(&(*ops).remote_port),
        )
    };
    if op != ACTIVE_ESTABLISHED {
        return 1;
    }
    // SAFETY: a sock_ops context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before any other map call.
    let Some(original) = (unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }).copied() else {
        return 1;
    };
    // local_port is in host order. remote_port is in network order, and
    // little-endian kernels put it in the upper 16 bits (the kernel shifts
    // the be16 left by 16); take whichever half holds it.
    let remote_be = if remote_port >> 16 != 0 { (remote_port >> 16) as u16 } else { remote_port as u16 };
    let mut key = ConnectionKey {
        peer: [0; 16],
        local: [0; 16],
        peer_port: local_port,
        local_port: u16::from_be(remote_be) as u32,
    };
    if family == AF_INET6 {
        key.peer = words_to_bytes(local_ip6);
        key.local = words_to_bytes(remote_ip6);
    } else {
        key.peer = mapped_v4(local_ip4);
        key.local = mapped_v4(remote_ip4);
    }
    let _ = ORIGINAL_BY_CONNECTION.insert(&key, &original, 0);
    1
}

#[inline(always)]
fn loopback_for_unspecified(mut addr: [u8; 16]) -> [u8; 16] {
    let mut zero_head = true;
    let mut i = 0;
    while i < 10 {
        zero_head &= addr[i] == 0;
        i += 1;
    }
    let tail_zero = addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0;
    if zero_head && addr[10] == 0xff && addr[11] == 0xff && tail_zero {
        addr[12] = 127; // ::ffff:0.0.0.0 -> ::ffff:127.0.0.1
        addr[15] = 1;
    } else if zero_head && addr[10] == 0 && addr[11] == 0 && tail_zero {
        addr[15] = 1; // :: -> ::1
    }
    addr
}

#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
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

#[inline(always)]
fn mapped_v4(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]]
}

/// The application sees the peer it asked for, not the proxy.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    1
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, ipv6: bool) {
    // SAFETY: a socket address context, as the helper requires.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(original) = (unsafe { ORIGINAL_BY_COOKIE.get(&cookie) }).copied() else {
        return;
    };
    let a = original.addr;
    let sa = ctx.sock_addr;
    // SAFETY: writes to the fields this attach type may write.
    unsafe {
        if ipv6 {
            (*sa).user_ip6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
        } else {
            (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        }
        (*sa).user_port = (original.port as u16).to_be() as u32;
    }
}

/// The verdict and rule id of the most specific rule for (cgroup, port,
/// address): the longer address prefix wins; at equal length the
/// port-specific rule wins. Rules with the same prefix and port were merged
/// by the agent (deny beats allow). No rule: deny.
#[inline(always)]
fn lookup_rule(cgroup_id: u64, port: [u8; 2], addr: &[u8; 16]) -> (u32, u32) {
    // IPv4 (and IPv4-mapped IPv6) destinations match only IPv4 rules.
    let mapped = addr[0..10].iter().all(|&b| b == 0) && addr[10] == 0xff && addr[11] == 0xff;
    let family = if mapped { 4 } else { 6 };
    let cg = cgroup_id.to_be_bytes();
    let mut any = [0u8; 25];
    let mut with_port = [0u8; 27];
    let mut i = 0;
    while i < 8 {
        any[i] = cg[i];
        with_port[i] = cg[i];
        i += 1;
    }
    any[8] = family;
    with_port[8] = family;
    with_port[9] = port[0];
    with_port[10] = port[1];
    let mut i = 0;
    while i < 16 {
        any[9 + i] = addr[i];
        with_port[11 + i] = addr[i];
        i += 1;
    }
    // Compare through references into map memory: copying Option<NetRule>
    // out lets the compiler read undefined padding, which the verifier refuses.
    let any_rule = NET_ANY_PORT.get(&Key::new(NET_ANY_PORT_FIXED_BITS + 128, any));
    let port_rule = NET_PORT.get(&Key::new(NET_PORT_FIXED_BITS + 128, with_port));
    match (any_rule, port_rule) {
        (Some(a), Some(p)) => {
            if p.addr_prefix >= a.addr_prefix {
                (p.verdict, p.rule_id)
            } else {
                (a.verdict, a.rule_id)
            }
        }
        (Some(a), None) => (a.verdict, a.rule_id),
        (None, Some(p)) => (p.verdict, p.rule_id),
        (None, None) => (Verdict::Deny as u32, NO_RULE),
    }
}

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_IP: u32 = 0;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// IPv4 and IPv6 sockets of a session are TCP or UDP (governed by the
/// programs above); raw and ICMP "ping" sockets would reach the network
/// without a connect or send those programs see. The kernel runs this hook
/// for inet sockets only; packet sockets need CAP_NET_RAW, which a session
/// has only when privileged.
#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let sk = ctx.sock;
    // SAFETY: the context is valid for the program's run; 4-byte reads.
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let inet_ok = (family == AF_INET || family == AF_INET6)
        && ((sock_type == SOCK_STREAM && (protocol == IPPROTO_IP || protocol == IPPROTO_TCP))
            || (sock_type == SOCK_DGRAM && (protocol == IPPROTO_IP || protocol == IPPROTO_UDP)));
    if inet_ok || (family != AF_INET && family != AF_INET6) {
        return 1;
    }
    let event = SocketEvent {
        header: header(EventKind::Socket, cgroup_id),
        uid: bpf_get_current_uid_gid() as u32,
        verdict: Verdict::Deny as u32,
        family,
        sock_type,
        protocol,
        reserved: 0,
    };
    if EVENTS.output::<SocketEvent>(&event, 0).is_err() {
        count_lost(EventKind::Socket);
    }
    0
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
