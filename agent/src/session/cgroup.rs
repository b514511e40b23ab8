//! cgroup v2: finding the mount, the daemon's subtree, one directory per session.
//!
//! A session is a cgroup: every descendant of its first process inherits it
//! and an unprivileged process cannot leave it (moving needs write access to
//! `cgroup.procs` of a common ancestor, which only root has here).

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Errors of cgroup handling.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 line in mountinfo.
    #[error("no cgroup v2 mount found in /proc/self/mountinfo (tollgate needs cgroup v2, hybrid or unified)")]
    NoCgroup2,
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { what, path: path.to_owned(), source }
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_error("cannot read", Path::new("/proc/self/mountinfo")))?;
    find_cgroup2(&mountinfo).ok_or(CgroupError::NoCgroup2)
}

/// Finds the first cgroup2 mount point in mountinfo text.
pub fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split_whitespace().next()?;
        let mount_point = fields.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The daemon's subtree: `<mount>/<name>/sessions/<session>`.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    /// `<mount>/<name>`.
    pub root: PathBuf,
    /// `<root>/sessions`: the BPF socket programs are attached here.
    pub sessions: PathBuf,
}

impl CgroupTree {
    /// Creates (or reuses) the subtree. Session directories an earlier
    /// daemon left are kept: [`CgroupTree::leftovers`] lists them, and the
    /// daemon adopts or ends each.
    pub fn create(mount: &Path, name: &str) -> Result<Self, CgroupError> {
        let root = mount.join(name);
        let sessions = root.join("sessions");
        std::fs::create_dir_all(&sessions).map_err(io_error("cannot create cgroup", &sessions))?;
        Ok(Self { root, sessions })
    }

    /// Top session cgroups an earlier daemon left: (directory name, path,
    /// cgroup id). Child sessions are below them ([`children`]).
    pub fn leftovers(&self) -> Vec<(String, PathBuf, u64)> {
        children(&self.sessions)
    }

    /// Removes the subtree (when the daemon stops); fails quietly when busy.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir(&self.sessions);
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// Creates a session's cgroup `name` under `parent` (the sessions cgroup,
/// or the parent session's for a child) and returns it with its id (the id
/// the kernel's `bpf_get_current_cgroup_id()` returns: the directory's inode).
pub fn create_session(parent: &Path, name: &str) -> Result<(PathBuf, u64), CgroupError> {
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(io_error("cannot create session cgroup", &path))?;
    let ino = std::fs::metadata(&path).map_err(io_error("cannot stat", &path))?.ino();
    Ok((path, ino))
}

/// The child session cgroups directly under `path`: (name, path, cgroup id).
pub fn children(path: &Path) -> Vec<(String, PathBuf, u64)> {
    let entries = std::fs::read_dir(path).into_iter().flatten().flatten();
    entries
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| {
            let path = entry.path();
            let ino = std::fs::metadata(&path).ok()?.ino();
            Some((entry.file_name().to_string_lossy().into_owned(), path, ino))
        })
        .collect()
}

/// Moves `pid` into the cgroup at `path`.
pub fn move_process(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(io_error("cannot move process into", &procs))
}

/// Does the cgroup still hold any process (here or below)?
pub fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|line| line == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process in the cgroup: `cgroup.kill` (5.14+) where the
/// kernel has it, else SIGKILL to each process listed, until none is left.
pub fn kill_all(path: &Path) -> Result<(), CgroupError> {
    let kill = path.join("cgroup.kill");
    if std::fs::write(&kill, "1").is_ok() {
        return Ok(());
    }
    let procs = path.join("cgroup.procs");
    // New processes may be forked while we kill: go round until none is left.
    for _ in 0..100 {
        let pids = std::fs::read_to_string(&procs).map_err(io_error("cannot list processes of", &procs))?;
        let pids: Vec<i32> = pids.lines().filter_map(|pid| pid.trim().parse().ok()).collect();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Err(CgroupError::Io {
        what: "cannot kill every process of",
        path: path.to_owned(),
        source: io::Error::other("processes kept appearing"),
    })
}

/// Kills what is left in a session cgroup (and in child sessions below
/// it), waits for it to empty (a killed process leaves its cgroup only once
/// it is reaped) and removes it, children first. Failures are logged: there
/// is nothing more the caller could do.
pub fn discard(path: &Path) {
    for (_, child, _) in children(path) {
        discard(&child);
    }
    if populated(path) {
        let _ = kill_all(path);
        for _ in 0..100 {
            if !populated(path) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    if let Err(e) = std::fs::remove_dir(path) {
        tracing::warn!(cgroup = %path.display(), error = %e, "cannot remove session cgroup");
    }
}

/// The cgroup v2 path of a process, relative to the mount (`/a/b`).
pub fn of_process(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| line.strip_prefix("0::").map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        let escaped = "35 24 0:30 / /mnt/my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(find_cgroup2(escaped), Some(PathBuf::from("/mnt/my cgroups")));
        assert_eq!(find_cgroup2("35 24 0:30 / /sys/fs/cgroup rw - cgroup cgroup rw\n"), None);
    }
}
