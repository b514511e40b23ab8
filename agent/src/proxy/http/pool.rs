//! Upstream connections a session's client connection left idle, kept for
//! the same session's next client connection to the same destination under
//! the same route. A client that opens a connection per request (no
//! keep-alive) would otherwise cost the upstream a TCP (and TLS) handshake
//! per request as well.
//!
//! Connections are never shared between sessions: each carries one
//! session's requests (and the credentials injected into them) only.
//!
//! Each proxy thread keeps the connections its runtime drives, and takes
//! its own first: a connection driven by another thread crosses cores,
//! both ways, on every request (still cheaper than a new handshake). One
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
/// Idle connections kept per session and destination, on each proxy thread.
const PER_DESTINATION: usize = 64;
/// Idle connections kept in all, on each proxy thread.
const IN_ALL: usize = 512;

/// The idle connections, by the proxy thread that drives them, then by
/// session and destination.
pub struct UpstreamPool {
    threads: Vec<Mutex<IdleByDestination>>,
}

/// One proxy thread's idle connections, by session and destination.
type IdleByDestination = HashMap<(SessionId, SocketAddr), Vec<Idle>>;

impl Default for UpstreamPool {
    fn default() -> Self {
        Self { threads: (0..crate::proxy::MAX_THREADS).map(|_| Mutex::default()).collect() }
    }
}

/// An upstream connection, and the proxy thread whose runtime drives it.
pub struct Kept {
    pub sender: SendRequest<ProxyBody>,
    pub home: usize,
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
    /// route, ready for a request, if one is kept: one that `thread` drives
    /// if it has one.
    pub fn take(&self, thread: usize, governed: &Governed) -> Option<Kept> {
        let others = (0..self.threads.len()).filter(|&home| home != thread);
        std::iter::once(thread).chain(others).find_map(|home| {
            let sender = self.take_from(home, governed)?;
            Some(Kept { sender, home })
        })
    }

    fn take_from(&self, home: usize, governed: &Governed) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.threads.get(home)?.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
    pub fn keep(self: &Arc<Self>, governed: &Governed, kept: Kept) {
        let Kept { mut sender, home } = kept;
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
            let Some(idle) = pool.threads.get(home) else { return };
            let mut idle = idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

#[cfg(test)]
mod tests {
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::proxy::testing::governed;

    /// A client connection over one end of an in-memory pipe, driven on
    /// this runtime; the other end is returned to keep it open.
    async fn connection() -> (SendRequest<ProxyBody>, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, driver) =
            hyper::client::conn::http1::handshake(TokioIo::new(ours)).await.expect("an HTTP/1 handshake");
        tokio::spawn(driver);
        (sender, theirs)
    }

    fn kept_on(pool: &UpstreamPool, home: usize) -> usize {
        pool.threads[home].lock().expect("the pool's lock").values().map(Vec::len).sum()
    }

    /// Keeping waits for the connection to be ready on a task of its own.
    async fn settle(pool: &UpstreamPool, expected: &[usize]) {
        for _ in 0..1000 {
            if expected.iter().enumerate().all(|(home, &n)| kept_on(pool, home) == n) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("kept {:?}, expected {expected:?}", (0..expected.len()).map(|h| kept_on(pool, h)).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_thread_takes_the_connections_it_drives_first_then_another_threads() {
        let pool = Arc::new(UpstreamPool::default());
        let governed = governed();
        let ((on_one, _one), (on_zero, _zero)) = (connection().await, connection().await);
        pool.keep(&governed, Kept { sender: on_one, home: 1 });
        pool.keep(&governed, Kept { sender: on_zero, home: 0 });
        settle(&pool, &[1, 1]).await;

        assert_eq!(pool.take(1, &governed).map(|kept| kept.home), Some(1), "its own first");
        assert_eq!(pool.take(1, &governed).map(|kept| kept.home), Some(0), "another's rather than a new handshake");
        assert!(pool.take(1, &governed).is_none());
        assert!(pool.take(0, &governed).is_none());
    }

    #[tokio::test]
    async fn connections_stay_with_their_session_and_a_thread_out_of_range_keeps_nothing() {
        let pool = Arc::new(UpstreamPool::default());
        let governed = governed();
        let (sender, _peer) = connection().await;
        pool.keep(&governed, Kept { sender, home: 1 });
        settle(&pool, &[0, 1]).await;
        let other_session = crate::proxy::testing::governed();
        for thread in 0..crate::proxy::MAX_THREADS {
            assert!(pool.take(thread, &other_session).is_none(), "another session's connection");
        }
        assert!(pool.take(crate::proxy::MAX_THREADS + 3, &governed).is_some(), "any thread may take it");

        let (sender, _peer) = connection().await;
        pool.keep(&governed, Kept { sender, home: crate::proxy::MAX_THREADS });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!((0..crate::proxy::MAX_THREADS).all(|home| kept_on(&pool, home) == 0));
    }
}
