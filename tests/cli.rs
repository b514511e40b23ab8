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
