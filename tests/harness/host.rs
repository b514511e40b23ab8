//! Facts about the host kernel, found independently of tollgate so tests can check what the
//! daemon reports against them.

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::run_with_timeout;

const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// The LSMs the running kernel has active, from securityfs's `lsm` file.
///
/// Some hosts do not mount securityfs at /sys/kernel/security. Then the file is read from a
/// securityfs mounted in a private mount namespace, which leaves the host's mounts untouched.
pub fn active_lsms() -> Vec<String> {
    let list = match fs::read_to_string(LSM_LIST) {
        Ok(list) => list,
        Err(err) if err.kind() == ErrorKind::NotFound => read_lsm_list_privately(),
        Err(err) => panic!("reading {LSM_LIST}: {err}"),
    };
    list.trim().split(',').filter(|name| !name.is_empty()).map(str::to_owned).collect()
}

fn read_lsm_list_privately() -> String {
    let mount_point = tempfile::tempdir().expect("creating a mount point for securityfs");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t securityfs securityfs "$0" && cat "$0/lsm""#)
        .arg(mount_point.path());
    let out = run_with_timeout(&mut cmd, Duration::from_secs(10))
        .unwrap_or_else(|err| panic!("reading the LSM list from a private securityfs: {err:#}"));
    assert!(out.success(), "could not read the LSM list from a private securityfs mount: {out}");
    out.stdout
}

/// True when the kernel has the BPF LSM active. Active is necessary for
/// the `lsm` exec enforcement mode but not sufficient: a kernel may still
/// refuse to load the program (this development host blocks BPF trampolines).
pub fn bpf_lsm_active() -> bool {
    active_lsms().iter().any(|name| name == "bpf")
}

/// Where the cgroup2 hierarchy is mounted (for example /sys/fs/cgroup, or
/// /sys/fs/cgroup/unified on a hybrid host), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").unwrap_or_else(|err| panic!("reading /proc/self/mountinfo: {err}"));
    // Each line is "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...".
    // Mount points with spaces would be octal-escaped; cgroup2 mount points have none.
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, filesystem) = line.split_once(" - ")?;
            (filesystem.split(' ').next() == Some("cgroup2"))
                .then(|| mount.split(' ').nth(4).map(PathBuf::from))
                .flatten()
        })
        .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mountinfo:\n{mountinfo}"))
}
