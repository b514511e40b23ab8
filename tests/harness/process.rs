//! Running child processes with a deadline, so a hung command fails its test instead of hanging
//! the whole suite.

use std::fmt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, bail};

/// What a finished command did.
#[derive(Debug)]
pub struct RunOutput {
    /// Pid of the process we spawned (for `tollgate run`, the parent of the session's first
    /// process).
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl RunOutput {
    /// The exit code, or `None` when the process was killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The first line of stdout. Test commands print `$TOLLGATE_SESSION` first, so this is how
    /// they learn which session they ran in.
    pub fn first_line(&self) -> &str {
        self.stdout.lines().next().unwrap_or("")
    }

    /// Whether some stdout line is exactly `line`.
    pub fn has_stdout_line(&self, line: &str) -> bool {
        self.stdout.lines().any(|l| l == line)
    }
}

impl fmt::Display for RunOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} finished with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.pid, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with stdin closed and stdout/stderr captured, failing if it takes longer than
/// `timeout`.
///
/// Output is collected until both pipes reach EOF, which also waits for any background process
/// that inherited them.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> anyhow::Result<RunOutput> {
    let description = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {description}"))?;
    let pid = child.id();

    // std has no wait-with-timeout; wait on a helper thread and time out on the channel.
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        // The receiver is gone only if we already timed out; nothing is left to report to.
        let _ = sender.send(child.wait_with_output());
    });
    match receiver.recv_timeout(timeout) {
        Ok(result) => {
            let output = result.with_context(|| format!("waiting for {description}"))?;
            Ok(RunOutput {
                pid,
                status: output.status,
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
        Err(_) => {
            // Best effort: stop our own child so it does not outlive the test. The helper thread
            // reaps the child only after both pipes close, so the pid still names our child
            // unless everything finished in the instant since the timeout fired.
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            bail!("{description} (pid {pid}) did not finish within {timeout:?}; killed it")
        }
    }
}
