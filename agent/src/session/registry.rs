//! The daemon's table of live sessions, keyed by cgroup id (what the
//! kernel reports with every event).

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{policy::compile::SessionRules, store::SessionId};

/// How long an ended session's cgroup id still attributes late events.
const LINGER: Duration = Duration::from_secs(30);

/// A session whose processes may still run.
#[derive(Debug)]
pub struct ActiveSession {
    /// Its id.
    pub id: SessionId,
    /// The identity it was opened for.
    pub identity: String,
    /// The token's subject.
    pub subject: String,
    /// The token's issuer.
    pub issuer: String,
    /// The token's claims.
    pub claims: serde_json::Value,
    /// The session it was opened from (its cgroup id), for a child session.
    pub parent: Option<u64>,
    /// 0 at the top of a chain, one more for each child below it.
    pub depth: u32,
    /// Why it was opened, as the caller said.
    pub reason: Option<String>,
    /// The grants of its own level (before the parent's rights cut them down).
    pub own_grants: Vec<String>,
    /// The policies it was opened under: it keeps them across reloads,
    /// except for grants a reload removed.
    pub policies: std::sync::Arc<crate::policy::PolicySet>,
    /// The uid its processes run as.
    pub uid: u32,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
    /// Its cgroup id.
    pub cgroup_id: u64,
    /// What the kernel enforces for it.
    pub rules: SessionRules,
    /// Who forked whom (child -> creator), so an exec names the process
    /// that made it even after a double fork reparented it.
    pub creators: HashMap<u32, u32>,
    /// When it must end, the limit that set it, and which limit that was.
    pub deadline: Option<(Instant, Duration, super::Lifetime)>,
    /// Set once it was revoked or expired: its processes are being killed.
    pub ending: bool,
}

/// Live sessions, and recently ended ones for late events.
#[derive(Debug, Default)]
pub struct Registry {
    active: HashMap<u64, ActiveSession>,
    ended: HashMap<u64, (SessionId, Instant)>,
}

impl Registry {
    /// Adds a started session.
    pub fn insert(&mut self, session: ActiveSession) {
        self.active.insert(session.cgroup_id, session);
    }

    /// The live session of a cgroup.
    pub fn get(&self, cgroup_id: u64) -> Option<&ActiveSession> {
        self.active.get(&cgroup_id)
    }

    /// The live session of a cgroup, to change.
    pub fn get_mut(&mut self, cgroup_id: u64) -> Option<&mut ActiveSession> {
        self.active.get_mut(&cgroup_id)
    }

    /// The session id for an event's cgroup, live or recently ended, and
    /// the live session to change, in one lookup.
    pub fn attribute(&mut self, cgroup_id: u64) -> Option<(SessionId, Option<&mut ActiveSession>)> {
        if let Some(active) = self.active.get_mut(&cgroup_id) {
            return Some((active.id.clone(), Some(active)));
        }
        self.ended.get(&cgroup_id).map(|(id, _)| (id.clone(), None))
    }

    /// The session id for an event's cgroup, live or recently ended.
    pub fn session_of(&self, cgroup_id: u64) -> Option<SessionId> {
        self.active
            .get(&cgroup_id)
            .map(|s| s.id.clone())
            .or_else(|| self.ended.get(&cgroup_id).map(|(id, _)| id.clone()))
    }

    /// Moves a session to the ended set and returns it.
    pub fn end(&mut self, cgroup_id: u64) -> Option<ActiveSession> {
        let session = self.active.remove(&cgroup_id)?;
        self.ended.insert(cgroup_id, (session.id.clone(), Instant::now()));
        self.ended.retain(|_, (_, when)| when.elapsed() < LINGER);
        Some(session)
    }

    /// Remembers a session that ended unobserved, so late events of its
    /// cgroup are still attributed to it.
    pub fn remember_ended(&mut self, cgroup_id: u64, id: SessionId) {
        self.ended.insert(cgroup_id, (id, Instant::now()));
    }

    /// Every live session.
    pub fn active(&self) -> impl Iterator<Item = &ActiveSession> {
        self.active.values()
    }

    /// Every live session, to change.
    pub fn active_mut(&mut self) -> impl Iterator<Item = &mut ActiveSession> {
        self.active.values_mut()
    }

    /// The number of live sessions.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// The live session with id `id`.
    pub fn by_id(&self, id: &SessionId) -> Option<&ActiveSession> {
        self.active.values().find(|s| &s.id == id)
    }

    /// The live session and every live session above it, innermost first.
    pub fn chain(&self, cgroup_id: u64) -> Vec<&ActiveSession> {
        let mut chain = Vec::new();
        let mut next = Some(cgroup_id);
        while let Some(id) = next {
            let Some(session) = self.active.get(&id) else { break };
            chain.push(session);
            next = session.parent;
        }
        chain
    }

    /// The live sessions below `cgroup_id` (children, their children, ...),
    /// deepest first: the order in which they can be ended.
    pub fn descendants(&self, cgroup_id: u64) -> Vec<u64> {
        let mut found: Vec<(u32, u64)> = self
            .active
            .values()
            .filter(|s| s.cgroup_id != cgroup_id && self.chain(s.cgroup_id).iter().any(|a| a.cgroup_id == cgroup_id))
            .map(|s| (s.depth, s.cgroup_id))
            .collect();
        found.sort_by(|a, b| b.cmp(a));
        found.into_iter().map(|(_, id)| id).collect()
    }
}
