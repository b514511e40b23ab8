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

use super::EXIT_TOKEN_REFUSED;
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
    // SAFETY: this process is single-threaded (the CLI starts no runtime), so
    // the child may allocate and use std before it executes.
    match unsafe { fork() }.context("cannot fork")? {
        ForkResult::Child => {
            drop(hold_write);
            let code = held_child(hold_read, &argv);
            // SAFETY: leave without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(hold_read);
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
            };
            let answer = client::call(socket, &request);
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
                        Err(e) => Err(e),
                    };
                }
            };
            release(hold_write, &session)?;
            wait(child)
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
fn held_child(hold_read: OwnedFd, argv: &[CString]) -> i32 {
    let mut session = String::new();
    let mut pipe = std::fs::File::from(hold_read);
    if pipe.read_to_string(&mut session).is_err() || !session.ends_with('\n') {
        return 126;
    }
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
