//! Types shared by the tollgate eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]`, has no implicit padding, and has its size
//! asserted at compile time, because both sides read the same bytes: the
//! kernel side writes events and reads maps, userspace does the reverse.
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

/// The layout of the maps the daemon pins. Bumped whenever a pinned map's
/// key, value or size changes, or the layout of the events in the (pinned)
/// ring buffer, so a daemon never adopts maps it would misread.
pub const ABI_VERSION: u32 = 6;

/// Room for the executed file's name in an exec event: a name is kept to
/// `FILENAME_LEN - 1` bytes (the kernel's string helper keeps one for a NUL,
/// which is not sent).
pub const FILENAME_LEN: usize = 256;
/// Bytes of the NUL-separated argument list kept in an exec event.
pub const ARGV_LEN: usize = 512;
/// Most bytes of names that follow an [`ExecEvent`]: the file name, then the arguments.
pub const EXEC_STRINGS_LEN: usize = FILENAME_LEN + ARGV_LEN;

/// `ExecEvent::flags`: the file name filled all `FILENAME_LEN - 1` bytes
/// kept, so it may have been cut (a name of exactly that length is flagged too).
pub const EXEC_FILENAME_TRUNCATED: u32 = 1;
/// `ExecEvent::flags`: the arguments were longer than [`ARGV_LEN`] and were cut.
pub const EXEC_ARGV_TRUNCATED: u32 = 2;
/// `ExecEvent::flags`: the arguments could not be read at all.
pub const EXEC_ARGV_UNREADABLE: u32 = 4;

/// What an event reports. Decoded in userspace with `TryFrom<u32>`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A program image was executed (or refused).
    Exec = 1,
    /// A governed process created a new process (threads are not reported).
    Fork = 2,
    /// A governed process (thread group) exited.
    Exit = 3,
    /// A governed socket asked to connect or send to an address.
    Connect = 4,
    /// A governed process asked for a socket kind sessions may not have.
    Socket = 5,
}

impl EventKind {
    /// The name the session log, `status` and the docs use for this kind.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Fork => "fork",
            Self::Exit => "exit",
            Self::Connect => "connect",
            Self::Socket => "socket",
        }
    }
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            1 => Ok(Self::Exec),
            2 => Ok(Self::Fork),
            3 => Ok(Self::Exit),
            4 => Ok(Self::Connect),
            5 => Ok(Self::Socket),
            other => Err(other),
        }
    }
}

/// The kernel's decision on an exec or a connect.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it happen.
    Allow = 1,
    /// Refused with `EPERM` (connect, and exec where BPF LSM is active).
    Deny = 2,
    /// Exec refused by killing the process before the new image ran.
    Killed = 3,
    /// Connect rewritten to the daemon's L7 proxy.
    Redirect = 4,
}

impl Verdict {
    /// The name the session log and `policy explain` use for this verdict.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Killed => "killed",
            Self::Redirect => "redirect",
        }
    }
}

impl TryFrom<u32> for Verdict {
    type Error = u32;
    fn try_from(value: u32) -> Result<Self, u32> {
        match value {
            1 => Ok(Self::Allow),
            2 => Ok(Self::Deny),
            3 => Ok(Self::Killed),
            4 => Ok(Self::Redirect),
            other => Err(other),
        }
    }
}

/// Common start of every event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Thread group id (the process id userspace sees).
    pub pid: u32,
    /// The cgroup v2 id of the process's cgroup.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns()` when the event happened.
    pub boot_ns: u64,
}

/// An exec, allowed or refused. In the ring buffer it is followed by the
/// file name (`filename_len` bytes, no NUL), then the arguments (`argv_len`
/// bytes). The exec tracepoint sends only the bytes used, so a typical exec
/// takes about a tenth of the room the longest one would, and a session's
/// share of the buffer holds that many more of them; the LSM hook's
/// refusals (no arguments yet) carry room for the longest file name after it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    /// Common header; `kind` is [`EventKind::Exec`].
    pub header: EventHeader,
    /// The parent's thread group id at exec time.
    pub ppid: u32,
    /// The real uid of the process.
    pub uid: u32,
    /// A [`Verdict`] as `u32`.
    pub verdict: u32,
    /// `EXEC_*` flags.
    pub flags: u32,
    /// Device of the executed file (kernel encoding, `MAJOR << 20 | MINOR`).
    pub dev: u32,
    /// Bytes of arguments that follow the file name.
    pub argv_len: u32,
    /// Inode number of the executed file.
    pub ino: u64,
    /// Bytes of the file name that follow this event.
    pub filename_len: u32,
    /// Zero.
    pub reserved: u32,
}

/// A new process inside a governed cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    /// Common header; `pid` is the parent, `kind` is [`EventKind::Fork`].
    pub header: EventHeader,
    /// The new process's thread group id.
    pub child_pid: u32,
    /// The uid of the parent.
    pub uid: u32,
}

/// A governed process has exited.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    /// Common header; `kind` is [`EventKind::Exit`].
    pub header: EventHeader,
    /// Wait status as the kernel keeps it (`code << 8 | signal`).
    pub exit_code: u32,
    /// Padding to 8 bytes, always zero.
    pub reserved: u32,
}

/// A connect (or unconnected send) from a governed socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnectEvent {
    /// Common header; `kind` is [`EventKind::Connect`].
    pub header: EventHeader,
    /// The uid of the process.
    pub uid: u32,
    /// A [`Verdict`] as `u32`.
    pub verdict: u32,
    /// 4 or 6: the socket family the program saw.
    pub family: u32,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u32,
    /// Destination port, host byte order.
    pub port: u32,
    /// 1 when this was `sendmsg` on an unconnected socket rather than `connect`.
    pub send: u32,
    /// The rule that decided ([`NetRule::rule_id`]), or [`NO_RULE`].
    pub rule_id: u32,
    /// Always zero.
    pub reserved: u32,
    /// Destination as IPv6 (IPv4 is mapped, `::ffff:a.b.c.d`).
    pub addr: [u8; 16],
}

/// `ConnectEvent::rule_id` when no rule matched (the default is deny).
pub const NO_RULE: u32 = u32::MAX;
/// The rule id of DNS traffic sent to the session's resolver.
pub const DNS_RULE: u32 = u32::MAX - 1;
/// DNS's port: what a session sends there goes to its resolver.
pub const DNS_PORT: u16 = 53;

/// A socket a session may not create (raw, packet, ICMP "ping" sockets...).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SocketEvent {
    /// Common header; `kind` is [`EventKind::Socket`].
    pub header: EventHeader,
    /// The uid of the process.
    pub uid: u32,
    /// A [`Verdict`] as `u32` (only refusals are reported).
    pub verdict: u32,
    /// `AF_*`.
    pub family: u32,
    /// `SOCK_*`.
    pub sock_type: u32,
    /// `IPPROTO_*`.
    pub protocol: u32,
    /// Always zero.
    pub reserved: u32,
}

/// `SessionSlot::flags`: the session may execute only files in the exec
/// allow map (deny entries still apply).
pub const SESSION_EXEC_ALLOW_LIST: u32 = 1;

/// Value of the governed-cgroup map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SessionSlot {
    /// The cgroup id again, so a dump of the map reads on its own.
    pub session_id: u64,
    /// `SESSION_*` flags.
    pub flags: u32,
    /// The port of the session's resolver on 127.0.0.1 and ::1, where its
    /// DNS traffic (UDP and TCP to port 53) goes; 0: none (DNS then follows
    /// the session's rules like any other traffic).
    pub dns_port: u32,
}

/// Key of the exec deny map: an executable file of one session.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExecKey {
    /// The session's cgroup id.
    pub cgroup_id: u64,
    /// Inode number of the file.
    pub ino: u64,
    /// Device of the file, kernel encoding.
    pub dev: u32,
    /// Always zero.
    pub reserved: u32,
}

/// Data of a key in the address-only network rule trie: cgroup id (big
/// endian), family (4 or 6), then the address (IPv4 mapped into IPv6). The
/// family byte keeps IPv6 rules such as `::/0` from covering IPv4.
pub type NetAnyPortKey = [u8; 25];
/// Data of a key in the address-and-port network rule trie: cgroup id (big
/// endian), family, port (big endian), then the address.
pub type NetPortKey = [u8; 27];
/// Bits of a network key before the address starts, address-only trie.
pub const NET_ANY_PORT_FIXED_BITS: u32 = 72;
/// Bits of a network key before the address starts, address-and-port trie.
pub const NET_PORT_FIXED_BITS: u32 = 88;

/// `family` byte of a network key for IPv4 (and IPv4-mapped IPv6) destinations.
pub const FAMILY_V4: u8 = 4;
/// `family` byte of a network key for IPv6 destinations.
pub const FAMILY_V6: u8 = 6;

/// Is `addr` an IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`)? Such
/// destinations are governed as IPv4, whichever socket family asked.
#[inline(always)]
pub fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    let mut zero = true;
    let mut i = 0;
    while i < 10 {
        zero &= addr[i] == 0;
        i += 1;
    }
    zero && addr[10] == 0xff && addr[11] == 0xff
}

/// The rule family of a destination: [`FAMILY_V4`] for mapped IPv4, else [`FAMILY_V6`].
#[inline(always)]
pub fn family_of(addr: &[u8; 16]) -> u8 {
    if is_v4_mapped(addr) { FAMILY_V4 } else { FAMILY_V6 }
}

/// An IPv4 address (octets in network order) mapped into IPv6.
#[inline(always)]
pub fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

/// Connecting to `0.0.0.0` or `::` reaches this host's loopback; such a
/// destination is decided (and recorded) as `127.0.0.1` or `::1`, so it
/// cannot slip past rules written for the loopback address.
#[inline(always)]
pub fn loopback_for_unspecified(mut addr: [u8; 16]) -> [u8; 16] {
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

/// The address-only trie's key data for (cgroup, family, address).
#[inline(always)]
pub fn net_any_port_key(cgroup_id: u64, family: u8, addr: &[u8; 16]) -> NetAnyPortKey {
    let mut key = [0u8; 25];
    let cgroup = cgroup_id.to_be_bytes();
    let mut i = 0;
    while i < 8 {
        key[i] = cgroup[i];
        i += 1;
    }
    key[8] = family;
    let mut i = 0;
    while i < 16 {
        key[9 + i] = addr[i];
        i += 1;
    }
    key
}

/// The address-and-port trie's key data for (cgroup, family, port, address).
#[inline(always)]
pub fn net_port_key(cgroup_id: u64, family: u8, port: u16, addr: &[u8; 16]) -> NetPortKey {
    let mut key = [0u8; 27];
    let cgroup = cgroup_id.to_be_bytes();
    let mut i = 0;
    while i < 8 {
        key[i] = cgroup[i];
        i += 1;
    }
    key[8] = family;
    let port = port.to_be_bytes();
    key[9] = port[0];
    key[10] = port[1];
    let mut i = 0;
    while i < 16 {
        key[11 + i] = addr[i];
        i += 1;
    }
    key
}

/// Value of a network rule trie entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetRule {
    /// A [`Verdict`] as `u32` (`Allow` or `Deny`).
    pub verdict: u32,
    /// Prefix length of the address alone (0..=128, IPv4 as mapped), so the
    /// kernel can tell which of two tries matched more specifically.
    pub addr_prefix: u32,
    /// Index of the policy entry that made this rule, for the record.
    pub rule_id: u32,
    /// Always zero.
    pub reserved: u32,
}

/// Where a redirected connection was going, saved by socket cookie at
/// connect and re-keyed by the connection's addresses once established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct OriginalDst {
    /// The destination asked for, as IPv6 (IPv4 mapped).
    pub addr: [u8; 16],
    /// The session's cgroup.
    pub cgroup_id: u64,
    /// The destination port, host byte order.
    pub port: u32,
    /// The session rule (a proxy route) that redirected it.
    pub rule_id: u32,
    /// The process that connected (thread group id), for the record.
    pub pid: u32,
    /// Always zero.
    pub reserved: u32,
}

/// An established connection to the proxy as the proxy sees it: the client's
/// address and port (its peer) and the proxy's own (local). Addresses are
/// IPv6 (IPv4 mapped), ports host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    /// The client's address.
    pub peer: [u8; 16],
    /// The proxy's address.
    pub local: [u8; 16],
    /// The client's port.
    pub peer_port: u32,
    /// The proxy's port.
    pub local_port: u32,
}

/// Where the proxy listens: 127.0.0.1 and ::1 on this port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProxyAddr {
    /// Port, host byte order; 0 while no proxy is configured (redirects then fail closed).
    pub port: u32,
    /// Always zero.
    pub reserved: u32,
}

/// Offsets into kernel structures, read by the agent from the running
/// kernel's BTF and written into the programs' read-only data before load.
/// This is what lets one object work across kernel versions without CO-RE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    /// `task_struct.mm`
    pub task_mm: u32,
    /// `task_struct.real_parent`
    pub task_real_parent: u32,
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.exit_code`
    pub task_exit_code: u32,
    /// `mm_struct.exe_file`
    pub mm_exe_file: u32,
    /// `mm_struct.arg_start`
    pub mm_arg_start: u32,
    /// `mm_struct.arg_end`
    pub mm_arg_end: u32,
    /// `file.f_path` + `path.dentry`
    pub file_dentry: u32,
    /// `dentry.d_inode`
    pub dentry_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `linux_binprm.file`
    pub bprm_file: u32,
    /// `linux_binprm.filename`
    pub bprm_filename: u32,
    /// `linux_binprm.interp`: the same pointer as `filename` until an
    /// interpreter (a script's `#!` line) takes over the exec.
    pub bprm_interp: u32,
    /// Always zero.
    pub reserved: u32,
    /// 1 once the agent has filled this in; programs do nothing while 0.
    pub ready: u32,
}

/// Kind slots of userspace's lost-event totals, one per [`EventKind`] (index 0 unused).
pub const LOST_SLOTS: u32 = 6;

/// `LostKey::reason`: the ring buffer had no room for the event.
pub const LOST_BUFFER_FULL: u32 = 1;
/// `LostKey::reason`: the session had its share of the ring buffer in
/// flight while the buffer was at least half full; the event is only counted.
pub const LOST_THROTTLED: u32 = 2;

/// While the ring buffer is at least half full, a session may add an event
/// only while its events not yet read by the daemon take less than this
/// fraction (1/N) of the buffer. A flooding session is stopped there, and
/// the rest of the buffer stays for the sessions that write little.
pub const FAIR_SHARE_DIVISOR: u64 = 4;

/// The programs wake the daemon only once the unread events fill this
/// fraction of the ring buffer (1/16); below it the daemon drains on its
/// own every [`DRAIN_INTERVAL_MS`]. A wakeup per event costs a context
/// switch per exec or connect, which on two cores slows the session itself.
pub const WAKEUP_DIVISOR: u64 = 16;

/// How often the daemon drains the ring buffer without being woken.
pub const DRAIN_INTERVAL_MS: u64 = 10;

/// Key of the map of execs whose first file an allow list admitted: the exec
/// (its `linux_binprm`) and the thread doing it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecInProgress {
    /// Address of the exec's `linux_binprm`.
    pub bprm: u64,
    /// `bpf_get_current_pid_tgid()`.
    pub pid_tgid: u64,
}

/// Key of the lost-event counters: whose events, of which kind, and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LostKey {
    /// The session's cgroup id.
    pub cgroup_id: u64,
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// `LOST_BUFFER_FULL` or `LOST_THROTTLED`.
    pub reason: u32,
}

#[cfg(feature = "user")]
pub use user::read;

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for the types userspace puts into maps or reads out of
    //! maps and the ring buffer, and reading them from raw bytes.
    use super::{
        ConnectEvent, ConnectionKey, EventHeader, ExecEvent, ExecKey, ExitEvent, ForkEvent, KernelOffsets, LostKey,
        NetRule, OriginalDst, ProxyAddr, SessionSlot, SocketEvent,
    };

    /// A `T` from the start of `bytes` (which need not be aligned), or `None`
    /// when there are fewer bytes than a `T` has.
    pub fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
        if bytes.len() < core::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: the length is checked above, and `Pod` promises a repr(C)
        // type of plain integers for which every bit pattern is valid.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }

    /// `aya::Pod` for each type: repr(C), made only of integers and byte
    /// arrays, with no padding (sizes asserted below).
    macro_rules! pod {
        ($($ty:ty),* $(,)?) => {
            // SAFETY: every listed type is repr(C) plain old data without
            // padding, so every bit pattern is a valid value.
            $(unsafe impl aya::Pod for $ty {})*
        };
    }
    pod!(
        LostKey,
        EventHeader,
        ExecEvent,
        ForkEvent,
        ExitEvent,
        ConnectEvent,
        SocketEvent,
        OriginalDst,
        ConnectionKey,
        ProxyAddr,
        SessionSlot,
        ExecKey,
        NetRule,
        KernelOffsets,
    );
}

const _: () = {
    assert!(core::mem::size_of::<EventHeader>() == 24);
    assert!(core::mem::size_of::<ExecEvent>() == 24 + 40);
    assert!(core::mem::size_of::<ForkEvent>() == 32);
    assert!(core::mem::size_of::<ExitEvent>() == 32);
    assert!(core::mem::size_of::<ConnectEvent>() == 24 + 32 + 16);
    assert!(core::mem::size_of::<SocketEvent>() == 24 + 24);
    assert!(core::mem::size_of::<ExecKey>() == 24);
    assert!(core::mem::size_of::<NetRule>() == 16);
    assert!(core::mem::size_of::<KernelOffsets>() == 72);
    assert!(core::mem::size_of::<SessionSlot>() == 16);
    assert!(core::mem::size_of::<OriginalDst>() == 40);
    assert!(core::mem::size_of::<ConnectionKey>() == 40);
    assert!(core::mem::size_of::<ProxyAddr>() == 8);
    assert!(core::mem::size_of::<LostKey>() == 16);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_put_the_cgroup_family_port_and_address_where_the_prefix_lengths_say() {
        let addr = v4_mapped([10, 1, 2, 3]);
        let any = net_any_port_key(0x0102_0304_0506_0708, family_of(&addr), &addr);
        assert_eq!(&any[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(any[8], FAMILY_V4);
        assert_eq!(&any[9..], &addr);
        assert_eq!(NET_ANY_PORT_FIXED_BITS as usize, 9 * 8);
        let port = net_port_key(1, FAMILY_V6, 0x1f90, &[0xfd; 16]);
        assert_eq!((port[8], port[9], port[10]), (FAMILY_V6, 0x1f, 0x90));
        assert_eq!(&port[11..], &[0xfd; 16]);
        assert_eq!(NET_PORT_FIXED_BITS as usize, 11 * 8);
    }

    #[test]
    fn mapped_and_unspecified_addresses() {
        assert!(is_v4_mapped(&v4_mapped([127, 0, 0, 1])));
        let mut v6_loopback = [0u8; 16];
        v6_loopback[15] = 1;
        assert!(!is_v4_mapped(&v6_loopback));
        assert_eq!(family_of(&v6_loopback), FAMILY_V6);
        assert_eq!(loopback_for_unspecified(v4_mapped([0, 0, 0, 0])), v4_mapped([127, 0, 0, 1]));
        assert_eq!(loopback_for_unspecified([0; 16]), v6_loopback);
        assert_eq!(loopback_for_unspecified(v4_mapped([10, 0, 0, 0])), v4_mapped([10, 0, 0, 0]));
    }

    #[test]
    fn names_are_spelled_once() {
        assert_eq!(EventKind::Connect.name(), "connect");
        assert_eq!(Verdict::Killed.as_str(), "killed");
        assert_eq!(EventKind::try_from(5).map(EventKind::name), Ok("socket"));
    }
}
