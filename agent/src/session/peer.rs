//! Who may put which process into a session: only the caller's own child
//! that has not yet executed anything (it still runs the caller's binary).
//! The caller is identified by `SO_PEERCRED`, never by what it claims.

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
    /// It could still gain privileges through setuid binaries.
    #[error("process {0} does not have no_new_privs set (a session must not gain privileges)")]
    NoNewPrivs(u32),
}

/// Checks that `child` is a not-yet-executed child of `caller_pid`, running
/// as `caller_uid`, with `no_new_privs` already set (so a session can never
/// become root through sudo and leave its cgroup).
pub fn check_child(caller_pid: u32, caller_uid: u32, child: u32) -> Result<(), PeerError> {
    let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).map_err(|_| PeerError::NoSuchProcess(child))?;
    // The command name may hold spaces and parentheses: parse after the last ')'.
    let parent = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|field| field.parse::<u32>().ok())
        .ok_or(PeerError::NoSuchProcess(child))?;
    if parent != caller_pid {
        return Err(PeerError::NotChild { pid: child, parent });
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
    if child_exe.is_none() || child_exe != caller_exe {
        return Err(PeerError::AlreadyExecuted(child));
    }
    let no_new_privs = status.lines().any(|line| line.split_whitespace().eq(["NoNewPrivs:", "1"]));
    if !no_new_privs {
        return Err(PeerError::NoNewPrivs(child));
    }
    Ok(())
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
        assert_eq!(check_child(me, uid, sleeper.id()), Err(PeerError::AlreadyExecuted(sleeper.id())));
        // Our parent is not our child.
        let parent = nix::unistd::getppid().as_raw() as u32;
        assert!(matches!(check_child(me, uid, parent), Err(PeerError::NotChild { .. })));
        assert_eq!(check_child(me, uid, u32::MAX - 1), Err(PeerError::NoSuchProcess(u32::MAX - 1)));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
