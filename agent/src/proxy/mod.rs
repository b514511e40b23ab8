//! The L7 proxy: governed connections arrive here, redirected by the
//! kernel; each is matched to its session and route by the original
//! destination the kernel saved, then handled by its protocol.
//!
//! The proxy runs in the daemon, outside the sessions cgroup, so its own
//! connections to upstreams are never redirected.

mod body;
mod credential;
mod file_cache;
mod http;
pub mod postgres;
mod record;
mod representation;
pub mod rules;
pub mod tls;

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use tokio::net::TcpListener;
use tollgate_common::ConnectionKey;
use tracing::Instrument;

use crate::{
    approval::{self, Reviews},
    bpf::OriginalDestinations,
    policy::{compile::SessionRoute, route::Protocol},
    session::{GovernedRoute, Sessions},
    store::{SessionId, SessionLog},
};

/// What the proxy works with: the daemon hands it these handles and nothing else.
pub struct ProxyCtx {
    /// Which session and route a redirected connection belongs to.
    pub sessions: Arc<Sessions>,
    /// Where held requests wait for a reviewer.
    pub reviews: Arc<Reviews>,
    /// Where exchanges are recorded.
    pub log: SessionLog,
    /// Where redirected connections were going.
    pub originals: OriginalDestinations,
    /// Bytes of each (masked) response body kept in the record.
    pub record_body_bytes: usize,
    /// Credentials read from their secret files, refreshed when a file changes.
    pub credentials: credential::Credentials,
    /// TLS client configurations per CA file, refreshed when a file changes.
    pub upstream_tls: tls::UpstreamConfigs,
    /// Open tunnels (upgraded connections) at most, across all sessions.
    pub tunnels: Arc<tokio::sync::Semaphore>,
    /// Cancel keys and the client-side certificate of PostgreSQL routes.
    pub postgres: postgres::Shared,
    /// Upstream HTTP connections kept for a session's next client connection.
    pub http_upstreams: Arc<http::UpstreamPool>,
}

/// Tunnels open at once at most; an upgrade past that is refused (503).
pub const MAX_TUNNELS: usize = 256;

impl ProxyCtx {
    /// The proxy's context; caches start empty.
    pub fn new(
        sessions: Arc<Sessions>,
        reviews: Arc<Reviews>,
        log: SessionLog,
        originals: OriginalDestinations,
        record_body_bytes: usize,
    ) -> Self {
        Self {
            sessions,
            reviews,
            log,
            originals,
            record_body_bytes,
            credentials: credential::Credentials::default(),
            upstream_tls: tls::UpstreamConfigs::default(),
            tunnels: Arc::new(tokio::sync::Semaphore::new(MAX_TUNNELS)),
            postgres: postgres::Shared::default(),
            http_upstreams: Arc::default(),
        }
    }
}

/// A governed connection, matched to its session and route.
#[derive(Clone)]
pub struct Governed {
    /// The session.
    pub session: SessionId,
    /// The uid the session runs as.
    pub uid: u32,
    /// Its identity.
    pub identity: String,
    /// Its subject.
    pub subject: String,
    /// Where the client asked to go.
    pub destination: SocketAddr,
    /// The same, as records write it: formatted once per connection, not
    /// per exchange. Set with `destination`, in `identify` only.
    destination_text: String,
    /// The route (and grant) that governs it.
    pub route: Arc<SessionRoute>,
    /// The route's rule name.
    pub rule_name: String,
    /// The session and every session above it, innermost first.
    pub chain: Vec<crate::session::ChainLink>,
    /// The uids of every session of the chain.
    pub uids: Vec<u32>,
    /// The process that connected, as the kernel saw it at connect.
    pub client_pid: u32,
}

impl Governed {
    /// A request of this connection, held for a reviewer.
    pub fn held(
        &self,
        rule: &str,
        method: &str,
        path: String,
        body_start: Option<String>,
        upgrade: Option<String>,
    ) -> approval::Request {
        approval::Request {
            session: self.session.clone(),
            uid: self.uid,
            identity: self.identity.clone(),
            subject: self.subject.clone(),
            grant: self.route.grant.clone(),
            chain: self.chain.clone(),
            uids: self.uids.clone(),
            rule: rule.to_owned(),
            destination: self.destination_text.clone(),
            method: method.to_owned(),
            path,
            body_start,
            upgrade,
        }
    }
}

/// Binds the proxy on 127.0.0.1 and ::1 at `port`; port 0 means no proxy
/// (governed connects are then refused by the kernel: fail closed).
pub async fn bind(port: u16) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    if port == 0 {
        tracing::warn!("proxy_port is 0: no proxy, governed destinations are refused");
        return Ok(listeners);
    }
    for ip in [IpAddr::from([127, 0, 0, 1]), IpAddr::V6(Ipv6Addr::LOCALHOST)] {
        let address = SocketAddr::new(ip, port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} for the proxy (proxy_port in the config)"))?;
        // Small exchanges must not wait for Nagle and delayed ACKs to meet.
        // Set on the listener, every accepted connection has it from the
        // kernel (Linux copies it over): no system call per connection.
        nix::sys::socket::setsockopt(&listener, nix::sys::socket::sockopt::TcpNoDelay, &true)
            .with_context(|| format!("cannot set TCP_NODELAY on the proxy's listener at {address}"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Accepts governed connections on every listener until the daemon stops
/// (or a proxy thread fails). Connections are served by [`threads`] proxy
/// threads, each a single-threaded runtime that accepts from every listener
/// and keeps what it accepted: a connection's tasks (the client's side, the
/// upstream's, the record) then run on one core, with no work stealing or
/// cross-core wakeups between them. On 2 cores that took a fifth off the
/// daemon's CPU per keep-alive request against one shared runtime.
pub async fn serve(ctx: Arc<ProxyCtx>, listeners: Vec<TcpListener>) -> anyhow::Result<()> {
    if listeners.is_empty() {
        // No proxy configured: nothing to serve, but the daemon goes on.
        return std::future::pending().await;
    }
    let listeners = listeners
        .into_iter()
        .map(|listener| {
            let address = listener.local_addr().context("the proxy listener's address")?;
            let listener = listener.into_std().context("taking the proxy listener off the runtime")?;
            Ok(SharedListener { listener, address, slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)) })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (ended, mut failure) = tokio::sync::mpsc::unbounded_channel();
    for index in 0..threads() {
        let mine = listeners
            .iter()
            .map(|shared| {
                let listener = shared.listener.try_clone().context("sharing the proxy listener with a proxy thread")?;
                Ok(SharedListener { listener, address: shared.address, slots: shared.slots.clone() })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (ctx, ended) = (ctx.clone(), ended.clone());
        std::thread::Builder::new()
            .name(format!("proxy-{index}"))
            .spawn(move || {
                let _ = ended.send(serve_on_this_thread(ctx, mine, index));
            })
            .context("cannot start a proxy thread")?;
    }
    drop(ended);
    match failure.recv().await {
        Some(Err(e)) => Err(e),
        Some(Ok(())) | None => Err(anyhow::anyhow!("a proxy thread ended")),
    }
}

/// Proxy threads at most. Every idle one is woken for each new connection
/// (they share the listeners), so on a large host more would cost more
/// wakeups than they save; eight cores of proxy are far past what a host's
/// governed agents ask.
pub(crate) const MAX_THREADS: usize = 8;

/// Proxy threads: one per core the daemon may use, at most [`MAX_THREADS`].
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(MAX_THREADS)
}

/// A listening socket every proxy thread accepts from, and its connection slots.
struct SharedListener {
    listener: std::net::TcpListener,
    address: SocketAddr,
    slots: Arc<tokio::sync::Semaphore>,
}

/// One proxy thread, the `index`th: its own runtime, accepting from every listener.
fn serve_on_this_thread(ctx: Arc<ProxyCtx>, listeners: Vec<SharedListener>, index: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a proxy thread's runtime")?;
    runtime.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for shared in listeners {
            let listener = TcpListener::from_std(shared.listener).context("registering the proxy listener")?;
            tasks.spawn(accept(ctx.clone(), listener, shared.address, shared.slots, index));
        }
        match tasks.join_next().await {
            Some(Ok(result)) => result,
            Some(Err(e)) => Err(anyhow::anyhow!("proxy listener task failed: {e}")),
            None => Ok(()),
        }
    })
}

/// Governed connections served at once (per listener); more wait in the backlog.
const MAX_CONNECTIONS: usize = 1024;

/// `local`: the listener's address, which every connection it accepts has
/// as its local end (no `getsockname` per connection).
async fn accept(
    ctx: Arc<ProxyCtx>,
    listener: TcpListener,
    local: SocketAddr,
    slots: Arc<tokio::sync::Semaphore>,
    thread: usize,
) -> anyhow::Result<()> {
    loop {
        let permit = slots.clone().acquire_owned().await.context("proxy connection limit closed")?;
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Where `identify` finds nothing, it says why.
            if let Some(governed) = identify(&ctx, local, peer).await {
                // Every log line of this connection names its session.
                let span = tracing::info_span!(
                    "governed",
                    session = %governed.session,
                    destination = %governed.destination_text,
                );
                let protocol = governed.route.route.protocol;
                match protocol {
                    Protocol::Http => http::serve(ctx, governed, stream, thread).instrument(span).await,
                    Protocol::Tls => tls::passthrough(ctx, governed, stream).instrument(span).await,
                    Protocol::Postgres => postgres::serve(ctx, governed, stream).instrument(span).await,
                }
            }
        });
    }
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => tollgate_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Finds where an accepted connection (from `peer` to `local`) was going and whose it is.
async fn identify(ctx: &ProxyCtx, local: SocketAddr, peer: SocketAddr) -> Option<Governed> {
    let key = ConnectionKey {
        peer: mapped(peer.ip()),
        local: mapped(local.ip()),
        peer_port: u32::from(peer.port()),
        local_port: u32::from(local.port()),
    };
    // The kernel keys the entry when the client side is established, which
    // on loopback is before the proxy's accept returns; retry briefly anyway.
    let mut original = None;
    for _ in 0..20 {
        match ctx.originals.take(&key) {
            Ok(Some(found)) => {
                original = Some(found);
                break;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(2)).await,
            Err(e) => {
                tracing::error!(error = %e, %peer, "cannot read where a connection to the proxy was going; closing it");
                return None;
            }
        }
    }
    let Some(original) = original else {
        tracing::warn!(%peer, "connection to the proxy that the kernel did not redirect; closing");
        return None;
    };
    let v6 = Ipv6Addr::from(original.addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    let destination = SocketAddr::new(ip, original.port as u16);
    let Some(GovernedRoute { session, uid, identity, subject, route, rule_name, chain, uids }) =
        ctx.sessions.route_of(original.cgroup_id, original.rule_id)
    else {
        tracing::warn!(%peer, cgroup_id = original.cgroup_id, rule_id = original.rule_id, "connection to the proxy from a session that has ended, or by a route it no longer has; closing");
        return None;
    };
    let client_pid = original.pid;
    let destination_text = destination.to_string();
    Some(Governed {
        session,
        uid,
        identity,
        subject,
        destination,
        destination_text,
        route,
        rule_name,
        chain,
        uids,
        client_pid,
    })
}

#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use serde_json::json;

    use super::Governed;
    use crate::{policy::compile::SessionRoute, store::SessionId};

    /// A new session's connection to 127.0.0.1:8080, under a route that blocks DELETE.
    pub(crate) fn governed() -> Governed {
        let route = serde_json::from_value(json!({
            "to": "127.0.0.1/32:8080",
            "protocol": "http",
            "block": [{"method": "DELETE"}],
        }))
        .expect("a route");
        Governed {
            session: SessionId::generate(),
            uid: 0,
            identity: "bots".into(),
            subject: "b".into(),
            destination: "127.0.0.1:8080".parse().expect("an address"),
            destination_text: "127.0.0.1:8080".into(),
            route: Arc::new(SessionRoute::of("builds", route)),
            rule_name: "builds: network.proxy 127.0.0.1/32:8080".into(),
            chain: Vec::new(),
            uids: Vec::new(),
            client_pid: 42,
        }
    }
}
