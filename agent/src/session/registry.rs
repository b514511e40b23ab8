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
    /// When it must end, and the identity's `max_session` that set it.
    pub deadline: Option<(Instant, Duration)>,
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
    pub fn get_mut(&mut self, cgroup_id: u64) -> Option<&mut ActiveSession> {
        self.active.get_mut(&cgroup_id)
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
}
