//! Enforcement outlives the daemon. Killed with SIGKILL, or stopped for a
//! handover (SIGUSR2), the daemon leaves its programs and maps pinned: a
//! running session's denied connects and execs stay refused with no daemon
//! alive (checked on the receiving side: a listener that counts arrivals,
//! a marker file the denied binary would write). The next daemon adopts
//! the session, records the gap and goes on recording it; a session that
//! ended meanwhile is closed in the record. A clean stop leaves nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use harness::enforcement::{BUILD_BOTS, policy, strings};
use harness::net::Listener;
use harness::session_log::pretty;
use harness::{Daemon, RunOutput};
use serde_json::Value;
use tempfile::TempDir;

/// A session's steps, driven by files the test creates.
struct Script {
    dir: TempDir,
    denied_bin: PathBuf,
}

impl Script {
    fn new() -> Script {
        let dir = tempfile::Builder::new().prefix("tollgate-survival-").tempdir().expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        // A copy of touch: denied by the policy; if it ever runs, its marker appears.
        let denied_bin = dir.path().join("denied-touch");
        fs::copy("/usr/bin/touch", &denied_bin).expect("copy touch");
        Script { dir, denied_bin }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Names its session, then at each `go-N` file: tries the denied connect
    /// and the denied exec, then runs an allowed marker exec, and says `done-N`.
    fn argv(&self, port: u16, rounds: u32) -> Vec<String> {
        let d = self.dir.path().display();
        let script = format!(
            r#"echo "$TOLLGATE_SESSION" > {d}/id.tmp && mv {d}/id.tmp {d}/id
for n in $(seq 1 {rounds}); do
  while [ ! -e {d}/go-$n ]; do sleep 0.05; done
  (exec 3<>/dev/tcp/127.0.0.2/{port}) 2>/dev/null && echo "connect-$n=ok" >> {d}/log || echo "connect-$n=refused" >> {d}/log
  {denied} {d}/denied-ran-$n 2>/dev/null
  /bin/echo after-round-$n > /dev/null
  touch {d}/done-$n
done"#,
            denied = self.denied_bin.display(),
        );
        vec!["/bin/bash".into(), "-c".into(), script]
    }

    fn wait_for(&self, name: &str) -> String {
        let path = self.path(name);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !path.exists() {
            assert!(Instant::now() < deadline, "the session never wrote {name}");
            thread::sleep(Duration::from_millis(20));
        }
        fs::read_to_string(&path).unwrap_or_default().trim().to_owned()
    }

    /// Lets round `n` run and waits for it.
    fn round(&self, n: u32) {
        fs::write(self.path(&format!("go-{n}")), "").expect("go");
        self.wait_for(&format!("done-{n}"));
    }
}

/// Loopback allowed except the listener's address; the copied touch denied.
fn start(script: &Script) -> Daemon {
    Daemon::start(&policy(&strings(["127.0.0.0/8"]), &strings(["127.0.0.2/32"]), &[script.denied_bin.as_path()]))
}

fn gap_events(detail: &Value) -> Vec<Value> {
    detail["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "session" && e["verdict"] == "daemon-gap")
        .cloned()
        .collect()
}

fn pinned_links(daemon: &Daemon) -> usize {
    let dir = Path::new("/sys/fs/bpf").join(daemon.cgroup_name());
    fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|layout| fs::read_dir(layout.path().join("links")).ok())
        .map(|links| links.count())
        .sum()
}

/// Runs the session in a thread; `body` gets the session id while it runs.
fn with_session(
    daemon: &mut Daemon,
    script: &Script,
    argv: Vec<String>,
    body: impl FnOnce(&mut Daemon, &str),
) -> RunOutput {
    let token = daemon.mint("survivor", BUILD_BOTS);
    let socket = daemon.socket().to_owned();
    let bin = harness::tollgate_bin();
    let session = thread::spawn(move || {
        let mut command = std::process::Command::new(bin);
        command.arg("--socket").arg(socket).arg("run").arg("--token-file").arg(token).arg("--").args(argv);
        harness::run_with_timeout(&mut command, Duration::from_secs(60)).expect("tollgate run")
    });
    let id = script.wait_for("id");
    body(daemon, &id);
    session.join().expect("the session thread")
}

#[test]
fn a_killed_daemons_session_stays_governed_and_is_adopted() {
    let listener = Listener::bind("127.0.0.2");
    let script = Script::new();
    let mut daemon = start(&script);
    assert_eq!(daemon.status()["enforcement_survives_daemon"], true, "{}", pretty(&daemon.status()));
    let argv = script.argv(listener.port(), 3);
    let out = with_session(&mut daemon, &script, argv, |daemon, id| {
        script.round(1);
        daemon.kill_hard();
        assert!(pinned_links(daemon) > 0, "no links are pinned after the daemon died");
        // No daemon: the kernel still refuses what the policy forbids.
        script.round(2);
        daemon.restart();
        assert_eq!(daemon.status()["sessions_active"], 1, "the session was not adopted: {}", pretty(&daemon.status()));
        script.round(3);
        let detail = daemon.show_until(id, "round 3's exec", |d| {
            d["events"].as_array().into_iter().flatten().any(|e| e["kind"] == "exec" && e["argv"][1] == "after-round-3")
        });
        let gaps = gap_events(&detail);
        assert_eq!(gaps.len(), 1, "one gap event: {}", pretty(&detail));
        assert_eq!(gaps[0]["outcome"], "adopted", "{}", pretty(&detail));
        assert!(
            gaps[0]["daemon_last_alive"].is_string(),
            "the gap says when the daemon was last alive: {}",
            pretty(&detail)
        );
    });
    assert_eq!(out.code(), Some(0), "{out}");
    let log = fs::read_to_string(script.path("log")).expect("the session's log");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        ["connect-1=refused", "connect-2=refused", "connect-3=refused"],
        "{log}"
    );
    assert_eq!(listener.take_connections(), 0, "a denied connect reached the listener");
    for n in 1..=3 {
        assert!(!script.path(&format!("denied-ran-{n}")).exists(), "the denied binary ran in round {n}");
    }
    let id = script.wait_for("id");
    let detail = daemon.show_until(&id, "the session's end", |d| d["session"]["ended_at"].is_string());
    assert!(detail["session"]["ended_at"].is_string(), "{}", pretty(&detail));
}

#[test]
fn a_session_that_ended_while_no_daemon_ran_is_closed_in_the_record() {
    let listener = Listener::bind("127.0.0.2");
    let script = Script::new();
    let mut daemon = start(&script);
    let argv = script.argv(listener.port(), 1);
    let mut session_id = String::new();
    let out = with_session(&mut daemon, &script, argv, |daemon, id| {
        session_id = id.to_owned();
        daemon.kill_hard();
        script.round(1);
    });
    assert_eq!(out.code(), Some(0), "{out}");
    // Its last process has exited, with no daemon to see it.
    thread::sleep(Duration::from_millis(300));
    daemon.restart();
    let detail = daemon.show_until(&session_id, "the session's end", |d| d["session"]["ended_at"].is_string());
    let gaps = gap_events(&detail);
    assert_eq!(gaps.len(), 1, "{}", pretty(&detail));
    assert_eq!(gaps[0]["outcome"], "ended while no daemon ran", "{}", pretty(&detail));
    assert_eq!(daemon.status()["sessions_active"], 0);
    assert_eq!(listener.take_connections(), 0, "a denied connect reached the listener");
    assert!(!script.path("denied-ran-1").exists(), "the denied binary ran");
}

#[test]
fn a_handover_keeps_sessions_governed_and_a_clean_stop_removes_everything() {
    let listener = Listener::bind("127.0.0.2");
    let script = Script::new();
    let mut daemon = start(&script);
    let cgroup = daemon.status()["cgroup"].as_str().expect("cgroup").to_owned();
    let argv = script.argv(listener.port(), 2);
    let out = with_session(&mut daemon, &script, argv, |daemon, _| {
        let status = daemon.handover();
        assert!(status.success(), "the handover stop failed: {status}");
        assert!(pinned_links(daemon) > 0, "a handover must leave the programs pinned");
        script.round(1);
        daemon.restart();
        assert_eq!(daemon.status()["sessions_active"], 1);
        script.round(2);
    });
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(listener.take_connections(), 0, "a denied connect reached the listener");
    assert!(!script.path("denied-ran-1").exists() && !script.path("denied-ran-2").exists(), "the denied binary ran");
    let pins = Path::new("/sys/fs/bpf").join(daemon.cgroup_name());
    let report = daemon.stop();
    assert!(report.status.success(), "{}", report.log);
    assert!(!pins.exists(), "a clean stop left pins in {}", pins.display());
    assert!(!Path::new(&cgroup).exists(), "a clean stop left the cgroup {cgroup}");
}
