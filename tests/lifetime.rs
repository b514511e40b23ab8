//! How long a session lives: an identity's `max_session` ends it, and a
//! reviewer can revoke it now. Either way its processes are killed (a
//! marker file the command would write later never appears) and the record
//! says who or what ended it.

use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::proxy::REVIEWERS;
use harness::session_log::pretty;
use harness::{Daemon, RunOutput, run_with_timeout, unique_tag};
use serde_json::Value;

fn policy(max_session: &str) -> String {
    format!(
        "identities:\n  - name: timed-bots\n    issuer: tollgate-dev\n    allow_root: true\n{max_session}grants:\n  - name: timed\n    identity: timed-bots\n    network:\n      allow: [\"127.0.0.0/8\"]\n"
    )
}

/// The session's events of kind `session`.
fn lifecycle_events(detail: &Value) -> Vec<Value> {
    detail["events"].as_array().into_iter().flatten().filter(|e| e["kind"] == "session").cloned().collect()
}

/// A command that names its session, then would write `marker` after 30 s.
fn long_command(marker: &Path) -> Vec<String> {
    let script = format!("echo \"$TOLLGATE_SESSION\"; sleep 30; touch {}", marker.display());
    vec!["/bin/sh".into(), "-c".into(), script]
}

fn cli(daemon: &Daemon, args: &[&str]) -> RunOutput {
    let mut command = Command::new(harness::tollgate_bin());
    command.arg("--socket").arg(daemon.socket()).args(args);
    run_with_timeout(&mut command, Duration::from_secs(30)).expect("tollgate runs")
}

#[test]
fn a_session_ends_at_its_identitys_max_session() {
    let daemon = Daemon::start(&policy("    max_session: 2s\n"));
    let token = daemon.mint("timed-bot", &[]);
    let marker = daemon.dir().join(format!("late-{}", unique_tag()));
    let started = Instant::now();
    let out = daemon.run(&token, &long_command(&marker));
    assert!(started.elapsed() < Duration::from_secs(25), "the session outlived its max_session: {out}");
    assert_eq!(out.code(), Some(77), "run exits with the ended-by-policy code: {out}");
    assert!(out.stderr.contains("max_session"), "and says why: {out}");
    thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists(), "the command went on after its session expired");
    let id = out.first_line().to_owned();
    let detail = daemon.show_until(&id, "the session's end", |d| d["session"]["ended_at"].is_string());
    let events = lifecycle_events(&detail);
    assert_eq!(events.len(), 1, "one expiry event: {}", pretty(&detail));
    assert_eq!(events[0]["verdict"], "expired", "{}", pretty(&detail));
    assert_eq!(events[0]["max_session_secs"], 2, "{}", pretty(&detail));
}

#[test]
fn a_bad_max_session_is_refused_with_its_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("timed.yaml");
    std::fs::write(&file, policy("    max_session: soon\n")).expect("policy written");
    let out = cli_check(&file);
    assert_eq!(out.code(), Some(1), "{out}");
    // serde reports a bad value at the identity it belongs to.
    assert!(out.stderr.contains("timed.yaml:2:5: identities[0]"), "names the file and the identity: {out}");
    assert!(format!("{out}").contains("duration 'soon' is not valid"), "says what is wrong: {out}");
}

fn cli_check(file: &Path) -> RunOutput {
    let mut command = Command::new(harness::tollgate_bin());
    command.args(["policy", "check"]).arg(file);
    run_with_timeout(&mut command, Duration::from_secs(30)).expect("tollgate runs")
}

#[test]
fn a_reviewer_revokes_a_live_session_and_nobody_else_can() {
    let daemon = Daemon::builder().policy(&policy("")).config_line(REVIEWERS).start();
    let token = daemon.mint("revoked-bot", &[]);
    let marker = daemon.dir().join(format!("late-{}", unique_tag()));
    let id_file = daemon.dir().join(format!("id-{}", unique_tag()));
    let script = format!("echo \"$TOLLGATE_SESSION\" > {}; sleep 30; touch {}", id_file.display(), marker.display());
    let out = thread::scope(|scope| {
        let session = scope.spawn(|| daemon.run(&token, &["/bin/sh", "-c", script.as_str()]));
        let deadline = Instant::now() + Duration::from_secs(20);
        let id = loop {
            if let Ok(text) = std::fs::read_to_string(&id_file)
                && text.ends_with('\n')
            {
                break text.trim().to_owned();
            }
            assert!(Instant::now() < deadline, "the session never started");
            thread::sleep(Duration::from_millis(50));
        };

        // Not a reviewer: refused, and the session goes on.
        let mut nobody = Command::new("setpriv");
        nobody
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(harness::tollgate_bin())
            .arg("--socket")
            .arg(daemon.socket())
            .args(["revoke", id.as_str()]);
        let refused = run_with_timeout(&mut nobody, Duration::from_secs(30)).expect("setpriv runs");
        assert_eq!(refused.code(), Some(1), "{refused}");
        assert!(refused.stderr.contains("not a reviewer"), "{refused}");
        // From inside a session, even as a reviewer's uid: refused.
        let bin = harness::tollgate_bin();
        let inside = daemon.run(
            &token,
            &[
                bin.to_str().expect("UTF-8 path"),
                "--socket",
                daemon.socket().to_str().expect("UTF-8 path"),
                "revoke",
                id.as_str(),
            ],
        );
        assert_eq!(inside.code(), Some(1), "{inside}");
        assert!(inside.stderr.contains("inside a session"), "{inside}");
        assert!(!session.is_finished(), "a refused revoke ended the session");

        let revoked = cli(&daemon, &["revoke", id.as_str(), "--reason", "job cancelled"]);
        assert_eq!(revoked.code(), Some(0), "{revoked}");
        assert!(revoked.stdout.contains(&id), "{revoked}");
        let again = cli(&daemon, &["revoke", id.as_str()]);
        assert_eq!(again.code(), Some(1), "revoking twice is refused: {again}");
        session.join().expect("the session thread")
    });
    assert_eq!(out.code(), Some(77), "run exits with the ended-by-policy code: {out}");
    assert!(out.stderr.contains("session revoked by root: job cancelled"), "and says why: {out}");
    thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists(), "the command went on after its session was revoked");
    let id = std::fs::read_to_string(&id_file).expect("id").trim().to_owned();
    let detail = daemon.show_until(&id, "the session's end", |d| d["session"]["ended_at"].is_string());
    let events = lifecycle_events(&detail);
    assert_eq!(events.len(), 1, "one revocation: {}", pretty(&detail));
    assert_eq!(events[0]["verdict"], "revoked", "{}", pretty(&detail));
    assert_eq!(events[0]["by"], "root", "{}", pretty(&detail));
    assert_eq!(events[0]["reason"], "job cancelled", "{}", pretty(&detail));
}
