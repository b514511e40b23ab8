//! A recorded session's terminal. For identities with `record_output`, the
//! daemon opens a pseudo-terminal, keeps its master, and hands only the
//! slave to the command (passed over the control socket), so what the
//! session's terminal shows passes through the daemon: it is recorded
//! (masked, up to a cap) with its timing, and relayed to the caller, whose
//! keystrokes are relayed back. Nothing the caller's client says about the
//! output is trusted: it never handles the master.

use std::{io, os::fd::OwnedFd, time::Duration};

use serde_json::{Map, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, unix::AsyncFd},
    net::UnixStream,
};

use crate::store::{RecordKind, SessionId, SessionLog};

/// A pseudo-terminal pair.
pub struct Terminal {
    /// The daemon's end.
    pub master: OwnedFd,
    /// The command's end.
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `rows` x `cols`.
pub fn open(rows: u16, cols: u16) -> io::Result<Terminal> {
    let size = nix::pty::Winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 };
    let pair = nix::pty::openpty(Some(&size), None).map_err(io::Error::from)?;
    Ok(Terminal { master: pair.master, slave: pair.slave })
}

/// Output waits this long for the rest of its line before it is recorded.
const LINE_WAIT: Duration = Duration::from_millis(200);

/// Turns terminal output into masked, capped `output` records.
pub struct OutputRecorder {
    log: SessionLog,
    session: SessionId,
    masks: Vec<(regex::Regex, String)>,
    cap: usize,
    recorded: usize,
    pending: Vec<u8>,
    truncated: bool,
}

impl OutputRecorder {
    /// Records `session`'s output, masked with `masks`, up to `cap` bytes.
    pub fn new(log: SessionLog, session: SessionId, masks: Vec<(regex::Regex, String)>, cap: usize) -> Self {
        Self { log, session, masks, cap, recorded: 0, pending: Vec::new(), truncated: false }
    }

    /// Takes output; whole lines are recorded at once (masks see whole lines).
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        if let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') {
            let lines: Vec<u8> = self.pending.drain(..=end).collect();
            self.record(&lines);
        }
        // A line longer than this is recorded in pieces.
        if self.pending.len() >= 4096 {
            let piece = std::mem::take(&mut self.pending);
            self.record(&piece);
        }
    }

    /// Records what is left (the end of output, or a line that waited long enough).
    pub fn flush(&mut self) {
        if !self.pending.is_empty() {
            let piece = std::mem::take(&mut self.pending);
            self.record(&piece);
        }
    }

    fn record(&mut self, bytes: &[u8]) {
        if self.truncated {
            return;
        }
        let mut text = String::from_utf8_lossy(bytes).into_owned();
        for (regex, replace) in &self.masks {
            text = regex.replace_all(&text, replace.as_str()).into_owned();
        }
        let mut detail = Map::new();
        if self.recorded + text.len() > self.cap {
            let room = self.cap.saturating_sub(self.recorded);
            let cut = (0..=room.min(text.len())).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            text.truncate(cut);
            self.truncated = true;
            detail.insert("truncated".into(), Value::Bool(true));
            detail.insert("cap_bytes".into(), self.cap.into());
        }
        self.recorded += text.len();
        detail.insert("data".into(), text.into());
        self.log.noted(&self.session, RecordKind::Output, detail);
    }
}

/// Relays between the terminal's master and the caller's connection until
/// the command and everything else holding the terminal is gone, recording
/// the output. A caller that goes away does not stop the recording.
/// Notices for the session (denials, its end by policy) are shown to the
/// caller between the output, and not recorded as output.
pub async fn relay(
    master: OwnedFd,
    mut client: UnixStream,
    mut recorder: OutputRecorder,
    mut notices: tokio::sync::mpsc::Receiver<super::Notice>,
) {
    if nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    // SAFETY: the AsyncFd owns the master for as long as it is registered.
    let Ok(master) = (unsafe { AsyncFd::register(master) }) else { return };
    let mut from_client = [0u8; 4096];
    // The caller's input may end (EOF) while its output still flows.
    let (mut input_open, mut output_open) = (true, true);
    let mut buffer = [0u8; 8192];
    loop {
        tokio::select! {
            ready = master.readable() => {
                let Ok(mut guard) = ready else { break };
                match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buffer).map_err(io::Error::from)) {
                    Ok(Ok(0)) | Ok(Err(_)) => break, // EIO: no process holds the terminal any more
                    Ok(Ok(n)) => {
                        recorder.push(&buffer[..n]);
                        if output_open && client.write_all(&buffer[..n]).await.is_err() {
                            output_open = false;
                        }
                    }
                    Err(_would_block) => continue,
                }
            }
            read = client.read(&mut from_client), if input_open => {
                match read {
                    Ok(0) | Err(_) => {
                        // The caller's input ended: end-of-file for the terminal (^D).
                        input_open = false;
                        let _ = write_all(&master, &[0x04]).await;
                    }
                    Ok(n) => {
                        let _ = write_all(&master, &from_client[..n]).await;
                    }
                }
            }
            Some(notice) = notices.recv() => {
                let text = match notice {
                    super::Notice::Denied { text } | super::Notice::Ending { text } => text,
                    super::Notice::Ended => continue,
                };
                if output_open && client.write_all(format!("\r\ntollgate: {text}\r\n").as_bytes()).await.is_err() {
                    output_open = false;
                }
            }
            () = tokio::time::sleep(LINE_WAIT) => recorder.flush(),
        }
    }
    recorder.flush();
    let _ = client.shutdown().await;
}

async fn write_all(master: &AsyncFd<OwnedFd>, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), bytes).map_err(io::Error::from)) {
            Ok(Ok(n)) => bytes = &bytes[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}
