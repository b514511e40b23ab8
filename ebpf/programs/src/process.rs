//! Process programs: exec (recorded, and refused for denied files), fork and exit.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task, bpf_probe_read_user, bpf_send_signal},
    },
    macros::{lsm, raw_tracepoint},
    programs::{LsmContext, RawTracePointContext},
};
use aya_log_ebpf::debug;
use tollgate_common::{
    ARGV_LEN, EXEC_ARGV_TRUNCATED, EXEC_ARGV_UNREADABLE, EXEC_FILENAME_TRUNCATED, EXEC_STRINGS_LEN, EventKind,
    ExecEvent, ExecInProgress, ExecKey, ExitEvent, FILENAME_LEN, ForkEvent, KernelOffsets, LOST_BUFFER_FULL,
    SESSION_EXEC_ALLOW_LIST, Verdict,
};

use crate::{
    ADMITTED_EXECS, EVENTS, EXEC_ALLOW, EXEC_DENY, EXEC_SCRATCH, LSM_ACTIVE, admit, count_lost, emit, field, header,
    is_governed, offsets, session_flags, submitted,
};

const SIGKILL: u32 = 9;
const EPERM: i32 = 1;

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

/// Refused by the session's allow list: it has one and the file is not on it.
#[inline(always)]
fn not_allowed(cgroup_id: u64, dev: u32, ino: u64) -> bool {
    if session_flags(cgroup_id) & SESSION_EXEC_ALLOW_LIST == 0 {
        return false;
    }
    let key = ExecKey { cgroup_id, ino, dev, reserved: 0 };
    // SAFETY: presence test only.
    unsafe { EXEC_ALLOW.get(key) }.is_none()
}

/// An exec event with room for the longest names; only the part used is sent.
#[repr(C)]
pub(crate) struct ExecScratch {
    event: ExecEvent,
    strings: [u8; EXEC_STRINGS_LEN],
}

/// An exec refused by the LSM hook: no arguments exist yet, so it is the
/// fixed part and room for the longest file name, reserved in the ring
/// buffer at that size. The hook may be preempted (it runs with migration,
/// not preemption, disabled), so it must not build in a per-CPU scratch
/// another task's exec could overwrite meanwhile.
#[repr(C)]
struct ExecRefused {
    event: ExecEvent,
    filename: [u8; FILENAME_LEN],
}

/// Fills an exec event's fixed part, and its file name into `filename`.
#[inline(always)]
unsafe fn fill_exec(
    event: *mut ExecEvent,
    filename: *mut [u8; FILENAME_LEN],
    cgroup_id: u64,
    bprm: *const u8,
    verdict: Verdict,
    dev: u32,
    ino: u64,
    off: &KernelOffsets,
) {
    // SAFETY: `event` and `filename` point at memory this program owns
    // (a reserved ring buffer slot, or this CPU's scratch); kernel reads are checked.
    unsafe {
        (*event).header = header(EventKind::Exec, cgroup_id);
        (*event).uid = bpf_get_current_uid_gid() as u32;
        (*event).verdict = verdict as u32;
        (*event).dev = dev;
        (*event).ino = ino;
        (*event).flags = 0;
        (*event).argv_len = 0;
        (*event).filename_len = 0;
        (*event).reserved = 0;
        (*event).ppid = 0;
        let task = bpf_get_current_task() as *const u8;
        if let Ok(parent) = field::<*const u8>(task, off.task_real_parent)
            && let Ok(ppid) = field::<u32>(parent, off.task_tgid)
        {
            (*event).ppid = ppid;
        }
        if let Ok(name) = field::<*const u8>(bprm, off.bprm_filename)
            && let Ok(bytes) = bpf_probe_read_kernel_str_bytes(name, &mut *filename)
        {
            // The helper stops one short of the buffer when it had to cut.
            if bytes.len() >= FILENAME_LEN - 1 {
                (*event).flags |= EXEC_FILENAME_TRUNCATED;
            }
            // The mask shows the verifier what the helper promises: less than FILENAME_LEN.
            (*event).filename_len = (bytes.len() as u32) & (FILENAME_LEN as u32 - 1);
        }
    }
}

/// Records an exec the tracepoint saw: built in this CPU's scratch space
/// (it is larger than the 512-byte BPF stack; the tracepoint runs with
/// preemption disabled, so nothing else uses the scratch meanwhile), then
/// the fixed part and the names it used are sent.
#[inline(always)]
unsafe fn emit_exec(cgroup_id: u64, bprm: *const u8, verdict: Verdict, dev: u32, ino: u64) {
    let off = offsets();
    let Some(scratch) = EXEC_SCRATCH.get_ptr_mut(0) else {
        // Never: the array has its one entry. Counted all the same.
        count_lost(cgroup_id, EventKind::Exec, LOST_BUFFER_FULL);
        return;
    };
    // SAFETY: `scratch` is this CPU's own map value (see above).
    unsafe {
        let event = &raw mut (*scratch).event;
        let strings = &raw mut (*scratch).strings;
        fill_exec(event, strings.cast::<[u8; FILENAME_LEN]>(), cgroup_id, bprm, verdict, dev, ino, &off);
        // Kept in a register, where the verifier knows its bound.
        let filename_len = (*event).filename_len & (FILENAME_LEN as u32 - 1);
        let task = bpf_get_current_task() as *const u8;
        let argv_len = read_args(task, &off, event, strings.cast::<u8>().add(filename_len as usize));
        (*event).argv_len = argv_len;
        let size = (size_of::<ExecEvent>() as u32 + filename_len + argv_len) as u64;
        let Some(flags) = admit(cgroup_id, EventKind::Exec, size) else {
            return;
        };
        let sent = core::slice::from_raw_parts(scratch.cast::<u8>(), size as usize);
        if EVENTS.output::<[u8]>(sent, flags).is_err() {
            count_lost(cgroup_id, EventKind::Exec, LOST_BUFFER_FULL);
            return;
        }
        submitted(cgroup_id, size);
    }
}

/// Records an exec the LSM hook refused (see [`ExecRefused`]).
#[inline(always)]
unsafe fn emit_exec_refused(cgroup_id: u64, bprm: *const u8, dev: u32, ino: u64) {
    let off = offsets();
    let size = size_of::<ExecRefused>() as u64;
    let Some(flags) = admit(cgroup_id, EventKind::Exec, size) else {
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<ExecRefused>(0) else {
        count_lost(cgroup_id, EventKind::Exec, LOST_BUFFER_FULL);
        return;
    };
    let refused = entry.as_mut_ptr();
    // SAFETY: `refused` points at a reserved, exclusively owned ring buffer slot.
    unsafe {
        fill_exec(
            &raw mut (*refused).event,
            &raw mut (*refused).filename,
            cgroup_id,
            bprm,
            Verdict::Deny,
            dev,
            ino,
            &off,
        );
    }
    entry.submit(flags);
    submitted(cgroup_id, size);
}

/// Reads the new image's arguments to `dst` (room for [`ARGV_LEN`] bytes);
/// returns how many bytes it read.
#[inline(always)]
unsafe fn read_args(task: *const u8, off: &KernelOffsets, event: *mut ExecEvent, dst: *mut u8) -> u32 {
    // SAFETY: checked kernel and user reads into this CPU's scratch space.
    unsafe {
        let Ok(mm) = field::<*const u8>(task, off.task_mm) else {
            (*event).flags |= EXEC_ARGV_UNREADABLE;
            return 0;
        };
        let (Ok(start), Ok(end)) = (field::<u64>(mm, off.mm_arg_start), field::<u64>(mm, off.mm_arg_end)) else {
            (*event).flags |= EXEC_ARGV_UNREADABLE;
            return 0;
        };
        let total = end.saturating_sub(start);
        let mut len = total;
        if len > ARGV_LEN as u64 {
            len = ARGV_LEN as u64;
            (*event).flags |= EXEC_ARGV_TRUNCATED;
        }
        let len = (len as u32) & (2 * ARGV_LEN as u32 - 1);
        if len > ARGV_LEN as u32 {
            return 0;
        }
        if bpf_probe_read_user(dst.cast(), len, start as *const _) == 0 {
            len
        } else {
            (*event).flags |= EXEC_ARGV_UNREADABLE;
            0
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
    // The exec is done: its admission (a script's, by the LSM hook) is spent.
    let _ = ADMITTED_EXECS.remove(&ExecInProgress { bprm: bprm as u64, pid_tgid: bpf_get_current_pid_tgid() });
    // With BPF LSM the hook has decided already (a script by its own file);
    // here only the kill-on-exec fallback decides, by the file the new image
    // is (a script's interpreter). An unreadable file is refused where an
    // allow list applies.
    let lsm_decides = LSM_ACTIVE.get(0).is_some_and(|active| *active == 1);
    let refused = !lsm_decides
        && match identity {
            Ok((dev, ino)) => exec_denied(cgroup_id, dev, ino) || not_allowed(cgroup_id, dev, ino),
            Err(_) => session_flags(cgroup_id) & SESSION_EXEC_ALLOW_LIST != 0,
        };
    let verdict = if refused {
        // SAFETY: signals the current task; delivered before it returns to user mode.
        unsafe { bpf_send_signal(SIGKILL) };
        debug!(&ctx, "killed denied exec: pid {} inode {}", (bpf_get_current_pid_tgid() >> 32) as u32, ino);
        Verdict::Killed
    } else {
        Verdict::Allow
    };
    // SAFETY: bprm comes from the tracepoint's own arguments.
    unsafe { emit_exec(cgroup_id, bprm, verdict, dev, ino) };
    0
}

/// `bprm_check_security(struct linux_binprm *bprm)`: refuses a denied exec
/// with EPERM before the new image replaces the caller. Needs BPF LSM.
#[lsm(hook = "bprm_check_security")]
// Inlined into the program: as a subprogram, its context argument would be
// refused by the verifier's BTF check.
#[inline(always)]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // SAFETY: no arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    if !is_governed(cgroup_id) {
        return 0;
    }
    let off = offsets();
    // SAFETY: the hook's first argument is the bprm.
    let bprm: *const u8 = ctx.arg(0);
    // Plain values, not `Result`s: the compiler may store the unset half of
    // an enum, and the verifier refuses that read of an undefined register.
    // SAFETY: checked kernel reads.
    let (loaded, dev, ino) =
        match unsafe { field::<*const u8>(bprm, off.bprm_file).and_then(|f| file_identity(f, &off)) } {
            Ok((dev, ino)) => (true, dev, ino),
            Err(_) => (false, 0, 0),
        };
    // The first file of an exec is judged by the allow list; when an
    // interpreter takes over (a script's `#!`), it is judged by that first
    // file, remembered per exec. The deny list judges every file.
    // SAFETY: checked kernel reads.
    let (filename, interp) = unsafe {
        (
            field::<*const u8>(bprm, off.bprm_filename).unwrap_or(core::ptr::null()),
            field::<*const u8>(bprm, off.bprm_interp).unwrap_or(core::ptr::null()),
        )
    };
    let first_file = filename == interp;
    let key = ExecInProgress { bprm: bprm as u64, pid_tgid: bpf_get_current_pid_tgid() };
    let listed = if session_flags(cgroup_id) & SESSION_EXEC_ALLOW_LIST == 0 {
        true
    } else if !loaded {
        // A file that cannot be identified is refused where an allow list applies.
        false
    } else if first_file {
        let listed = !not_allowed(cgroup_id, dev, ino);
        // Set or cleared at every first file, so no earlier exec's entry lingers.
        if listed {
            let _ = ADMITTED_EXECS.insert(&key, &1, 0);
        } else {
            let _ = ADMITTED_EXECS.remove(&key);
        }
        listed
    } else {
        // SAFETY: presence test only.
        unsafe { ADMITTED_EXECS.get(&key) }.is_some()
    };
    let refused = (loaded && exec_denied(cgroup_id, dev, ino)) || !listed;
    if !refused {
        return 0;
    }
    debug!(&ctx, "refused denied exec: pid {} inode {}", (bpf_get_current_pid_tgid() >> 32) as u32, ino);
    // SAFETY: bprm is the hook's argument.
    unsafe { emit_exec_refused(cgroup_id, bprm, dev, ino) };
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
    emit(cgroup_id, EventKind::Fork, &event);
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
    emit(cgroup_id, EventKind::Exit, &event);
    0
}
