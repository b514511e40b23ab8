//! `tollgate run`: hold a child before it executes, have the daemon put it
//! into a new session, then let it execute the command.
//!
//! The child waits on a pipe. On success the parent writes the session id
//! into it and the child executes; on refusal the parent closes the pipe and
//! the child exits without running anything.

use std::{
    ffi::CString,
    io::{Read, Write},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use anyhow::Context;
use nix::{
    sys::{
        signal::{SigHandler, Signal, signal},
        wait::{WaitStatus, waitpid},
    },
    unistd::{ForkResult, Pid, fork, pipe},
};

use super::{EXIT_ENDED_BY_POLICY, EXIT_TOKEN_REFUSED};
use crate::api::{
    client,
    protocol::{ErrorKind, Request, Response},
};
use crate::identity::MAX_TOKEN_BYTES;

/// Whose rights the session carries, as the command line gave them.
pub enum Authority {
    /// `--token-file`.
    TokenFile(PathBuf),
    /// `--grant` (inside a session only).
    Grants(Vec<String>),
}

/// What the caller asks of the session besides its command.
pub struct Asked {
    /// Token or grants.
    pub authority: Authority,
    /// `--reason`.
    pub reason: Option<String>,
    /// `--ttl`.
    pub ttl: Option<std::time::Duration>,
}

/// Runs `command` in a session opened with the token in `token_file` (or,
/// inside a session, with some of its grants); returns the command's exit
/// code (128 + signal when a signal ended it).
pub fn run(socket: &Path, asked: Asked, command: &[String]) -> anyhow::Result<i32> {
    let (token, grants) = match asked.authority {
        Authority::TokenFile(token_file) => match read_token(&token_file)? {
            Some(token) => (Some(token), Vec::new()),
            None => return Ok(EXIT_TOKEN_REFUSED),
        },
        Authority::Grants(grants) => (None, grants),
    };
    let argv: Vec<CString> = command
        .iter()
        .map(|arg| CString::new(arg.as_bytes()))
        .collect::<Result<_, _>>()
        .context("an argument contains a NUL byte")?;

    // Set before the fork so the held child has it when the daemon checks:
    // nothing in a session may gain privileges through setuid binaries.
    // SAFETY: prctl with constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        anyhow::bail!("cannot set no_new_privs: {}", std::io::Error::last_os_error());
    }
    let (hold_read, hold_write) = pipe().context("cannot create pipe")?;
    // Where the parent hands the child a recorded session's terminal.
    let (link_parent, link_child) = std::os::unix::net::UnixStream::pair().context("cannot create socket pair")?;
    let terminal_size = terminal_size();
    // SAFETY: this process is single-threaded (the CLI starts no runtime), so
    // the child may allocate and use std before it executes.
    match unsafe { fork() }.context("cannot fork")? {
        ForkResult::Child => {
            drop(hold_write);
            drop(link_parent);
            let code = held_child(hold_read, link_child, &argv);
            // SAFETY: leave without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(hold_read);
            drop(link_child);
            // This process stays outside the session: the session's processes
            // (same uid) must not ptrace it to act from outside.
            // SAFETY: prctl with constant arguments.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
            let request = Request::Run {
                token,
                grants,
                pid: child.as_raw() as u32,
                command: command.to_vec(),
                reason: asked.reason,
                ttl_secs: asked.ttl.map(|ttl| ttl.as_secs().max(1)),
                terminal_size,
            };
            let answer = client::call_with_fd(socket, &request);
            let (answer, terminal, stream_for_notices) = match answer {
                Ok((response, Some(fd), stream)) => (Ok(response), Some((fd, stream)), None),
                Ok((response, None, stream)) => (Ok(response), None, Some(stream)),
                Err(e) => (Err(e), None, None),
            };
            let session = match answer {
                Ok(Response::Ok(body)) => body.get("session").and_then(|s| s.as_str()).unwrap_or_default().to_owned(),
                other => {
                    // Closing the pipe makes the child exit without executing.
                    drop(hold_write);
                    let _ = waitpid(child, None);
                    return match other {
                        Ok(Response::Error { kind: ErrorKind::Token, message }) => {
                            eprintln!("tollgate: token rejected: {message}");
                            Ok(EXIT_TOKEN_REFUSED)
                        }
                        Ok(Response::Error { kind: ErrorKind::Refused, message }) => {
                            eprintln!("tollgate: session refused: {message}");
                            Ok(EXIT_TOKEN_REFUSED)
                        }
                        Ok(Response::Error { message, .. }) => Err(anyhow::anyhow!("session refused: {message}")),
                        Ok(Response::Ok(_)) => unreachable!("handled above"),
                        Err(e) => Err(e.context("the command was not started")),
                    };
                }
            };
            let Some((slave, stream)) = terminal else {
                release(hold_write, &session)?;
                let notices = stream_of_notices(stream_for_notices);
                let code = wait(child)?;
                return Ok(notices.finish(code));
            };
            // The child gets the terminal before it is released.
            send_fd(&link_parent, &slave).context("cannot hand the session's terminal to the command")?;
            drop(slave);
            release(hold_write, &session)?;
            relay(stream);
            wait(child)
        }
    }
}

/// What the daemon tells `run` about its session while the command runs:
/// denials are printed as they come; how the session ended decides the
/// exit code.
struct Notices {
    ended_by_policy: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    done: Option<std::sync::mpsc::Receiver<bool>>,
}

fn stream_of_notices(stream: Option<std::os::unix::net::UnixStream>) -> Notices {
    let ended_by_policy = std::sync::Arc::new(std::sync::Mutex::new(None));
    let Some(stream) = stream else { return Notices { ended_by_policy, done: None } };
    let (tx, rx) = std::sync::mpsc::channel();
    let policy = ended_by_policy.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut ended = false;
        for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
            let Ok(notice) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let text = notice["text"].as_str().unwrap_or_default().to_owned();
            match notice["notice"].as_str() {
                Some("denied") => tell(&text),
                Some("ending") => {
                    if let Ok(mut slot) = policy.lock() {
                        slot.get_or_insert(text);
                    }
                }
                Some("ended") => {
                    ended = true;
                    break;
                }
                _ => {}
            }
        }
        let _ = tx.send(ended);
    });
    Notices { ended_by_policy, done: Some(rx) }
}

/// Says one line on stderr in a single write: the session's processes share
/// that stderr, and `eprintln!` writes a line in pieces they could land between.
fn tell(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("tollgate: {text}\n").as_bytes());
}

impl Notices {
    /// The exit code once the command exited with `code`: after the daemon
    /// says the session ended (briefly waited for, so `sessions` shows it
    /// ended once `run` returns), or that the daemon went away.
    fn finish(self, code: i32) -> i32 {
        let ended = self.done.as_ref().map(|done| done.recv_timeout(std::time::Duration::from_secs(2)));
        if let Some(Ok(false)) = ended {
            tell("the daemon went away while the session ran (its programs keep governing sessions until it is back)");
        }
        match self.ended_by_policy.lock().ok().and_then(|slot| slot.clone()) {
            Some(why) => {
                tell(&why);
                EXIT_ENDED_BY_POLICY
            }
            None => code,
        }
    }
}

/// The caller's terminal size (rows, columns), when standard output is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes a winsize into the one we pass.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

fn send_fd(link: &std::os::unix::net::UnixStream, fd: &OwnedFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    nix::sys::socket::sendmsg::<()>(
        link.as_raw_fd(),
        &[std::io::IoSlice::new(b"t")],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}

/// A recorded session's terminal, relayed: the daemon's side of it comes
/// over `stream`; our standard input goes to it (raw, when a terminal), its
/// output comes to our standard output.
fn relay(stream: std::os::unix::net::UnixStream) {
    let raw = RawMode::enter();
    if let Ok(mut to_daemon) = stream.try_clone() {
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let _ = std::io::copy(&mut stdin, &mut to_daemon);
            let _ = to_daemon.shutdown(std::net::Shutdown::Write);
        });
    }
    let mut from_daemon = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buffer = [0u8; 8192];
    loop {
        match from_daemon.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout.write_all(&buffer[..n]).and_then(|()| stdout.flush()).is_err() {
                    break;
                }
            }
        }
    }
    drop(raw);
}

/// The caller's terminal in raw mode while a recorded session runs (its
/// keys go to the session's terminal as typed); restored when dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else { return Self(None) };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, saved);
        }
    }
}

/// The token in `token_file`; `None` (after saying why) when it cannot be one.
fn read_token(token_file: &Path) -> anyhow::Result<Option<String>> {
    let mut token = String::new();
    std::fs::File::open(token_file)
        .and_then(|file| file.take(MAX_TOKEN_BYTES as u64 * 2).read_to_string(&mut token))
        .with_context(|| format!("cannot read token file {}", token_file.display()))?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        anyhow::bail!("token file {} is empty", token_file.display());
    }
    if token.len() > MAX_TOKEN_BYTES {
        eprintln!(
            "tollgate: token rejected: token file {} holds more than {MAX_TOKEN_BYTES} bytes; is it a token?",
            token_file.display()
        );
        return Ok(None);
    }
    Ok(Some(token))
}

/// The terminal the parent handed over, if it did (it is queued by now).
fn receive_fd(link: &std::os::unix::net::UnixStream) -> Option<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut slices = [std::io::IoSliceMut::new(&mut byte)];
    let message = nix::sys::socket::recvmsg::<()>(
        link.as_raw_fd(),
        &mut slices,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_DONTWAIT,
    )
    .ok()?;
    let fd = message.cmsgs().ok()?.find_map(|cmsg| match cmsg {
        nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
        _ => None,
    })?;
    // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `terminal` the controlling terminal and standard streams of a new session.
fn take_terminal(terminal: OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    if nix::unistd::setsid().is_err() {
        return false;
    }
    // SAFETY: TIOCSCTTY on a terminal descriptor we own; no pointers.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return false;
    }
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(terminal.as_raw_fd(), target) } < 0 {
            return false;
        }
    }
    true
}

fn release(hold_write: OwnedFd, session: &str) -> anyhow::Result<()> {
    let mut pipe = std::fs::File::from(hold_write);
    pipe.write_all(format!("{session}\n").as_bytes()).context("cannot release the held command")
}

/// Like `system()`: the terminal's Ctrl-C goes to the command; we wait for it.
fn wait(child: Pid) -> anyhow::Result<i32> {
    // SAFETY: setting dispositions to ignore is async-signal-safe and affects only us.
    unsafe {
        let _ = signal(Signal::SIGINT, SigHandler::SigIgn);
        let _ = signal(Signal::SIGQUIT, SigHandler::SigIgn);
    }
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(anyhow::anyhow!("cannot wait for the command: {e}")),
        }
    }
}

/// The child: wait for the session id, then execute. Exit codes follow the
/// shell's: 126 not released or not allowed to run, 127 no such command.
fn held_child(hold_read: OwnedFd, link: std::os::unix::net::UnixStream, argv: &[CString]) -> i32 {
    let mut session = String::new();
    let mut pipe = std::fs::File::from(hold_read);
    if pipe.read_to_string(&mut session).is_err() || !session.ends_with('\n') {
        return 126;
    }
    // A recorded session: its terminal was handed over before the release.
    if let Some(terminal) = receive_fd(&link)
        && !take_terminal(terminal)
    {
        return 126;
    }
    drop(link);
    // SAFETY: single-threaded child; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("TOLLGATE_SESSION", session.trim()) };
    drop(pipe);
    let Some(program) = argv.first() else { return 127 };
    let Err(error) = nix::unistd::execvp(program, argv);
    eprintln!("tollgate: cannot execute {}: {error}", program.to_string_lossy());
    // As shells do: 127 when there is no such command, 126 when it may not run
    // (a denied exec under BPF LSM fails with EPERM).
    if error == nix::errno::Errno::ENOENT { 127 } else { 126 }
}
