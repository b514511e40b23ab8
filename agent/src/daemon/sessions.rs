//! Opening a session for a caller, ending it when its last process exits,
//! and ending all of them when the daemon stops.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use super::{Daemon, REAP_INTERVAL};
use crate::{
    api::protocol::{ErrorKind, Response},
    policy::compile,
    session::{ActiveSession, cgroup, peer},
    store::{SessionId, SessionRecord, rfc3339},
};

/// The caller as the kernel reports it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
}

impl Daemon {
    /// Verifies the token, then creates the session's cgroup, fills the
    /// kernel maps, moves the caller's held child in and records the session.
    /// On any failure everything done so far is undone and the child stays
    /// outside (the client then ends it without running the command).
    pub async fn open_session(self: &Arc<Self>, caller: Caller, token: String, pid: u32, command: Vec<String>) -> Response {
        if self.is_governed(caller.pid) {
            return Response::error(
                ErrorKind::Forbidden,
                "cannot open a session from inside a session (nested sessions are not supported yet)",
            );
        }
        if let Err(e) = peer::check_child(caller.pid, caller.uid, pid) {
            return Response::error(ErrorKind::Forbidden, e.to_string());
        }
        let daemon = self.clone();
        let verified = match tokio::task::spawn_blocking(move || daemon.verifier.verify(&token)).await {
            Ok(Ok(verified)) => verified,
            Ok(Err(e)) => return Response::error(ErrorKind::Token, e.to_string()),
            Err(e) => return Response::error(ErrorKind::Internal, format!("token verification failed: {e}")),
        };
        let Some(identity) = self.policies.match_identity(&verified.issuer, &verified.claims) else {
            return Response::error(
                ErrorKind::Token,
                format!("no matching identity for issuer '{}' and subject '{}'", verified.issuer, verified.subject),
            );
        };
        let rules = compile::compile(self.policies.grants_for(&identity.name));
        for missing in &rules.exec_deny_missing {
            tracing::warn!(path = %missing.display(), identity = %identity.name, "denied executable does not exist; nothing to match");
        }

        let id = SessionId::generate();
        let privileged = caller.uid == 0;
        let span = tracing::info_span!("session", id = %id, identity = %identity.name);
        let _enter = span.enter();
        let (cgroup_path, cgroup_id) = match self.tree.create_session(id.as_str()) {
            Ok(created) => created,
            Err(e) => return Response::error(ErrorKind::Internal, e.to_string()),
        };
        let undo_cgroup = || {
            let _ = cgroup::kill_all(&cgroup_path);
            let _ = cgroup::remove(&cgroup_path);
        };
        if let Err(e) = self.state().enforcer.add_session(cgroup_id, cgroup_id, &rules) {
            self.state().enforcer.remove_session(cgroup_id, &rules);
            undo_cgroup();
            return Response::error(ErrorKind::Internal, e.to_string());
        }
        let undo = || {
            self.state().enforcer.remove_session(cgroup_id, &rules);
            undo_cgroup();
        };
        if let Err(e) = cgroup::move_process(&cgroup_path, pid) {
            undo();
            return Response::error(ErrorKind::Internal, e.to_string());
        }
        let claims: BTreeMap<_, _> = verified.claims.clone();
        let record = SessionRecord {
            id: id.clone(),
            identity: identity.name.clone(),
            subject: verified.subject.clone(),
            issuer: verified.issuer.clone(),
            claims: serde_json::to_value(&claims).unwrap_or_default(),
            host: self.host.clone(),
            uid: caller.uid,
            privileged,
            grants: rules.grants.clone(),
            cgroup: cgroup_path.display().to_string(),
            command: command.clone(),
            started_at: rfc3339(SystemTime::now()),
            ended_at: None,
        };
        let writer = self.writer.clone();
        let recorded = tokio::task::spawn_blocking(move || writer.open_session(record)).await;
        if !matches!(recorded, Ok(Ok(()))) {
            undo();
            return Response::error(ErrorKind::Internal, "cannot record the session; nothing was started");
        }
        if privileged {
            tracing::warn!(uid = 0, "PRIVILEGED session: it runs as root and could leave its cgroup or unload programs");
        }
        tracing::info!(subject = %verified.subject, pid, grants = ?rules.grants, "session started");
        let grants = rules.grants.clone();
        self.state().registry.insert(ActiveSession {
            id: id.clone(),
            cgroup: cgroup_path,
            cgroup_id,
            rules,
            creators: Default::default(),
        });
        Response::Ok(serde_json::json!({
            "session": id,
            "identity": identity.name,
            "grants": grants,
            "privileged": privileged,
            "exec_enforcement": self.mode.as_str(),
        }))
    }

    /// Ends sessions whose cgroup has emptied. A session is ended one tick
    /// after it is first seen empty, so that its last events, still in the
    /// ring buffer, are recorded before its end.
    fn reap_once(&self, seen_empty: &mut Vec<u64>) {
        let empty: Vec<u64> = {
            let state = self.state();
            state.registry.active().filter(|s| !cgroup::populated(&s.cgroup)).map(|s| s.cgroup_id).collect()
        };
        for cgroup_id in std::mem::take(seen_empty) {
            if empty.contains(&cgroup_id) {
                self.end_session(cgroup_id);
            }
        }
        *seen_empty = empty;
    }

    fn end_session(&self, cgroup_id: u64) {
        let mut state = self.state();
        let Some(session) = state.registry.end(cgroup_id) else { return };
        state.enforcer.remove_session(cgroup_id, &session.rules);
        drop(state);
        if let Err(e) = cgroup::remove(&session.cgroup) {
            tracing::warn!(session = %session.id, error = %e, "cannot remove session cgroup");
        }
        self.writer.end_session(session.id.clone(), rfc3339(SystemTime::now()));
        tracing::info!(session = %session.id, "session ended");
    }
}

/// Ends sessions as their last process exits.
pub async fn reap(daemon: Arc<Daemon>) -> anyhow::Result<()> {
    let mut seen_empty = Vec::new();
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    loop {
        tick.tick().await;
        daemon.reap_once(&mut seen_empty);
    }
}

/// Kills what still runs in sessions (nothing may run ungoverned once the
/// programs detach) and records every session's end.
pub async fn shutdown(daemon: &Arc<Daemon>) {
    let live: Vec<(u64, std::path::PathBuf)> =
        daemon.state().registry.active().map(|s| (s.cgroup_id, s.cgroup.clone())).collect();
    for (_, path) in &live {
        tracing::warn!(cgroup = %path.display(), "daemon stopping: killing the session's processes");
        let _ = cgroup::kill_all(path);
    }
    for _ in 0..50 {
        if live.iter().all(|(_, path)| !cgroup::populated(path)) {
            break;
        }
        tokio::time::sleep(REAP_INTERVAL).await;
    }
    for (cgroup_id, _) in live {
        daemon.end_session(cgroup_id);
    }
}
