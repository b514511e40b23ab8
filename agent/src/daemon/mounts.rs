//! Pseudo-filesystems the daemon needs, mounted when the host has not.

use std::path::Path;

use nix::mount::{MsFlags, mount};

const NEEDED: [(&str, &str); 3] =
    [("/sys/fs/bpf", "bpf"), ("/sys/kernel/tracing", "tracefs"), ("/sys/kernel/security", "securityfs")];

/// Mounts bpffs, tracefs and securityfs where they are missing. Failures
/// are logged: without bpffs enforcement cannot outlive the daemon (which
/// `status` then says); the others only improve diagnostics.
pub fn ensure() {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (target, fstype) in NEEDED {
        let mounted = mountinfo.lines().any(|line| line.split_whitespace().nth(4) == Some(target));
        if mounted || !Path::new(target).is_dir() {
            continue;
        }
        match mount(Some(fstype), target, Some(fstype), MsFlags::empty(), None::<&str>) {
            Ok(()) => tracing::info!(target, fstype, "mounted"),
            Err(e) => tracing::warn!(target, fstype, error = %e, "cannot mount"),
        }
    }
}
