//! Loading and attaching the programs, and the maps the daemon fills.

use std::{fs::File, path::Path, sync::Arc};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, RawTracePoint, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tollgate_common::{KernelOffsets, ProxyAddr};

use super::{
    BpfError,
    btf::Btf,
    maps::{ConsumedBytes, EventBacklog, LostCounters, OriginalDestinations, SessionMaps},
    pins::{PINNED_MAPS, PinDir},
};

/// The compiled eBPF object, built by `agent/build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate.bpf.o"));

const TRACEPOINTS: [&str; 3] = ["sched_process_exec", "sched_process_fork", "sched_process_exit"];
const SOCK_ADDR: [&str; 8] =
    ["connect4", "connect6", "sendmsg4", "sendmsg6", "getpeername4", "getpeername6", "recvmsg4", "recvmsg6"];

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
    /// Bytes of each session's events read so far, for the kernel's fairness.
    pub consumed: ConsumedBytes,
    /// Whether each session's events have all been read.
    pub backlog: Arc<EventBacklog>,
    /// The event ring buffer.
    pub events: RingBuf<MapData>,
    /// The programs' own log, where the kernel supports it.
    pub logger: Option<KernelLogger>,
    /// How denied execs are stopped.
    pub mode: ExecEnforcement,
    /// Why BPF LSM is not in use, when it is not.
    pub lsm_unavailable: Option<String>,
}

/// The loaded object and its links. Without pins, the programs stay
/// attached while this lives; with pins, until the pins are removed.
pub struct Programs {
    _ebpf: Ebpf,
    /// Links pinned in bpffs (they outlive this process).
    _pinned: Vec<PinnedLink>,
    /// Links held only by this process (no bpffs): they detach when it ends.
    _held: Vec<FdLink>,
    pins: Option<PinDir>,
}

impl Programs {
    /// A clean stop: removes the pins, so the programs detach and the maps
    /// are freed once this process lets go of them.
    pub fn release(self) {
        if let Some(pins) = &self.pins {
            pins.remove();
        }
    }

    /// Whether enforcement outlives this process.
    pub fn pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Detaches the programs of earlier map layouts (an upgrade that changed
    /// them). Called once the sessions they governed are in this daemon's
    /// maps, so none is ungoverned in between.
    pub fn retire_earlier_layouts(&self) {
        if let Some(pins) = &self.pins {
            pins.remove_other_layouts();
        }
    }
}

/// Keeps a program's link attached: pinned where bpffs allows (replacing
/// an earlier daemon's pin, whose program detaches only now that this one
/// is attached), held by this process otherwise.
fn keep_link(
    link: FdLink,
    name: &'static str,
    pins: Option<&PinDir>,
    pinned: &mut Vec<PinnedLink>,
    held: &mut Vec<FdLink>,
) -> Result<(), BpfError> {
    let Some(pins) = pins else {
        held.push(link);
        return Ok(());
    };
    let path = pins.link(name);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(BpfError::Pin { name, why: format!("cannot replace {}: {e}", path.display()) });
    }
    let link = link.pin(&path).map_err(|e| BpfError::Pin { name, why: e.to_string() })?;
    pinned.push(link);
    Ok(())
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
/// With `pins`, the maps are pinned (an earlier daemon's are reused, with
/// what they hold) and so are the links.
pub fn load(
    sessions_cgroup: &Path,
    event_buffer_bytes: u32,
    proxy_port: u16,
    pins: Option<PinDir>,
) -> Result<Loaded, BpfError> {
    let offsets: KernelOffsets = Btf::from_sys_fs()?.kernel_offsets()?;
    let proxy = ProxyAddr { port: u32::from(proxy_port), reserved: 0 };
    let map_paths: Vec<(&str, std::path::PathBuf)> =
        pins.iter().flat_map(|pins| PINNED_MAPS.map(|name| (name, pins.map(name)))).collect();
    let mut loader = EbpfLoader::new();
    loader
        .override_global("OFFSETS", &offsets, true)
        .override_global("PROXY", &proxy, true)
        .map_max_entries("EVENTS", event_buffer_bytes);
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT)?;
    let (mut pinned, mut held) = (Vec::new(), Vec::new());
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
        let link = tp.attach(name).map_err(program_error(name))?;
        let link = tp.take_link(link).map_err(program_error(name))?;
        keep_link(link.into(), name, pins.as_ref(), &mut pinned, &mut held)?;
    }

    let cgroup = File::open(sessions_cgroup)
        .map_err(|source| BpfError::Cgroup { path: sessions_cgroup.display().to_string(), source })?;
    // Links to a cgroup always coexist with other programs; the mode flag must stay 0.
    let mode = CgroupAttachMode::Single;
    // Cgroup links are BPF links (5.7+), which is what lets them be pinned.
    macro_rules! attach_to_cgroup {
        ($kind:ty, $name:expr) => {{
            let name: &'static str = $name;
            let prog: &mut $kind = program(&mut ebpf, name)?;
            prog.load().map_err(program_error(name))?;
            let link = prog.attach(&cgroup, mode).map_err(program_error(name))?;
            let link = prog.take_link(link).map_err(program_error(name))?;
            let link =
                FdLink::try_from(link).map_err(|e| BpfError::Pin { name, why: format!("not a BPF link: {e}") })?;
            keep_link(link, name, pins.as_ref(), &mut pinned, &mut held)?;
        }};
    }
    for name in SOCK_ADDR {
        attach_to_cgroup!(CgroupSockAddr, name);
    }
    attach_to_cgroup!(CgroupSock, "sock_create");
    attach_to_cgroup!(SockOps, "track_established");

    let (mode, lsm_error) = match attach_lsm(&mut ebpf) {
        Ok(link) => {
            keep_link(link, "bprm_check_security", pins.as_ref(), &mut pinned, &mut held)?;
            // The hook decides execs alone from now on; the tracepoint records.
            let mut active: Array<MapData, u32> = map(&mut ebpf, "LSM_ACTIVE")?;
            active.set(0, 1, 0).map_err(|source| BpfError::Map { name: "LSM_ACTIVE", source })?;
            (ExecEnforcement::Lsm, None)
        }
        Err(e) => {
            // The tracepoint decides from now on; only then may an earlier
            // daemon's LSM link, which no one holds but its pin, go.
            let mut active: Array<MapData, u32> = map(&mut ebpf, "LSM_ACTIVE")?;
            active.set(0, 0, 0).map_err(|source| BpfError::Map { name: "LSM_ACTIVE", source })?;
            if let Some(pins) = &pins {
                let _ = std::fs::remove_file(pins.link("bprm_check_security"));
            }
            (ExecEnforcement::KillOnExec, Some(with_causes(&*e)))
        }
    };

    let backlog = Arc::new(EventBacklog::new(map(&mut ebpf, "SUBMITTED")?));
    Ok(Loaded {
        session_maps: SessionMaps::new(
            map(&mut ebpf, "SESSIONS")?,
            map(&mut ebpf, "EXEC_DENY")?,
            map(&mut ebpf, "EXEC_ALLOW")?,
            map(&mut ebpf, "NET_ANY_PORT")?,
            map(&mut ebpf, "NET_PORT")?,
        ),
        originals: map(&mut ebpf, "ORIGINAL_BY_CONNECTION")?,
        lost: LostCounters::new(map(&mut ebpf, "LOST")?),
        consumed: ConsumedBytes::new(map(&mut ebpf, "CONSUMED")?, backlog.clone()),
        backlog,
        events: map(&mut ebpf, "EVENTS")?,
        logger,
        programs: Programs { _ebpf: ebpf, _pinned: pinned, _held: held, pins },
        mode,
        lsm_unavailable: lsm_error,
    })
}

/// An error and its causes on one line (aya's attach errors keep the errno in their source).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let part = inner.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        cause = inner.source();
    }
    text
}

fn attach_lsm(ebpf: &mut Ebpf) -> Result<FdLink, Box<dyn std::error::Error>> {
    // Without securityfs we cannot tell; trying to load is the real test.
    if let Ok(active) = std::fs::read_to_string("/sys/kernel/security/lsm")
        && !active.split(',').any(|name| name.trim() == "bpf")
    {
        return Err(format!("BPF LSM is not enabled (active LSMs: {}); boot with lsm=...,bpf", active.trim()).into());
    }
    let btf = aya::Btf::from_sys_fs()?;
    let program: &mut Lsm = ebpf.program_mut("bprm_check_security").ok_or("program missing")?.try_into()?;
    program.load("bprm_check_security", &btf)?;
    let link = program.attach()?;
    Ok(program.take_link(link)?.into())
}
