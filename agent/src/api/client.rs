//! The client side of the control socket (blocking: the CLI has no runtime).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use super::protocol::{Request, Response};

/// No daemon answers on the control socket.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the tollgate daemon at {path} (is it running? set --socket or TOLLGATE_SOCKET): {source}")]
pub struct Unreachable {
    /// The socket.
    pub path: String,
    /// Why.
    pub source: std::io::Error,
}

/// Connects and sends one request.
fn send(socket: &Path, request: &Request) -> anyhow::Result<UnixStream> {
    use anyhow::Context;
    let mut stream =
        UnixStream::connect(socket).map_err(|source| Unreachable { path: socket.display().to_string(), source })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).context("cannot send request to the daemon")?;
    Ok(stream)
}

/// Sends one request and reads the response.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    let stream = send(socket, request)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).context("cannot read the daemon's answer")?;
    if answer.is_empty() {
        anyhow::bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid JSON")
}

/// Sends one request and reads the response, with the descriptor the
/// daemon attached to it (a recorded session's terminal), and the
/// connection, which then carries that terminal's traffic.
pub fn call_with_fd(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<(Response, Option<std::os::fd::OwnedFd>, UnixStream)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use anyhow::Context;
    let stream = send(socket, request)?;
    // Read byte-wise up to the newline: what follows belongs to the terminal.
    let mut answer = Vec::new();
    let mut fd = None;
    loop {
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut slices = [std::io::IoSliceMut::new(&mut byte)];
        let message = nix::sys::socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut slices,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        )
        .context("cannot read the daemon's answer")?;
        for cmsg in message.cmsgs().context("cannot read the daemon's answer")? {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = cmsg {
                for raw in fds {
                    // SAFETY: SCM_RIGHTS gave this process a new descriptor that nothing else owns.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        if message.bytes == 0 {
            break;
        }
        answer.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    if answer.is_empty() {
        anyhow::bail!("the daemon closed the connection without answering");
    }
    let response = serde_json::from_slice(&answer).context("the daemon's answer is not valid JSON")?;
    Ok((response, fd, stream))
}
