//! Enforcement that outlives the daemon: the maps and the links that keep
//! the programs attached are pinned in bpffs, under one directory per
//! daemon (named for its cgroup subtree) and per layout of the maps.
//!
//! While the pins exist the kernel keeps enforcing every session's rules
//! with no userspace process alive. A daemon that starts and finds them
//! adopts that state; a clean stop removes them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use tollgate_common::ABI_VERSION;

/// Where bpffs is mounted (the daemon mounts it there when it is missing).
pub const BPFFS: &str = "/sys/fs/bpf";

/// Maps whose contents must survive the daemon: the session rules, the
/// original destinations of redirected connections, the events written
/// while no daemon reads them, the lost counters and the fairness accounts.
pub const PINNED_MAPS: [&str; 12] = [
    "SESSIONS",
    "EXEC_DENY",
    "EXEC_ALLOW",
    "LSM_ACTIVE",
    "NET_ANY_PORT",
    "NET_PORT",
    "ORIGINAL_BY_COOKIE",
    "ORIGINAL_BY_CONNECTION",
    "EVENTS",
    "LOST",
    "SUBMITTED",
    "CONSUMED",
];

/// This daemon's pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    /// `/sys/fs/bpf/<cgroup name>`: every layout's directory is below it.
    daemon: PathBuf,
    /// `<daemon>/abi-<ABI_VERSION>`.
    current: PathBuf,
}

/// What a starting daemon found pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing: no earlier daemon left enforcement running.
    Nothing,
    /// Links of an earlier daemon: its programs are still enforcing.
    Enforcing,
}

impl PinDir {
    /// The pin directory of the daemon whose cgroup subtree is `name`, or why
    /// pinning is not possible here (bpffs not mounted).
    pub fn open(name: &str) -> Result<Self, String> {
        let bpffs = Path::new(BPFFS);
        let stat = nix::sys::statfs::statfs(bpffs).map_err(|e| format!("cannot stat {BPFFS}: {e}"))?;
        if stat.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
            return Err(format!("{BPFFS} is not a bpffs mount"));
        }
        let daemon = bpffs.join(name);
        let current = daemon.join(format!("abi-{ABI_VERSION}"));
        for dir in [current.join("maps"), current.join("links")] {
            fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        Ok(Self { daemon, current })
    }

    /// Whether an earlier daemon left programs attached (of any layout).
    pub fn found(&self) -> Found {
        let has_links = |layout: &Path| fs::read_dir(layout.join("links")).is_ok_and(|mut d| d.next().is_some());
        let layouts = fs::read_dir(&self.daemon).into_iter().flatten().flatten();
        if layouts.map(|entry| entry.path()).any(|layout| has_links(&layout)) {
            Found::Enforcing
        } else {
            Found::Nothing
        }
    }

    /// Where map `name` is pinned.
    pub fn map(&self, name: &str) -> PathBuf {
        self.current.join("maps").join(name)
    }

    /// Where the link of program `name` is pinned.
    pub fn link(&self, name: &str) -> PathBuf {
        self.current.join("links").join(name)
    }

    /// Removes the pins of earlier layouts: their programs detach and their
    /// maps are freed. Called once this daemon's own programs are attached.
    pub fn remove_other_layouts(&self) {
        for entry in fs::read_dir(&self.daemon).into_iter().flatten().flatten() {
            if entry.path() != self.current {
                remove_tree(&entry.path());
            }
        }
    }

    /// Removes every pin: the programs detach and the maps are freed (a clean stop).
    pub fn remove(&self) {
        remove_tree(&self.daemon);
    }

    /// The directory, for `status`.
    pub fn path(&self) -> &Path {
        &self.daemon
    }
}

/// bpffs directories hold pins and directories only; removing a pin drops
/// the kernel's reference it held.
fn remove_tree(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %dir.display(), error = %e, "cannot remove pinned eBPF objects");
    }
}
