//! Harness for tollgate's integration tests.
//!
//! Every test drives the real `tollgate` binary against the real kernel: [`Daemon`] starts
//! `tollgate daemon` with its own state directory, control socket, policy directory and cgroup
//! subtree, so tests can run in parallel without seeing each other's sessions. Nothing is mocked;
//! the tests must run as root on a cgroup v2 host.
//!
//! Run them after building the binary: `cargo build -p tollgate && cargo test -p tollgate-tests`
//! (or set `TOLLGATE_BIN` to test another build). A failing test prints the daemon's log.

pub mod bench;
mod daemon;
pub mod dnsmasq;
pub mod enforcement;
pub mod host;
pub mod jwt;
pub mod net;
pub mod pki;
pub mod postgres;
mod process;
pub mod proxy;
pub mod rounds;
pub mod session_log;
pub mod upstream;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use daemon::{Daemon, DaemonBuilder, Issuer, Jwks, StopReport, free_loopback_port, left_behind};
pub use process::{RunOutput, run_with_timeout};

/// Environment variable naming the `tollgate` binary under test.
pub const BIN_ENV: &str = "TOLLGATE_BIN";

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("tests crate at {} has no parent directory", manifest_dir.display()))
}

/// The `tollgate` binary under test: `$TOLLGATE_BIN`, else the workspace's debug build.
///
/// Panics when it does not exist, because every test needs it and a missing binary should read
/// as "build it first" rather than as dozens of confusing spawn errors.
pub fn tollgate_bin() -> PathBuf {
    let (path, origin) = match std::env::var_os(BIN_ENV) {
        Some(path) => (PathBuf::from(path), format!("${BIN_ENV}")),
        None => (workspace_root().join("target/debug/tollgate"), "the default location".to_owned()),
    };
    assert!(
        path.is_file(),
        "tollgate binary not found at {} ({origin}); build it with `cargo build -p tollgate` \
         or point {BIN_ENV} at it",
        path.display()
    );
    path
}

/// A string unique to this test process and call, for distinctive argv values and file names.
///
/// Includes the pid so that markers from concurrently running test binaries cannot collide.
pub fn unique_tag() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}
