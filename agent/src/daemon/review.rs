//! Reviewers: who may decide held requests, announcing them, and recording
//! every decision with who, when and why.

use std::time::Duration;

use nix::unistd::{Group, User, getgrouplist};
use serde_json::{Map, Value};

use super::{Caller, Daemon};
use crate::{
    api::protocol::{ErrorKind, Response},
    approval::{Decision, Pending},
    store::SessionId,
};

impl Daemon {
    /// The caller's name if it is a configured reviewer outside every
    /// session; otherwise why not. A governed process (the requester's own
    /// identity among them) can never decide anything.
    pub fn reviewer(&self, caller: Caller) -> Result<String, Response> {
        if self.is_governed(caller.pid) {
            return Err(Response::error(ErrorKind::Forbidden, "processes inside a session cannot review requests"));
        }
        let user = User::from_uid(caller.uid.into())
            .ok()
            .flatten()
            .ok_or_else(|| Response::error(ErrorKind::Forbidden, format!("uid {} has no user name", caller.uid)))?;
        let reviewers = &self.config().reviewers;
        if reviewers.unix_users.contains(&user.name) {
            return Ok(user.name);
        }
        let name = std::ffi::CString::new(user.name.clone())
            .map_err(|_| Response::error(ErrorKind::Forbidden, "bad user name"))?;
        let groups = getgrouplist(&name, user.gid).unwrap_or_default();
        let member = reviewers
            .unix_groups
            .iter()
            .any(|group| Group::from_name(group).ok().flatten().is_some_and(|g| groups.contains(&g.gid)));
        if member {
            Ok(user.name)
        } else {
            Err(Response::error(
                ErrorKind::Forbidden,
                format!("user '{}' is not a reviewer (reviewers in the config)", user.name),
            ))
        }
    }

    /// A reviewer's decision on a held request, recorded in its session.
    pub fn decide(&self, caller: Caller, id: &str, decision: Decision) -> Response {
        let by = match self.reviewer(caller) {
            Ok(name) => name,
            Err(response) => return response,
        };
        let decision = match decision {
            Decision::Approved { window, .. } => Decision::Approved { by: by.clone(), window },
            Decision::Denied { reason, .. } => Decision::Denied { by: by.clone(), reason },
        };
        let Some(held) = self.approvals().get(id) else {
            return Response::error(
                ErrorKind::NotFound,
                format!("no pending request '{id}' (it may have been decided or timed out)"),
            );
        };
        // The session's own user could be acting for it from outside the
        // session (another login, a user service): never let it decide.
        if caller.uid != 0 && caller.uid == held.request.uid {
            return Response::error(
                ErrorKind::Forbidden,
                format!("user '{by}' runs the requesting session and cannot decide its requests"),
            );
        }
        match self.approvals().decide(id, decision.clone()) {
            Ok(pending) => {
                let mut detail = describe(&pending);
                let verdict = match &decision {
                    Decision::Approved { window, .. } => {
                        detail.insert("window_secs".into(), window.map_or(Value::Null, |w| w.as_secs().into()));
                        "approved"
                    }
                    Decision::Denied { reason, .. } => {
                        detail.insert("reason".into(), reason.clone().map_or(Value::Null, Value::from));
                        "denied"
                    }
                };
                detail.insert("by".into(), by.clone().into());
                tracing::info!(session = %pending.request.session, approval = id, by, verdict, "approval decided");
                self.record_proxy_event(&pending.request.session, "approval", verdict, detail);
                Response::Ok(serde_json::json!({"approval": id, "decision": verdict, "by": by}))
            }
            Err(e) => Response::error(ErrorKind::NotFound, e.to_string()),
        }
    }

    /// Records a request nobody decided in time.
    pub fn record_approval_timeout(&self, session: &SessionId, pending: &Pending) {
        let mut detail = describe(pending);
        detail.insert("by".into(), "timeout".into());
        self.record_proxy_event(session, "approval", "timed-out", detail);
    }

    /// Records a newly held request and announces it to the webhook.
    pub fn announce_pending(&self, pending: &Pending) {
        self.record_proxy_event(&pending.request.session, "approval", "pending", describe(pending));
        let Some(url) = self.config().approval_webhook.clone() else { return };
        let notice = serde_json::to_value(pending).unwrap_or_default();
        // One worker thread posts notices in order; a slow webhook never
        // holds up the proxy, and a flood of held requests cannot start
        // threads without bound (notices beyond the queue are dropped, logged).
        let queue = self.webhook_queue.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<serde_json::Value>(256);
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
