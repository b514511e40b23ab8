//! Upgraded connections (WebSocket, `kubectl exec`): the handshake is judged
//! by the route's rules like any request; on the upstream's 101 its headers
//! go to the client and bytes are tunnelled both ways until either side
//! closes. The record holds the handshake when the tunnel opens and the
//! bytes each way and how long it lasted when it closes. A route can forbid
//! upgrades; a route that masks, injects a credential or reads bodies always
//! does: nothing inside a tunnel can be masked, scrubbed or judged.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    upgrade::OnUpgrade,
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::OwnedSemaphorePermit,
};

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
    asked_in(request.headers())
}

/// The protocol request headers ask to upgrade to, if they ask.
pub fn asked_in(headers: &HeaderMap) -> Option<HeaderValue> {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade.then(|| headers.get(header::UPGRADE).cloned()).flatten()
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
    if route.credential.is_some() {
        return Err(Refusal::new(
            Outcome::Refused,
            StatusCode::FORBIDDEN,
            "upgrade refused",
            json!({"reason": "the route injects a credential, which a tunnel could echo back unscrubbed"}),
        ));
    }
    if route.block.iter().chain(&route.approve).any(|m| m.body.is_some()) {
        return Err(Refusal::new(
            Outcome::Refused,
            StatusCode::FORBIDDEN,
            "upgrade refused",
            json!({"reason": "the route's rules read bodies, and no rule sees what goes through a tunnel"}),
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

/// How long a tunnel waits for its other direction once one has closed.
const HALF_CLOSED_GRACE: Duration = Duration::from_secs(30);

/// A tunnel slot, taken before the handshake goes upstream.
pub fn slot(ctx: &ProxyCtx) -> Result<OwnedSemaphorePermit, Refusal> {
    ctx.tunnels.clone().try_acquire_owned().map_err(|_| {
        Refusal::new(
            Outcome::Refused,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many open tunnels",
            json!({"limit": crate::proxy::MAX_TUNNELS}),
        )
    })
}

/// Answers the client with the upstream's 101 and tunnels the two upgraded
/// connections. The handshake is recorded as the tunnel opens, the bytes
/// and duration when it closes (a tunnel still open when the daemon stops
/// has its handshake on record).
pub fn tunnel(
    ctx: &Arc<ProxyCtx>,
    governed: &Arc<Governed>,
    mut answer: Response<Incoming>,
    client: OnUpgrade,
    record: ProxyRecord,
    closing: ProxyRecord,
    permit: OwnedSemaphorePermit,
) -> Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut answer);
    let (parts, _) = answer.into_parts();
    let status = parts.status;
    record.finish_exchange(&ctx.log, governed, Outcome::Tunnelled, status);
    let (ctx, governed) = (ctx.clone(), governed.clone());
    tokio::spawn(async move {
        let _permit = permit;
        let mut closing = closing;
        let started = Instant::now();
        let (up, down) = match tokio::try_join!(client, upstream) {
            Ok((client, upstream)) => relay(TokioIo::new(client), TokioIo::new(upstream)).await,
            Err(e) => {
                tracing::warn!(error = %e, "an upgraded connection could not be taken over");
                (None, None)
            }
        };
        closing.set("bytes_up", up.map_or(serde_json::Value::Null, serde_json::Value::from));
        closing.set("bytes_down", down.map_or(serde_json::Value::Null, serde_json::Value::from));
        closing.set("tunnel_ms", started.elapsed().as_secs_f64() * 1000.0);
        closing.finish_exchange(&ctx.log, &governed, Outcome::TunnelClosed, status);
    });
    Response::from_parts(parts, full(bytes::Bytes::new()))
}

/// Copies both ways; once one direction ends, the other gets
/// [`HALF_CLOSED_GRACE`] to end too. Bytes each way, `None` where unknown.
async fn relay<C, U>(client: C, upstream: U) -> (Option<u64>, Option<u64>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let up = async {
        let copied = tokio::io::copy(&mut client_read, &mut upstream_write).await.ok();
        let _ = upstream_write.shutdown().await;
        copied
    };
    let down = async {
        let copied = tokio::io::copy(&mut upstream_read, &mut client_write).await.ok();
        let _ = client_write.shutdown().await;
        copied
    };
    tokio::pin!(up, down);
    tokio::select! {
        up_bytes = &mut up => (up_bytes, tokio::time::timeout(HALF_CLOSED_GRACE, &mut down).await.ok().flatten()),
        down_bytes = &mut down => (tokio::time::timeout(HALF_CLOSED_GRACE, &mut up).await.ok().flatten(), down_bytes),
    }
}
