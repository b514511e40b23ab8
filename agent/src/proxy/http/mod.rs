//! HTTP/1.1 through the proxy: admit (ambiguity, block, hold for
//! approval), rewrite (hop-by-hop headers, credential), forward, answer
//! (stream, or mask and scrub), record.
//!
//! Bodies stream through with no size limit and constant memory, except
//! where a rule must see all of one first: a request body when a matcher
//! looks at bodies, a response body when masks apply. Those are read into
//! memory within [`MAX_BODY`]; a larger one is refused (413 for a request,
//! 502 with the reason for a response) and never half-forwarded. A declared
//! length over the bound is refused before the upstream is contacted.

mod admission;
mod pool;
mod response;
mod rewrite;
mod upgrade;

use pool::Kept;
pub use pool::UpstreamPool;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Incoming},
    client::conn::http1::SendRequest,
    header,
    header::HeaderValue,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::Mutex};
use tracing::Instrument;

use super::{
    Governed, ProxyCtx,
    body::{BoxError, Counted, Gated, ProxyBody, full},
    record::{Outcome, ProxyRecord},
    rules::normalize_path,
};
use crate::policy::route::Route;
use admission::AdmittedBody;

/// Largest request or response body the proxy reads whole (for a rule).
pub const MAX_BODY: usize = 64 << 20;
/// Headers a request or an answer may have: more than servers commonly
/// accept (nginx takes about as many as fit in 32 KiB). A request with more
/// gets 431 with a body naming the limit.
pub const MAX_HEADERS: usize = 1000;
/// What the HTTP parser takes before it answers 431 itself (with no body):
/// a hundred above [`MAX_HEADERS`], so a request just past the limit gets
/// the proxy's own answer naming it. No more: the parser sets aside room
/// for this many headers on every request, and four times as many cost a
/// tenth of the proxy's throughput.
const PARSER_MAX_HEADERS: usize = MAX_HEADERS + 100;

/// Routes whose answers are read whole before the client sees them: masked
/// ones, and those with a credential (scrubbed of it in case it is echoed).
fn scrubs_response(route: &Route) -> bool {
    !route.mask.is_empty() || route.credential.is_some()
}

/// A client connection's upstream connection.
struct Upstream {
    current: Mutex<Option<Kept>>,
    /// The proxy thread that serves the client connection (and drives the
    /// upstream connections it opens).
    thread: usize,
}

/// Serves one governed client connection (keep-alive: many requests).
/// `thread`: the proxy thread it runs on.
pub async fn serve(ctx: Arc<ProxyCtx>, governed: Governed, stream: TcpStream, thread: usize) {
    // Shared by the connection's requests and their answers' bodies, not
    // copied into each (its chain and names are a dozen allocations).
    let governed = Arc::new(governed);
    let upstream = Arc::new(Upstream { current: Mutex::new(None), thread });
    let (pool, governed_here, upstream_here) = (ctx.http_upstreams.clone(), governed.clone(), upstream.clone());
    let service = service_fn(move |request: Request<Incoming>| {
        let (ctx, governed, upstream) = (ctx.clone(), governed.clone(), upstream.clone());
        // Debug level: at info, a span per request cost 3% of the proxy's
        // time; refusals log their method and path themselves, and the
        // connection's span names the session.
        let span = tracing::debug_span!("request", method = %request.method(), path = %request.uri().path());
        async move { Ok::<_, Infallible>(exchange(ctx, &governed, &upstream, request).await) }.instrument(span)
    });
    // The stream has TCP_NODELAY from its listener. A client that never
    // finishes its headers must not hold a connection forever.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_headers(PARSER_MAX_HEADERS);
    if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).with_upgrades().await {
        tracing::debug!(error = %e, "governed HTTP connection ended with an error");
    }
    // The session's next client connection may use it.
    if let Some(kept) = upstream_here.current.lock().await.take() {
        pool.keep(&governed_here, kept);
    }
}

/// A request the proxy answers itself: how the exchange ends, and what the client is told.
pub struct Refusal {
    outcome: Outcome,
    status: StatusCode,
    error: &'static str,
    extra: Value,
}

impl Refusal {
    fn new(outcome: Outcome, status: StatusCode, error: &'static str, extra: Value) -> Self {
        Self { outcome, status, error, extra }
    }

    fn with_error(mut self, error: &'static str) -> Self {
        self.error = error;
        self
    }

    /// Writes the record and builds the client's answer: a JSON error
    /// saying what happened, which rule, and where to look.
    fn answer(self, ctx: &ProxyCtx, governed: &Governed, record: ProxyRecord) -> Response<ProxyBody> {
        record.finish_exchange(&ctx.log, governed, self.outcome, self.status);
        let mut body = json!({
            "error": self.error,
            "session": governed.session,
            "grant": governed.route.grant,
            "route": governed.rule_name,
        });
        if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), self.extra) {
            body.extend(extra);
        }
        let mut response = Response::new(full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// One request: admit, rewrite, send, answer. Whatever happens, one record.
async fn exchange(
    ctx: Arc<ProxyCtx>,
    governed: &Arc<Governed>,
    upstream: &Upstream,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    // The client's side of an upgrade is taken before the request is split.
    let upgrade = upgrade::asked(&request).map(|protocol| (protocol, hyper::upgrade::on(&mut request)));
    let (mut parts, body) = request.into_parts();
    let head = parts.method == hyper::Method::HEAD;
    let method = parts.method.clone();
    let raw_path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let host = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
    // Requests whose meaning servers disagree on are refused outright, so a
    // rule cannot be read one way by the proxy and another by the upstream.
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let ambiguous =
        admission::ambiguity(&parts.headers, &raw_path, authority.as_deref(), &parts.method, &governed.route.route);
    if let Some(why) = ambiguous {
        let mut record = ProxyRecord::exchange(governed, &parts.method, &raw_path, &host);
        record.hit(why);
        let refusal = Refusal::new(
            Outcome::Refused,
            StatusCode::BAD_REQUEST,
            "ambiguous request refused",
            json!({"reason": why}),
        );
        return refusal.answer(&ctx, governed, record);
    }
    // Rules see, and the upstream receives, the path as servers will read it.
    let path = normalize_path(&raw_path);
    let mut record = ProxyRecord::exchange(governed, &parts.method, &path, &host);
    if parts.headers.len() > MAX_HEADERS {
        let refusal = Refusal::new(
            Outcome::Refused,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too many request headers",
            json!({"limit": MAX_HEADERS, "headers": parts.headers.len()}),
        );
        return refusal.answer(&ctx, governed, record);
    }
    let admitted = match admission::admit(&ctx, governed, &mut parts, body, &path, &host, &mut record).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.answer(&ctx, governed, record),
    };
    let buffered_len = match &admitted {
        AdmittedBody::Buffered(bytes) => Some(bytes.len()),
        AdmittedBody::Streamed(_) => None,
    };
    let mut tunnel_slot = None;
    if let Some((protocol, _)) = &upgrade {
        let allowed = upgrade::allowed(&governed.route.route, protocol, &mut record).and_then(|()| upgrade::slot(&ctx));
        match allowed {
            Ok(permit) => tunnel_slot = Some(permit),
            Err(refusal) => return refusal.answer(&ctx, governed, record),
        }
    }
    let secret = match rewrite::rewrite(&ctx, governed, &mut parts, &path, buffered_len, &mut record).await {
        Ok(secret) => secret,
        Err(refusal) => return refusal.answer(&ctx, governed, record),
    };
    if let Some((protocol, _)) = &upgrade {
        upgrade::restore_headers(&mut parts.headers, protocol);
    }
    // A streamed request's size is known once it has gone through, which
    // is before the answer for the servers this proxy fronts.
    let request_bytes = Arc::new(AtomicU64::new(buffered_len.unwrap_or(0) as u64));
    // A request whose body is held whole (or has none) can be sent again.
    let replay = match &admitted {
        AdmittedBody::Buffered(bytes) => Some(bytes.clone()),
        AdmittedBody::Streamed(incoming) if incoming.is_end_stream() => Some(Bytes::new()),
        AdmittedBody::Streamed(_) => None,
    }
    .filter(|_| upgrade.is_none())
    .map(|body| Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body,
    });
    // `Expect: 100-continue`: the client's body is read only once the
    // upstream asks for it, so an upstream that refuses (413, 401) never
    // receives any of it, and the client hears its answer.
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let mut continue_gate = None;
    let forwarded_body = match admitted {
        AdmittedBody::Buffered(bytes) => full(bytes),
        AdmittedBody::Streamed(incoming) => {
            let counter = request_bytes.clone();
            let counted = Counted::new(
                incoming.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync(),
                Box::new(move |bytes, _| counter.store(bytes, Ordering::Relaxed)),
            )
            .boxed_unsync();
            if expects_continue && !counted.is_end_stream() {
                let (open, gate) = tokio::sync::oneshot::channel();
                continue_gate = Some(Arc::new(std::sync::Mutex::new(Some(open))));
                Gated::new(counted, gate).boxed_unsync()
            } else {
                counted
            }
        }
    };
    let mut forwarded = Request::from_parts(parts, forwarded_body);
    if let Some(gate) = &continue_gate {
        let gate = gate.clone();
        hyper::ext::on_informational(&mut forwarded, move |answer| {
            if answer.status() == StatusCode::CONTINUE
                && let Some(open) = gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
            {
                let _ = open.send(true);
            }
        });
    }
    let answer = match send(&ctx, upstream, governed, forwarded, replay).await {
        Ok(answer) => answer,
        Err(why) => {
            tracing::warn!(%why, "upstream failed");
            let refusal =
                Refusal::new(Outcome::Error, StatusCode::BAD_GATEWAY, "upstream unreachable", json!({"detail": why}));
            return refusal.answer(&ctx, governed, record);
        }
    };
    if let (Some((_, client)), Some(permit)) = (upgrade, tunnel_slot)
        && answer.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let closing = ProxyRecord::exchange(governed, &method, &path, &host);
        return upgrade::tunnel(&ctx, governed, answer, client, record, closing, permit);
    }
    // A final answer without `100 Continue`: the request's body is abandoned
    // (and with it that upstream connection), but only once the answer has
    // been read, so the client gets all of the upstream's refusal.
    let unasked: Option<response::Held> = match &continue_gate {
        Some(gate) => {
            gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take().map(|open| Box::new(open) as _)
        }
        None => None,
    };
    let sent = response::Sent { secret, request_bytes: &request_bytes, head, held: unasked };
    match response::respond(&ctx, governed, answer, record, sent).await {
        Ok(response) => response,
        Err((record, refusal)) => refusal.answer(&ctx, governed, record),
    }
}

/// How the proxy speaks HTTP/1.1 to upstreams.
fn client_builder() -> hyper::client::conn::http1::Builder {
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.max_headers(MAX_HEADERS);
    builder
}

/// A request that can be sent again: its head and a body held whole.
pub struct Replay {
    method: hyper::Method,
    uri: hyper::Uri,
    version: hyper::Version,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Replay {
    fn request(&self) -> Request<ProxyBody> {
        let mut request = Request::new(full(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Methods that change nothing, so sending one twice is harmless. (PUT and
/// DELETE are idempotent in theory, but an approved DELETE that ran once
/// must not run again with one record.)
fn safe(method: &hyper::Method) -> bool {
    use hyper::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method)
}

/// Opens a connection to the upstream (TLS where the route originates it).
async fn connect(ctx: &ProxyCtx, governed: &Governed) -> Result<SendRequest<ProxyBody>, String> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(governed.destination))
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| format!("connect failed: {e}"))?;
    // Small exchanges must not wait for Nagle and delayed ACKs to meet.
    let _ = stream.set_nodelay(true);
    let sender = match &governed.route.route.upstream_tls {
        None => {
            let (sender, connection) =
                client_builder().handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            sender
        }
        Some(tls) => {
            let stream = crate::proxy::tls::connect_upstream(ctx, governed, tls, stream).await?;
            let (sender, connection) =
                client_builder().handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            sender
        }
    };
    Ok(sender)
}

/// Sends over this client connection's upstream connection, opening it
/// (again) when needed. A kept-alive connection the server closed just as
/// the request went out is replaced and the request sent once more, as
/// HTTP clients do: a safe one (GET, HEAD, OPTIONS, TRACE, with `replay`)
/// whenever it failed that way, any other only when it was not sent at all.
async fn send(
    ctx: &ProxyCtx,
    upstream: &Upstream,
    governed: &Governed,
    request: Request<ProxyBody>,
    replay: Option<Replay>,
) -> Result<Response<Incoming>, String> {
    let opened = |sender| Some(Kept { sender, home: upstream.thread });
    let mut slot = upstream.current.lock().await;
    let mut reused = true;
    if slot.as_ref().is_none_or(|kept| kept.sender.is_closed()) {
        *slot = match ctx.http_upstreams.take(upstream.thread, governed) {
            Some(kept) => Some(kept),
            None => {
                reused = false;
                opened(connect(ctx, governed).await?)
            }
        };
    }
    let kept = slot.as_mut().ok_or("no upstream connection")?;
    if kept.sender.ready().await.is_err() {
        // Closed before anything was sent: a new connection, whatever the method.
        *slot = opened(connect(ctx, governed).await?);
        reused = false;
    }
    let sender = &mut slot.as_mut().ok_or("no upstream connection")?.sender;
    let failed = match sender.send_request(request).await {
        Ok(answer) => return Ok(answer),
        Err(e) => e,
    };
    let stale = reused && (failed.is_canceled() || failed.is_incomplete_message());
    let Some(replay) = replay.filter(|r| stale && (failed.is_canceled() || safe(&r.method))) else {
        return Err(failed.to_string());
    };
    tracing::info!(error = %failed, "the kept-alive upstream connection was closed; sending again on a new one");
    *slot = opened(connect(ctx, governed).await?);
    let sender = &mut slot.as_mut().ok_or("no upstream connection")?.sender;
    sender.ready().await.map_err(|e| e.to_string())?;
    sender.send_request(replay.request()).await.map_err(|e| e.to_string())
}
