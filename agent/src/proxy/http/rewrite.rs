//! Rewriting an admitted request for the upstream: no hop-by-hop headers,
//! the held credential instead of whatever the client sent under that
//! name, and no compressed or partial answers where the response is read.

use hyper::{
    StatusCode, header,
    header::{HeaderName, HeaderValue},
    http::request::Parts,
};
use serde_json::json;

use super::{Refusal, scrubs_response};
use crate::proxy::{
    Governed, ProxyCtx,
    record::{Outcome, ProxyRecord},
};

/// Headers that belong to one hop, never forwarded. Names, not strings:
/// removing by a string parses it into a name on every request, each way.
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Rewrites `parts` in place for the upstream; returns the injected secret
/// (for scrubbing it from the answer), if the route injects one.
pub async fn rewrite(
    ctx: &ProxyCtx,
    governed: &Governed,
    parts: &mut Parts,
    path: &str,
    buffered_len: Option<usize>,
    record: &mut ProxyRecord,
) -> Result<Option<String>, Refusal> {
    let route = &governed.route.route;
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
    if !route.mask.is_empty() {
        // A conditional request would let the client test a guess of the
        // unmasked body against the upstream's validators (304 or 200).
        for name in [header::IF_NONE_MATCH, header::IF_MATCH, header::IF_MODIFIED_SINCE, header::IF_UNMODIFIED_SINCE] {
            parts.headers.remove(name);
        }
    }
    let mut secret = None;
    if let Some(credential) = &route.credential {
        match ctx.credentials.header(credential).await {
            Ok((name, value)) => {
                secret = value.to_str().ok().map(str::to_owned).filter(|v| !v.is_empty());
                parts.headers.remove(&name);
                parts.headers.insert(name, value);
                if let crate::policy::route::Credential::Header { header, .. } = credential {
                    record.set("credential", header.clone());
                }
            }
            Err(why) => {
                tracing::error!(%why, "credential unavailable");
                return Err(Refusal::new(
                    Outcome::Error,
                    StatusCode::BAD_GATEWAY,
                    "the credential for this destination is unavailable",
                    json!({}),
                ));
            }
        }
    }
    if let Some(length) = buffered_len {
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    parts.uri = path.parse().map_err(|_| {
        Refusal::new(Outcome::Refused, StatusCode::BAD_REQUEST, "request target is not valid", json!({}))
    })?;
    Ok(secret)
}
