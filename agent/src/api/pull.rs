//! The report listener: reviewers pull this host's reports, sessions,
//! replays and reviews over HTTPS with a bearer JWT, and monitoring scrapes
//! `/metrics`. The same domain calls as the control socket, another door.
//!
//! - `/metrics` needs no token (Prometheus text).
//! - Everything else needs a token from a trusted issuer that one of
//!   `reviewers.jwt` admits: none is 401, any other 403.
//! - A request from inside a session is refused (403) whatever its token.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::server::Control;
use crate::{
    config::ReportTls,
    report::{self, ReportQuery, window},
    review::{self, ReviewQuery},
    store::{SessionId, SessionLog},
};

/// What the report listener serves from.
pub struct Pull {
    /// The control socket's handles (who may pull is `control.reviews`'s `jwt`).
    pub control: Arc<Control>,
    /// For the counters `/metrics` shows.
    pub log: SessionLog,
}

/// The TLS side of the listener, from PEM files.
pub fn acceptor(tls: &ReportTls) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| format!("report_tls: cannot read certificate file {}", tls.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .with_context(|| format!("report_tls: cannot read key file {}", tls.key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("report_tls: TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("report_tls: the certificate and key do not fit together")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves until the daemon stops; one failed connection never stops it.
pub async fn serve(pull: Arc<Pull>, listener: TcpListener, acceptor: TlsAcceptor) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "report listener accept failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let local = stream.local_addr().unwrap_or(peer);
        let (pull, acceptor) = (pull.clone(), acceptor.clone());
        tokio::spawn(async move {
            let Ok(tls) = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let Ok(tls) = tls else { return };
            let service = service_fn(move |request| {
                let pull = pull.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(pull, peer, local, request).await) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await
            {
                tracing::debug!(error = %e, "report connection failed");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn json_reply(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", format!("{value}\n"))
}

/// Why a request is not answered: a status and a message.
struct Refusal(StatusCode, String);

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self(status, message.into())
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        refuse(self.0, &self.1)
    }
}

fn refuse(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = json_reply(status, &json!({"error": message}));
    if status == StatusCode::UNAUTHORIZED
        && let Ok(value) = "Bearer".parse()
    {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

async fn handle(
    pull: Arc<Pull>,
    peer: SocketAddr,
    local: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let path = request.uri().path().to_owned();
    let query: BTreeMap<String, String> =
        url::form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
    if path == "/metrics" {
        return reply(StatusCode::OK, "text/plain; version=0.0.4", metrics(&pull));
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let pull_for_auth = pull.clone();
    let admitted = tokio::task::spawn_blocking(move || admit(&pull_for_auth, peer, local, token.as_deref())).await;
    match admitted {
        Ok(Ok(())) => {}
        Ok(Err(refusal)) => return refusal.into_response(),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
    tokio::task::spawn_blocking(move || route(&pull, &path, &query))
        .await
        .unwrap_or_else(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))
}

/// Lets the request through, or says why not (blocking: reads /proc, may fetch keys).
fn admit(pull: &Pull, peer: SocketAddr, local: SocketAddr, token: Option<&str>) -> Result<(), Refusal> {
    if pull.control.sessions.holds_connection(peer, local) {
        return Err(Refusal::new(StatusCode::FORBIDDEN, "requests from inside a session are refused"));
    }
    let Some(token) = token else {
        return Err(Refusal::new(StatusCode::UNAUTHORIZED, "a bearer token is required"));
    };
    let verified = pull
        .control
        .sessions
        .verify_token(token)
        .map_err(|e| Refusal::new(StatusCode::FORBIDDEN, format!("token refused: {e}")))?;
    let admitted = pull.control.reviews.jwt_reviewers().iter().any(|reviewer| {
        reviewer.issuer == verified.issuer && crate::policy::claims_match(&reviewer.claims, &verified.claims)
    });
    if admitted {
        Ok(())
    } else {
        Err(Refusal::new(StatusCode::FORBIDDEN, "this token's issuer and claims are not among reviewers.jwt"))
    }
}

fn route(pull: &Pull, path: &str, query: &BTreeMap<String, String>) -> Response<Full<Bytes>> {
    let control = &pull.control;
    let reader = &control.reader;
    let sessions = &control.sessions;
    let now = std::time::SystemTime::now();
    let bound = |key: &str, default: &str| -> Result<String, Refusal> {
        let text = query.get(key).map_or(default, String::as_str);
        if text == "now" {
            return Ok(crate::store::rfc3339(now + std::time::Duration::from_secs(1)));
        }
        window::bound(text, now).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e.to_string()))
    };
    let failed = |e: &dyn std::fmt::Display| refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["v1", "report"] => {
            let (since, until) = match (bound("since", "7d"), bound("until", "now")) {
                (Ok(since), Ok(until)) => (since, until),
                (Err(e), _) | (_, Err(e)) => return e.into_response(),
            };
            let query_ = ReportQuery { since, until, identity: query.get("identity").cloned() };
            let built = report::build(
                &sessions.policies(),
                |a, b| sessions.grant_views(reader, a, b),
                reader,
                control.review_depth,
                &query_,
                control.ledger_key.as_deref(),
            );
            match (built, query.get("format").map_or("json", String::as_str)) {
                (Ok(report), "md") => {
                    reply(StatusCode::OK, "text/markdown; charset=utf-8", report::render::markdown(&report))
                }
                (Ok(report), "html") => {
                    reply(StatusCode::OK, "text/html; charset=utf-8", report::render::html(&report))
                }
                (Ok(report), "json") => json_reply(StatusCode::OK, &serde_json::to_value(report).unwrap_or_default()),
                (Ok(_), other) => {
                    refuse(StatusCode::BAD_REQUEST, &format!("format '{other}' is not one of json, md, html"))
                }
                (Err(e), _) => failed(&e),
            }
        }
        ["v1", "sessions"] => match reader.sessions() {
            Ok(list) => json_reply(StatusCode::OK, &serde_json::to_value(list).unwrap_or_default()),
            Err(e) => failed(&e),
        },
        ["v1", "sessions", id] | ["v1", "sessions", id, "replay"] => {
            let Ok(id) = id.parse::<SessionId>() else { return refuse(StatusCode::BAD_REQUEST, "not a session id") };
            let result = if segments.len() == 4 {
                reader.timeline(&id).map(|(sessions, events)| json!({"sessions": sessions, "events": events}))
            } else {
                reader.show(&id).map(|detail| serde_json::to_value(detail).unwrap_or_default())
            };
            match result {
                Ok(value) => json_reply(StatusCode::OK, &value),
                Err(crate::store::StoreError::NoSuchSession(id)) => {
                    refuse(StatusCode::NOT_FOUND, &format!("no session '{id}'"))
                }
                Err(e) => failed(&e),
            }
        }
        ["v1", "review"] => {
            let (since, until) = match (bound("since", "30d"), bound("until", "now")) {
                (Ok(since), Ok(until)) => (since, until),
                (Err(e), _) | (_, Err(e)) => return e.into_response(),
            };
            let claim = query.get("claim").and_then(|c| c.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned()));
            let review_query = ReviewQuery {
                since,
                until,
                identity: query.get("identity").cloned(),
                claim,
                resource: query.get("resource").cloned(),
                suggest: query.get("suggest").is_some_and(|v| v == "true"),
            };
            match review::run(
                &sessions.policies(),
                |a, b| sessions.grant_views(reader, a, b),
                reader,
                control.review_depth,
                &review_query,
            ) {
                Ok(review) => json_reply(StatusCode::OK, &serde_json::to_value(review).unwrap_or_default()),
                Err(review::AccessReviewError::Store(e)) => failed(&e),
                Err(e) => refuse(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        _ => refuse(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// Prometheus text: live sessions, lost events, held requests, and what was recorded.
fn metrics(pull: &Pull) -> String {
    use std::fmt::Write;
    let status = (pull.control.status)();
    let mut out = String::new();
    let _ = writeln!(out, "# HELP tollgate_sessions_active Live sessions.");
    let _ = writeln!(out, "# TYPE tollgate_sessions_active gauge");
    let _ = writeln!(out, "tollgate_sessions_active {}", status["sessions_active"].as_u64().unwrap_or(0));
    let _ = writeln!(out, "# HELP tollgate_events_lost_total Kernel events counted instead of delivered, by kind.");
    let _ = writeln!(out, "# TYPE tollgate_events_lost_total counter");
    for (kind, count) in status["events_lost_by_kind"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "tollgate_events_lost_total{{kind=\"{kind}\"}} {}", count.as_u64().unwrap_or(0));
    }
    let _ = writeln!(out, "# HELP tollgate_approvals_waiting Requests held for a reviewer now.");
    let _ = writeln!(out, "# TYPE tollgate_approvals_waiting gauge");
    let _ = writeln!(out, "tollgate_approvals_waiting {}", pull.control.reviews.waiting());
    out.push_str(&pull.log.stats().prometheus());
    out
}
