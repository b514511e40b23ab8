//! The maps the daemon reads and fills, one handle per concern: a
//! session's rules ([`SessionMaps`]), the original destinations of
//! redirected connections ([`OriginalDestinations`], the proxy's), the
//! lost-event counters ([`LostCounters`], the event pump's), and what of
//! each session's events is still unread ([`ConsumedBytes`] and
//! [`EventBacklog`]).

use std::{
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, lpm_trie::Key};
use tollgate_common::{
    ConnectionKey, ExecKey, LOST_BUFFER_FULL, LOST_SLOTS, LOST_THROTTLED, LostKey, NET_ANY_PORT_FIXED_BITS,
    NET_PORT_FIXED_BITS, NetAnyPortKey, NetPortKey, NetRule, OriginalDst, SESSION_EXEC_ALLOW_LIST, SessionSlot,
    net_any_port_key, net_port_key,
};

use super::BpfError;
use crate::policy::compile::{FileId, NetEntry, SessionRules};

/// The governed-cgroup map and the rule maps of every session.
pub struct SessionMaps {
    sessions: HashMap<MapData, u64, SessionSlot>,
    exec_deny: HashMap<MapData, ExecKey, u32>,
    exec_allow: HashMap<MapData, ExecKey, u32>,
    net_any_port: LpmTrie<MapData, NetAnyPortKey, NetRule>,
    net_port: LpmTrie<MapData, NetPortKey, NetRule>,
}

/// Where a network entry of a session lives: which trie, under which key.
enum NetKey {
    AnyPort(Key<NetAnyPortKey>),
    Port(Key<NetPortKey>),
}

fn net_key(cgroup_id: u64, entry: &NetEntry) -> NetKey {
    match entry.port {
        None => NetKey::AnyPort(Key::new(
            NET_ANY_PORT_FIXED_BITS + entry.addr_prefix,
            net_any_port_key(cgroup_id, entry.family, &entry.addr),
        )),
        Some(port) => NetKey::Port(Key::new(
            NET_PORT_FIXED_BITS + entry.addr_prefix,
            net_port_key(cgroup_id, entry.family, port, &entry.addr),
        )),
    }
}

impl SessionMaps {
    pub(super) fn new(
        sessions: HashMap<MapData, u64, SessionSlot>,
        exec_deny: HashMap<MapData, ExecKey, u32>,
        exec_allow: HashMap<MapData, ExecKey, u32>,
        net_any_port: LpmTrie<MapData, NetAnyPortKey, NetRule>,
        net_port: LpmTrie<MapData, NetPortKey, NetRule>,
    ) -> Self {
        Self { sessions, exec_deny, exec_allow, net_any_port, net_port }
    }

    /// Adds files to a session's exec allow list (a listed file replaced by
    /// a new one, as package upgrades do, is a new file).
    pub fn allow_files(&mut self, cgroup_id: u64, files: &[FileId]) -> Result<(), BpfError> {
        for file in files {
            let key = ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 };
            self.exec_allow.insert(key, 1, 0).map_err(|source| BpfError::Map { name: "EXEC_ALLOW", source })?;
        }
        Ok(())
    }

    /// Takes files off a session's exec allow list (replaced or removed).
    pub fn disallow_files(&mut self, cgroup_id: u64, files: &[FileId]) {
        for file in files {
            let _ = self.exec_allow.remove(&ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 });
        }
    }

    /// Removes the entries of `cgroup_id` that `rules` do not make: after
    /// [`SessionMaps::add_session`], this leaves exactly the session's rules
    /// without a moment in which the session has none.
    pub fn purge_stale(&mut self, cgroup_id: u64, rules: &SessionRules) {
        let deny: Vec<ExecKey> = rules
            .exec_deny
            .iter()
            .map(|(_, file)| ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 })
            .collect();
        let allow: Vec<ExecKey> = rules
            .exec_allow
            .iter()
            .flat_map(|allow| allow.files.iter())
            .map(|(_, file, _)| ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 })
            .collect();
        for (map, keep) in [(&mut self.exec_deny, &deny), (&mut self.exec_allow, &allow)] {
            let stale: Vec<ExecKey> =
                map.keys().flatten().filter(|k| k.cgroup_id == cgroup_id && !keep.contains(k)).collect();
            for key in stale {
                let _ = map.remove(&key);
            }
        }
        let (mut any, mut port) = (Vec::new(), Vec::new());
        for entry in &rules.net {
            match net_key(cgroup_id, entry) {
                NetKey::AnyPort(key) => any.push((key.prefix_len(), key.data())),
                NetKey::Port(key) => port.push((key.prefix_len(), key.data())),
            }
        }
        remove_from_trie(&mut self.net_any_port, cgroup_id, |key| !any.contains(&(key.prefix_len(), key.data())));
        remove_from_trie(&mut self.net_port, cgroup_id, |key| !port.contains(&(key.prefix_len(), key.data())));
    }

    /// Makes `cgroup_id` a governed session with `rules`. Rules go in before
    /// the session entry, so the kernel never sees the session without them.
    /// `dns_port`: the session's resolver, or `None` to keep the one it has.
    pub fn add_session(&mut self, cgroup_id: u64, rules: &SessionRules, dns_port: Option<u16>) -> Result<(), BpfError> {
        let dns_port = match dns_port {
            Some(port) => u32::from(port),
            None => self.sessions.get(&cgroup_id, 0).map_or(0, |slot| slot.dns_port),
        };
        let fail = |name| move |source| BpfError::Map { name, source };
        for (_, file) in &rules.exec_deny {
            let key = ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 };
            self.exec_deny.insert(key, 1, 0).map_err(fail("EXEC_DENY"))?;
        }
        let mut flags = 0;
        if let Some(allow) = &rules.exec_allow {
            let files: Vec<FileId> = allow.ids();
            self.allow_files(cgroup_id, &files)?;
            flags |= SESSION_EXEC_ALLOW_LIST;
        }
        for entry in &rules.net {
            self.put_entry(cgroup_id, entry)?;
        }
        let slot = SessionSlot { session_id: cgroup_id, flags, dns_port };
        self.sessions.insert(cgroup_id, slot, 0).map_err(fail("SESSIONS"))
    }

    /// Points the session's DNS traffic at its resolver on `port` (0: none).
    pub fn set_dns_port(&mut self, cgroup_id: u64, port: u16) -> Result<(), BpfError> {
        let fail = |source| BpfError::Map { name: "SESSIONS", source };
        let mut slot = self.sessions.get(&cgroup_id, 0).map_err(fail)?;
        slot.dns_port = u32::from(port);
        self.sessions.insert(cgroup_id, slot, 0).map_err(fail)
    }

    /// Adds (or replaces) one entry of a session: a compiled rule, or an
    /// address its resolver answered.
    pub fn put_entry(&mut self, cgroup_id: u64, entry: &NetEntry) -> Result<(), BpfError> {
        let fail = |name| move |source| BpfError::Map { name, source };
        let value = NetRule {
            verdict: entry.verdict as u32,
            addr_prefix: entry.addr_prefix,
            rule_id: entry.rule_id,
            reserved: 0,
        };
        match net_key(cgroup_id, entry) {
            NetKey::AnyPort(key) => self.net_any_port.insert(&key, value, 0).map_err(fail("NET_ANY_PORT")),
            NetKey::Port(key) => self.net_port.insert(&key, value, 0).map_err(fail("NET_PORT")),
        }
    }

    /// Removes one entry [`SessionMaps::put_entry`] added.
    pub fn remove_entry(&mut self, cgroup_id: u64, entry: &NetEntry) {
        let _ = match net_key(cgroup_id, entry) {
            NetKey::AnyPort(key) => self.net_any_port.remove(&key),
            NetKey::Port(key) => self.net_port.remove(&key),
        };
    }

    /// Removes every entry of `cgroup_id`, whatever rules put them there
    /// (maps an earlier daemon pinned may hold rules this one never compiled).
    pub fn purge(&mut self, cgroup_id: u64) {
        let _ = self.sessions.remove(&cgroup_id);
        self.purge_stale(cgroup_id, &SessionRules::default());
    }

    /// Forgets a session. The session entry goes first so nothing is
    /// decided from half-removed rules (a non-session cgroup is refused).
    pub fn remove_session(&mut self, cgroup_id: u64, rules: &SessionRules) {
        let _ = self.sessions.remove(&cgroup_id);
        for (_, file) in &rules.exec_deny {
            let _ = self.exec_deny.remove(&ExecKey { cgroup_id, ino: file.ino, dev: file.dev, reserved: 0 });
        }
        // The refresh keeps the listed files in step with the map.
        let allowed: Vec<FileId> = rules.exec_allow.iter().flat_map(|allow| allow.ids()).collect();
        self.disallow_files(cgroup_id, &allowed);
        for entry in &rules.net {
            let _ = match net_key(cgroup_id, entry) {
                NetKey::AnyPort(key) => self.net_any_port.remove(&key),
                NetKey::Port(key) => self.net_port.remove(&key),
            };
        }
    }
}

/// Removes the entries of `cgroup_id` (the key data's first 8 bytes) that `remove` picks.
fn remove_from_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], NetRule>,
    cgroup_id: u64,
    remove: impl Fn(&Key<[u8; N]>) -> bool,
) {
    let prefix = cgroup_id.to_be_bytes();
    let doomed: Vec<Key<[u8; N]>> =
        trie.keys().flatten().filter(|key| key.data()[..8] == prefix && remove(key)).collect();
    for key in doomed {
        let _ = trie.remove(&key);
    }
}

/// Where redirected connections were going, keyed as the proxy sees them.
/// Each entry is read and removed in one `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
/// (hash maps have it since Linux 5.14): atomic in the kernel, so the
/// proxy's lookups take no lock, and an entry can be taken only once.
pub struct OriginalDestinations {
    map: MapData,
}

impl TryFrom<Map> for OriginalDestinations {
    type Error = MapError;

    fn try_from(map: Map) -> Result<Self, MapError> {
        // aya's typed view refuses any other kind, and sizes other than the object's.
        HashMap::<&MapData, ConnectionKey, OriginalDst>::try_from(&map)?;
        let (Map::HashMap(map) | Map::LruHashMap(map)) = map else {
            unreachable!("aya's typed view accepts only hash maps")
        };
        // The map in the kernel may be a pinned one an earlier daemon left;
        // the raw call below writes a value of the kernel's size.
        let info = map.info()?;
        let (key, value) = (info.key_size() as usize, info.value_size() as usize);
        if key != size_of::<ConnectionKey>() {
            return Err(MapError::InvalidKeySize { size: size_of::<ConnectionKey>(), expected: key });
        }
        if value != size_of::<OriginalDst>() {
            return Err(MapError::InvalidValueSize { size: size_of::<OriginalDst>(), expected: value });
        }
        Ok(Self { map })
    }
}

impl OriginalDestinations {
    /// Where a connection the proxy accepted was going, taking the entry;
    /// `Ok(None)` when the kernel holds none for it.
    pub fn take(&self, key: &ConnectionKey) -> std::io::Result<Option<OriginalDst>> {
        lookup_and_delete(self.map.fd().as_fd(), key)
    }
}

/// The `bpf(2)` command; aya keeps its wrapper for it to itself.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The part of `union bpf_attr` the map element commands read.
#[repr(C)]
struct MapElementAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and removes the entry under `key` in the hash map `map`;
/// `Ok(None)` when there is none.
fn lookup_and_delete(map: BorrowedFd<'_>, key: &ConnectionKey) -> std::io::Result<Option<OriginalDst>> {
    let mut value = MaybeUninit::<OriginalDst>::uninit();
    let attr = MapElementAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at a live key and at room for one value; the
    // kernel's map has these types' key and value sizes (checked when it was
    // taken), so the kernel reads and writes only within them. It treats
    // the rest of `bpf_attr` past the size given as zero.
    let result = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &raw const attr, size_of::<MapElementAttr>())
    };
    if result == 0 {
        // SAFETY: the kernel wrote a whole value; any bytes are a valid `OriginalDst` (plain integers).
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(error) }
}

/// Per-CPU counts of events not delivered, per session, kind and reason.
pub struct LostCounters {
    lost: PerCpuHashMap<MapData, LostKey, u64>,
}

impl LostCounters {
    pub(super) fn new(lost: PerCpuHashMap<MapData, LostKey, u64>) -> Self {
        Self { lost }
    }

    /// Every counter so far, summed over CPUs.
    pub fn read(&self) -> Vec<(LostKey, u64)> {
        self.lost.iter().flatten().map(|(key, per_cpu)| (key, per_cpu.iter().sum())).collect()
    }

    /// The counters of the session in `cgroup_id`, summed over CPUs: a
    /// lookup per kind and reason, not a walk of every session's.
    pub fn read_session(&self, cgroup_id: u64) -> Vec<(LostKey, u64)> {
        (1..LOST_SLOTS)
            .flat_map(|kind| [LOST_BUFFER_FULL, LOST_THROTTLED].map(|reason| LostKey { cgroup_id, kind, reason }))
            .filter_map(|key| self.lost.get(&key, 0).ok().map(|per_cpu| (key, per_cpu.iter().sum())))
            .collect()
    }
}

/// How many bytes of each session's events the daemon has read, told to
/// the kernel so it knows which sessions' events fill the ring buffer.
pub struct ConsumedBytes {
    map: HashMap<MapData, u64, u64>,
    /// What this daemon believes each counter holds.
    totals: std::collections::HashMap<u64, u64>,
    /// Where the published totals are also shown to the rest of the daemon.
    backlog: Arc<EventBacklog>,
}

impl ConsumedBytes {
    pub(super) fn new(map: HashMap<MapData, u64, u64>, backlog: Arc<EventBacklog>) -> Self {
        Self { map, totals: std::collections::HashMap::new(), backlog }
    }

    /// Adds `bytes` read of `cgroup_id`'s events (kept here until [`ConsumedBytes::publish`]).
    pub fn add(&mut self, cgroup_id: u64, bytes: u64) {
        let map = &self.map;
        // The first time, carry on from what an earlier daemon published.
        let total = self.totals.entry(cgroup_id).or_insert_with(|| map.get(&cgroup_id, 0).unwrap_or(0));
        *total += bytes;
    }

    /// Writes the counters of `cgroup_ids` to the kernel. Call it only once
    /// the events counted have been handed to the session log.
    pub fn publish(&mut self, cgroup_ids: impl IntoIterator<Item = u64>) {
        let mut shown = self.backlog.read.lock().unwrap_or_else(|p| p.into_inner());
        for cgroup_id in cgroup_ids {
            if let Some(total) = self.totals.get(&cgroup_id) {
                let _ = self.map.insert(cgroup_id, *total, 0);
                shown.insert(cgroup_id, *total);
            }
        }
    }
}

/// Whether every event a session's processes put into the ring buffer has
/// been read and handed to the session log. A session whose cgroup emptied
/// is ended once it has, so its record holds its last events before its end.
pub struct EventBacklog {
    /// Bytes each session has put into the ring buffer (the kernel counts).
    submitted: HashMap<MapData, u64, u64>,
    /// Bytes of each session's events handed to the log (the reader publishes).
    read: Mutex<std::collections::HashMap<u64, u64>>,
    /// Asks the reader to drain the ring buffer now rather than at its next tick.
    drain: tokio::sync::Notify,
}

impl EventBacklog {
    pub(super) fn new(submitted: HashMap<MapData, u64, u64>) -> Self {
        Self { submitted, read: Mutex::default(), drain: tokio::sync::Notify::new() }
    }

    /// `Some(true)` once all of `cgroup_id`'s events are in the log,
    /// `Some(false)` while some are not, `None` when the kernel has no count
    /// for it (none submitted, or the count was evicted): the caller cannot
    /// tell, and must wait some other way.
    pub fn drained(&self, cgroup_id: u64) -> Option<bool> {
        let submitted = self.submitted.get(&cgroup_id, 0).ok()?;
        let read = self.read.lock().unwrap_or_else(|p| p.into_inner()).get(&cgroup_id).copied().unwrap_or(0);
        Some(read >= submitted)
    }

    /// [`EventBacklog::drained`] for every cgroup of `cgroup_ids`:
    /// `Some(false)` when one is not, else `None` when one cannot be told.
    pub fn all_drained(&self, cgroup_ids: &[u64]) -> Option<bool> {
        let mut all = Some(true);
        for &id in cgroup_ids {
            match self.drained(id) {
                Some(false) => return Some(false),
                None => all = None,
                Some(true) => {}
            }
        }
        all
    }

    /// Asks the reader to drain the ring buffer at once.
    pub fn request_drain(&self) {
        self.drain.notify_one();
    }

    /// Resolves when someone asked for a drain.
    pub async fn drain_requested(&self) {
        self.drain.notified().await;
    }
}
