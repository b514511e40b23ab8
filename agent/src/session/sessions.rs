//! [`Sessions`]: opening a session for a caller, attributing kernel events
//! to sessions, ending a session when its last process exits, and ending
//! all of them when the daemon stops.

use std::{
    collections::{HashMap, HashSet},
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
    ActiveSession, EmptiedWatch, Registry,
    cgroup::{self, CgroupError, CgroupTree},
    grants::GrantBook,
    peer::{self, PeerError},
};
use crate::{
    bpf::{BpfError, EventBacklog, ExecEnforcement, SessionMaps, events::KernelEvent},
    identity::{TokenError, Verifier},
    policy::{
        PolicySet,
        compile::{Decided, ExecAllow, FileId, RuleRef, SessionRoute, SessionRules, compile},
        exec_files::ExecPattern,
        intersect::intersect,
    },
    store::{RecordKind, RecordVerdict, SessionId, SessionLog, SessionRecord, rfc3339},
};

/// How often session cgroups are checked for their last process.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// How long an empty session waits for its last events to be read (a log
/// writer far behind leaves them in the ring buffer) before it ends anyway.
const LAST_EVENTS_WAIT: Duration = Duration::from_secs(5);
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
    /// Whose rights the session carries.
    pub authority: Authority,
    /// The caller's held child, not yet executed.
    pub pid: u32,
    /// The command it will execute, for the record.
    pub command: Vec<String>,
    /// Why, for the record (required by identities with `require_reason`).
    pub reason: Option<String>,
    /// The session ends once this has passed.
    pub ttl: Option<Duration>,
}

/// Whose rights a new session carries.
#[derive(Debug, Clone)]
pub enum Authority {
    /// The identity of a token (cut down to the parent's rights inside a session).
    Token(String),
    /// Inside a session only: the same identity, with only these of the parent's grants.
    Grants(Vec<String>),
}

/// One session of a delegation chain, as reviewers see it.
#[derive(Debug, Clone, Serialize)]
pub struct ChainLink {
    /// The session.
    pub session: SessionId,
    /// Its identity.
    pub identity: String,
    /// Its subject.
    pub subject: String,
    /// Why it was opened.
    pub reason: Option<String>,
    /// Its depth (0 at the top).
    pub depth: u32,
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
    /// The session it was opened from, for a child session.
    pub parent: Option<SessionId>,
    /// Its depth in the chain (0 at the top).
    pub depth: u32,
    /// Its terminal output is recorded: the command gets a terminal the daemon holds.
    pub record_output: bool,
}

/// Why no session was opened. Nothing of it is left behind.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The caller runs in a cgroup below the sessions that is no live session.
    #[error("the caller runs in no live session of this daemon; cannot open a child session")]
    UnknownParent,
    /// The held child does not run where its caller does.
    #[error("the process to place does not run in the caller's session")]
    ChildElsewhere,
    /// `--grant` outside a session.
    #[error("--grant opens a child session and works only inside a session; outside one, give --token-file")]
    GrantsOutside,
    /// `--grant` naming a grant the parent does not hold.
    #[error("the parent session holds no grant '{0}'")]
    UnknownGrant(String),
    /// The identity requires a reason.
    #[error("identity '{0}' requires a reason for every session (--reason TEXT)")]
    ReasonRequired(String),
    /// The chain would be deeper than allowed.
    #[error("delegation chains may be at most {0} sessions deep")]
    TooDeep(u32),
    /// The parent is being revoked or has expired.
    #[error("the parent session is ending; no child sessions")]
    ParentEnding,
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
    /// The session and every session above it, innermost first.
    pub chain: Vec<ChainLink>,
    /// The uids of every session of the chain (none of them may approve its requests).
    pub uids: Vec<u32>,
}

/// What the registry knows about the process behind a kernel event.
#[derive(Debug, Clone)]
pub struct Attribution {
    /// The event's session.
    pub session: SessionId,
    /// For an exec: the process that forked it, if that fork was seen.
    pub creator: Option<u32>,
    /// For a connect or exec: the rules that decided, if any did.
    pub rule: Option<Decided>,
}

/// The sessions of this daemon: registry, kernel maps, cgroups, verifier
/// and policies. One lock guards the registry and the maps together, so
/// the kernel and the registry never disagree about a session.
pub struct Sessions {
    pub(super) parts: SessionsParts,
    /// The policies and issuers in force now (a reload replaces them).
    current: Mutex<Arc<Loaded>>,
    state: Mutex<State>,
    /// Which grants are honoured, and when each was last exercised.
    pub(super) book: Mutex<GrantBook>,
    /// The `tollgate run` clients waiting to hear of their session's denials and end.
    watchers: Mutex<std::collections::HashMap<SessionId, Vec<tokio::sync::mpsc::Sender<Notice>>>>,
    /// Set when the daemon begins to stop: no new sessions after that.
    closing: AtomicBool,
    /// The sessions' resolvers, once the daemon has started them.
    resolvers: std::sync::OnceLock<Arc<dyn Resolvers>>,
    /// Hears sessions' cgroups empty, once the daemon has started it.
    emptied: std::sync::OnceLock<Arc<EmptiedWatch>>,
}

/// Each session's resolver: where the kernel sends its DNS traffic.
pub trait Resolvers: Send + Sync {
    /// Starts the resolver of the session in `cgroup_id`; returns its port
    /// (on 127.0.0.1 and ::1, UDP and TCP).
    fn open(&self, cgroup_id: u64) -> Result<u16, String>;
    /// Stops it and forgets what it added.
    fn close(&self, cgroup_id: u64);
}

pub(super) struct State {
    pub(super) maps: SessionMaps,
    pub(super) registry: Registry,
}

/// What a session's resolver judges queries by.
pub struct NamesView {
    /// The session.
    pub session: SessionId,
    /// Its name rules, a level per session of its chain (outermost first).
    pub levels: Vec<crate::policy::compile::NameLevel>,
    /// Each rule's description, by rule id.
    pub rules: Vec<String>,
    /// Its compiled entries.
    pub net: Vec<crate::policy::compile::NetEntry>,
}

/// Who a session speaks for: its token's subject, issuer and claims (a
/// `--grant` child has its parent's).
#[derive(Debug, Clone)]
struct Who {
    subject: String,
    issuer: String,
    claims: Value,
}

/// A live parent of a session being opened.
#[derive(Debug, Clone)]
struct Parent {
    id: SessionId,
    cgroup_id: u64,
    cgroup: PathBuf,
    depth: u32,
    identity: String,
    who: Who,
    /// The grants of its own level.
    grants: Vec<String>,
    rules: SessionRules,
}

/// What a session's `tollgate run` is told while its command runs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "notice", rename_all = "snake_case")]
pub enum Notice {
    /// Something a process of the session did was refused.
    Denied {
        /// One line: what, and the grant and rule that decided.
        text: String,
    },
    /// The session is being ended by policy (revoked, expired).
    Ending {
        /// One line: why.
        text: String,
    },
    /// The session ended (its last process is gone).
    Ended,
}

/// Notices a slow client has not read yet, at most; more are dropped
/// (the session log has them all).
const NOTICE_QUEUE: usize = 64;

/// What set a session's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// The identity's `max_session`.
    MaxSession,
    /// The caller's `--ttl`.
    Ttl,
}

/// The policies and issuers in force: replaced whole on a reload, so a
/// session opens under one consistent pair.
pub struct Loaded {
    /// The policies.
    pub policies: Arc<PolicySet>,
    /// Checks tokens against the configured issuers.
    pub verifier: Arc<Verifier>,
    /// When they were loaded.
    pub at: SystemTime,
}

impl Loaded {
    /// Loaded now.
    pub fn new(policies: PolicySet, verifier: Verifier) -> Self {
        Self { policies: Arc::new(policies), verifier: Arc::new(verifier), at: SystemTime::now() }
    }
}

/// What [`Sessions`] works with, besides the kernel maps and the policies
/// and issuers in force (which a reload replaces).
pub struct SessionsParts {
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
    /// The deepest a delegation chain may go (sessions, counting the top).
    pub max_depth: u32,
    /// The kernel's counts of events it could not deliver.
    pub lost: super::LostEvents,
}

impl Sessions {
    /// No sessions yet; `loaded` is in force, their rules go into `maps`.
    pub fn new(parts: SessionsParts, loaded: Loaded, maps: SessionMaps) -> Self {
        let state = Mutex::new(State { maps, registry: Registry::default() });
        let current = Mutex::new(Arc::new(loaded));
        Self {
            parts,
            current,
            state,
            book: Mutex::default(),
            watchers: Mutex::default(),
            closing: AtomicBool::new(false),
            resolvers: std::sync::OnceLock::new(),
            emptied: std::sync::OnceLock::new(),
        }
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not stop enforcement bookkeeping.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn book(&self) -> MutexGuard<'_, GrantBook> {
        self.book.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The policies and issuers in force now.
    pub fn loaded(&self) -> Arc<Loaded> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// The policies in force now.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.loaded().policies.clone()
    }

    /// Puts new policies and issuers in force (after they loaded whole).
    pub(super) fn replace_loaded(&self, loaded: Loaded) {
        *self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(loaded);
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
            // The innermost session: child sessions nest in their parent's cgroup.
            Ok(relative) => Placement::Inside(
                relative
                    .components()
                    .next_back()
                    .and_then(|c| c.as_os_str().to_str())
                    .and_then(|name| name.parse().ok()),
            ),
            Err(_) => Placement::Outside,
        }
    }

    /// Checks a token against the trusted issuers (blocking: may fetch keys).
    pub fn verify_token(&self, token: &str) -> Result<crate::identity::VerifiedToken, TokenError> {
        self.loaded().verifier.verify(token)
    }

    /// Does a process of a live session hold the local end of the TCP
    /// connection from `peer` to `local`? (Blocking: reads /proc.) A peer on
    /// another host is no session; a local one whose socket cannot be found
    /// counts as governed: fail closed.
    pub fn holds_connection(&self, peer: std::net::SocketAddr, local: std::net::SocketAddr) -> bool {
        if !peer::is_local_address(peer.ip()) {
            return false;
        }
        let Some(inode) = peer::tcp_socket_inode(peer, local) else { return true };
        let cgroups: Vec<PathBuf> = self.state().registry.active().map(|s| s.cgroup.clone()).collect();
        cgroups.iter().any(|cgroup| peer::cgroup_holds_socket(cgroup, inode))
    }

    /// True when `pid` runs inside one of this daemon's sessions.
    pub fn is_governed(&self, pid: u32) -> bool {
        matches!(self.placement(pid), Placement::Inside(_))
    }

    /// Verifies the token (or, for `--grant`, the parent's grants), then
    /// creates the session's cgroup (inside its parent's, for a child), fills
    /// the kernel maps, records the session and moves the caller's held
    /// child in. On any failure before the move everything is undone and
    /// the child stays where it was (the client then ends it without
    /// running the command).
    pub async fn open(self: &Arc<Self>, caller: Caller, request: OpenRequest) -> Result<Opened, OpenError> {
        let OpenRequest { authority, pid, command, reason, ttl } = request;
        let reason = reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty());
        let parent = match self.placement(caller.pid) {
            Placement::Outside => None,
            Placement::Inside(None) => return Err(OpenError::UnknownParent),
            Placement::Inside(Some(id)) => Some(id),
        };
        if self.placement(pid) != self.placement(caller.pid) {
            return Err(OpenError::ChildElsewhere);
        }
        let checked = peer::check_child(caller.pid, caller.uid, pid, None)?;
        let parent = match &parent {
            None => None,
            Some(id) => Some(self.parent_of(id)?),
        };
        if let Some(parent) = &parent
            && parent.depth + 1 >= self.parts.max_depth
        {
            return Err(OpenError::TooDeep(self.parts.max_depth));
        }
        let this = self.clone();
        let withdrawn = self.book().withdrawn();
        let withdrawn_when_compiled = withdrawn.clone();
        let parent_for_compile = parent.clone();
        // Token checks may fetch keys, and compiling may resolve host names
        // and stat files: off the runtime.
        let (who, identity, own_grants, rules, policies) = tokio::task::spawn_blocking(move || {
            let loaded = this.loaded();
            let policies = &loaded.policies;
            let (who, identity, own_grants) = match (authority, &parent_for_compile) {
                (Authority::Token(token), _) => {
                    let verified = loaded.verifier.verify(&token)?;
                    let Some(identity) = policies.match_identity(&verified.issuer, &verified.claims).cloned() else {
                        return Err(OpenError::NoIdentity { issuer: verified.issuer, subject: verified.subject });
                    };
                    let grants = policies.grants_for(&identity.name).map(|g| g.name.clone()).collect();
                    let who = Who {
                        subject: verified.subject,
                        issuer: verified.issuer,
                        claims: serde_json::to_value(&verified.claims).unwrap_or_default(),
                    };
                    (who, identity, grants)
                }
                (Authority::Grants(_), None) => return Err(OpenError::GrantsOutside),
                (Authority::Grants(names), Some(parent)) => {
                    if let Some(unknown) = names.iter().find(|name| !parent.grants.contains(name)) {
                        return Err(OpenError::UnknownGrant(unknown.clone()));
                    }
                    let identity = policies
                        .identities
                        .iter()
                        .find(|i| i.name == parent.identity)
                        .cloned()
                        .ok_or(OpenError::UnknownParent)?;
                    let mut names = names;
                    names.sort();
                    names.dedup();
                    (parent.who.clone(), identity, names)
                }
            };
            let rules =
                effective_rules(policies, &own_grants, &withdrawn, parent_for_compile.as_ref().map(|p| &p.rules));
            Ok((who, identity, own_grants, rules, loaded.policies.clone()))
        })
        .await
        .map_err(|e| OpenError::Internal(format!("token verification failed: {e}")))??;
        if identity.require_reason && reason.is_none() {
            return Err(OpenError::ReasonRequired(identity.name));
        }
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
        let depth = parent.as_ref().map_or(0, |p| p.depth + 1);
        let under = parent.as_ref().map_or(self.parts.tree.sessions.as_path(), |p| p.cgroup.as_path());
        let (cgroup_path, cgroup_id) = cgroup::create_session(under, id.as_str())?;
        // DNS goes to the session's resolver from its first process on.
        let dns_port = match self.open_resolver(cgroup_id) {
            Ok(port) => port,
            Err(why) => {
                discard(cgroup_path).await;
                return Err(OpenError::Internal(format!("cannot start the session's resolver: {why}")));
            }
        };
        let added = {
            let mut state = self.state();
            // The parent may have ended while its child's rules compiled.
            match &parent {
                Some(p) if state.registry.get_mut(p.cgroup_id).is_none_or(|live| live.ending) => {
                    Err(OpenError::ParentEnding)
                }
                _ => state.maps.add_session(cgroup_id, &rules, Some(dns_port)).map_err(OpenError::from),
            }
        };
        if let Err(e) = added {
            self.state().maps.remove_session(cgroup_id, &rules);
            self.close_resolver(cgroup_id);
            discard(cgroup_path).await;
            return Err(e);
        }
        // Recorded before any process is in it, so every event has its session.
        let record = SessionRecord {
            id: id.clone(),
            identity: identity.name.clone(),
            subject: who.subject.clone(),
            issuer: who.issuer.clone(),
            claims: who.claims.clone(),
            host: self.parts.host.clone(),
            uid: caller.uid,
            privileged,
            grants: rules.grants.clone(),
            cgroup: cgroup_path.display().to_string(),
            command,
            started_at: rfc3339(SystemTime::now()),
            ended_at: None,
            parent: parent.as_ref().map(|p| p.id.clone()),
            depth,
            reason: reason.clone(),
            ttl_secs: ttl.map(|t| t.as_secs()),
        };
        let log = self.parts.log.clone();
        let recorded = tokio::task::spawn_blocking(move || log.open_session(record)).await;
        if !matches!(recorded, Ok(Ok(()))) {
            self.state().maps.remove_session(cgroup_id, &rules);
            self.close_resolver(cgroup_id);
            discard(cgroup_path).await;
            return Err(OpenError::NotRecorded);
        }
        let grants = rules.grants.clone();
        // The earliest of the identity's max_session and the caller's --ttl.
        let deadline = [identity.max_session.map(|l| (l, Lifetime::MaxSession)), ttl.map(|t| (t, Lifetime::Ttl))]
            .into_iter()
            .flatten()
            .min_by_key(|(limit, _)| *limit)
            .map(|(limit, why)| (Instant::now() + limit, limit, why));
        self.state().registry.insert(ActiveSession {
            id: id.clone(),
            identity: identity.name.clone(),
            subject: who.subject.clone(),
            issuer: who.issuer,
            claims: who.claims,
            parent: parent.as_ref().map(|p| p.cgroup_id),
            depth,
            reason,
            own_grants,
            policies,
            uid: caller.uid,
            cgroup: cgroup_path.clone(),
            cgroup_id,
            rules,
            creators: Default::default(),
            deadline,
            ending: false,
        });
        self.watch_emptying(&cgroup_path, cgroup_id);
        // A grant withdrawn while this session's rules compiled (here or in
        // its parent) must not stay in them.
        if self.book().withdrawn() != withdrawn_when_compiled {
            self.recompile_live().await;
        }
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
        let parent_id = parent.map(|p| p.id);
        tracing::info!(session = %id, identity = %identity.name, subject = %who.subject, pid, grants = ?grants, parent = ?parent_id, depth, "session started");
        Ok(Opened {
            session: id,
            identity: identity.name,
            grants,
            privileged,
            exec_enforcement: self.parts.mode.as_str(),
            parent: parent_id,
            depth,
            record_output: identity.record_output,
        })
    }

    /// The regex masks of a session's routes, for its terminal output.
    pub fn output_masks(&self, id: &SessionId) -> Vec<(regex::Regex, String)> {
        let state = self.state();
        let Some(session) = state.registry.by_id(id) else { return Vec::new() };
        session
            .rules
            .routes
            .values()
            .flat_map(|route| route.route.mask.iter())
            .filter_map(|mask| match mask {
                crate::policy::route::Mask::Regex { regex, replace } => Some((regex.0.clone(), replace.clone())),
                crate::policy::route::Mask::JsonPath { .. } | crate::policy::route::Mask::Column { .. } => None,
            })
            .collect()
    }

    /// What a child session needs of its live parent.
    fn parent_of(&self, id: &SessionId) -> Result<Parent, OpenError> {
        let state = self.state();
        let parent = state.registry.by_id(id).ok_or(OpenError::UnknownParent)?;
        if parent.ending {
            return Err(OpenError::ParentEnding);
        }
        Ok(Parent {
            id: parent.id.clone(),
            cgroup_id: parent.cgroup_id,
            cgroup: parent.cgroup.clone(),
            depth: parent.depth,
            identity: parent.identity.clone(),
            who: Who { subject: parent.subject.clone(), issuer: parent.issuer.clone(), claims: parent.claims.clone() },
            grants: parent.rules.grants.clone(),
            rules: parent.rules.clone(),
        })
    }

    /// The session and route of a redirected connection.
    pub fn route_of(&self, cgroup_id: u64, rule_id: u32) -> Option<GovernedRoute> {
        let state = self.state();
        let chain = state.registry.chain(cgroup_id);
        let session = chain.first()?;
        let route = session.rules.routes.get(&rule_id)?.clone();
        Some(GovernedRoute {
            session: session.id.clone(),
            uid: session.uid,
            identity: session.identity.clone(),
            subject: session.subject.clone(),
            rule_name: session.rules.rules.get(rule_id as usize).map(ToString::to_string).unwrap_or_default(),
            route,
            chain: chain.iter().map(|s| link(s)).collect(),
            uids: chain.iter().map(|s| s.uid).collect(),
        })
    }

    /// Hands the sessions their resolvers (once, when the daemon starts them).
    pub fn set_resolvers(&self, resolvers: Arc<dyn Resolvers>) {
        let _ = self.resolvers.set(resolvers);
    }

    /// Sessions opened from now on are ended as soon as their cgroup
    /// empties (see [`Sessions::end_as_emptied`]).
    pub fn set_emptied_watch(&self, watch: Arc<EmptiedWatch>) {
        let _ = self.emptied.set(watch);
    }

    /// Watches a new session's cgroup for its emptying; without the watch,
    /// the reap tick still ends it.
    pub(super) fn watch_emptying(&self, cgroup: &Path, cgroup_id: u64) {
        if let Some(watch) = self.emptied.get()
            && let Err(e) = watch.watch(cgroup, cgroup_id)
        {
            tracing::warn!(cgroup = %cgroup.display(), error = %e, "cannot watch a session's cgroup; its end is noticed at the next reap tick");
        }
    }

    /// Starts a session's resolver; 0 when the daemon runs none.
    pub(super) fn open_resolver(&self, cgroup_id: u64) -> Result<u16, String> {
        match self.resolvers.get() {
            Some(resolvers) => resolvers.open(cgroup_id),
            None => Ok(0),
        }
    }

    pub(super) fn close_resolver(&self, cgroup_id: u64) {
        if let Some(resolvers) = self.resolvers.get() {
            resolvers.close(cgroup_id);
        }
    }

    /// What a session's resolver judges by: the session, its name rules
    /// (a level per session of the chain), the descriptions of its rules
    /// and its compiled entries.
    pub fn names_of(&self, cgroup_id: u64) -> Option<NamesView> {
        let state = self.state();
        let chain = state.registry.chain(cgroup_id);
        let session = chain.first()?;
        Some(NamesView {
            session: session.id.clone(),
            levels: session.rules.names.clone(),
            rules: session.rules.rules.iter().map(ToString::to_string).collect(),
            net: session.rules.net.clone(),
        })
    }

    /// Adds an entry for an address a session's resolver answered.
    pub fn put_resolved(&self, cgroup_id: u64, entry: &crate::policy::compile::NetEntry) -> Result<(), String> {
        let mut state = self.state();
        // A session that ended meanwhile keeps nothing.
        if state.registry.get_mut(cgroup_id).is_none() {
            return Err("the session ended".to_owned());
        }
        state.maps.put_entry(cgroup_id, entry).map_err(|e| e.to_string())
    }

    /// Removes an entry [`Sessions::put_resolved`] added.
    pub fn remove_resolved(&self, cgroup_id: u64, entry: &crate::policy::compile::NetEntry) {
        self.state().maps.remove_entry(cgroup_id, entry);
    }

    /// Subscribes to a session's notices (for the `tollgate run` that opened it).
    pub fn watch(&self, id: &SessionId) -> tokio::sync::mpsc::Receiver<Notice> {
        let (tx, rx) = tokio::sync::mpsc::channel(NOTICE_QUEUE);
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        watchers.entry(id.clone()).or_default().push(tx);
        rx
    }

    fn has_watchers(&self, id: &SessionId) -> bool {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner()).get(id).is_some_and(|list| !list.is_empty())
    }

    /// Tells a session's watchers; an ended session's watchers are let go.
    fn notify(&self, id: &SessionId, notice: Notice) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let ended = notice == Notice::Ended;
        if let Some(list) = watchers.get_mut(id) {
            list.retain(|tx| !tx.is_closed());
            for tx in list.iter() {
                let _ = tx.try_send(notice.clone());
            }
        }
        if ended {
            watchers.remove(id);
        }
    }

    /// The session of a cgroup, live or recently ended.
    pub fn session_of(&self, cgroup_id: u64) -> Option<SessionId> {
        self.state().registry.session_of(cgroup_id)
    }

    /// Attributes a kernel event to its session (live or recently ended),
    /// names the rules that decided it (and counts them as exercised), and
    /// keeps the registry's view of who forked whom up to date.
    pub fn attribute(&self, event: &KernelEvent) -> Option<Attribution> {
        let origin = event.origin();
        let mut state = self.state();
        let (session, active) = state.registry.attribute(origin.cgroup_id)?;
        let mut attribution = Attribution { session, creator: None, rule: None };
        match (event, active) {
            (KernelEvent::Exec { file, verdict, .. }, Some(active)) => {
                // The creator, if we saw the fork, even when the process has since been reparented.
                attribution.creator = active.creators.get(&origin.pid).copied();
                attribution.rule = exec_rule(&active.rules, *file, *verdict);
            }
            (KernelEvent::Fork { child_pid, .. }, Some(active)) => {
                active.creators.insert(*child_pid, origin.pid);
            }
            (KernelEvent::Exit { .. }, Some(active)) => {
                active.creators.remove(&origin.pid);
            }
            (KernelEvent::Connect { rule_id: Some(rule_id), .. }, Some(active)) => {
                attribution.rule = active.rules.rules.get(*rule_id as usize).filter(|d| !d.rules().is_empty()).cloned();
            }
            _ => {}
        }
        drop(state);
        if let Some(text) = denial_text(event, attribution.rule.as_ref()) {
            self.notify(&attribution.session, Notice::Denied { text });
        }
        let let_through = match event {
            KernelEvent::Exec { verdict, .. } | KernelEvent::Connect { verdict, .. } => {
                matches!(verdict, tollgate_common::Verdict::Allow | tollgate_common::Verdict::Redirect)
            }
            _ => false,
        };
        if let_through && let Some(decided) = &attribution.rule {
            let mut book = self.book();
            for rule in decided.rules() {
                book.exercised(&rule.grant, SystemTime::now());
            }
        }
        Some(attribution)
    }

    /// Ends a live session now for a reviewer: recorded with who and why,
    /// then every process in it (and in its child sessions) is killed; the
    /// reaper records the ends.
    pub fn revoke(&self, id: &SessionId, by: String, reason: Option<String>) -> Result<Revoked, RevokeError> {
        let (cgroup, children) = {
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
            let (cgroup, cgroup_id) = (session.cgroup.clone(), session.cgroup_id);
            (cgroup, mark_ending(&mut state.registry, cgroup_id))
        };
        if let Err(e) = cgroup::kill_all(&cgroup) {
            tracing::error!(session = %id, error = %e, "cannot kill a revoked session's processes");
            let mut state = self.state();
            for session in state.registry.active_mut().filter(|s| &s.id == id || children.contains(&s.id)) {
                session.ending = false;
            }
            return Err(RevokeError::NotKilled(id.to_string(), e.to_string()));
        }
        let mut detail = Map::new();
        detail.insert("by".into(), by.clone().into());
        detail.insert("reason".into(), reason.clone().map_or(Value::Null, Value::from));
        self.record_subtree(id, &children, RecordVerdict::Revoked, detail);
        tracing::warn!(session = %id, by, reason = reason.as_deref().unwrap_or(""), "session revoked; its processes were killed");
        Ok(Revoked { session: id.clone(), by })
    }

    /// Records a session's end (revoked, expired) in it and in each of its
    /// child sessions, which end with it.
    fn record_subtree(
        &self,
        id: &SessionId,
        children: &[SessionId],
        verdict: RecordVerdict,
        detail: Map<String, Value>,
    ) {
        self.parts.log.decided(id, RecordKind::Session, verdict, detail.clone());
        let why = match (verdict, detail.get("by").and_then(Value::as_str)) {
            (RecordVerdict::Revoked, Some(by)) => format!(
                "session revoked by {by}{}",
                detail.get("reason").and_then(Value::as_str).map_or(String::new(), |r| format!(": {r}"))
            ),
            (RecordVerdict::Expired, _) if detail.contains_key("ttl_secs") => "session reached its --ttl".to_owned(),
            (RecordVerdict::Expired, _) => "session reached its identity's max_session".to_owned(),
            _ => "session ended by policy".to_owned(),
        };
        self.notify(id, Notice::Ending { text: why.clone() });
        for child in children {
            self.notify(child, Notice::Ending { text: format!("{why} (its parent {id} ended)") });
            let mut detail = detail.clone();
            detail.insert("ended_with".into(), id.to_string().into());
            self.parts.log.decided(child, RecordKind::Session, verdict, detail);
        }
    }

    /// Ends the sessions that ran past their identity's `max_session` or their `--ttl`.
    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<(SessionId, PathBuf, Duration, Lifetime, Vec<SessionId>)> = {
            let mut state = self.state();
            let due: Vec<(u64, SessionId, PathBuf, Duration, Lifetime)> = state
                .registry
                .active_mut()
                .filter(|s| !s.ending)
                .filter_map(|s| {
                    let (deadline, limit, why) = s.deadline?;
                    (deadline <= now).then(|| (s.cgroup_id, s.id.clone(), s.cgroup.clone(), limit, why))
                })
                .collect();
            due.into_iter()
                .filter_map(|(cgroup_id, id, cgroup, limit, why)| {
                    // A parent expiring in the same tick already took this one.
                    let session = state.registry.get_mut(cgroup_id)?;
                    if session.ending {
                        return None;
                    }
                    session.ending = true;
                    let children = mark_ending(&mut state.registry, cgroup_id);
                    Some((id, cgroup, limit, why, children))
                })
                .collect()
        };
        for (id, cgroup, limit, why, children) in expired {
            if let Err(e) = cgroup::kill_all(&cgroup) {
                // Tried again at the next tick; recorded once it took.
                tracing::error!(session = %id, error = %e, "cannot kill an expired session's processes");
                let mut state = self.state();
                for session in state.registry.active_mut().filter(|s| s.id == id || children.contains(&s.id)) {
                    session.ending = false;
                }
                continue;
            }
            let mut detail = Map::new();
            let field = match why {
                Lifetime::MaxSession => "max_session_secs",
                Lifetime::Ttl => "ttl_secs",
            };
            detail.insert(field.into(), limit.as_secs().into());
            self.record_subtree(&id, &children, RecordVerdict::Expired, detail);
            tracing::warn!(session = %id, limit = field, "session ran out of time; its processes were killed");
        }
    }

    /// Reports what the kernel could not deliver since the last report, in
    /// each session's record (see [`super::LostEvents`]).
    pub fn report_lost(&self) {
        self.parts.lost.report_all(|cgroup_id| self.session_of(cgroup_id), &self.parts.log);
    }

    /// Ends a session and its child sessions (deepest first): each one's
    /// kernel entries go first, then its cgroup (with anything left in it),
    /// then its record is closed.
    pub async fn end(&self, cgroup_id: u64) {
        let mut order = self.state().registry.descendants(cgroup_id);
        order.push(cgroup_id);
        for cgroup_id in order {
            let session = {
                let mut state = self.state();
                let Some(session) = state.registry.end(cgroup_id) else { continue };
                state.maps.remove_session(cgroup_id, &session.rules);
                session
            };
            self.close_resolver(cgroup_id);
            discard(session.cgroup.clone()).await;
            // Its last events are read by now; what the kernel could not
            // deliver goes into its record before the end does.
            self.parts.lost.report_session(cgroup_id, &session.id, &self.parts.log);
            self.parts.log.end_session(session.id.clone());
            // Its `run` hears of the end once the record says so.
            if self.has_watchers(&session.id) {
                let log = self.parts.log.clone();
                let _ = tokio::task::spawn_blocking(move || log.flush()).await;
            }
            self.notify(&session.id, Notice::Ended);
            tracing::info!(session = %session.id, "session ended");
        }
    }

    /// Ends each session as soon as its cgroup empties and every event its
    /// processes put into the ring buffer is in the log, so its record ends
    /// with its last events. Where that cannot be told within
    /// [`REAP_INTERVAL`] (the reader is far behind, or the kernel has no
    /// count for the session), [`Sessions::reap`] ends it instead.
    /// Runs for as long as the daemon does; without a watch, or once the
    /// watch fails, it leaves every end to the reap tick.
    pub async fn end_as_emptied(self: Arc<Self>, backlog: Arc<EventBacklog>) -> anyhow::Result<()> {
        let Some(watch) = self.emptied.get().cloned() else { return std::future::pending().await };
        loop {
            let changed = match watch.changed().await {
                Ok(changed) => changed,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read sessions' cgroup changes (inotify); sessions now end at the reap tick after their last process");
                    return std::future::pending().await;
                }
            };
            for cgroup_id in changed {
                let subtree = {
                    let state = self.state();
                    match state.registry.get(cgroup_id) {
                        Some(session) if !session.ending && !cgroup::populated(&session.cgroup) => {
                            let mut subtree = state.registry.descendants(cgroup_id);
                            subtree.push(cgroup_id);
                            subtree
                        }
                        _ => continue,
                    }
                };
                let (sessions, backlog) = (self.clone(), backlog.clone());
                tokio::spawn(async move {
                    let give_up = Instant::now() + REAP_INTERVAL;
                    while Instant::now() < give_up {
                        backlog.request_drain();
                        match backlog.all_drained(&subtree) {
                            Some(true) => {
                                sessions.end(cgroup_id).await;
                                return;
                            }
                            Some(false) => tokio::time::sleep(Duration::from_millis(1)).await,
                            None => return,
                        }
                    }
                });
            }
        }
    }

    /// Ends sessions past their `max_session`, and sessions as their last
    /// process exits (where [`Sessions::end_as_emptied`] did not): from the
    /// tick after one is first seen empty, once its last events are read
    /// (or that cannot be told), and after [`LAST_EVENTS_WAIT`] regardless.
    pub async fn reap(self: Arc<Self>, backlog: Arc<EventBacklog>) -> anyhow::Result<()> {
        // Each empty session, with when it was first seen empty.
        let mut seen_empty: HashMap<u64, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        for ticks in 0u64.. {
            tick.tick().await;
            self.expire();
            if ticks % ALLOW_REFRESH_TICKS == 0 {
                self.expire_grants().await;
                self.refresh_allow_lists().await;
            }
            let empty: Vec<(u64, Vec<u64>)> = {
                let state = self.state();
                state
                    .registry
                    .active()
                    .filter(|s| !cgroup::populated(&s.cgroup))
                    .map(|s| {
                        let mut subtree = state.registry.descendants(s.cgroup_id);
                        subtree.push(s.cgroup_id);
                        (s.cgroup_id, subtree)
                    })
                    .collect()
            };
            let now = Instant::now();
            let mut still_empty = HashMap::new();
            for (cgroup_id, subtree) in empty {
                match seen_empty.get(&cgroup_id) {
                    // Its events are read, or cannot be told apart, or it
                    // waited long enough: late events still find it.
                    Some(&first)
                        if backlog.all_drained(&subtree) != Some(false)
                            || now.duration_since(first) >= LAST_EVENTS_WAIT =>
                    {
                        self.end(cgroup_id).await;
                    }
                    Some(&first) => {
                        still_empty.insert(cgroup_id, first);
                    }
                    None => {
                        still_empty.insert(cgroup_id, now);
                    }
                }
            }
            seen_empty = still_empty;
        }
        Ok(())
    }

    /// Brings each session's exec allow list up to date with what its
    /// patterns name now: a package upgrade replaces a listed file by a new
    /// one (rename over it), which must go on running, and the old file's
    /// inode must not stay allowed (a new file could take its number).
    async fn refresh_allow_lists(self: &Arc<Self>) {
        type Levels = Vec<Vec<(RuleRef, ExecPattern)>>;
        let lists: Vec<(u64, Levels, Vec<FileId>)> = self
            .state()
            .registry
            .active()
            .filter_map(|s| {
                let allow = s.rules.exec_allow.as_ref()?;
                Some((s.cgroup_id, allow.levels.clone(), allow.ids()))
            })
            .collect();
        if lists.is_empty() {
            return;
        }
        // Resolving and comparing happen off the runtime and outside the lock.
        let changes = tokio::task::spawn_blocking(move || {
            lists
                .into_iter()
                .filter_map(|(cgroup_id, levels, known)| {
                    let now = ExecAllow::files_of(&levels);
                    let known: HashSet<FileId> = known.into_iter().collect();
                    let current: HashSet<FileId> = now.iter().map(|(_, id, _)| *id).collect();
                    let added: Vec<(PathBuf, FileId)> = now
                        .iter()
                        .filter(|(_, id, _)| !known.contains(id))
                        .map(|(p, id, _)| (p.clone(), *id))
                        .collect();
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

/// A session's rules: its own grants as `policies` define them (those still
/// honoured), cut down to its parent's effective rules when it has a parent.
/// Blocking.
pub(super) fn effective_rules(
    policies: &PolicySet,
    own_grants: &[String],
    withdrawn: &std::collections::BTreeSet<String>,
    parent: Option<&SessionRules>,
) -> SessionRules {
    let grants = policies.grants.iter().filter(|g| own_grants.contains(&g.name));
    let own = compile(grants, withdrawn);
    match parent {
        Some(parent) => intersect(parent, own),
        None => own,
    }
}

/// A session as a link of its chain.
fn link(session: &ActiveSession) -> ChainLink {
    ChainLink {
        session: session.id.clone(),
        identity: session.identity.clone(),
        subject: session.subject.clone(),
        reason: session.reason.clone(),
        depth: session.depth,
    }
}

/// Marks every live child session below `cgroup_id` as ending (they die
/// with it) and returns their ids.
fn mark_ending(registry: &mut Registry, cgroup_id: u64) -> Vec<SessionId> {
    let below = registry.descendants(cgroup_id);
    below
        .into_iter()
        .filter_map(|id| {
            let session = registry.get_mut(id)?;
            session.ending = true;
            Some(session.id.clone())
        })
        .collect()
}

/// One line for the caller about a refused exec, connect or socket.
fn denial_text(event: &KernelEvent, decided: Option<&Decided>) -> Option<String> {
    use tollgate_common::Verdict;
    let by = |fallback: &str| match decided.and_then(|d| d.rules().first()) {
        Some(rule) => format!("denied by grant {} ({})", rule.grant, rule.rule),
        None => format!("denied: {fallback}"),
    };
    match event {
        KernelEvent::Exec { verdict, filename, .. } if *verdict != Verdict::Allow => {
            Some(format!("exec {filename} {}", by("not on the session's allow list")))
        }
        KernelEvent::Connect { verdict: Verdict::Deny, addr, port, send, .. } => {
            let what = if *send { "send to" } else { "connect" };
            let target = if addr.is_ipv6() { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") };
            Some(format!("{what} {target} {}", by("no rule allows it")))
        }
        KernelEvent::Socket { family, sock_type, .. } => Some(format!(
            "socket (family {family}, type {sock_type}) denied: raw and ICMP sockets are not allowed in sessions"
        )),
        _ => None,
    }
}

/// The rule that decided an exec: the deny entry that refused the file,
/// or the allow-list entry that let it run (none when no list applies).
fn exec_rule(rules: &SessionRules, file: FileId, verdict: tollgate_common::Verdict) -> Option<Decided> {
    if verdict != tollgate_common::Verdict::Allow {
        let index = rules.exec_deny.iter().position(|(_, denied)| *denied == file)?;
        return rules.exec_deny_rules.get(index).map(|rule| Decided::new(vec![rule.clone()]));
    }
    let allow = rules.exec_allow.as_ref()?;
    allow.files.iter().find(|(_, id, _)| *id == file).map(|(_, _, rule)| Decided::new(vec![rule.clone()]))
}

/// Removes a session cgroup off the runtime: emptying it may wait.
pub(super) async fn discard(path: PathBuf) {
    let removed = tokio::task::spawn_blocking(move || cgroup::discard(Path::new(&path))).await;
    if let Err(e) = removed {
        tracing::warn!(error = %e, "cgroup removal task failed");
    }
}
