//! [`Reviews`]: who may decide held requests, announcing them, and
//! recording every decision with who, when and why.

use std::{
    sync::{Arc, OnceLock, mpsc},
    time::Duration,
};

use nix::unistd::{Group, User, getgrouplist};
use serde::Serialize;
use serde_json::{Map, Value};

use super::held::{Abandon, Approvals, Decision, Pending, Request, key_of};
use crate::{
    config::Reviewers,
    session::{Caller, Sessions},
    store::{RecordKind, RecordVerdict, SessionLog},
};

/// Notices queued for the webhook at most; more are dropped (and logged).
const WEBHOOK_QUEUE: usize = 256;

/// Why a reviewer's request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// Governed processes never decide anything.
    #[error("processes inside a session cannot review requests or grants")]
    InsideSession,
    /// The caller's uid has no passwd entry.
    #[error("uid {0} has no user name")]
    NoUserName(u32),
    /// The user name cannot be looked up.
    #[error("bad user name")]
    BadUserName,
    /// Not among the configured reviewers.
    #[error("user '{0}' is not a reviewer (reviewers in the config)")]
    NotReviewer(String),
    /// Nothing is waiting under that id.
    #[error("no pending request '{0}' (it may have been decided or timed out)")]
    NotPending(String),
    /// The session's own user may not decide its requests.
    #[error("user '{0}' runs the requesting session and cannot decide its requests")]
    OwnSession(String),
    /// `approve --for` longer than the cap.
    #[error("an approval window may be at most {0}")]
    WindowTooLong(String),
    /// No such open window.
    #[error("no open window '{0}' (it may have closed)")]
    NoWindow(String),
}

/// A decision as the reviewer is told.
#[derive(Debug, Clone, Serialize)]
pub struct Decided {
    /// The request's id.
    pub approval: String,
    /// `approved` or `denied`.
    pub decision: &'static str,
    /// Who decided.
    pub by: String,
}

/// How a held request ended, for the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A JIT window of an earlier approval covers it: it was not held.
    Window,
    /// A reviewer approved it.
    Approved {
        /// The request's id.
        id: String,
        /// Who.
        by: String,
        /// The JIT window it opened.
        window: Option<Duration>,
    },
    /// A reviewer denied it.
    Denied {
        /// The request's id.
        id: String,
        /// Who.
        by: String,
        /// Why, if they said.
        reason: Option<String>,
    },
    /// Nobody decided in time.
    TimedOut {
        /// The request's id.
        id: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// Its session already has as many requests waiting as it may.
    TooMany,
}

/// Held requests and the people who decide them.
pub struct Reviews {
    approvals: Approvals,
    reviewers: std::sync::RwLock<Reviewers>,
    webhook: Option<String>,
    /// One worker thread posts notices, started with the first one.
    webhook_queue: OnceLock<mpsc::SyncSender<Value>>,
    sessions: Arc<Sessions>,
    log: SessionLog,
}

impl Reviews {
    /// Requests wait up to `timeout`; `reviewers` may decide them; each new
    /// one is POSTed to `webhook` when there is one.
    pub fn new(
        timeout: Duration,
        reviewers: Reviewers,
        webhook: Option<String>,
        sessions: Arc<Sessions>,
        log: SessionLog,
    ) -> Self {
        let reviewers = std::sync::RwLock::new(reviewers);
        Self { approvals: Approvals::new(timeout), reviewers, webhook, webhook_queue: OnceLock::new(), sessions, log }
    }

    /// The caller's name if it is a configured reviewer outside every
    /// session; otherwise why not. A governed process (the requester's own
    /// identity among them) can never decide anything.
    pub fn reviewer(&self, caller: Caller) -> Result<String, ReviewError> {
        if self.sessions.is_governed(caller.pid) {
            return Err(ReviewError::InsideSession);
        }
        let user = User::from_uid(caller.uid.into()).ok().flatten().ok_or(ReviewError::NoUserName(caller.uid))?;
        let reviewers = self.reviewers.read().unwrap_or_else(|p| p.into_inner()).clone();
        if reviewers.unix_users.contains(&user.name) {
            return Ok(user.name);
        }
        let name = std::ffi::CString::new(user.name.clone()).map_err(|_| ReviewError::BadUserName)?;
        let groups = getgrouplist(&name, user.gid).unwrap_or_default();
        let member = reviewers
            .unix_groups
            .iter()
            .any(|group| Group::from_name(group).ok().flatten().is_some_and(|g| groups.contains(&g.gid)));
        if member { Ok(user.name) } else { Err(ReviewError::NotReviewer(user.name)) }
    }

    /// Puts reloaded reviewers in force.
    pub fn set_reviewers(&self, reviewers: Reviewers) {
        *self.reviewers.write().unwrap_or_else(|p| p.into_inner()) = reviewers;
    }

    /// The tokens that may pull reports now (`reviewers.jwt`).
    pub fn jwt_reviewers(&self) -> Vec<crate::config::JwtReviewer> {
        self.reviewers.read().unwrap_or_else(|p| p.into_inner()).jwt.clone()
    }

    /// The JIT windows open now (reviewers).
    pub fn windows(&self, caller: Caller) -> Result<Vec<super::OpenWindow>, ReviewError> {
        self.reviewer(caller)?;
        Ok(self.approvals.windows())
    }

    /// Closes a JIT window now (reviewers), recorded in its session.
    pub fn close_window(&self, caller: Caller, id: &str) -> Result<super::OpenWindow, ReviewError> {
        let by = self.reviewer(caller)?;
        let window = self.approvals.close_window(id).map_err(|_| ReviewError::NoWindow(id.to_owned()))?;
        let mut detail = Map::new();
        detail.insert("window".into(), window.id.clone().into());
        detail.insert("rule".into(), window.rule.clone().into());
        detail.insert("by".into(), by.into());
        self.log.decided(&window.session, RecordKind::Approval, RecordVerdict::Revoked, detail);
        Ok(window)
    }

    /// How many requests wait for a reviewer now.
    pub fn waiting(&self) -> usize {
        self.approvals.pending().len()
    }

    /// Every held request, for a reviewer.
    pub fn pending(&self, caller: Caller) -> Result<Vec<Pending>, ReviewError> {
        self.reviewer(caller)?;
        Ok(self.approvals.pending())
    }

    /// A reviewer's decision on a held request, recorded in its session.
    pub fn decide(&self, caller: Caller, id: &str, decision: Decision) -> Result<Decided, ReviewError> {
        let by = self.reviewer(caller)?;
        let decision = match decision {
            Decision::Approved { window, .. } => Decision::Approved { by: by.clone(), window },
            Decision::Denied { reason, .. } => Decision::Denied { by: by.clone(), reason },
        };
        let held = self.approvals.get(id).ok_or_else(|| ReviewError::NotPending(id.to_owned()))?;
        // The session's own user could be acting for it from outside the
        // session (another login, a user service): never let it decide.
        if caller.uid != 0 && (caller.uid == held.request.uid || held.request.uids.contains(&caller.uid)) {
            return Err(ReviewError::OwnSession(by));
        }
        let pending = self.approvals.decide(id, decision.clone()).map_err(|e| match e {
            super::ApprovalError::WindowTooLong(cap) => ReviewError::WindowTooLong(cap),
            _ => ReviewError::NotPending(id.to_owned()),
        })?;
        let mut detail = describe(&pending);
        let verdict = match &decision {
            Decision::Approved { window, .. } => {
                detail.insert("window_secs".into(), window.map_or(Value::Null, |w| w.as_secs().into()));
                RecordVerdict::Approved
            }
            Decision::Denied { reason, .. } => {
                detail.insert("reason".into(), reason.clone().map_or(Value::Null, Value::from));
                RecordVerdict::Denied
            }
        };
        detail.insert("by".into(), by.clone().into());
        tracing::info!(session = %pending.request.session, approval = id, by, verdict = verdict.as_str(), "approval decided");
        self.log.decided(&pending.request.session, RecordKind::Approval, verdict, detail);
        Ok(Decided { approval: id.to_owned(), decision: verdict.as_str(), by })
    }

    /// Holds `request` for a reviewer, unless a JIT window covers it, and
    /// waits for the decision or the timeout. If the caller stops waiting
    /// (its client went away), the request stops being pending: nobody can
    /// approve, or open a window with, what no longer waits.
    pub async fn ask(&self, request: Request) -> Answer {
        if self.approvals.window_open(&request.session, &key_of(&request)) {
            return Answer::Window;
        }
        let Some((pending, decision)) = self.approvals.hold(request) else {
            return Answer::TooMany;
        };
        let _held = Abandon::new(&self.approvals, &pending.id);
        self.announce(&pending);
        tracing::info!(
            session = %pending.request.session,
            approval = %pending.id,
            method = %pending.request.method,
            path = %pending.request.path,
            "request held for approval"
        );
        let timeout = self.approvals.timeout();
        match tokio::time::timeout(timeout, decision).await {
            Ok(Ok(Decision::Approved { by, window })) => Answer::Approved { id: pending.id, by, window },
            Ok(Ok(Decision::Denied { by, reason })) => Answer::Denied { id: pending.id, by, reason },
            Ok(Err(_)) | Err(_) => {
                let mut detail = describe(&pending);
                detail.insert("by".into(), "timeout".into());
                self.log.decided(&pending.request.session, RecordKind::Approval, RecordVerdict::TimedOut, detail);
                Answer::TimedOut { id: pending.id, timeout }
            }
        }
    }

    /// Records a newly held request and announces it to the webhook.
    fn announce(&self, pending: &Pending) {
        self.log.decided(&pending.request.session, RecordKind::Approval, RecordVerdict::Pending, describe(pending));
        let Some(url) = self.webhook.clone() else { return };
        let notice = serde_json::to_value(pending).unwrap_or_default();
        // One worker thread posts notices in order; a slow webhook never
        // holds up the proxy, and a flood of held requests cannot start
        // threads without bound (notices beyond the queue are dropped, logged).
        let queue = self.webhook_queue.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<Value>(WEBHOOK_QUEUE);
            std::thread::spawn(move || {
                for notice in rx {
                    let sent = ureq::post(&url)
                        .timeout(Duration::from_secs(5))
                        .set("Content-Type", "application/json")
                        .send_string(&notice.to_string());
                    if let Err(e) = sent {
                        tracing::warn!(%url, error = %e, "approval webhook failed");
                    }
                }
            });
            tx
        });
        if queue.try_send(notice).is_err() {
            tracing::warn!("approval webhook queue is full; a notice was dropped");
        }
    }
}

fn describe(pending: &Pending) -> Map<String, Value> {
    match serde_json::to_value(pending) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}
