//! Who may put which process into a session: only the caller's own child
//! that has not yet executed anything. The caller is identified by
//! `SO_PEERCRED`, never by what it claims.
//!
//! "Not yet executed" does not rest on the executable's path (a child that
//! executes the caller's own program again would pass that): a forked child
//! has exactly its parent's memory layout (code, stack, data, heap,
//! arguments and environment addresses) until it executes anything, and
//! every exec lays out a new image. The process is then held to its start
//! time, so the one placed is the one checked, not a later holder of its pid.

use std::path::PathBuf;

/// Why a process may not be placed into a session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    /// The process does not exist.
    #[error("process {0} does not exist")]
    NoSuchProcess(u32),
    /// It is not the caller's child.
    #[error("process {pid} is not a child of the caller (its parent is {parent})")]
    NotChild {
        /// The process.
        pid: u32,
        /// Its actual parent.
        parent: u32,
    },
    /// It runs as another user.
    #[error("process {0} runs as another user than the caller")]
    OtherUser(u32),
    /// It has already executed another program.
    #[error("process {0} has already executed another program")]
    AlreadyExecuted(u32),
    /// Its start time changed between the checks: another process took its pid.
    #[error("process {0} is not the process first checked (its pid was reused)")]
    Replaced(u32),
    /// It could still gain privileges through setuid binaries.
    #[error("process {0} does not have no_new_privs set (a session must not gain privileges)")]
    NoNewPrivs(u32),
}

/// A process as the checks saw it: its pid and when it started (clock
/// ticks since boot), which together name one process for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// The pid.
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`.
    pub start_time: u64,
}

/// The fields of `/proc/PID/stat` after the command name, which may hold
/// spaces and parentheses: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // The state is a letter; it reads as 0, and nothing compares it.
    Some(rest.split_whitespace().map(|field| field.parse().unwrap_or(0)).collect())
}

/// Field `n` (1-based, as `man 5 proc` numbers them) of parsed stat fields.
fn field(fields: &[u64], n: usize) -> Option<u64> {
    fields.get(n.checked_sub(3)?).copied()
}

/// Where the process's image lies: startcode, endcode, startstack, and
/// start_data through env_end (fields 26-28 and 45-51).
fn layout(fields: &[u64]) -> Option<Vec<u64>> {
    [26, 27, 28, 45, 46, 47, 48, 49, 50, 51].into_iter().map(|n| field(fields, n)).collect()
}

/// Checks that `child` is a not-yet-executed child of `caller_pid`, running
/// as `caller_uid`, with `no_new_privs` already set (so a session can never
/// become root through sudo and leave its cgroup). With `first`, also that
/// it is the very process the first check saw.
pub fn check_child(caller_pid: u32, caller_uid: u32, child: u32, first: Option<Checked>) -> Result<Checked, PeerError> {
    let fields = stat_fields(child).ok_or(PeerError::NoSuchProcess(child))?;
    let parent = field(&fields, 4).ok_or(PeerError::NoSuchProcess(child))?;
    let start_time = field(&fields, 22).ok_or(PeerError::NoSuchProcess(child))?;
    if first.is_some_and(|first| first.start_time != start_time) {
        return Err(PeerError::Replaced(child));
    }
    if parent != u64::from(caller_pid) {
        return Err(PeerError::NotChild { pid: child, parent: u32::try_from(parent).unwrap_or(u32::MAX) });
    }
    let status =
        std::fs::read_to_string(format!("/proc/{child}/status")).map_err(|_| PeerError::NoSuchProcess(child))?;
    let uids: Vec<u32> = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .map(|rest| rest.split_whitespace().filter_map(|u| u.parse().ok()).collect())
        .unwrap_or_default();
    if uids.is_empty() || uids.iter().any(|&uid| uid != caller_uid) {
        return Err(PeerError::OtherUser(child));
    }
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let (child_exe, caller_exe): (Option<PathBuf>, Option<PathBuf>) = (exe(child), exe(caller_pid));
    let caller_layout = stat_fields(caller_pid).and_then(|fields| layout(&fields));
    let child_layout = layout(&fields);
    let unexecuted = child_exe.is_some()
        && child_exe == caller_exe
        && child_layout.is_some()
        && child_layout == caller_layout
        && child_layout.as_ref().is_some_and(|l| l.iter().any(|&address| address != 0));
    if !unexecuted {
        return Err(PeerError::AlreadyExecuted(child));
    }
    let no_new_privs = status.lines().any(|line| line.split_whitespace().eq(["NoNewPrivs:", "1"]));
    if !no_new_privs {
        return Err(PeerError::NoNewPrivs(child));
    }
    Ok(Checked { pid: child, start_time })
}

/// The inode of the TCP socket whose local end is `local_end` and whose
/// remote end is `remote_end`, from /proc/net/tcp{,6}.
pub fn tcp_socket_inode(local_end: std::net::SocketAddr, remote_end: std::net::SocketAddr) -> Option<u64> {
    use std::net::{IpAddr, SocketAddr};
    // A v4 client of a dual-stack listener shows as v4-mapped there, as v4 here.
    let plain = |addr: SocketAddr| match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, |v4| SocketAddr::new(IpAddr::V4(v4), addr.port())),
        IpAddr::V4(_) => addr,
    };
    let encode = |addr: SocketAddr| -> String {
        let ip = match addr.ip() {
            IpAddr::V4(v4) => format!("{:08X}", u32::from_le_bytes(v4.octets())),
            IpAddr::V6(v6) => v6
                .octets()
                .chunks(4)
                .map(|word| format!("{:08X}", u32::from_le_bytes([word[0], word[1], word[2], word[3]])))
                .collect(),
        };
        format!("{ip}:{:04X}", addr.port())
    };
    let (local, remote) = (plain(local_end), plain(remote_end));
    let table = if local.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let (want_local, want_remote) = (encode(local), encode(remote));
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&want_local.as_str()) && fields.get(2) == Some(&want_remote.as_str()))
            .then(|| fields.get(9).and_then(|inode| inode.parse().ok()))
            .flatten()
    })
}

/// Does a process in the cgroup at `path` (or below it) hold socket `inode`?
pub fn cgroup_holds_socket(path: &std::path::Path, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let pids = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    let here = pids.lines().any(|pid| {
        std::fs::read_dir(format!("/proc/{}/fd", pid.trim()))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str()))
    });
    here || super::cgroup::children(path).iter().any(|(_, child, _)| cgroup_holds_socket(child, inode))
}

/// Is `ip` one of this host's addresses (loopback, or an interface's)?
pub fn is_local_address(ip: std::net::IpAddr) -> bool {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    ip.is_loopback()
        || nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
            addrs.any(|a| {
                a.address.is_some_and(|s| {
                    s.as_sockaddr_in().map(|v4| std::net::IpAddr::V4(v4.ip())) == Some(ip)
                        || s.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())) == Some(ip)
                })
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unexecuted_child_of_the_caller_passes() {
        let me = std::process::id();
        let uid = nix::unistd::getuid().as_raw();
        // A child that has executed another program (sleep) is refused.
        let mut sleeper = std::process::Command::new("sleep").arg("5").spawn().expect("spawn sleep");
        assert_eq!(check_child(me, uid, sleeper.id(), None), Err(PeerError::AlreadyExecuted(sleeper.id())));
        // Our parent is not our child.
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert!(matches!(check_child(me, uid, parent, None), Err(PeerError::NotChild { .. })));
        assert_eq!(check_child(me, uid, u32::MAX - 1, None), Err(PeerError::NoSuchProcess(u32::MAX - 1)));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
