//! Starting and failing to start: a daemon that cannot start leaves nothing
//! behind, and a second daemon on the same config never disturbs the first.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use harness::{Daemon, host, left_behind, run_with_timeout, tollgate_bin, unique_tag};

const POLICY: &str = "identities:\n  - name: life-bots\n    issuer: tollgate-dev\n    allow_root: true\ngrants:\n  - name: life\n    identity: life-bots\n    network:\n      allow: [\"127.0.0.0/8\"]\n";

/// A daemon's config in `dir`, outside the harness (which waits for a
/// daemon to be ready): its cgroup name and the config's path.
fn standalone_config(dir: &Path, proxy_port: u16) -> (String, PathBuf) {
    let cgroup = format!("tollgate-test-{}", unique_tag());
    let config = dir.join("config.yaml");
    std::fs::create_dir(dir.join("policies")).expect("policy dir");
    std::fs::write(dir.join("policies/p.yaml"), POLICY).expect("policy");
    std::fs::write(
        &config,
        format!(
            "state_dir: state\nsocket: control.sock\npolicies: [policies]\ncgroup: {cgroup}\nproxy_port: {proxy_port}\n"
        ),
    )
    .expect("config");
    (cgroup, config)
}

#[test]
fn a_daemon_that_cannot_start_leaves_no_cgroup_behind() {
    // The proxy port is taken, so start-up fails after the cgroups exist.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to take");
    let port = taken.local_addr().expect("address").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let (cgroup, config) = standalone_config(dir.path(), port);
    let mut daemon = Command::new(tollgate_bin());
    daemon.arg("daemon").arg("--config").arg(&config);
    let out = run_with_timeout(&mut daemon, Duration::from_secs(60)).expect("the daemon runs");
    assert_eq!(out.code(), Some(1), "start-up should fail: {out}");
    assert!(
        out.stderr.contains(&format!("{port}")) && out.stderr.contains("proxy"),
        "the error should name the proxy port: {out}"
    );
    let left = left_behind(&cgroup);
    assert!(left.is_empty(), "a failed start left {left:?} behind: {out}");
}

/// A daemon outside the harness, caught while it starts: its cgroup made,
/// its programs not yet loaded.
struct Starting {
    child: std::process::Child,
    dir: tempfile::TempDir,
    cgroup: String,
}

impl Starting {
    fn catch() -> Starting {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = harness::free_loopback_port().expect("a port for the proxy");
        let (cgroup, config) = standalone_config(dir.path(), port);
        let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log file");
        let mut child = Command::new(tollgate_bin())
            .arg("daemon")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("the daemon starts");
        let made = host::cgroup2_mount().join(&cgroup);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !made.exists() {
            assert!(child.try_wait().expect("the daemon").is_none(), "the daemon exited before it made its cgroup");
            assert!(Instant::now() < deadline, "the daemon made no cgroup {} within 30 s", made.display());
            std::thread::sleep(Duration::from_millis(2));
        }
        Starting { child, dir, cgroup }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "signal {signal} to the daemon");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).expect("the daemon's log")
    }

    /// Sends SIGTERM and checks the stop was clean: exit 0, and the cgroup
    /// and pinned programs removed.
    fn stop_cleanly(mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("the daemon") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the daemon did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        assert!(status.success(), "the daemon did not stop cleanly ({status}):\n{log}");
        assert!(log.contains("stopping"), "the daemon did not say it stops:\n{log}");
        let left = left_behind(&self.cgroup);
        assert!(left.is_empty(), "the daemon left {left:?} behind:\n{log}");
    }
}

/// SIGTERM while the daemon starts: it finishes starting, then stops as on
/// any SIGTERM. Killed by the signal instead, it would leave its cgroups and
/// pinned programs behind.
#[test]
fn a_daemon_stopped_while_it_starts_stops_cleanly() {
    Starting::catch().stop_cleanly();
}

/// SIGHUP (`systemctl reload`) while the daemon starts: it starts, reloads,
/// and serves; SIGHUP's default action would have killed it.
#[test]
fn a_daemon_reloaded_while_it_starts_starts_and_reloads() {
    let mut starting = Starting::catch();
    starting.signal(libc::SIGHUP);
    let socket = starting.dir.path().join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(exit) = starting.child.try_wait().expect("the daemon") {
            panic!("the daemon exited ({exit}) on SIGHUP while it started:\n{}", starting.log());
        }
        let mut status = Command::new(tollgate_bin());
        status.arg("--socket").arg(&socket).arg("status");
        if run_with_timeout(&mut status, Duration::from_secs(10)).expect("tollgate status").success()
            && starting.log().contains("reloaded")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon neither served nor reloaded within 60 s:\n{}", starting.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    starting.stop_cleanly();
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_and_leaves_the_first_alone() {
    let first = Daemon::start(POLICY);
    let token = first.mint("long-bot", &[]);
    let marker = first.dir().join(format!("still-running-{}", unique_tag()));
    let script = format!("sleep 3; touch {}", marker.display());
    std::thread::scope(|scope| {
        let session = scope.spawn(|| first.run(&token, &["/bin/sh", "-c", script.as_str()]));
        std::thread::sleep(Duration::from_millis(500));
        let mut second = Command::new(tollgate_bin());
        second.arg("daemon").arg("--config").arg(first.dir().join("config.yaml"));
        let out = run_with_timeout(&mut second, Duration::from_secs(60)).expect("the second daemon runs");
        assert_eq!(out.code(), Some(1), "a second daemon must not start: {out}");
        assert!(out.stderr.contains("already listening"), "the refusal should say why: {out}");
        let finished = session.join().expect("session thread");
        assert_eq!(finished.code(), Some(0), "the first daemon's session was disturbed: {finished}");
    });
    assert!(marker.exists(), "the first daemon's session did not finish its work");
}

/// The daemon turns transparent huge pages off for itself (its allocator
/// keeps less memory that way). `run` must not: the setting is inherited
/// across exec, so the governed command gets what its caller has.
#[test]
fn the_daemons_memory_setting_stays_with_the_daemon() {
    let daemon = Daemon::start(POLICY);
    let thp_enabled = |status: &str| {
        status.lines().find_map(|line| line.strip_prefix("THP_enabled:")).map(|value| value.trim().to_owned())
    };
    let own = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("the daemon's status");
    assert_eq!(thp_enabled(&own).as_deref(), Some("0"), "the daemon keeps huge pages off:\n{own}");
    let caller = std::fs::read_to_string("/proc/self/status").expect("this process's status");
    let callers = thp_enabled(&caller);
    assert_eq!(callers.as_deref(), Some("1"), "the caller has huge pages on, or this test proves nothing:\n{caller}");
    let token = daemon.mint("thp-bot", &[]);
    let out = daemon.run(&token, &["cat", "/proc/self/status"]);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(thp_enabled(&out.stdout), callers, "the governed command's setting is not its caller's: {out}");
}

/// Loading the kernel programs frees tens of MB (the BPF object, the
/// kernel's BTF); a daemon at rest has handed them back. Kept, its
/// anonymous memory was 60 MB and more; handed back, about 25 MB.
#[test]
fn a_daemon_at_rest_has_handed_back_what_its_start_freed() {
    const MOST_ANON_KB: u64 = 40 * 1024;
    let daemon = Daemon::start(POLICY);
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("the daemon's status");
    let anon_kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no RssAnon in the daemon's status:\n{status}"));
    assert!(anon_kb <= MOST_ANON_KB, "the daemon holds {anon_kb} kB of anonymous memory at rest:\n{status}");
}
