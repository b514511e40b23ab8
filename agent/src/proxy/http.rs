//! HTTP/1.1 through the proxy: block, hold for approval, inject the
//! credential, forward, mask, record.
//!
//! Bodies stream through, bounded by [`MAX_BODY`], except where a rule must
//! see all of one first: a request body when a matcher looks at bodies, a
//! response body when masks apply. Those are read into memory within the
//! same bound; a larger one is refused and never half-forwarded. A declared
//! length over the bound is refused before the upstream is contacted.

use std::{
    convert::Infallible,
    os::unix::fs::MetadataExt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{self, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::{net::TcpStream, sync::Mutex};

use super::{
    Governed,
    body::{Counted, ProxyBody, full},
    rules::{RequestView, Unmaskable, blocked_by, mask, needs_approval, normalize_path},
};
use crate::{
    approval::{self, Decision},
    daemon::Daemon,
    policy::route::{Credential, Route, RouteTarget},
};

/// Largest request or response body the proxy passes on.
pub const MAX_BODY: usize = 64 << 20;

/// Headers some frameworks take as the request's real method.
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// Why a request is ambiguous, if it is: its path or headers could be read
/// differently by the upstream than by the proxy's rules.
fn ambiguity(
    headers: &hyper::HeaderMap,
    raw_path: &str,
    method: &hyper::Method,
    route: &Route,
) -> Option<&'static str> {
    if !raw_path.is_ascii() {
        return Some("the path is not ASCII");
    }
    let path_only = raw_path.split('?').next().unwrap_or("");
    let lower = path_only.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || path_only.contains('\\') || path_only.contains(';') {
        return Some("the path holds an encoded slash, a backslash or a ';' parameter");
    }
    if has_bad_escape(path_only) {
        return Some("the path holds a malformed percent escape");
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Some("more than one Host header");
    }
    if route.credential.is_some()
        && (method.as_str().eq_ignore_ascii_case("TRACE") || method.as_str().eq_ignore_ascii_case("TRACK"))
    {
        return Some("TRACE would echo the injected credential back");
    }
    let body_rules = has_body_rules(route);
    let encoded = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"));
    if body_rules && encoded {
        return Some("a content-encoded body cannot be checked by body rules");
    }
    None
}

fn has_bad_escape(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%' && !(i + 2 < bytes.len() && bytes[i + 1].is_ascii_hexdigit() && bytes[i + 2].is_ascii_hexdigit())
    })
}

/// Does a rule of the route look at request bodies?
fn has_body_rules(route: &Route) -> bool {
    route.block.iter().chain(&route.approve).any(|m| m.body.is_some())
}

/// Routes whose answers are read whole before the client sees them: masked
/// ones, and those with a credential (scrubbed of it in case it is echoed).
fn scrubs_response(route: &Route) -> bool {
    !route.mask.is_empty() || route.credential.is_some()
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Replaces every occurrence of `secret` in `body`.
fn scrub(body: &[u8], secret: &str) -> (Vec<u8>, usize) {
    let needle = secret.as_bytes();
    let (mut out, mut found, mut i) = (Vec::with_capacity(body.len()), 0, 0);
    while i < body.len() {
        if body[i..].starts_with(needle) {
            out.extend_from_slice(b"[credential removed]");
            found += 1;
            i += needle.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    (out, found)
}

/// Headers that belong to one hop, never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

type Upstream = Arc<Mutex<Option<SendRequest<ProxyBody>>>>;

/// Serves one governed client connection (keep-alive: many requests).
pub async fn serve(daemon: Arc<Daemon>, governed: Governed, stream: TcpStream) {
    let upstream: Upstream = Arc::default();
    let service = service_fn(move |request| {
        let (daemon, governed, upstream) = (daemon.clone(), governed.clone(), upstream.clone());
        async move { Ok::<_, Infallible>(exchange(daemon, &governed, &upstream, request).await) }
    });
    // A client that never finishes its headers must not hold a connection forever.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
        tracing::debug!(error = %e, "governed HTTP connection ended with an error");
    }
}

/// What the record says of one exchange.
struct Record {
    detail: Map<String, Value>,
    started: Instant,
}

impl Record {
    fn new(governed: &Governed, method: &str, path: &str, host: &str) -> Self {
        let mut detail = Map::new();
        detail.insert("method".into(), method.into());
        detail.insert("path".into(), path.into());
        detail.insert("host".into(), host.into());
        detail.insert("destination".into(), governed.destination.to_string().into());
        detail.insert("grant".into(), governed.route.grant.clone().into());
        detail.insert("route".into(), governed.rule_name.clone().into());
        detail.insert("rules".into(), Value::Array(Vec::new()));
        Self { detail, started: Instant::now() }
    }

    fn hit(&mut self, rule: &str) {
        if let Some(Value::Array(rules)) = self.detail.get_mut("rules") {
            rules.push(rule.into());
        }
    }

    fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.detail.insert(key.into(), value.into());
    }

    /// Records the exchange as ended by the proxy with `status`, and builds
    /// the client's answer.
    fn refuse(
        self,
        daemon: &Daemon,
        outcome: &str,
        status: StatusCode,
        governed: &Governed,
        error: &str,
        extra: Value,
    ) -> Response<ProxyBody> {
        self.finish(daemon, governed, outcome, status);
        refuse(status, governed, error, extra)
    }

    fn finish(mut self, daemon: &Daemon, governed: &Governed, outcome: &str, status: StatusCode) {
        self.set("outcome", outcome);
        self.set("status", status.as_u16());
        self.set("duration_ms", self.started.elapsed().as_secs_f64() * 1000.0);
        let verdict = match outcome {
            "forwarded" => "allow",
            "blocked" => "block",
            _ => "deny",
        };
        daemon.record_proxy_event(&governed.session, "http", verdict, self.detail);
    }
}

/// A JSON error for the client: what happened, which rule, and where to look.
fn refuse(status: StatusCode, governed: &Governed, error: &str, extra: Value) -> Response<ProxyBody> {
    let mut body = json!({
        "error": error,
        "session": governed.session,
        "grant": governed.route.grant,
        "route": governed.rule_name,
    });
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn exchange(
    daemon: Arc<Daemon>,
    governed: &Governed,
    upstream: &Upstream,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let daemon_arc = daemon.clone();
    let daemon: &Daemon = &daemon;
    let (mut parts, body) = request.into_parts();
    let method = parts.method.clone();
    let raw_path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    let route = &governed.route.route;
    // Requests whose meaning servers disagree on are refused outright, so a
    // rule cannot be read one way by the proxy and another by the upstream.
    if let Some(why) = ambiguity(&parts.headers, &raw_path, &method, route) {
        let mut record = Record::new(governed, method.as_str(), &raw_path, &host);
        record.hit(why);
        return record.refuse(
            daemon,
            "refused",
            StatusCode::BAD_REQUEST,
            governed,
            "ambiguous request refused",
            json!({"reason": why}),
        );
    }
    // Rules see, and the upstream receives, the path as servers will read it.
    let path = normalize_path(&raw_path);
    let mut record = Record::new(governed, method.as_str(), &path, &host);
    // A method override would let a POST act as the DELETE a rule blocks.
    for name in METHOD_OVERRIDES {
        parts.headers.remove(name);
    }

    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return record.refuse(
            daemon,
            "refused",
            StatusCode::PAYLOAD_TOO_LARGE,
            governed,
            "request body too large",
            json!({"limit": MAX_BODY}),
        );
    }
    // Only a rule on bodies needs the whole request before deciding.
    let needs_body = has_body_rules(route);
    let (buffered, streamed) = if needs_body {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => (Some(collected.to_bytes()), None),
            Err(_) => {
                return record.refuse(
                    daemon,
                    "refused",
                    StatusCode::PAYLOAD_TOO_LARGE,
                    governed,
                    "request body too large or unreadable",
                    json!({"limit": MAX_BODY}),
                );
            }
        }
    } else {
        (None, Some(body))
    };
    // A streamed request's size is known once it has gone through, which
    // is before the answer for the servers this proxy fronts.
    let request_bytes = Arc::new(AtomicU64::new(buffered.as_ref().map_or(0, |b| b.len() as u64)));
    // Until the body has gone through, what the client declared.
    record.set("request_bytes", buffered.as_ref().map_or(declared.unwrap_or(0), |b| b.len() as u64));

    if let RouteTarget::Host { name, .. } = &route.to {
        let asked = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h).to_ascii_lowercase();
        if &asked != name {
            return record.refuse(
                daemon,
                "blocked",
                StatusCode::FORBIDDEN,
                governed,
                "host is not the one this route governs",
                json!({"host": host, "expected": name}),
            );
        }
    }

    let view = RequestView {
        method: &method,
        path: &path,
        headers: &parts.headers,
        body: buffered.as_deref().unwrap_or_default(),
    };
    if let Some(rule) = blocked_by(route, &view) {
        record.hit(&rule);
        return record.refuse(
            daemon,
            "blocked",
            StatusCode::FORBIDDEN,
            governed,
            "blocked by policy",
            json!({"rule": rule}),
        );
    }
    if let Some(rule) = needs_approval(route, &view) {
        record.hit(&rule);
        if let Err(response) = approve(daemon, governed, &mut record, &rule, method.as_str(), &path).await {
            let status = response.status();
            record.finish(daemon, governed, "denied", status);
            return response;
        }
    }

    // Rewrite for the upstream: no hop-by-hop headers, the held credential
    // instead of whatever the client sent under that name, and no compressed
    // answers when the response must be masked.
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    if scrubs_response(route) {
        // Whole, uncompressed answers only: a compressed or partial one could
        // not be masked or scrubbed.
        parts.headers.remove(header::ACCEPT_ENCODING);
        parts.headers.remove(header::RANGE);
        parts.headers.remove(header::IF_RANGE);
    }
    let mut secret: Option<String> = None;
    if let Some(credential) = &route.credential {
        match credential_header(credential) {
            Ok((name, value)) => {
                secret = value.to_str().ok().map(str::to_owned).filter(|v| !v.is_empty());
                parts.headers.remove(&name);
                parts.headers.insert(name, value);
                record.set("credential", credential.header.clone());
            }
            Err(why) => {
                tracing::error!(session = %governed.session, %why, "credential unavailable");
                return record.refuse(
                    daemon,
                    "error",
                    StatusCode::BAD_GATEWAY,
                    governed,
                    "the credential for this destination is unavailable",
                    json!({}),
                );
            }
        }
    }
    if let Some(bytes) = &buffered {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
    parts.uri = match path.parse() {
        Ok(uri) => uri,
        Err(_) => {
            return record.refuse(
                daemon,
                "refused",
                StatusCode::BAD_REQUEST,
                governed,
                "request target is not valid",
                json!({}),
            );
        }
    };
    let forwarded_body = match (buffered, streamed) {
        (Some(bytes), _) => full(bytes),
        (None, Some(incoming)) => {
            let counter = request_bytes.clone();
            Counted::new(
                Limited::new(incoming, MAX_BODY).boxed_unsync(),
                Box::new(move |bytes, _| counter.store(bytes, Ordering::Relaxed)),
            )
            .boxed_unsync()
        }
        (None, None) => full(Bytes::new()),
    };
    let forwarded = Request::from_parts(parts, forwarded_body);

    let answer = match send(upstream, governed, forwarded).await {
        Ok(answer) => answer,
        Err(why) => {
            tracing::warn!(session = %governed.session, destination = %governed.destination, %why, "upstream failed");
            return record.refuse(
                daemon,
                "error",
                StatusCode::BAD_GATEWAY,
                governed,
                "upstream unreachable",
                json!({"detail": why}),
            );
        }
    };
    let (mut answer_parts, answer_body) = answer.into_parts();
    for name in HOP_BY_HOP {
        answer_parts.headers.remove(name);
    }
    let status = answer_parts.status;
    record.set("request_bytes", request_bytes.load(Ordering::Relaxed));
    if !scrubs_response(route) {
        // Streamed: the record is written when the body has gone through.
        let governed = governed.clone();
        let body = Counted::new(
            Limited::new(answer_body, MAX_BODY).boxed_unsync(),
            Box::new(move |bytes, complete| {
                record.set("response_bytes", bytes);
                let outcome = if complete { "forwarded" } else { "forwarded-incomplete" };
                record.finish(&daemon_arc, &governed, outcome, status);
            }),
        );
        return Response::from_parts(answer_parts, body.boxed_unsync());
    }
    let answer_body = match Limited::new(answer_body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return record.refuse(
                daemon,
                "error",
                StatusCode::BAD_GATEWAY,
                governed,
                "upstream response too large or unreadable",
                json!({"limit": MAX_BODY}),
            );
        }
    };
    // A partial or encoded answer cannot be masked or scrubbed: refuse it
    // rather than pass it on unread.
    let encoded = answer_parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("identity"));
    let json_declared = answer_parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    let masked = if status == StatusCode::PARTIAL_CONTENT || encoded {
        Err(Unmaskable)
    } else {
        mask(&route.mask, strip_bom(&answer_body), json_declared)
    };
    let Ok((mut masked, mut count)) = masked else {
        return record.refuse(
            daemon,
            "error",
            StatusCode::BAD_GATEWAY,
            governed,
            "the response could not be masked",
            json!({}),
        );
    };
    // The injected credential never goes back to the agent, even when an
    // endpoint echoes the request.
    if let Some(secret) = &secret {
        let (scrubbed, found) = scrub(&masked, secret);
        if found > 0 {
            tracing::warn!(session = %governed.session, "the upstream echoed the injected credential; removed");
            masked = scrubbed;
            count += found;
        }
        for value in answer_parts.headers.values_mut() {
            if value.to_str().is_ok_and(|v| v.contains(secret.as_str())) {
                *value = HeaderValue::from_static("[credential removed]");
                count += 1;
            }
        }
    }
    record.set("masked", count);
    let kept = masked.len().min(daemon.config().record_body_bytes);
    record.set("response_body", String::from_utf8_lossy(&masked[..kept]).into_owned());
    record.set("response_body_truncated", kept < masked.len());
    answer_parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(masked.len()));
    record.set("response_bytes", masked.len());
    record.finish(daemon, governed, "forwarded", status);
    Response::from_parts(answer_parts, full(Bytes::from(masked)))
}

/// Holds the request for a reviewer, unless a JIT window covers it.
async fn approve(
    daemon: &Daemon,
    governed: &Governed,
    record: &mut Record,
    rule: &str,
    method: &str,
    path: &str,
) -> Result<(), Response<ProxyBody>> {
    let request = approval::Request {
        session: governed.session.clone(),
        uid: governed.uid,
        identity: governed.identity.clone(),
        subject: governed.subject.clone(),
        grant: governed.route.grant.clone(),
        rule: rule.to_owned(),
        destination: governed.destination.to_string(),
        method: method.to_owned(),
        path: path.to_owned(),
    };
    let approvals = daemon.approvals();
    if approvals.window_open(&governed.session, &approval::key_of(&request)) {
        record.set("approval", "jit-window");
        return Ok(());
    }
    let Some((pending, decision)) = approvals.hold(request) else {
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            governed,
            "too many requests of this session are already waiting for approval",
            json!({"rule": rule, "limit": approval::MAX_HELD_PER_SESSION}),
        ));
    };
    // If the client goes away while held, the request stops being pending:
    // nobody can approve (or open a window with) what no longer waits.
    let _held = approval::Abandon::new(approvals, &pending.id);
    record.set("approval_id", pending.id.clone());
    daemon.announce_pending(&pending);
    tracing::info!(session = %governed.session, approval = %pending.id, method, path, "request held for approval");
    match tokio::time::timeout(approvals.timeout(), decision).await {
        Ok(Ok(Decision::Approved { by, window })) => {
            record.set("approved_by", by);
            if let Some(window) = window {
                record.set("jit_window_secs", window.as_secs());
            }
            Ok(())
        }
        Ok(Ok(Decision::Denied { by, reason })) => {
            record.set("denied_by", by.clone());
            Err(refuse(
                StatusCode::FORBIDDEN,
                governed,
                "denied by a reviewer",
                json!({"rule": rule, "approval": pending.id, "denied_by": by, "reason": reason}),
            ))
        }
        Ok(Err(_)) | Err(_) => {
            daemon.record_approval_timeout(&governed.session, &pending);
            record.set("denied_by", "timeout");
            Err(refuse(
                StatusCode::FORBIDDEN,
                governed,
                "approval timed out",
                json!({"rule": rule, "approval": pending.id, "denied_by": "timeout", "timeout_secs": approvals.timeout().as_secs()}),
            ))
        }
    }
}

/// Reads the credential; the file must belong to root and be private.
fn credential_header(credential: &Credential) -> Result<(HeaderName, HeaderValue), String> {
    let path = &credential.secret_file.0;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!("secret file {} must be owned by root and readable by root only", path.display()));
    }
    let secret =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let name = HeaderName::from_bytes(credential.header.as_bytes())
        .map_err(|_| format!("'{}' is not a header name", credential.header))?;
    let mut value = HeaderValue::from_str(secret.trim_end_matches(['\r', '\n']))
        .map_err(|_| format!("secret file {} does not hold a valid header value", path.display()))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Sends over this client connection's upstream connection, opening it
/// (again) when needed.
async fn send(
    upstream: &Upstream,
    governed: &Governed,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, String> {
    let mut slot = upstream.lock().await;
    if slot.as_ref().is_none_or(|sender| sender.is_closed()) {
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(governed.destination))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("connect failed: {e}"))?;
        let sender = match &governed.route.route.upstream_tls {
            None => {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                sender
            }
            Some(tls) => {
                let stream = super::tls::connect_upstream(governed, tls, stream).await?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                sender
            }
        };
        *slot = Some(sender);
    }
    let sender = slot.as_mut().ok_or("no upstream connection")?;
    sender.ready().await.map_err(|e| e.to_string())?;
    sender.send_request(request).await.map_err(|e| e.to_string())
}
