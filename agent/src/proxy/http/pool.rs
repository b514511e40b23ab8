//! Upstream connections a session's client connection left idle, kept for
//! the same session's next client connection to the same destination under
//! the same route. A client that opens a connection per request (no
//! keep-alive) would otherwise cost the upstream a TCP (and TLS) handshake
//! per request as well.
//!
//! Connections are never shared between sessions: each carries one
//! session's requests (and the credentials injected into them) only. One
//! is kept only when its last exchange ended cleanly (hyper then reports it
//! ready), and for at most [`IDLE_FOR`], shorter than the keep-alive
//! timeouts servers commonly use, so a kept connection is rarely one the
//! server is closing; when it is, `send` opens another as for any
//! kept-alive connection.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::client::conn::http1::SendRequest;

use crate::{
    policy::compile::SessionRoute,
    proxy::{Governed, body::ProxyBody},
    store::SessionId,
};

/// How long an idle connection is kept.
pub const IDLE_FOR: Duration = Duration::from_secs(4);
/// Idle connections kept per session and destination.
const PER_DESTINATION: usize = 64;
/// Idle connections kept in all.
const IN_ALL: usize = 512;

/// The idle connections, by session and destination.
#[derive(Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<(SessionId, SocketAddr), Vec<Idle>>>,
}

struct Idle {
    /// The route it was opened under: held so that it is compared by identity
    /// (a policy reload makes new routes, and their connections new ones).
    route: Arc<SessionRoute>,
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.since) < IDLE_FOR
    }
}

impl UpstreamPool {
    /// An idle connection of this session to this destination under this
    /// route, ready for a request, if one is kept.
    pub fn take(&self, governed: &Governed) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let kept = idle.get_mut(&(governed.session.clone(), governed.destination))?;
        let now = Instant::now();
        while let Some(entry) = kept.pop() {
            if Arc::ptr_eq(&entry.route, &governed.route) && entry.usable(now) && entry.sender.is_ready() {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Keeps `sender` once its last exchange has ended (waiting at most a
    /// moment for that); a connection still busy or broken is dropped.
    pub fn keep(self: &Arc<Self>, governed: &Governed, mut sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let pool = self.clone();
        let key = (governed.session.clone(), governed.destination);
        let route = governed.route.clone();
        tokio::spawn(async move {
            let ready = tokio::time::timeout(Duration::from_millis(500), sender.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                return;
            }
            let now = Instant::now();
            let mut idle = pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Forget what has closed or waited too long, everywhere.
            idle.retain(|_, kept| {
                kept.retain(|entry| entry.usable(now));
                !kept.is_empty()
            });
            let in_all: usize = idle.values().map(Vec::len).sum();
            let kept = idle.entry(key).or_default();
            if kept.len() < PER_DESTINATION && in_all < IN_ALL {
                kept.push(Idle { route, sender, since: now });
            }
        });
    }
}
