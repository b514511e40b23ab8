//! Loading and attaching the programs, and the maps the daemon fills.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, RingBuf},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, RawTracePoint, SockOps},
};
use tollgate_common::{KernelOffsets, ProxyAddr};

use super::{
    BpfError,
    btf::Btf,
    maps::{LostCounters, OriginalDestinations, SessionMaps},
};

/// The compiled eBPF object, built by `agent/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate.bpf.o"));

const TRACEPOINTS: [&str; 3] = ["sched_process_exec", "sched_process_fork", "sched_process_exit"];
const SOCK_ADDR: [&str; 6] = ["connect4", "connect6", "sendmsg4", "sendmsg6", "getpeername4", "getpeername6"];

/// Forwards `aya-log-ebpf` records from the programs to the daemon's log.
pub type KernelLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// How a denied exec is stopped on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecEnforcement {
    /// BPF LSM `bprm_check_security`: the exec fails with EPERM.
    Lsm,
    /// The exec tracepoint kills the process before the new image runs a single
    /// instruction (BPF LSM is not available on this kernel).
    KillOnExec,
}

impl ExecEnforcement {
    /// The name `tollgate status` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lsm => "lsm",
            Self::KillOnExec => "kill-on-exec",
        }
    }
}

/// The programs and maps, loaded and attached, handed out by concern:
/// the session maps to the sessions, the original destinations to the
/// proxy, the ring buffer, logger and lost counters to the event pump.
pub struct Loaded {
    /// Keeps programs and links attached; dropping it detaches them.
    pub programs: Programs,
    /// The maps a session's rules live in.
    pub session_maps: SessionMaps,
    /// Where redirected connections were going.
    pub originals: OriginalDestinations,
    /// Events the kernel could not deliver.
    pub lost: LostCounters,
    /// The event ring buffer.
    pub events: RingBuf<MapData>,
    /// The programs' own log, where the kernel supports it.
    pub logger: Option<KernelLogger>,
    /// How denied execs are stopped.
    pub mode: ExecEnforcement,
    /// Why BPF LSM is not in use, when it is not.
    pub lsm_unavailable: Option<String>,
}

/// The loaded object: its programs and links stay attached while this lives.
pub struct Programs {
    _ebpf: Ebpf,
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> BpfError {
    move |source| BpfError::Program { name, source }
}

/// The program `name` as its type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, BpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let raw =
        ebpf.program_mut(name).ok_or(BpfError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    raw.try_into().map_err(program_error(name))
}

fn map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let raw = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(raw).map_err(|source| BpfError::Map { name, source })
}

/// Loads the programs, attaches the tracepoints globally and the socket
/// programs to `sessions_cgroup` (so they cover every session below it),
/// and the LSM hook where the kernel allows it.
/// Governed connects are redirected to 127.0.0.1 / ::1 on `proxy_port`
/// (0: no proxy; governed connects are refused).
pub fn load(sessions_cgroup: &Path, event_buffer_bytes: u32, proxy_port: u16) -> Result<Loaded, BpfError> {
    let offsets: KernelOffsets = Btf::from_sys_fs()?.kernel_offsets()?;
    let proxy = ProxyAddr { port: u32::from(proxy_port), reserved: 0 };
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .override_global("PROXY", &proxy, true)
        .map_max_entries("EVENTS", event_buffer_bytes)
        .load(OBJECT)?;
    // Taken before the programs load: they refer to its map.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(logger),
        Err(e) => {
            tracing::warn!(error = %e, "eBPF programs' own log is not available");
            None
        }
    };

    for name in TRACEPOINTS {
        let tp: &mut RawTracePoint = program(&mut ebpf, name)?;
        tp.load().map_err(program_error(name))?;
        tp.attach(name).map_err(program_error(name))?;
    }

    let cgroup = File::open(sessions_cgroup)
        .map_err(|source| BpfError::Cgroup { path: sessions_cgroup.display().to_string(), source })?;
    // Links to a cgroup always coexist with other programs; the mode flag must stay 0.
    let mode = CgroupAttachMode::Single;
    for name in SOCK_ADDR {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(program_error(name))?;
        prog.attach(&cgroup, mode).map_err(program_error(name))?;
    }
    let name = "sock_create";
    let prog: &mut CgroupSock = program(&mut ebpf, name)?;
    prog.load().map_err(program_error(name))?;
    prog.attach(&cgroup, mode).map_err(program_error(name))?;
    let name = "track_established";
    let prog: &mut SockOps = program(&mut ebpf, name)?;
    prog.load().map_err(program_error(name))?;
    prog.attach(&cgroup, mode).map_err(program_error(name))?;

    let (mode, lsm_error) = match attach_lsm(&mut ebpf) {
        Ok(()) => (ExecEnforcement::Lsm, None),
        Err(e) => (ExecEnforcement::KillOnExec, Some(e.to_string())),
    };

    Ok(Loaded {
        session_maps: SessionMaps::new(
            map(&mut ebpf, "SESSIONS")?,
            map(&mut ebpf, "EXEC_DENY")?,
            map(&mut ebpf, "NET_ANY_PORT")?,
            map(&mut ebpf, "NET_PORT")?,
        ),
        originals: OriginalDestinations::new(map(&mut ebpf, "ORIGINAL_BY_CONNECTION")?),
        lost: LostCounters::new(map(&mut ebpf, "LOST")?),
        events: map(&mut ebpf, "EVENTS")?,
        logger,
        programs: Programs { _ebpf: ebpf },
        mode,
        lsm_unavailable: lsm_error,
    })
}

fn attach_lsm(ebpf: &mut Ebpf) -> Result<(), Box<dyn std::error::Error>> {
    // Without securityfs we cannot tell; trying to load is the real test.
    if let Ok(active) = std::fs::read_to_string("/sys/kernel/security/lsm")
        && !active.split(',').any(|name| name.trim() == "bpf")
    {
        return Err(format!("BPF LSM is not enabled (active LSMs: {}); boot with lsm=...,bpf", active.trim()).into());
    }
    let btf = aya::Btf::from_sys_fs()?;
    let program: &mut Lsm = ebpf.program_mut("bprm_check_security").ok_or("program missing")?.try_into()?;
    program.load("bprm_check_security", &btf)?;
    program.attach()?;
    Ok(())
}
