//! The daemon side of the control socket.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use super::{
    errors::reply,
    protocol::{ErrorKind, MAX_REQUEST_BYTES, Request, Response},
};
use crate::{
    approval::{Decision, Reviews},
    session::{Authority, Caller, OpenRequest, Placement, Sessions},
    store::{Reader, SessionId, StoreError},
};

/// What the control socket serves from: the daemon hands it these handles.
pub struct Control {
    /// Opening sessions, and where callers run.
    pub sessions: Arc<Sessions>,
    /// Held requests and who may decide them.
    pub reviews: Arc<Reviews>,
    /// The session log, read-only.
    pub reader: Reader,
    /// Chains with more levels than this are a review finding.
    pub review_depth: u32,
    /// Signs reports (the session log's chain key).
    pub ledger_key: Option<Arc<crate::store::ledger::LedgerKey>>,
    /// Records recorded sessions' terminal output.
    pub log: crate::store::SessionLog,
    /// Terminal output recorded per session at most.
    pub output_cap_bytes: usize,
    /// What `tollgate status` shows, made by the daemon.
    pub status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The servers the sessions' resolver asks (`policy explain` asks them too).
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

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
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    Ok(listener)
}

/// Requests served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// A client has this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until the daemon stops. Accept errors (out of file
/// descriptors, say) are logged and retried: a flood of clients must not
/// stop enforcement.
pub async fn serve(control: Arc<Control>, listener: UnixListener) -> anyhow::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.context("connection limit closed")?;
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let control = control.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(control, stream, permit).await {
                tracing::debug!(error = %e, "control connection failed");
            }
        });
    }
}

/// Serves one connection. The `permit` (one of the connections served at
/// once) is given back as soon as the request is answered: a `run`
/// connection that stays open to carry notices or a terminal does not hold one.
async fn handle(
    control: Arc<Control>,
    stream: UnixStream,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let (Some(pid), uid) = (cred.pid(), cred.uid()) else {
        anyhow::bail!("peer has no pid");
    };
    let caller = Caller { pid: pid as u32, uid };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line))
        .await
        .context("no request within the time limit")??;
    let reply = if line.len() as u64 >= MAX_REQUEST_BYTES && !line.ends_with('\n') {
        Reply::Plain(Response::error(ErrorKind::BadRequest, format!("request larger than {MAX_REQUEST_BYTES} bytes")))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Run { token, grants, pid, command, reason, ttl_secs, terminal_size }) => {
                let request = RunRequest { token, grants, pid, command, reason, ttl_secs, terminal_size };
                run(&control, caller, request).await
            }
            Ok(request) => Reply::Plain(dispatch(&control, caller, request).await),
            Err(e) => Reply::Plain(Response::error(ErrorKind::BadRequest, format!("malformed request: {e}"))),
        }
    };
    let line = |response: &Response| -> anyhow::Result<String> {
        let mut out = serde_json::to_string(response)?;
        out.push('\n');
        Ok(out)
    };
    match reply {
        Reply::Plain(response) => {
            write.write_all(line(&response)?.as_bytes()).await?;
            Ok(())
        }
        Reply::Watched(response, notices) => {
            write.write_all(line(&response)?.as_bytes()).await?;
            drop(permit);
            let read = reader.into_inner().into_inner();
            let stream = read.reunite(write).map_err(|_| anyhow::anyhow!("cannot rejoin the connection"))?;
            tell(stream, notices).await;
            Ok(())
        }
        Reply::Terminal(response, terminal, recorder, notices) => {
            // The answer carries the terminal's slave; the connection then
            // carries the terminal's traffic both ways.
            send_with_fd(write.as_ref(), line(&response)?.as_bytes(), &terminal.slave).await?;
            drop(terminal.slave);
            drop(permit);
            let read = reader.into_inner().into_inner();
            let stream = read.reunite(write).map_err(|_| anyhow::anyhow!("cannot rejoin the connection"))?;
            crate::session::terminal::relay(terminal.master, stream, recorder, notices).await;
            Ok(())
        }
    }
}

/// Passes a session's notices to its `tollgate run`, one JSON line each,
/// until the session ends or the client goes.
async fn tell(mut stream: UnixStream, mut notices: tokio::sync::mpsc::Receiver<crate::session::Notice>) {
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            notice = notices.recv() => {
                let Some(notice) = notice else { break };
                let ended = notice == crate::session::Notice::Ended;
                let Ok(mut text) = serde_json::to_string(&notice) else { break };
                text.push('\n');
                if stream.write_all(text.as_bytes()).await.is_err() || ended {
                    break;
                }
            }
            read = stream.read(&mut probe) => {
                if matches!(read, Ok(0) | Err(_)) {
                    break;
                }
            }
        }
    }
}

/// What a `run` asks, as received.
struct RunRequest {
    token: Option<String>,
    grants: Vec<String>,
    pid: u32,
    command: Vec<String>,
    reason: Option<String>,
    ttl_secs: Option<u64>,
    terminal_size: Option<(u16, u16)>,
}

/// An answer; for an opened session, its notices to pass on; for a session
/// with a recorded terminal, that terminal too.
enum Reply {
    Plain(Response),
    Watched(Response, tokio::sync::mpsc::Receiver<crate::session::Notice>),
    Terminal(
        Response,
        crate::session::terminal::Terminal,
        crate::session::terminal::OutputRecorder,
        tokio::sync::mpsc::Receiver<crate::session::Notice>,
    ),
}

/// Opens a session; for a recorded one, also its terminal.
async fn run(control: &Control, caller: Caller, request: RunRequest) -> Reply {
    let RunRequest { token, grants, pid, command, reason, ttl_secs, terminal_size } = request;
    let authority = match (token, grants.is_empty()) {
        (Some(token), true) => Authority::Token(token),
        (None, false) => Authority::Grants(grants),
        (Some(_), false) => {
            return Reply::Plain(Response::error(ErrorKind::BadRequest, "give either a token or grants, not both"));
        }
        (None, true) => {
            return Reply::Plain(Response::error(
                ErrorKind::BadRequest,
                "a session needs a token (or, inside a session, grants)",
            ));
        }
    };
    let ttl = ttl_secs.map(Duration::from_secs);
    let opened = match control.sessions.open(caller, OpenRequest { authority, pid, command, reason, ttl }).await {
        Ok(opened) => opened,
        Err(e) => return Reply::Plain(reply::<()>(Err(e))),
    };
    let notices = control.sessions.watch(&opened.session);
    if !opened.record_output {
        return Reply::Watched(Response::Ok(serde_json::to_value(&opened).unwrap_or_default()), notices);
    }
    let (rows, cols) = terminal_size.unwrap_or((24, 80));
    match crate::session::terminal::open(rows, cols) {
        Ok(terminal) => {
            let masks = control.sessions.output_masks(&opened.session);
            let recorder = crate::session::terminal::OutputRecorder::new(
                control.log.clone(),
                opened.session.clone(),
                masks,
                control.output_cap_bytes,
            );
            Reply::Terminal(
                Response::Ok(serde_json::to_value(&opened).unwrap_or_default()),
                terminal,
                recorder,
                notices,
            )
        }
        Err(e) => {
            // The held child is never released: it exits and the session ends empty.
            tracing::error!(session = %opened.session, error = %e, "cannot open a recorded session's terminal");
            Reply::Plain(Response::error(ErrorKind::Internal, format!("cannot open the session's terminal: {e}")))
        }
    }
}

/// Writes `bytes` with `fd` attached (SCM_RIGHTS) to the first of them.
async fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: &std::os::fd::OwnedFd) -> anyhow::Result<()> {
    use std::os::fd::{AsRawFd, RawFd};
    let fds: [RawFd; 1] = [fd.as_raw_fd()];
    let mut sent = 0;
    while sent == 0 {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            let slices = [std::io::IoSlice::new(bytes)];
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
            nix::sys::socket::sendmsg::<()>(
                stream.as_raw_fd(),
                &slices,
                &cmsg,
                nix::sys::socket::MsgFlags::empty(),
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => sent = n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        stream.writable().await?;
        match stream.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn dispatch(control: &Control, caller: Caller, request: Request) -> Response {
    // A process inside a session may read its own session's record, no other.
    // Only reading records asks where the caller runs.
    let placement = || control.sessions.placement(caller.pid);
    let may_read = |placement: &Placement, uid: u32, id: &SessionId| -> bool {
        match placement {
            Placement::Inside(own) => own.as_ref() == Some(id),
            Placement::Outside => caller.uid == 0 || caller.uid == uid,
        }
    };
    match request {
        // Handled before dispatch: its answer may carry a terminal.
        Request::Run { .. } => Response::error(ErrorKind::Internal, "run is answered apart"),
        Request::Grants { since, until } => {
            let (reviews, sessions, reader) =
                (control.reviews.clone(), control.sessions.clone(), control.reader.clone());
            blocking(move || match reviews.reviewer(caller) {
                Ok(_) => reply(sessions.grant_views(&reader, day(&since), day(&until))),
                Err(e) => reply::<()>(Err(e)),
            })
            .await
        }
        Request::RenewGrant { grant } => {
            let by = match reviewer(control, caller).await {
                Ok(by) => by,
                Err(response) => return response,
            };
            reply(
                control
                    .sessions
                    .renew_grant(&grant, by)
                    .await
                    .map(|()| serde_json::json!({"grant": grant, "state": "active"})),
            )
        }
        Request::RevokeGrant { grant, reason } => {
            let by = match reviewer(control, caller).await {
                Ok(by) => by,
                Err(response) => return response,
            };
            reply(
                control
                    .sessions
                    .revoke_grant(&grant, by, reason)
                    .await
                    .map(|()| serde_json::json!({"grant": grant, "state": "revoked"})),
            )
        }
        Request::Review(query) => {
            let (reviews, sessions, reader) =
                (control.reviews.clone(), control.sessions.clone(), control.reader.clone());
            let depth = control.review_depth;
            blocking(move || match reviews.reviewer(caller) {
                Ok(_) => reply(crate::review::run(
                    &sessions.policies(),
                    |since, until| sessions.grant_views(&reader, since, until),
                    &reader,
                    depth,
                    &query,
                )),
                Err(e) => reply::<()>(Err(e)),
            })
            .await
        }
        Request::Status => Response::Ok((control.status)()),
        // Deciding who is a reviewer asks the user and group databases
        // (NSS: maybe LDAP): off the runtime.
        Request::Approvals => {
            let reviews = control.reviews.clone();
            blocking(move || reply(reviews.pending(caller))).await
        }
        Request::Approve { id, window_secs } => {
            let reviews = control.reviews.clone();
            let decision = Decision::Approved { by: String::new(), window: window_secs.map(Duration::from_secs) };
            blocking(move || reply(reviews.decide(caller, &id, decision))).await
        }
        Request::Windows => {
            let reviews = control.reviews.clone();
            blocking(move || reply(reviews.windows(caller))).await
        }
        Request::CloseWindow { id } => {
            let reviews = control.reviews.clone();
            blocking(move || reply(reviews.close_window(caller, &id))).await
        }
        Request::Deny { id, reason } => {
            let reviews = control.reviews.clone();
            let decision = Decision::Denied { by: String::new(), reason };
            blocking(move || reply(reviews.decide(caller, &id, decision))).await
        }
        Request::Revoke { session, reason } => {
            let id: SessionId = match session.parse() {
                Ok(id) => id,
                Err(e) => return Response::error(ErrorKind::BadRequest, e),
            };
            let (reviews, sessions) = (control.reviews.clone(), control.sessions.clone());
            blocking(move || match reviews.reviewer(caller) {
                Ok(by) => reply(sessions.revoke(&id, by, reason)),
                Err(e) => reply::<()>(Err(e)),
            })
            .await
        }
        Request::Replay { session } => {
            let id: SessionId = match session.parse() {
                Ok(id) => id,
                Err(e) => return Response::error(ErrorKind::BadRequest, e),
            };
            let reader = control.reader.clone();
            match tokio::task::spawn_blocking(move || reader.timeline(&id)).await {
                Ok(Ok((sessions, events))) if may_read(&placement(), sessions[0].uid, &sessions[0].id) => {
                    Response::Ok(serde_json::json!({"sessions": sessions, "events": events}))
                }
                Ok(Ok((sessions, _))) => reply::<()>(Err(StoreError::NoSuchSession(sessions[0].id.to_string()))),
                Ok(Err(e)) => reply::<()>(Err(e)),
                Err(e) => Response::error(ErrorKind::Internal, e.to_string()),
            }
        }
        Request::Verify { session, since, key } => {
            let session: Option<SessionId> = match session.map(|s| s.parse()).transpose() {
                Ok(id) => id,
                Err(e) => return Response::error(ErrorKind::BadRequest, e),
            };
            let Some(public) = key.or_else(|| control.ledger_key.as_ref().map(|k| k.public_text())) else {
                return Response::error(ErrorKind::Internal, "the daemon has no ledger key to verify with");
            };
            let (reviews, reader) = (control.reviews.clone(), control.reader.clone());
            // Root outside sessions may read the log file anyway; others must be reviewers.
            let root = caller.uid == 0 && placement() == Placement::Outside;
            blocking(move || match if root { Ok(String::new()) } else { reviews.reviewer(caller) } {
                Ok(_) => reply(reader.verify(session.as_ref(), since.as_deref(), &public)),
                Err(e) => reply::<()>(Err(e)),
            })
            .await
        }
        Request::Report(query) => {
            let (reviews, sessions, reader) =
                (control.reviews.clone(), control.sessions.clone(), control.reader.clone());
            let (depth, key) = (control.review_depth, control.ledger_key.clone());
            blocking(move || match reviews.reviewer(caller) {
                Ok(_) => reply(crate::report::build(
                    &sessions.policies(),
                    |since, until| sessions.grant_views(&reader, since, until),
                    &reader,
                    depth,
                    &query,
                    key.as_deref(),
                )),
                Err(e) => reply::<()>(Err(e)),
            })
            .await
        }
        Request::Explain { identity, to, exec, sql } => {
            let sessions = control.sessions.clone();
            let upstreams = control.dns_upstreams.clone();
            blocking(move || {
                let withdrawn = sessions.withdrawn_grants();
                let exec = exec.map(std::path::PathBuf::from);
                match crate::policy::explain::explain_lines(
                    &sessions.policies(),
                    &withdrawn,
                    &identity,
                    to.as_deref(),
                    exec.as_deref(),
                    sql.as_deref(),
                    // The resolver's servers, else the host's own view (/etc/hosts included).
                    &|name, port| match crate::dns::lookup(&upstreams, name, port) {
                        Ok(found) if !found.is_empty() => Ok(found),
                        _ => crate::policy::explain::resolve_with_libc(name, port),
                    },
                ) {
                    Ok(lines) => Response::Ok(serde_json::json!({"lines": lines})),
                    Err(why) => Response::error(ErrorKind::BadRequest, why),
                }
            })
            .await
        }
        Request::Sessions => {
            let reader = control.reader.clone();
            match tokio::task::spawn_blocking(move || reader.sessions()).await {
                Ok(Ok(sessions)) => {
                    let here = placement();
                    let visible: Vec<_> = sessions.into_iter().filter(|s| may_read(&here, s.uid, &s.id)).collect();
                    Response::Ok(serde_json::to_value(visible).unwrap_or_default())
                }
                Ok(Err(e)) => reply::<()>(Err(e)),
                Err(e) => Response::error(ErrorKind::Internal, e.to_string()),
            }
        }
        Request::Show { session } => {
            let id: SessionId = match session.parse() {
                Ok(id) => id,
                Err(e) => return Response::error(ErrorKind::BadRequest, e),
            };
            let reader = control.reader.clone();
            match tokio::task::spawn_blocking(move || reader.show(&id)).await {
                Ok(Ok(detail)) if may_read(&placement(), detail.session.uid, &detail.session.id) => {
                    Response::Ok(serde_json::to_value(detail).unwrap_or_default())
                }
                // Another's session is reported as absent, not as forbidden.
                Ok(Ok(detail)) => reply::<()>(Err(StoreError::NoSuchSession(detail.session.id.to_string()))),
                Ok(Err(e)) => reply::<()>(Err(e)),
                Err(e) => Response::error(ErrorKind::Internal, e.to_string()),
            }
        }
    }
}

/// The reviewer's name, or the reply refusing a caller who is none.
async fn reviewer(control: &Control, caller: Caller) -> Result<String, Response> {
    let reviews = control.reviews.clone();
    match tokio::task::spawn_blocking(move || reviews.reviewer(caller)).await {
        Ok(Ok(by)) => Ok(by),
        Ok(Err(e)) => Err(reply::<()>(Err(e))),
        Err(e) => Err(Response::error(ErrorKind::Internal, e.to_string())),
    }
}

/// The UTC day (`YYYY-MM-DD`) of an RFC 3339 time.
fn day(at: &str) -> &str {
    at.get(..10).unwrap_or(at)
}

/// Runs `work` on the blocking pool; a failed task is an internal error.
async fn blocking(work: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Response::error(ErrorKind::Internal, format!("request failed: {e}")))
}
