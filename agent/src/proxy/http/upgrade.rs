//! Upgraded connections (WebSocket, `kubectl exec`): the handshake is judged
//! by the route's rules like any request; on the upstream's 101 its headers
//! go to the client and bytes are tunnelled both ways until either side
//! closes. The record holds the handshake, the bytes each way and how long
//! the tunnel lasted. A route can forbid upgrades, and a masked route always
//! does: a tunnel cannot be masked.

use std::{sync::Arc, time::Instant};

use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    upgrade::OnUpgrade,
};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::Refusal;
use crate::{
    policy::route::Route,
    proxy::{
        Governed, ProxyCtx,
        body::{ProxyBody, full},
        record::{Outcome, ProxyRecord},
    },
};

/// The protocol a request asks to upgrade to, if it asks.
pub fn asked<B>(request: &Request<B>) -> Option<HeaderValue> {
    let connection_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade.then(|| request.headers().get(header::UPGRADE).cloned()).flatten()
}

/// Whether the route lets this request upgrade.
pub fn allowed(route: &Route, protocol: &HeaderValue, record: &mut ProxyRecord) -> Result<(), Refusal> {
    record.set("upgrade", protocol.to_str().unwrap_or("?"));
    if !route.mask.is_empty() {
        return Err(Refusal::new(
            Outcome::Refused,
            StatusCode::FORBIDDEN,
            "upgrade refused",
            json!({"reason": "the route masks answers, and a tunnel cannot be masked"}),
        ));
    }
    if !route.upgrade {
        return Err(Refusal::new(
            Outcome::Refused,
            StatusCode::FORBIDDEN,
            "upgrade refused",
            json!({"reason": "the route does not allow upgrades (upgrade: false)"}),
        ));
    }
    Ok(())
}

/// Puts back the hop-by-hop headers an upgrade needs on the next hop.
pub fn restore_headers(headers: &mut HeaderMap, protocol: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol.clone());
}

/// Answers the client with the upstream's 101 and tunnels the two upgraded
/// connections; the record is written when the tunnel closes.
pub fn tunnel(
    ctx: &Arc<ProxyCtx>,
    governed: &Governed,
    mut answer: Response<Incoming>,
    client: OnUpgrade,
    mut record: ProxyRecord,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut answer);
    let (parts, _) = answer.into_parts();
    let status = parts.status;
    let (ctx, governed) = (ctx.clone(), governed.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let joined = tokio::try_join!(client, upstream);
        let (up, down) = match joined {
            Ok((client, upstream)) => {
                let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
                tokio::io::copy_bidirectional(&mut client, &mut upstream).await.unwrap_or((0, 0))
            }
            Err(e) => {
                tracing::warn!(error = %e, "an upgraded connection could not be taken over");
                (0, 0)
            }
        };
        record.set("bytes_up", up);
        record.set("bytes_down", down);
        record.set("tunnel_ms", started.elapsed().as_secs_f64() * 1000.0);
        record.finish_exchange(&ctx.log, &governed, Outcome::Tunnelled, status);
    });
    Response::from_parts(parts, full(bytes::Bytes::new()))
}
