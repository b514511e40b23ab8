//! Loading and attaching the programs, and the maps the daemon fills.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, Lsm, RawTracePoint, SockOps},
};
use tollgate_common::{
    ConnectionKey, ExecKey, KernelOffsets, LOST_SLOTS, NET_ANY_PORT_FIXED_BITS, NET_PORT_FIXED_BITS, NetAnyPortKey,
    NetPortKey, NetRule, OriginalDst, ProxyAddr, SessionSlot,
};

use super::{BpfError, btf::Btf};
use crate::policy::compile::SessionRules;

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

/// The loaded, attached programs and their maps. Dropping it detaches everything.
pub struct Enforcer {
    /// Keeps programs and links alive.
    _ebpf: Ebpf,
    sessions: HashMap<MapData, u64, SessionSlot>,
    exec_deny: HashMap<MapData, ExecKey, u32>,
    net_any_port: LpmTrie<MapData, NetAnyPortKey, NetRule>,
    net_port: LpmTrie<MapData, NetPortKey, NetRule>,
    lost: PerCpuArray<MapData, u64>,
    original: aya::maps::HashMap<MapData, ConnectionKey, OriginalDst>,
    events: Option<RingBuf<MapData>>,
    logger: Option<KernelLogger>,
    mode: ExecEnforcement,
    lsm_error: Option<String>,
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

impl Enforcer {
    /// Loads the programs, attaches the tracepoints globally and the socket
    /// programs to `sessions_cgroup` (so they cover every session below it),
    /// and the LSM hook where the kernel allows it.
    /// Governed connects are redirected to 127.0.0.1 / ::1 on `proxy_port`
    /// (0: no proxy; governed connects are refused).
    pub fn load(sessions_cgroup: &Path, event_buffer_bytes: u32, proxy_port: u16) -> Result<Self, BpfError> {
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

        Ok(Self {
            sessions: map(&mut ebpf, "SESSIONS")?,
            exec_deny: map(&mut ebpf, "EXEC_DENY")?,
            net_any_port: map(&mut ebpf, "NET_ANY_PORT")?,
            net_port: map(&mut ebpf, "NET_PORT")?,
            lost: map(&mut ebpf, "LOST")?,
            original: map(&mut ebpf, "ORIGINAL_BY_CONNECTION")?,
            events: Some(map(&mut ebpf, "EVENTS")?),
            logger,
            _ebpf: ebpf,
            mode,
            lsm_error,
        })
    }

    /// How denied execs are stopped.
    pub fn exec_enforcement(&self) -> ExecEnforcement {
        self.mode
    }

    /// Why BPF LSM is not in use, when it is not.
    pub fn lsm_unavailable_reason(&self) -> Option<&str> {
        self.lsm_error.as_deref()
    }

    /// The event ring buffer, once (the reader task owns it).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The programs' log, once (a daemon task forwards it).
    pub fn take_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }

    /// Makes `cgroup_id` a governed session with `rules`. Rules go in before
    /// the session entry, so the kernel never sees the session without them.
    pub fn add_session(&mut self, cgroup_id: u64, rules: &SessionRules) -> Result<(), BpfError> {
        let fail = |name| move |source| BpfError::Map { name, source };
        for (_, file) in &rules.exec_deny {
            let key = ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 };
            self.exec_deny.insert(key, 1, 0).map_err(fail("EXEC_DENY"))?;
        }
        for entry in &rules.net {
            let value = NetRule {
                verdict: entry.verdict as u32,
                addr_prefix: entry.addr_prefix,
                rule_id: entry.rule_id,
                reserved: 0,
            };
            match entry.port {
                None => {
                    let key = Key::new(
                        NET_ANY_PORT_FIXED_BITS + entry.addr_prefix,
                        any_port_key(cgroup_id, entry.family, &entry.addr),
                    );
                    self.net_any_port.insert(&key, value, 0).map_err(fail("NET_ANY_PORT"))?;
                }
                Some(port) => {
                    let key = Key::new(
                        NET_PORT_FIXED_BITS + entry.addr_prefix,
                        port_key(cgroup_id, entry.family, port, &entry.addr),
                    );
                    self.net_port.insert(&key, value, 0).map_err(fail("NET_PORT"))?;
                }
            }
        }
        self.sessions.insert(cgroup_id, SessionSlot { session_id: cgroup_id }, 0).map_err(fail("SESSIONS"))
    }

    /// Forgets a session. The session entry goes first so nothing is
    /// decided from half-removed rules (a non-session cgroup is refused).
    pub fn remove_session(&mut self, cgroup_id: u64, rules: &SessionRules) {
        let _ = self.sessions.remove(&cgroup_id);
        for (_, file) in &rules.exec_deny {
            let _ = self.exec_deny.remove(&ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 });
        }
        for entry in &rules.net {
            let _ = match entry.port {
                None => self.net_any_port.remove(&Key::new(
                    NET_ANY_PORT_FIXED_BITS + entry.addr_prefix,
                    any_port_key(cgroup_id, entry.family, &entry.addr),
                )),
                Some(port) => self.net_port.remove(&Key::new(
                    NET_PORT_FIXED_BITS + entry.addr_prefix,
                    port_key(cgroup_id, entry.family, port, &entry.addr),
                )),
            };
        }
    }

    /// Where a connection the proxy accepted was going; the entry is taken.
    pub fn take_original(&mut self, key: &ConnectionKey) -> Option<OriginalDst> {
        let original = self.original.get(key, 0).ok()?;
        let _ = self.original.remove(key);
        Some(original)
    }

    /// Events lost so far, per event kind slot, summed over CPUs.
    pub fn lost_events(&self) -> Vec<u64> {
        (0..LOST_SLOTS).map(|slot| self.lost.get(&slot, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)).collect()
    }
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

fn any_port_key(cgroup_id: u64, family: u8, addr: &[u8; 16]) -> NetAnyPortKey {
    let mut key = [0u8; 25];
    key[..8].copy_from_slice(&cgroup_id.to_be_bytes());
    key[8] = family;
    key[9..].copy_from_slice(addr);
    key
}

fn port_key(cgroup_id: u64, family: u8, port: u16, addr: &[u8; 16]) -> NetPortKey {
    let mut key = [0u8; 27];
    key[..8].copy_from_slice(&cgroup_id.to_be_bytes());
    key[8] = family;
    key[9..11].copy_from_slice(&port.to_be_bytes());
    key[11..].copy_from_slice(addr);
    key
}
