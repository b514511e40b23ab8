//! The upstream's answer on its way back: streamed as it comes where no
//! rule reads it, otherwise read whole, masked and scrubbed of the injected
//! credential. An answer that cannot be masked is refused, never passed on unread.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{
    Response, StatusCode,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
};
use serde_json::json;

use super::{MAX_BODY, Refusal, rewrite::HOP_BY_HOP, scrubs_response};
use crate::policy::route::Mask;
use crate::proxy::{
    Governed, ProxyCtx,
    body::{BoxError, Counted, ProxyBody, full},
    credential::{REMOVED, Scrubbing, scrub},
    record::{Outcome, ProxyRecord},
    representation::{self, Unmaskable},
    rules::mask,
};

/// How long a masked route waits for an answer to end before refusing it.
const WHOLE_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Headers that identify or hash the upstream's body: for a masked body
/// they would describe (and let a client test guesses of) the clear one.
fn remove_validators(headers: &mut hyper::HeaderMap) {
    headers.remove(header::ETAG);
    headers.remove(header::LAST_MODIFIED);
    for name in ["content-md5", "digest", "content-digest", "repr-digest"] {
        headers.remove(HeaderName::from_static(name));
    }
}

/// Replaces header values holding the injected credential; returns how many.
fn scrub_headers(headers: &mut hyper::HeaderMap, secret: &str) -> usize {
    let mut count = 0;
    for value in headers.values_mut() {
        if value.to_str().is_ok_and(|v| v.contains(secret)) {
            *value = HeaderValue::from_static(REMOVED);
            count += 1;
        }
    }
    count
}

/// Headers that describe the body rather than carry data.
const FRAMING: [header::HeaderName; 4] =
    [header::CONTENT_LENGTH, header::CONTENT_TYPE, header::CONTENT_ENCODING, header::TRANSFER_ENCODING];

/// Applies the regex masks to response header values (a header can carry
/// the same data as the body). Returns how many values were replaced.
fn mask_headers(masks: &[Mask], headers: &mut hyper::HeaderMap) -> usize {
    let mut count = 0;
    for (name, value) in headers.iter_mut() {
        if FRAMING.contains(name) {
            continue;
        }
        let Ok(text) = value.to_str() else { continue };
        let (masked, found) = crate::proxy::rules::mask_regexes(masks, text.into());
        if found > 0 {
            count += found;
            let masked = masked.into_owned();
            *value = HeaderValue::from_str(&masked).unwrap_or_else(|_| HeaderValue::from_static("****"));
        }
    }
    count
}

fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// Passes an answer on as it arrives; the record is written once its body
/// has gone through (with how many credentials were scrubbed, given `found`).
fn streamed(
    ctx: &Arc<ProxyCtx>,
    governed: &Arc<Governed>,
    parts: hyper::http::response::Parts,
    body: ProxyBody,
    mut record: ProxyRecord,
    held: Option<Held>,
    found: Option<Arc<AtomicUsize>>,
) -> Response<ProxyBody> {
    let status = parts.status;
    let (ctx, governed) = (ctx.clone(), governed.clone());
    let body = Counted::new(
        body,
        Box::new(move |bytes, complete| {
            // Let go of the request's held body only now the answer has gone through.
            drop(held);
            if let Some(found) = found {
                let masked = found.load(Ordering::Relaxed);
                if masked > 0 {
                    tracing::warn!(masked, "the upstream echoed the injected credential; removed");
                }
                record.set("masked", masked);
            }
            record.set("response_bytes", bytes);
            let outcome = if complete { Outcome::Forwarded } else { Outcome::ForwardedIncomplete };
            if !complete {
                tracing::warn!(bytes, "a streamed answer ended before its end (the upstream or the client went away)");
            }
            record.finish_exchange(&ctx.log, &governed, outcome, status);
        }),
    );
    Response::from_parts(parts, body.boxed_unsync())
}

/// Something kept until the answer has been read (the sender whose drop
/// abandons a request body the upstream never asked for).
pub type Held = Box<dyn Send>;

/// What the answer's handling needs to know of the request that was sent.
pub struct Sent<'a> {
    /// The injected credential, to scrub from the answer.
    pub secret: Option<String>,
    /// Bytes of the request body that went upstream.
    pub request_bytes: &'a AtomicU64,
    /// Whether it was a HEAD.
    pub head: bool,
    /// Kept until the answer has been read.
    pub held: Option<Held>,
}

/// Bodies this large or larger are masked on the blocking pool, so that
/// their proxy thread goes on serving its other connections meanwhile (a
/// 64 MiB body takes a core about a third of a second).
const MASKED_OFF_THREAD: usize = 256 << 10;

/// The body with the route's masks applied, and how many places they changed.
async fn mask_body(governed: &Governed, body: &Bytes, json_declared: bool) -> Result<(Vec<u8>, usize), String> {
    if body.len() < MASKED_OFF_THREAD {
        return mask(&governed.route.route.mask, strip_bom(body), json_declared).map_err(|e| e.to_string());
    }
    let (route, body) = (governed.route.clone(), body.clone());
    tokio::task::spawn_blocking(move || mask(&route.route.mask, strip_bom(&body), json_declared))
        .await
        // A mask that panicked masked nothing: the answer is refused.
        .map_err(|e| format!("masking failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// Turns the upstream's answer into the client's, and writes the record
/// (for a streamed answer, once its body has gone through).
pub async fn respond(
    ctx: &Arc<ProxyCtx>,
    governed: &Arc<Governed>,
    answer: Response<Incoming>,
    mut record: ProxyRecord,
    sent: Sent<'_>,
) -> Result<Response<ProxyBody>, (ProxyRecord, Refusal)> {
    let Sent { secret, request_bytes, head, held } = sent;
    let route = &governed.route.route;
    let (mut parts, body) = answer.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    let status = parts.status;
    record.set("request_bytes", request_bytes.load(Ordering::Relaxed));
    if !scrubs_response(route) {
        let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync();
        return Ok(streamed(ctx, governed, parts, body, record, held, None));
    }
    // An answer without a body (HEAD, 204, 304) has only headers to scrub.
    // What masking would change (length, validators) is not the upstream's
    // to say on a masked route.
    if head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED || status.is_informational() {
        let mut count = 0;
        if !route.mask.is_empty() {
            parts.headers.remove(header::CONTENT_LENGTH);
            remove_validators(&mut parts.headers);
            count += mask_headers(&route.mask, &mut parts.headers);
        }
        if let Some(secret) = &secret {
            count += scrub_headers(&mut parts.headers, secret);
        }
        record.set("masked", count);
        record.set("response_bytes", 0);
        record.finish_exchange(&ctx.log, governed, Outcome::Forwarded, status);
        return Ok(Response::from_parts(parts, full(Bytes::new())));
    }
    // A credential-only route streams its answer with the credential
    // scrubbed as it passes: nothing there needs the whole body, and
    // streams (server-sent events from an API whose key is injected) flow.
    if route.mask.is_empty()
        && let Some(secret) = secret.as_deref()
    {
        let encoding = parts.headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("(not text)"));
        if status == StatusCode::PARTIAL_CONTENT || encoding.is_some_and(|e| !e.eq_ignore_ascii_case("identity")) {
            let refusal = Refusal::new(
                Outcome::Error,
                StatusCode::BAD_GATEWAY,
                "the response could not be masked",
                json!({"reason": "an encoded or partial answer cannot be scrubbed of the injected credential"}),
            );
            return Err((record, refusal));
        }
        let found_in_headers = scrub_headers(&mut parts.headers, secret);
        // Scrubbing may change the length.
        parts.headers.remove(header::CONTENT_LENGTH);
        let found = Arc::new(AtomicUsize::new(found_in_headers));
        let body = body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync();
        let scrubbing = Scrubbing::new(body, secret, found.clone()).boxed_unsync();
        return Ok(streamed(ctx, governed, parts, scrubbing, record, held, Some(found)));
    }
    // A stream that never ends cannot be read whole: refused at once.
    let streaming = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.to_ascii_lowercase();
        v.starts_with("text/event-stream") || v.starts_with("application/x-ndjson")
    });
    if streaming && !route.mask.is_empty() {
        let refusal = Refusal::new(
            Outcome::Error,
            StatusCode::BAD_GATEWAY,
            "the response could not be masked",
            json!({"reason": "the response is a stream (server-sent events or NDJSON); a masked route reads answers whole"}),
        );
        return Err((record, refusal));
    }
    let collected = tokio::time::timeout(WHOLE_BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await;
    let body = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            let refusal = Refusal::new(
                Outcome::Error,
                StatusCode::BAD_GATEWAY,
                "upstream response too large or unreadable",
                json!({"limit": MAX_BODY}),
            );
            return Err((record, refusal));
        }
        Err(_) => {
            let refusal = Refusal::new(
                Outcome::Error,
                StatusCode::BAD_GATEWAY,
                "upstream response did not end in time",
                json!({"timeout_secs": WHOLE_BODY_TIMEOUT.as_secs()}),
            );
            return Err((record, refusal));
        }
    };
    // Masks work only on a representation they read with certainty; a
    // credential-only route reads the answer whole to scrub it, which an
    // encoded or partial answer does not allow either.
    let readable = if route.mask.is_empty() {
        let encoding = parts.headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("(not text)"));
        match encoding {
            _ if status == StatusCode::PARTIAL_CONTENT => Err(Unmaskable::Partial),
            Some(encoding) if !encoding.eq_ignore_ascii_case("identity") => Err(Unmaskable::Encoded(encoding.into())),
            _ => Ok(()),
        }
    } else {
        representation::check(&route.mask, status, &parts.headers, &body)
    };
    let json_declared = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("json"));
    let masked = match readable {
        Ok(()) => mask_body(governed, &body, json_declared).await,
        Err(why) => Err(why.to_string()),
    };
    let (mut masked, mut count) = match masked {
        Ok(masked) => masked,
        Err(why) => {
            tracing::warn!(reason = %why, "response refused: it cannot be masked with certainty");
            record.set("reason", why.clone());
            let refusal = Refusal::new(
                Outcome::Error,
                StatusCode::BAD_GATEWAY,
                "the response could not be masked",
                json!({"reason": why}),
            );
            return Err((record, refusal));
        }
    };
    count += mask_headers(&route.mask, &mut parts.headers);
    // The injected credential never goes back to the agent, even when an
    // endpoint echoes the request.
    if let Some(secret) = &secret {
        let (scrubbed, found) = scrub(&masked, secret);
        if found > 0 {
            tracing::warn!("the upstream echoed the injected credential; removed");
            masked = scrubbed;
            count += found;
        }
        count += scrub_headers(&mut parts.headers, secret);
    }
    // A validator of the upstream's body does not describe a rewritten one.
    if masked.as_slice() != body.as_ref() {
        remove_validators(&mut parts.headers);
    }
    record.set("masked", count);
    let kept = masked.len().min(ctx.record_body_bytes);
    record.set("response_body", String::from_utf8_lossy(&masked[..kept]).into_owned());
    record.set("response_body_truncated", kept < masked.len());
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(masked.len()));
    record.set("response_bytes", masked.len());
    record.finish_exchange(&ctx.log, governed, Outcome::Forwarded, status);
    Ok(Response::from_parts(parts, full(Bytes::from(masked))))
}
