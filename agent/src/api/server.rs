//! The daemon side of the control socket.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::Context;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::protocol::{ErrorKind, MAX_REQUEST_BYTES, Request, Response};
use crate::{
    daemon::{Caller, Daemon},
    store::{SessionId, StoreError},
};

/// Binds the control socket. Anyone may connect (mode 0666): every request
/// is authorized by the caller's credentials, and opening a session needs a
/// valid token. A stale socket file is replaced; a live daemon is not.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another tollgate daemon is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}

/// Accepts connections until the daemon stops.
pub async fn serve(daemon: Arc<Daemon>, listener: UnixListener) -> anyhow::Result<()> {
    loop {
        let (stream, _) = listener.accept().await.context("control socket accept failed")?;
        let daemon = daemon.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(daemon, stream).await {
                tracing::debug!(error = %e, "control connection failed");
            }
        });
    }
}

async fn handle(daemon: Arc<Daemon>, stream: UnixStream) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let (Some(pid), uid) = (cred.pid(), cred.uid()) else {
        anyhow::bail!("peer has no pid");
    };
    let caller = Caller { pid: pid as u32, uid };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES)).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => dispatch(&daemon, caller, request).await,
        Err(e) => Response::error(ErrorKind::BadRequest, format!("malformed request: {e}")),
    };
    let mut out = serde_json::to_string(&response)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    Ok(())
}

async fn dispatch(daemon: &Arc<Daemon>, caller: Caller, request: Request) -> Response {
    match request {
        Request::Run { token, pid, command } => daemon.open_session(caller, token, pid, command).await,
        Request::Status => Response::Ok(daemon.status()),
        Request::Sessions => {
            let reader = daemon.reader().clone();
            match tokio::task::spawn_blocking(move || reader.sessions()).await {
                Ok(Ok(sessions)) => {
                    let visible: Vec<_> = sessions.into_iter().filter(|s| may_read(caller, s.uid)).collect();
                    Response::Ok(serde_json::to_value(visible).unwrap_or_default())
                }
                Ok(Err(e)) => Response::error(ErrorKind::Internal, e.to_string()),
                Err(e) => Response::error(ErrorKind::Internal, e.to_string()),
            }
        }
        Request::Show { session } => {
            let id: SessionId = match session.parse() {
                Ok(id) => id,
                Err(e) => return Response::error(ErrorKind::BadRequest, e),
            };
            let reader = daemon.reader().clone();
            match tokio::task::spawn_blocking(move || reader.show(&id)).await {
                Ok(Ok(detail)) if may_read(caller, detail.session.uid) => {
                    Response::Ok(serde_json::to_value(detail).unwrap_or_default())
                }
                Ok(Ok(detail)) => Response::error(ErrorKind::NotFound, format!("no session '{}'", detail.session.id)),
                Ok(Err(e @ StoreError::NoSuchSession(_))) => Response::error(ErrorKind::NotFound, e.to_string()),
                Ok(Err(e)) => Response::error(ErrorKind::Internal, e.to_string()),
                Err(e) => Response::error(ErrorKind::Internal, e.to_string()),
            }
        }
    }
}

/// Root reads every session; other users read their own.
fn may_read(caller: Caller, session_uid: u32) -> bool {
    caller.uid == 0 || caller.uid == session_uid
}
