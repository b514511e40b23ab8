//! The command line as people and scripts use it: pipes that close early.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use harness::Daemon;
use harness::enforcement::{ALLOW_ALL, BUILD_BOTS, policy, strings};

/// `tollgate show SESSION | head -1` ends quietly: no panic, no error
/// message, just the end of a program whose reader went away.
#[test]
fn commands_end_quietly_when_their_reader_goes_away() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("pipe-bot", BUILD_BOTS);
    // Enough events that `show` writes far more than a pipe buffer holds.
    let out =
        daemon.run(&token, &["/bin/sh", "-c", "echo \"$TOLLGATE_SESSION\"; for i in $(seq 1500); do /bin/true; done"]);
    let id = out.first_line().to_owned();
    daemon.show_until(&id, "the session's end", |detail| detail["session"]["ended_at"].is_string());
    let mut show = Command::new(harness::tollgate_bin())
        .arg("--socket")
        .arg(daemon.socket())
        .args(["show", id.as_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tollgate show starts");
    let mut first = String::new();
    let stdout = show.stdout.take().expect("stdout");
    BufReader::new(stdout).read_line(&mut first).expect("a first line");
    // The reader goes away: the BufReader (and the pipe) dropped above.
    let output = show.wait_with_output().expect("tollgate show ends");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(first.starts_with("session"), "the first line is the session: {first:?}");
    assert!(stderr.is_empty(), "a closed pipe made tollgate say something: {stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        output.status.success() || output.status.signal() == Some(libc::SIGPIPE),
        "tollgate ended with {:?} on a closed pipe",
        output.status
    );
}

/// Global options appear only where they are used: `--socket` before a command that does not talk
/// to the daemon is a usage error (64) naming the command, the top-level help does not offer it,
/// the help of commands that talk to the daemon does, and the daemon listens where its
/// configuration says even when `TOLLGATE_SOCKET` (meant for clients) is set.
#[test]
fn the_socket_option_appears_only_where_it_is_used() {
    let tollgate = |args: &[&str]| {
        let mut cmd = Command::new(harness::tollgate_bin());
        cmd.args(args);
        harness::run_with_timeout(&mut cmd, std::time::Duration::from_secs(30)).expect("tollgate runs")
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, "grants: []\n").expect("policy");
    let out = tollgate(&["--socket", "/tmp/nowhere.sock", "policy", "check", file.to_str().expect("path")]);
    assert_eq!(out.code(), Some(64), "{out}");
    assert!(out.stderr.contains("not `policy check`"), "{out}");
    let out = tollgate(&["--socket", "/tmp/nowhere.sock", "token", "mint", "--sub", "x"]);
    assert_eq!(out.code(), Some(64), "{out}");
    let help = tollgate(&["--help"]);
    assert!(help.success() && !help.stdout.contains("--socket"), "{help}");
    for command in ["sessions", "run", "approve"] {
        let help = tollgate(&[command, "--help"]);
        assert!(help.stdout.contains("--socket"), "{command} --help: {help}");
    }
    let help = tollgate(&["policy", "check", "--help"]);
    assert!(!help.stdout.contains("--socket"), "{help}");

    let elsewhere = dir.path().join("elsewhere.sock");
    let daemon = Daemon::builder()
        .policy(&policy(&strings(ALLOW_ALL), &[], &[]))
        .env("TOLLGATE_SOCKET", elsewhere.to_str().expect("path"))
        .start();
    assert!(daemon.socket().exists() && !elsewhere.exists(), "the daemon listened where a client variable said");
}
