//! The client side of the control socket (blocking: the CLI has no runtime).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
};

use super::protocol::{Request, Response};

/// Sends one request and reads the response.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the tollgate daemon at {} (is it running? set --socket or TOLLGATE_SOCKET)",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).context("cannot send request to the daemon")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).context("cannot read the daemon's answer")?;
    if answer.is_empty() {
        anyhow::bail!("the daemon closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid JSON")
}
