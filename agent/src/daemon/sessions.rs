//! Opening a session for a caller, ending it when its last process exits,
//! and ending all of them when the daemon stops.

use std::{
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

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
    /// kernel maps, records the session and moves the caller's held child in.
    /// On any failure before the move everything is undone and the child
    /// stays outside (the client then ends it without running the command).
    pub async fn open_session(
        self: &Arc<Self>,
        caller: Caller,
        token: String,
        pid: u32,
        command: Vec<String>,
    ) -> Response {
        if self.is_governed(caller.pid) || self.is_governed(pid) {
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
        if self.mode == crate::bpf::ExecEnforcement::KillOnExec {
            for script in &rules.exec_deny_scripts {
                tracing::warn!(path = %script.display(), identity = %identity.name, "denied script cannot be stopped in kill-on-exec mode (it needs BPF LSM); deny its interpreter or use an allow list");
            }
        }
        for missing in &rules.exec_deny_missing {
            tracing::warn!(path = %missing.display(), identity = %identity.name, "denied executable does not exist; nothing to match");
        }

        if caller.uid == 0 && !identity.allow_root {
            return Response::error(
                ErrorKind::Forbidden,
                format!("identity '{}' may not run sessions as root (allow_root: false)", identity.name),
            );
        }
        if self.closing.load(Ordering::SeqCst) {
            return Response::error(ErrorKind::Internal, "the daemon is stopping; no new sessions");
        }

        let id = SessionId::generate();
        let privileged = caller.uid == 0;
        let (cgroup_path, cgroup_id) = match self.tree.create_session(id.as_str()) {
            Ok(created) => created,
            Err(e) => return Response::error(ErrorKind::Internal, e.to_string()),
        };
        let added = self.state().enforcer.add_session(cgroup_id, &rules);
        if let Err(e) = added {
            self.state().enforcer.remove_session(cgroup_id, &rules);
            cgroup::discard(&cgroup_path);
            return Response::error(ErrorKind::Internal, e.to_string());
        }
        // Recorded before any process is in it, so every event has its session.
        let record = SessionRecord {
            id: id.clone(),
            identity: identity.name.clone(),
            subject: verified.subject.clone(),
            issuer: verified.issuer.clone(),
            claims: serde_json::to_value(&verified.claims).unwrap_or_default(),
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
            self.state().enforcer.remove_session(cgroup_id, &rules);
            cgroup::discard(&cgroup_path);
            return Response::error(ErrorKind::Internal, "cannot record the session; nothing was started");
        }
        let grants = rules.grants.clone();
        self.state().registry.insert(ActiveSession {
            id: id.clone(),
            identity: identity.name.clone(),
            subject: verified.subject.clone(),
            uid: caller.uid,
            cgroup: cgroup_path.clone(),
            cgroup_id,
            rules,
            creators: Default::default(),
        });
        // Checked again right before the move: the token check may have taken
        // seconds, in which the held child could have gone and its pid been reused.
        let moved = peer::check_child(caller.pid, caller.uid, pid)
            .map_err(|e| e.to_string())
            .and_then(|()| cgroup::move_process(&cgroup_path, pid).map_err(|e| e.to_string()));
        if let Err(e) = moved {
            tracing::warn!(session = %id, error = %e, "session opened but its command could not be placed in it; ending it");
            self.end_session(cgroup_id);
            return Response::error(ErrorKind::Forbidden, e);
        }
        if privileged {
            tracing::warn!(session = %id, uid = 0, "PRIVILEGED session: it runs as root and could leave its cgroup or unload programs");
        }
        tracing::info!(session = %id, identity = %identity.name, subject = %verified.subject, pid, grants = ?grants, "session started");
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

    pub(super) fn end_session(&self, cgroup_id: u64) {
        let mut state = self.state();
        let Some(session) = state.registry.end(cgroup_id) else { return };
        state.enforcer.remove_session(cgroup_id, &session.rules);
        drop(state);
        cgroup::discard(&session.cgroup);
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
    daemon.closing.store(true, Ordering::SeqCst);
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
