//! [`Sessions`]: opening a session for a caller, attributing kernel events
//! to sessions, ending a session when its last process exits, and ending
//! all of them when the daemon stops.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use serde_json::{Map, Value};

use super::{
    ActiveSession, Registry,
    cgroup::{self, CgroupError, CgroupTree},
    peer::{self, PeerError},
};
use crate::{
    bpf::{BpfError, ExecEnforcement, SessionMaps, events::KernelEvent},
    identity::{TokenError, Verifier},
    policy::{
        PolicySet,
        compile::{FileId, SessionRoute},
        exec_files::{ExecPattern, resolve},
    },
    store::{RecordKind, RecordVerdict, SessionId, SessionLog, SessionRecord, rfc3339},
};

/// How often session cgroups are checked for their last process.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// Exec allow lists are looked at again every this many reaper ticks (1 s).
const ALLOW_REFRESH_TICKS: u64 = 10;

/// The caller as the kernel reports it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
}

/// Where a process runs, as far as sessions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Outside every session of this daemon.
    Outside,
    /// Inside a session (named, when the cgroup is one this daemon made).
    Inside(Option<SessionId>),
}

/// What a caller asks to open.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    /// The JWT.
    pub token: String,
    /// The caller's held child, not yet executed.
    pub pid: u32,
    /// The command it will execute, for the record.
    pub command: Vec<String>,
}

/// A session that was opened, as the caller is told.
#[derive(Debug, Clone, Serialize)]
pub struct Opened {
    /// Its id.
    pub session: SessionId,
    /// The identity the token matched.
    pub identity: String,
    /// The grants that apply.
    pub grants: Vec<String>,
    /// True when it runs as root.
    pub privileged: bool,
    /// How denied execs are stopped.
    pub exec_enforcement: &'static str,
}

/// Why no session was opened. Nothing of it is left behind.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The caller or its child already runs in a session.
    #[error("cannot open a session from inside a session (nested sessions are not supported yet)")]
    Nested,
    /// The process to place is not the caller's held child.
    #[error(transparent)]
    NotHeldChild(#[from] PeerError),
    /// The token was refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The token is valid but no policy identity matches it.
    #[error("no matching identity for issuer '{issuer}' and subject '{subject}'")]
    NoIdentity {
        /// The token's issuer.
        issuer: String,
        /// The token's subject.
        subject: String,
    },
    /// The identity may not run sessions as root.
    #[error("identity '{0}' may not run sessions as root (allow_root: false)")]
    RootRefused(String),
    /// The daemon is stopping.
    #[error("the daemon is stopping; no new sessions")]
    Closing,
    /// The session's cgroup could not be made.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The kernel maps refused the session's rules.
    #[error(transparent)]
    Maps(#[from] BpfError),
    /// The session could not be recorded.
    #[error("cannot record the session; nothing was started")]
    NotRecorded,
    /// The held child could not be moved into the session's cgroup.
    #[error("{0}")]
    NotPlaced(String),
    /// A worker task failed.
    #[error("{0}")]
    Internal(String),
}

/// A session a reviewer ended, as the reviewer is told.
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    /// The session.
    pub session: SessionId,
    /// Who revoked it.
    pub by: String,
}

/// Why a session could not be revoked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    /// No live session has that id (it ended, or never was).
    #[error("no live session '{0}' (it may have ended)")]
    NotLive(String),
    /// Already revoked or expired; its processes are being killed.
    #[error("session '{0}' is already ending")]
    AlreadyEnding(String),
    /// Its processes could not be killed; nothing was recorded, it may be tried again.
    #[error("cannot kill the processes of session '{0}': {1}")]
    NotKilled(String, String),
}

/// A governed connection's session and route, as the proxy needs them.
#[derive(Debug, Clone)]
pub struct GovernedRoute {
    /// The session.
    pub session: SessionId,
    /// The uid the session runs as.
    pub uid: u32,
    /// Its identity.
    pub identity: String,
    /// Its subject.
    pub subject: String,
    /// The route (and grant) that governs the connection.
    pub route: Arc<SessionRoute>,
    /// The route's rule name.
    pub rule_name: String,
}

/// What the registry knows about the process behind a kernel event.
#[derive(Debug, Clone)]
pub struct Attribution {
    /// The event's session.
    pub session: SessionId,
    /// For an exec: the process that forked it, if that fork was seen.
    pub creator: Option<u32>,
    /// For a connect: the name of the rule that decided.
    pub rule: Option<String>,
}

/// The sessions of this daemon: registry, kernel maps, cgroups, verifier
/// and policies. One lock guards the registry and the maps together, so
/// the kernel and the registry never disagree about a session.
pub struct Sessions {
    pub(super) parts: SessionsParts,
    state: Mutex<State>,
    /// Set when the daemon begins to stop: no new sessions after that.
    closing: AtomicBool,
}

pub(super) struct State {
    pub(super) maps: SessionMaps,
    pub(super) registry: Registry,
}

/// What [`Sessions`] works with, besides the kernel maps.
pub struct SessionsParts {
    /// Loaded policies.
    pub policies: PolicySet,
    /// Checks tokens.
    pub verifier: Verifier,
    /// The daemon's cgroup subtree.
    pub tree: CgroupTree,
    /// The cgroup v2 mount.
    pub mount: PathBuf,
    /// This host's name, for the record.
    pub host: String,
    /// How denied execs are stopped.
    pub mode: ExecEnforcement,
    /// Where sessions are recorded.
    pub log: SessionLog,
}

impl Sessions {
    /// No sessions yet; their rules go into `maps`.
    pub fn new(parts: SessionsParts, maps: SessionMaps) -> Self {
        let state = Mutex::new(State { maps, registry: Registry::default() });
        Self { parts, state, closing: AtomicBool::new(false) }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not stop enforcement bookkeeping.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The loaded policies.
    pub fn policies(&self) -> &PolicySet {
        &self.parts.policies
    }

    /// The daemon's cgroup subtree.
    pub fn tree(&self) -> &CgroupTree {
        &self.parts.tree
    }

    /// How denied execs are stopped.
    pub fn exec_enforcement(&self) -> ExecEnforcement {
        self.parts.mode
    }

    /// The number of live sessions.
    pub fn active_count(&self) -> usize {
        self.state().registry.active_count()
    }

    /// Where `pid` runs, from one read of `/proc/PID/cgroup`: outside the
    /// sessions, or inside (with its session when it can be named). A process
    /// that cannot be placed counts as inside: fail closed.
    pub fn placement(&self, pid: u32) -> Placement {
        let Some(path) = cgroup::of_process(pid) else { return Placement::Inside(None) };
        let full = self.parts.mount.join(path.trim_start_matches('/'));
        match full.strip_prefix(&self.parts.tree.sessions) {
            Ok(relative) => Placement::Inside(
                relative.components().next().and_then(|c| c.as_os_str().to_str()).and_then(|name| name.parse().ok()),
            ),
            Err(_) => Placement::Outside,
        }
    }

    /// True when `pid` runs inside one of this daemon's sessions.
    pub fn is_governed(&self, pid: u32) -> bool {
        matches!(self.placement(pid), Placement::Inside(_))
    }

    /// Verifies the token, then creates the session's cgroup, fills the
    /// kernel maps, records the session and moves the caller's held child in.
    /// On any failure before the move everything is undone and the child
    /// stays outside (the client then ends it without running the command).
    pub async fn open(self: &Arc<Self>, caller: Caller, request: OpenRequest) -> Result<Opened, OpenError> {
        let OpenRequest { token, pid, command } = request;
        if self.is_governed(caller.pid) || self.is_governed(pid) {
            return Err(OpenError::Nested);
        }
        let checked = peer::check_child(caller.pid, caller.uid, pid, None)?;
        let this = self.clone();
        // Token checks may fetch keys, and compiling may resolve host names
        // and stat files: off the runtime.
        let (verified, identity, rules) = tokio::task::spawn_blocking(move || {
            let verified = this.parts.verifier.verify(&token)?;
            let Some(identity) = this.parts.policies.match_identity(&verified.issuer, &verified.claims).cloned() else {
                return Err(OpenError::NoIdentity { issuer: verified.issuer, subject: verified.subject });
            };
            let rules = crate::policy::compile::compile(this.parts.policies.grants_for(&identity.name));
            Ok((verified, identity, rules))
        })
        .await
        .map_err(|e| OpenError::Internal(format!("token verification failed: {e}")))??;
        if self.parts.mode == ExecEnforcement::KillOnExec {
            for script in &rules.exec_deny_scripts {
                tracing::warn!(path = %script.display(), identity = %identity.name, "denied script cannot be stopped in kill-on-exec mode (it needs BPF LSM); deny its interpreter or use an allow list");
            }
        }
        for missing in &rules.exec_deny_missing {
            tracing::warn!(path = %missing.display(), identity = %identity.name, "denied executable does not exist; nothing to match");
        }
        if caller.uid == 0 && !identity.allow_root {
            return Err(OpenError::RootRefused(identity.name));
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err(OpenError::Closing);
        }

        let id = SessionId::generate();
        let privileged = caller.uid == 0;
        let (cgroup_path, cgroup_id) = self.parts.tree.create_session(id.as_str())?;
        let added = self.state().maps.add_session(cgroup_id, &rules);
        if let Err(e) = added {
            self.state().maps.remove_session(cgroup_id, &rules);
            discard(cgroup_path).await;
            return Err(e.into());
        }
        // Recorded before any process is in it, so every event has its session.
        let record = SessionRecord {
            id: id.clone(),
            identity: identity.name.clone(),
            subject: verified.subject.clone(),
            issuer: verified.issuer.clone(),
            claims: serde_json::to_value(&verified.claims).unwrap_or_default(),
            host: self.parts.host.clone(),
            uid: caller.uid,
            privileged,
            grants: rules.grants.clone(),
            cgroup: cgroup_path.display().to_string(),
            command,
            started_at: rfc3339(SystemTime::now()),
            ended_at: None,
        };
        let log = self.parts.log.clone();
        let recorded = tokio::task::spawn_blocking(move || log.open_session(record)).await;
        if !matches!(recorded, Ok(Ok(()))) {
            self.state().maps.remove_session(cgroup_id, &rules);
            discard(cgroup_path).await;
            return Err(OpenError::NotRecorded);
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
            deadline: identity.max_session.map(|limit| (Instant::now() + limit, limit)),
            ending: false,
        });
        // Checked again right before the move: the token check may have taken
        // seconds, in which the held child could have gone and its pid been reused.
        let moved = peer::check_child(caller.pid, caller.uid, pid, Some(checked))
            .map(|_| ())
            .map_err(|e| e.to_string())
            .and_then(|()| cgroup::move_process(&cgroup_path, pid).map_err(|e| e.to_string()));
        if let Err(e) = moved {
            tracing::warn!(session = %id, error = %e, "session opened but its command could not be placed in it; ending it");
            self.end(cgroup_id).await;
            return Err(OpenError::NotPlaced(e));
        }
        if privileged {
            tracing::warn!(session = %id, uid = 0, "PRIVILEGED session: it runs as root and could leave its cgroup or unload programs");
        }
        tracing::info!(session = %id, identity = %identity.name, subject = %verified.subject, pid, grants = ?grants, "session started");
        Ok(Opened {
            session: id,
            identity: identity.name,
            grants,
            privileged,
            exec_enforcement: self.parts.mode.as_str(),
        })
    }

    /// The session and route of a redirected connection.
    pub fn route_of(&self, cgroup_id: u64, rule_id: u32) -> Option<GovernedRoute> {
        let mut state = self.state();
        let session = state.registry.get_mut(cgroup_id)?;
        let route = session.rules.routes.get(&rule_id)?.clone();
        Some(GovernedRoute {
            session: session.id.clone(),
            uid: session.uid,
            identity: session.identity.clone(),
            subject: session.subject.clone(),
            rule_name: session.rules.rules.get(rule_id as usize).cloned().unwrap_or_default(),
            route: Arc::new(route),
        })
    }

    /// The session of a cgroup, live or recently ended.
    pub fn session_of(&self, cgroup_id: u64) -> Option<SessionId> {
        self.state().registry.session_of(cgroup_id)
    }

    /// Attributes a kernel event to its session (live or recently ended)
    /// and keeps the registry's view of who forked whom up to date.
    pub fn attribute(&self, event: &KernelEvent) -> Option<Attribution> {
        let origin = event.origin();
        let mut state = self.state();
        let session = state.registry.session_of(origin.cgroup_id)?;
        let active = state.registry.get_mut(origin.cgroup_id);
        let mut attribution = Attribution { session, creator: None, rule: None };
        match (event, active) {
            (KernelEvent::Exec { .. }, Some(active)) => {
                // The creator, if we saw the fork, even when the process has since been reparented.
                attribution.creator = active.creators.get(&origin.pid).copied();
            }
            (KernelEvent::Fork { child_pid, .. }, Some(active)) => {
                active.creators.insert(*child_pid, origin.pid);
            }
            (KernelEvent::Exit { .. }, Some(active)) => {
                active.creators.remove(&origin.pid);
            }
            (KernelEvent::Connect { rule_id: Some(rule_id), .. }, Some(active)) => {
                attribution.rule = active.rules.rules.get(*rule_id as usize).cloned();
            }
            _ => {}
        }
        Some(attribution)
    }

    /// Ends a live session now for a reviewer: recorded with who and why,
    /// then every process in it is killed; the reaper records its end.
    pub fn revoke(&self, id: &SessionId, by: String, reason: Option<String>) -> Result<Revoked, RevokeError> {
        let cgroup = {
            let mut state = self.state();
            let session = state
                .registry
                .active_mut()
                .find(|s| &s.id == id)
                .ok_or_else(|| RevokeError::NotLive(id.to_string()))?;
            if session.ending {
                return Err(RevokeError::AlreadyEnding(id.to_string()));
            }
            session.ending = true;
            session.cgroup.clone()
        };
        if let Err(e) = cgroup::kill_all(&cgroup) {
            tracing::error!(session = %id, error = %e, "cannot kill a revoked session's processes");
            if let Some(session) = self.state().registry.active_mut().find(|s| &s.id == id) {
                session.ending = false;
            }
            return Err(RevokeError::NotKilled(id.to_string(), e.to_string()));
        }
        let mut detail = Map::new();
        detail.insert("by".into(), by.clone().into());
        detail.insert("reason".into(), reason.clone().map_or(Value::Null, Value::from));
        self.parts.log.decided(id, RecordKind::Session, RecordVerdict::Revoked, detail);
        tracing::warn!(session = %id, by, reason = reason.as_deref().unwrap_or(""), "session revoked; its processes were killed");
        Ok(Revoked { session: id.clone(), by })
    }

    /// Ends the sessions that ran past their identity's `max_session`.
    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<(SessionId, PathBuf, Duration)> = self
            .state()
            .registry
            .active_mut()
            .filter(|s| !s.ending)
            .filter_map(|s| {
                let (deadline, limit) = s.deadline?;
                (deadline <= now).then(|| {
                    s.ending = true;
                    (s.id.clone(), s.cgroup.clone(), limit)
                })
            })
            .collect();
        for (id, cgroup, limit) in expired {
            if let Err(e) = cgroup::kill_all(&cgroup) {
                // Tried again at the next tick; recorded once it took.
                tracing::error!(session = %id, error = %e, "cannot kill an expired session's processes");
                if let Some(session) = self.state().registry.active_mut().find(|s| s.id == id) {
                    session.ending = false;
                }
                continue;
            }
            let mut detail = Map::new();
            detail.insert("max_session_secs".into(), limit.as_secs().into());
            self.parts.log.decided(&id, RecordKind::Session, RecordVerdict::Expired, detail);
            tracing::warn!(session = %id, "session reached its identity's max_session; its processes were killed");
        }
    }

    /// Ends a session: its kernel entries go first, then its cgroup (with
    /// anything left in it), then its record is closed.
    pub async fn end(&self, cgroup_id: u64) {
        let session = {
            let mut state = self.state();
            let Some(session) = state.registry.end(cgroup_id) else { return };
            state.maps.remove_session(cgroup_id, &session.rules);
            session
        };
        discard(session.cgroup.clone()).await;
        self.parts.log.end_session(session.id.clone());
        tracing::info!(session = %session.id, "session ended");
    }

    /// Ends sessions past their `max_session`, and sessions as their last
    /// process exits. A session is ended one tick after it is first seen
    /// empty, so that its last events, still in the ring buffer, are
    /// recorded before its end.
    pub async fn reap(self: Arc<Self>) -> anyhow::Result<()> {
        let mut seen_empty: Vec<u64> = Vec::new();
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        for ticks in 0u64.. {
            tick.tick().await;
            self.expire();
            if ticks % ALLOW_REFRESH_TICKS == 0 {
                self.refresh_allow_lists().await;
            }
            let empty: Vec<u64> = {
                let state = self.state();
                state.registry.active().filter(|s| !cgroup::populated(&s.cgroup)).map(|s| s.cgroup_id).collect()
            };
            for cgroup_id in std::mem::take(&mut seen_empty) {
                if empty.contains(&cgroup_id) {
                    self.end(cgroup_id).await;
                }
            }
            seen_empty = empty;
        }
        Ok(())
    }

    /// Brings each session's exec allow list up to date with what its
    /// patterns name now: a package upgrade replaces a listed file by a new
    /// one (rename over it), which must go on running, and the old file's
    /// inode must not stay allowed (a new file could take its number).
    async fn refresh_allow_lists(self: &Arc<Self>) {
        let lists: Vec<(u64, Vec<ExecPattern>, Vec<FileId>)> = self
            .state()
            .registry
            .active()
            .filter_map(|s| {
                let allow = s.rules.exec_allow.as_ref()?;
                let patterns = allow.patterns.iter().map(|(_, pattern)| pattern.clone()).collect();
                Some((s.cgroup_id, patterns, allow.files.iter().map(|(_, id)| *id).collect()))
            })
            .collect();
        if lists.is_empty() {
            return;
        }
        // Resolving and comparing happen off the runtime and outside the lock.
        let changes = tokio::task::spawn_blocking(move || {
            lists
                .into_iter()
                .filter_map(|(cgroup_id, patterns, known)| {
                    let now = resolve(&patterns).files;
                    let known: HashSet<FileId> = known.into_iter().collect();
                    let current: HashSet<FileId> = now.iter().map(|(_, id)| *id).collect();
                    let added: Vec<(PathBuf, FileId)> =
                        now.iter().filter(|(_, id)| !known.contains(id)).cloned().collect();
                    let removed: Vec<FileId> = known.difference(&current).copied().collect();
                    (!added.is_empty() || !removed.is_empty()).then_some((cgroup_id, now, added, removed))
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(changes) = changes else { return };
        let mut state = self.state();
        let State { maps, registry } = &mut *state;
        for (cgroup_id, now, added, removed) in changes {
            let Some(session) = registry.get_mut(cgroup_id) else { continue };
            let Some(allow) = session.rules.exec_allow.as_mut() else { continue };
            maps.disallow_files(cgroup_id, &removed);
            let ids: Vec<FileId> = added.iter().map(|(_, id)| *id).collect();
            if let Err(e) = maps.allow_files(cgroup_id, &ids) {
                tracing::error!(session = %session.id, error = %e, "cannot add replaced executables to the allow list");
                continue;
            }
            for (path, _) in &added {
                tracing::info!(session = %session.id, path = %path.display(), "a listed executable changed; the file it is now is allowed");
            }
            allow.files = now;
        }
    }

    /// Refuses new sessions, kills what still runs in sessions (nothing may
    /// run ungoverned once the programs detach) and records every session's end.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let live: Vec<(u64, PathBuf)> =
            self.state().registry.active().map(|s| (s.cgroup_id, s.cgroup.clone())).collect();
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
            self.end(cgroup_id).await;
        }
    }
}

/// Removes a session cgroup off the runtime: emptying it may wait.
pub(super) async fn discard(path: PathBuf) {
    let removed = tokio::task::spawn_blocking(move || cgroup::discard(Path::new(&path))).await;
    if let Err(e) = removed {
        tracing::warn!(error = %e, "cgroup removal task failed");
    }
}
