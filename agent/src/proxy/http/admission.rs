//! Request admission: whether a request may go upstream at all. Requests
//! servers could read differently from the rules are refused; then the
//! route's host, block and approve rules decide.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::{Method, StatusCode, body::Incoming, header, header::HeaderName, http::request::Parts};
use serde_json::json;

use super::{MAX_BODY, Refusal};
use crate::{
    approval,
    policy::route::{Route, RouteTarget, name_matches},
    proxy::{
        Governed, ProxyCtx,
        record::{Outcome, ProxyRecord, Unapproved},
        rules::{RequestView, blocked_by, needs_approval},
    },
};

/// Headers some frameworks take as the request's real method.
const METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// A request's body once admitted: read whole (a rule needed to see it) or still streaming.
pub enum AdmittedBody {
    /// Read whole.
    Buffered(Bytes),
    /// Not read yet; it streams through.
    Streamed(Incoming),
}

/// Why a request is ambiguous, if it is: its path or headers could be read
/// differently by the upstream than by the proxy's rules.
pub fn ambiguity(
    headers: &hyper::HeaderMap,
    raw_path: &str,
    target_authority: Option<&str>,
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
    // Servers cut a Host value at different places (the first or the last
    // ':'): only a plain name or address with an optional port is read alike.
    if headers.get(header::HOST).is_some_and(|h| h.to_str().map_or(true, |h| !plain_host(h))) {
        return Some("the Host header is not a host name with an optional port");
    }
    // An absolute-form target names a host of its own; HTTP/1.1 says it
    // wins over the Host header, and servers disagree on whether they follow.
    if let Some(authority) = target_authority
        && headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(host_name) != Some(host_name(authority))
    {
        return Some("the request target names another host than the Host header");
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

/// `name`, `name:port`, `[v6]` or `[v6]:port`, and nothing else.
fn plain_host(host: &str) -> bool {
    let port_ok = |port: &str| !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        let Some((address, after)) = rest.split_once(']') else { return false };
        let address_ok =
            !address.is_empty() && address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        return address_ok && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok));
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    name_ok && port.is_none_or(port_ok)
}

/// The host a Host header or an authority names: lowercase, without port,
/// brackets or the root's trailing dot.
pub fn host_name(host: &str) -> String {
    let bare = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        },
    };
    bare.trim_end_matches('.').to_ascii_lowercase()
}

/// Decides whether a request may go upstream. `path` is the normalized
/// path the rules see. On refusal the answer for the client is returned,
/// with the record already written.
pub async fn admit(
    ctx: &ProxyCtx,
    governed: &Governed,
    parts: &mut Parts,
    body: Incoming,
    path: &str,
    host: &str,
    record: &mut ProxyRecord,
) -> Result<AdmittedBody, Refusal> {
    let route = &governed.route.route;
    // A method override would let a POST act as the DELETE a rule blocks.
    for name in METHOD_OVERRIDES {
        parts.headers.remove(name);
    }
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // Only a body a rule must read whole is bounded; others stream through.
    // A request an approve rule holds is read first too, so that the
    // reviewer sees what it asks (rules on bodies buffer anyway).
    let held_without_body = {
        let view = RequestView { method: &parts.method, path, headers: &parts.headers, body: &[] };
        needs_approval(route, &view).is_some()
    };
    let needs_body = has_body_rules(route) || held_without_body;
    if needs_body && declared.is_some_and(|length| length > MAX_BODY as u64) {
        return Err(Refusal::new(
            Outcome::Refused,
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large",
            json!({"limit": MAX_BODY}),
        ));
    }
    // Only a rule on bodies needs the whole request before deciding.
    let body = if needs_body {
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => AdmittedBody::Buffered(collected.to_bytes()),
            Err(_) => {
                return Err(Refusal::new(
                    Outcome::Refused,
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large or unreadable",
                    json!({"limit": MAX_BODY}),
                ));
            }
        }
    } else {
        AdmittedBody::Streamed(body)
    };
    // Until a streamed body has gone through, what the client declared.
    record.set(
        "request_bytes",
        match &body {
            AdmittedBody::Buffered(bytes) => bytes.len() as u64,
            AdmittedBody::Streamed(_) => declared.unwrap_or(0),
        },
    );

    let asked = host_name(host);
    if let RouteTarget::Host { name, .. } = &route.to
        && &asked != name
    {
        return Err(Refusal::new(
            Outcome::Blocked,
            StatusCode::FORBIDDEN,
            "host is not the one this route governs",
            json!({"host": host, "expected": name}),
        ));
    }
    // A route that names its hosts serves those only: the credential is
    // never sent for a request to another.
    if !route.hosts.is_empty() && !route.hosts.iter().any(|pattern| name_matches(&pattern.0, &asked)) {
        return Err(Refusal::new(
            Outcome::Blocked,
            StatusCode::FORBIDDEN,
            "host is not one this route serves",
            json!({"host": host, "hosts": route.hosts.iter().map(|h| h.0.as_str()).collect::<Vec<_>>()}),
        ));
    }

    let view = RequestView {
        method: &parts.method,
        path,
        headers: &parts.headers,
        body: match &body {
            AdmittedBody::Buffered(bytes) => bytes,
            AdmittedBody::Streamed(_) => &[],
        },
    };
    if let Some(rule) = blocked_by(route, &view) {
        record.hit(&rule);
        return Err(Refusal::new(Outcome::Blocked, StatusCode::FORBIDDEN, "blocked by policy", json!({"rule": rule})));
    }
    if let Some(rule) = needs_approval(route, &view) {
        record.hit(&rule);
        // The reviewer must see that approving opens a tunnel.
        let upgrade = super::upgrade::asked_in(&parts.headers).and_then(|v| v.to_str().ok().map(str::to_owned));
        // The reviewer sees what is asked: the start of the body (a streamed one is not at hand).
        let body_start = (!view.body.is_empty())
            .then(|| String::from_utf8_lossy(&view.body[..view.body.len().min(BODY_SHOWN)]).into_owned());
        let asked = Asked { method: &parts.method, path, upgrade, body_start };
        approve(ctx, governed, record, &rule, asked).await?;
    }
    Ok(body)
}

/// Bytes of a held request's body a reviewer is shown.
const BODY_SHOWN: usize = 256;

/// What a held request asks, for the reviewer.
struct Asked<'a> {
    method: &'a Method,
    path: &'a str,
    upgrade: Option<String>,
    body_start: Option<String>,
}

/// Holds the request for a reviewer, unless a JIT window covers it.
async fn approve(
    ctx: &ProxyCtx,
    governed: &Governed,
    record: &mut ProxyRecord,
    rule: &str,
    asked: Asked<'_>,
) -> Result<(), Refusal> {
    let Asked { method, path, upgrade, body_start } = asked;
    let request = governed.held(rule, method.as_str(), path.to_owned(), body_start, upgrade);
    let denied = |extra| Refusal::new(Outcome::Denied, StatusCode::FORBIDDEN, "", extra);
    match record.answered(ctx.reviews.ask(request).await) {
        Ok(()) => Ok(()),
        Err(Unapproved::Denied { id, by, reason }) => {
            Err(denied(json!({"rule": rule, "approval": id, "denied_by": by, "reason": reason}))
                .with_error("denied by a reviewer"))
        }
        Err(Unapproved::TimedOut { id, timeout }) => Err(denied(
            json!({"rule": rule, "approval": id, "denied_by": "timeout", "timeout_secs": timeout.as_secs()}),
        )
        .with_error("approval timed out")),
        Err(Unapproved::TooMany) => Err(Refusal::new(
            Outcome::Denied,
            StatusCode::TOO_MANY_REQUESTS,
            "too many requests of this session are already waiting for approval",
            json!({"rule": rule, "limit": approval::MAX_HELD_PER_SESSION}),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn host_names_lose_port_brackets_case_and_the_trailing_dot() {
        assert_eq!(host_name("API.example.com.:8080"), "api.example.com");
        assert_eq!(host_name("[::1]:80"), "::1");
        assert_eq!(host_name("127.0.0.1"), "127.0.0.1");
        assert_eq!(host_name("evil.test"), "evil.test");
    }

    #[test]
    fn only_plain_hosts_are_read_alike_by_every_server() {
        for host in ["api.example.com", "api.example.com:8080", "127.0.0.1:80", "[::1]", "[::1]:443"] {
            assert!(super::plain_host(host), "{host}");
        }
        for host in ["attacker.com:443.api.example.com", "a b", "a:", "a:99999999", "[::1", "evil.test/x", "a@b", ""] {
            assert!(!super::plain_host(host), "{host}");
        }
    }
}
