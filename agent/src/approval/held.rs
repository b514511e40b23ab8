//! Held requests waiting for a reviewer, and JIT windows: the table behind
//! [`super::Reviews`]. Waiting holds only the one request: other requests
//! and sessions flow.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tokio::sync::oneshot;

use crate::store::{SessionId, rfc3339};

/// Requests one session may have waiting at once; more are refused (429).
pub const MAX_HELD_PER_SESSION: usize = 16;
/// The longest JIT window a reviewer may open.
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a held request is, for the reviewer.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    /// The session asking.
    pub session: SessionId,
    /// The uid the session runs as (that user may not approve it).
    pub uid: u32,
    /// Its identity.
    pub identity: String,
    /// Its subject.
    pub subject: String,
    /// The grant whose route holds the request.
    pub grant: String,
    /// For a child session: it and every session above it, innermost
    /// first (who delegated to whom, under which identity, why).
    pub chain: Vec<crate::session::ChainLink>,
    /// The uids of every session of the chain: none of them may approve.
    #[serde(skip)]
    pub uids: Vec<u32>,
    /// The approve rule that matched.
    pub rule: String,
    /// Where the request was going.
    pub destination: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The start of the request's body (lossy UTF-8), so the reviewer sees what is asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_start: Option<String>,
    /// The protocol the request asks to upgrade to (a WebSocket handshake
    /// opens a tunnel no rule sees into), if it asks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
}

/// A reviewer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let it through; with a window, later matching requests of the same
    /// session and rule pass without asking until it closes.
    Approved {
        /// Who approved.
        by: String,
        /// The JIT window.
        window: Option<Duration>,
    },
    /// Refuse it.
    Denied {
        /// Who denied ("timeout" when nobody answered in time).
        by: String,
        /// Why, if they said.
        reason: Option<String>,
    },
}

/// A pending request as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    /// Its id, for `tollgate approve` / `deny`.
    pub id: String,
    /// What it is.
    #[serde(flatten)]
    pub request: Request,
    /// RFC 3339.
    pub requested_at: String,
    /// RFC 3339: denied by timeout after this.
    pub expires_at: String,
}

/// Why a decision was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    /// No such pending request (decided, timed out, or never was).
    #[error("no pending request '{0}' (it may have been decided or timed out)")]
    NotPending(String),
    /// `approve --for` longer than the cap.
    #[error("an approval window may be at most {0}")]
    WindowTooLong(String),
    /// No such open window.
    #[error("no open window '{0}' (it may have closed)")]
    NoWindow(String),
}

struct Held {
    pending: Pending,
    answer: oneshot::Sender<Decision>,
}

struct Window {
    id: String,
    session: SessionId,
    rule_key: String,
    until: Instant,
    /// As listed.
    listed: OpenWindow,
}

/// An open JIT window, as `tollgate windows` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct OpenWindow {
    /// Its id, for `tollgate windows revoke`.
    pub id: String,
    /// The session it lets through.
    pub session: SessionId,
    /// The approve rule it covers.
    pub rule: String,
    /// Who opened it.
    pub by: String,
    /// RFC 3339: it closes then.
    pub until: String,
}

#[derive(Default)]
struct Inner {
    held: BTreeMap<String, Held>,
    windows: Vec<Window>,
}

/// A new id with `prefix`, random so ids stay unique across restarts.
fn fresh_id(prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    loop {
        let id = format!("{prefix}-{:08x}", rand::random::<u32>());
        if !taken(&id) {
            return id;
        }
    }
}

/// Every held request of the daemon.
pub struct Approvals {
    inner: Mutex<Inner>,
    timeout: Duration,
}

impl Approvals {
    /// Requests are denied when nobody answers within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { inner: Mutex::new(Inner::default()), timeout }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long a request is held at most.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Is a JIT window open for this session and rule?
    pub fn window_open(&self, session: &SessionId, rule_key: &str) -> bool {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.windows.retain(|w| w.until > now);
        inner.windows.iter().any(|w| &w.session == session && w.rule_key == rule_key)
    }

    /// Holds a request: returns its id and where the decision will arrive,
    /// or `None` when its session already has [`MAX_HELD_PER_SESSION`] waiting.
    pub fn hold(&self, request: Request) -> Option<(Pending, oneshot::Receiver<Decision>)> {
        let (answer, decision) = oneshot::channel();
        let mut inner = self.lock();
        let waiting = inner.held.values().filter(|h| h.pending.request.session == request.session).count();
        if waiting >= MAX_HELD_PER_SESSION {
            return None;
        }
        let id = fresh_id("a", |id| inner.held.contains_key(id));
        let now = SystemTime::now();
        let pending =
            Pending { id: id.clone(), request, requested_at: rfc3339(now), expires_at: rfc3339(now + self.timeout) };
        inner.held.insert(id, Held { pending: pending.clone(), answer });
        Some((pending, decision))
    }

    /// Forgets a held request whose wait ended (timeout, client gone).
    pub fn abandon(&self, id: &str) {
        self.lock().held.remove(id);
    }

    /// Every held request, oldest first.
    pub fn pending(&self) -> Vec<Pending> {
        let mut list: Vec<Pending> = self.lock().held.values().map(|h| h.pending.clone()).collect();
        list.sort_by(|a, b| a.requested_at.cmp(&b.requested_at));
        list
    }

    /// Decides a held request. An approval with a window opens it for the
    /// request's session and rule; a window longer than [`MAX_WINDOW`] is
    /// refused (and nothing is decided).
    pub fn decide(&self, id: &str, decision: Decision) -> Result<Pending, ApprovalError> {
        if let Decision::Approved { window: Some(window), .. } = &decision
            && *window > MAX_WINDOW
        {
            return Err(ApprovalError::WindowTooLong(humantime::format_duration(MAX_WINDOW).to_string()));
        }
        let mut inner = self.lock();
        let held = inner.held.remove(id).ok_or_else(|| ApprovalError::NotPending(id.to_owned()))?;
        if let Decision::Approved { window: Some(window), by } = &decision {
            let window_id = fresh_id("w", |id| inner.windows.iter().any(|w| w.id == id));
            let listed = OpenWindow {
                id: window_id.clone(),
                session: held.pending.request.session.clone(),
                rule: held.pending.request.rule.clone(),
                by: by.clone(),
                until: rfc3339(SystemTime::now() + *window),
            };
            inner.windows.push(Window {
                id: window_id,
                session: held.pending.request.session.clone(),
                rule_key: key_of(&held.pending.request),
                until: Instant::now() + *window,
                listed,
            });
        }
        // The waiting request may have just timed out; then nobody listens.
        let _ = held.answer.send(decision);
        Ok(held.pending)
    }

    /// The JIT windows open now.
    pub fn windows(&self) -> Vec<OpenWindow> {
        let mut inner = self.lock();
        let now = Instant::now();
        inner.windows.retain(|w| w.until > now);
        inner.windows.iter().map(|w| w.listed.clone()).collect()
    }

    /// Closes a JIT window now; returns it.
    pub fn close_window(&self, id: &str) -> Result<OpenWindow, ApprovalError> {
        let mut inner = self.lock();
        let index =
            inner.windows.iter().position(|w| w.id == id).ok_or_else(|| ApprovalError::NoWindow(id.to_owned()))?;
        Ok(inner.windows.remove(index).listed)
    }

    /// A held request, as listed.
    pub fn get(&self, id: &str) -> Option<Pending> {
        self.lock().held.get(id).map(|h| h.pending.clone())
    }
}

/// Forgets a held request when dropped (its wait ended, however it ended).
pub struct Abandon<'a> {
    approvals: &'a Approvals,
    id: String,
}

impl<'a> Abandon<'a> {
    /// Guards the held request `id`.
    pub fn new(approvals: &'a Approvals, id: &str) -> Self {
        Self { approvals, id: id.to_owned() }
    }
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        self.approvals.abandon(&self.id);
    }
}

/// Windows cover one session, grant, destination and rule.
pub fn key_of(request: &Request) -> String {
    format!("{}\u{1f}{}\u{1f}{}", request.grant, request.destination, request.rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(session: &str) -> Request {
        Request {
            session: session.parse().expect("id"),
            uid: 1000,
            identity: "bots".into(),
            subject: "bot".into(),
            grant: "g".into(),
            chain: Vec::new(),
            uids: vec![1000],
            rule: "approve[0]: method POST".into(),
            destination: "127.0.0.1:80".into(),
            method: "POST".into(),
            path: "/deploy".into(),
            body_start: None,
            upgrade: None,
        }
    }

    #[test]
    fn a_session_may_hold_only_so_many_and_abandoned_requests_leave() {
        let approvals = Approvals::new(Duration::from_secs(60));
        let held: Vec<_> = (0..MAX_HELD_PER_SESSION).map(|_| approvals.hold(request("s-1")).expect("held")).collect();
        assert!(approvals.hold(request("s-1")).is_none(), "one more than the limit is refused");
        assert!(approvals.hold(request("s-2")).is_some(), "other sessions are not affected");
        drop(Abandon::new(&approvals, &held[0].0.id));
        assert!(approvals.get(&held[0].0.id).is_none(), "an abandoned request is no longer pending");
    }

    #[tokio::test]
    async fn a_decision_reaches_the_waiting_request_and_opens_a_window() {
        let approvals = Approvals::new(Duration::from_secs(60));
        let (pending, decision) = approvals.hold(request("s-1")).expect("held");
        assert_eq!(approvals.pending().len(), 1);
        let key = key_of(&pending.request);
        let approved = Decision::Approved { by: "root".into(), window: Some(Duration::from_secs(60)) };
        approvals.decide(&pending.id, approved.clone()).expect("decided");
        assert_eq!(decision.await.expect("answered"), approved);
        assert!(approvals.window_open(&"s-1".parse().expect("id"), &key));
        assert!(!approvals.window_open(&"s-2".parse().expect("id"), &key), "windows are per session");
        assert_eq!(
            approvals.decide(&pending.id, approved).expect_err("decided once"),
            ApprovalError::NotPending(pending.id)
        );
    }
}
