//! What a starting daemon does with the sessions an earlier one left.
//!
//! With the earlier daemon's programs still pinned, its sessions stayed
//! governed while no daemon ran: each one still running is adopted (its
//! rules compiled again from the current policy and written into the
//! maps) and its record resumes, with an event saying when no daemon was
//! there. Sessions that ended meanwhile, and any whose processes could not
//! have been governed (no pins: the programs detached with the daemon), are
//! closed in the record with what is known, their processes killed.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Map, Value};

use super::{ActiveSession, Lifetime, Sessions, cgroup::populated, sessions::discard};
use crate::store::{RecordKind, RecordVerdict, RecordedLoss, SessionId, SessionRecord, rfc3339};

/// What the starting daemon knows of the time no daemon ran.
#[derive(Debug, Clone)]
pub struct Gap {
    /// Whether an earlier daemon's programs were still attached (pinned).
    pub enforced: bool,
    /// When the earlier daemon was last alive (its heartbeat), if known.
    pub last_alive: Option<String>,
}

/// A session the log has no end for, as an earlier daemon left it.
#[derive(Debug, Clone)]
pub struct LeftOpen {
    /// Its record.
    pub record: SessionRecord,
    /// What its record already counts as lost.
    pub losses: Vec<RecordedLoss>,
}

impl Gap {
    fn detail(&self, outcome: &str) -> Map<String, Value> {
        let mut detail = Map::new();
        detail.insert("daemon_last_alive".into(), self.last_alive.clone().map_or(Value::Null, Value::from));
        detail.insert("daemon_back".into(), rfc3339(SystemTime::now()).into());
        detail.insert("enforced_meanwhile".into(), self.enforced.into());
        detail.insert("outcome".into(), outcome.into());
        detail
    }
}

impl Sessions {
    /// Adopts or ends what an earlier daemon left: the cgroups under the
    /// sessions cgroup, and the records still open. `running` are the
    /// session log's records that have no end.
    pub async fn recover(self: &Arc<Self>, running: Vec<LeftOpen>, gap: &Gap) {
        let tree = self.parts.tree.clone();
        let mut seen = Vec::new();
        // Parents before their children: a child is adopted only under an
        // adopted parent, whose rules cut its own down.
        let mut queue: std::collections::VecDeque<(String, PathBuf, u64, Option<u64>, bool)> =
            tree.leftovers().into_iter().map(|(name, path, id)| (name, path, id, None, true)).collect();
        while let Some((name, path, cgroup_id, parent, parent_adopted)) = queue.pop_front() {
            let left = running.iter().find(|left| left.record.id.as_str() == name);
            if let Some(left) = left {
                // The kernel's loss counters are pinned with the maps: what
                // they held when the earlier daemon reported is in the record.
                self.parts.lost.already_reported(cgroup_id, &left.losses);
            }
            let record = left.map(|left| &left.record);
            seen.push(name.clone());
            // Listed before anything is discarded: discarding takes the children along.
            let children = super::cgroup::children(&path);
            let adopted = match record {
                Some(record) if parent_adopted && gap.enforced && populated(&path) => {
                    self.adopt(record, &path, cgroup_id, parent, gap).await
                }
                _ => false,
            };
            queue.extend(children.into_iter().map(|(name, path, id)| (name, path, id, Some(cgroup_id), adopted)));
            if adopted {
                continue;
            }
            if populated(&path) {
                tracing::warn!(cgroup = %path.display(), enforced = gap.enforced, "killing processes left in a session this daemon cannot adopt");
            }
            self.state().maps.purge(cgroup_id);
            discard(path.clone()).await;
            if let Some(record) = record {
                self.close_unobserved(record, Some(cgroup_id), gap);
            }
        }
        // Records of this tree still open with no cgroup: they ended unobserved.
        let ours = |r: &&SessionRecord| PathBuf::from(&r.cgroup).starts_with(&tree.sessions);
        let records = running.iter().map(|left| &left.record);
        for record in records.filter(ours).filter(|r| !seen.iter().any(|name| name == r.id.as_str())) {
            self.close_unobserved(record, None, gap);
        }
    }

    /// Takes a running session back: its rules from the current policy (cut
    /// down to its parent's, for a child), its registry entry, and a record
    /// of the gap. False when it cannot be adopted (its identity is gone
    /// from the policy, the maps refuse it).
    async fn adopt(
        self: &Arc<Self>,
        record: &SessionRecord,
        path: &std::path::Path,
        cgroup_id: u64,
        parent: Option<u64>,
        gap: &Gap,
    ) -> bool {
        let identity_name = record.identity.clone();
        let withdrawn = self.book().withdrawn();
        let parent_rules = parent.and_then(|p| self.state().registry.get_mut(p).map(|s| s.rules.clone()));
        if parent.is_some() && parent_rules.is_none() {
            return false;
        }
        let recorded_grants = record.grants.clone();
        let policies = self.policies();
        let snapshot = policies.clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let identity = policies.identities.iter().find(|i| i.name == identity_name).cloned()?;
            // A top session holds its identity's grants; a child what it was opened with.
            let own: Vec<String> = match &parent_rules {
                None => policies.grants_for(&identity.name).map(|g| g.name.clone()).collect(),
                Some(_) => recorded_grants,
            };
            let rules = super::sessions::effective_rules(&policies, &own, &withdrawn, parent_rules.as_ref());
            Some((identity, own, rules))
        })
        .await
        .ok()
        .flatten();
        let Some((identity, own_grants, rules)) = compiled else {
            tracing::warn!(session = %record.id, identity = %record.identity, "cannot adopt: its identity is no longer in the policy");
            return false;
        };
        if record.uid == 0 && !identity.allow_root {
            tracing::warn!(session = %record.id, identity = %identity.name, "cannot adopt: a root session of an identity that no longer allows root");
            return false;
        }
        let started = humantime::parse_rfc3339(&record.started_at).unwrap_or_else(|_| SystemTime::now());
        let left = |limit: Duration| {
            let left = (started + limit).duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
            Instant::now() + left
        };
        let deadline = [
            identity.max_session.map(|limit| (limit, Lifetime::MaxSession)),
            record.ttl_secs.map(|secs| (Duration::from_secs(secs), Lifetime::Ttl)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(limit, _)| *limit)
        .map(|(limit, why)| (left(limit), limit, why));
        // The new rules go in over the old ones, then what they do not make
        // comes out: at no moment is the session without rules.
        let dns_port = match self.open_resolver(cgroup_id) {
            Ok(port) => port,
            Err(why) => {
                tracing::error!(session = %record.id, %why, "cannot adopt: its resolver does not start");
                self.state().maps.purge(cgroup_id);
                return false;
            }
        };
        let added = {
            let mut state = self.state();
            let added = state.maps.add_session(cgroup_id, &rules, Some(dns_port));
            if added.is_ok() {
                state.maps.purge_stale(cgroup_id, &rules);
            }
            added
        };
        if let Err(e) = added {
            tracing::error!(session = %record.id, error = %e, "cannot adopt: the maps refused its rules");
            self.state().maps.purge(cgroup_id);
            return false;
        }
        self.state().registry.insert(ActiveSession {
            id: record.id.clone(),
            identity: identity.name.clone(),
            subject: record.subject.clone(),
            issuer: record.issuer.clone(),
            claims: record.claims.clone(),
            parent,
            depth: record.depth,
            reason: record.reason.clone(),
            own_grants,
            policies: snapshot,
            uid: record.uid,
            cgroup: path.to_owned(),
            cgroup_id,
            rules,
            creators: Default::default(),
            deadline,
            ending: false,
        });
        self.watch_emptying(path, cgroup_id);
        self.parts.log.decided(&record.id, RecordKind::Session, RecordVerdict::DaemonGap, gap.detail("adopted"));
        tracing::warn!(session = %record.id, last_alive = gap.last_alive.as_deref().unwrap_or("unknown"), "adopted a session an earlier daemon left running");
        true
    }

    /// Closes the record of a session that ended (or was ended) while no
    /// daemon watched it.
    fn close_unobserved(&self, record: &SessionRecord, cgroup_id: Option<u64>, gap: &Gap) {
        let id: SessionId = record.id.clone();
        if let Some(cgroup_id) = cgroup_id {
            self.state().registry.remember_ended(cgroup_id, id.clone());
        }
        let outcome =
            if gap.enforced { "ended while no daemon ran" } else { "killed: not governed while no daemon ran" };
        self.parts.log.decided(&id, RecordKind::Session, RecordVerdict::DaemonGap, gap.detail(outcome));
        if let Some(cgroup_id) = cgroup_id {
            // What it lost while no daemon ran goes in before its end.
            self.parts.lost.report_session(cgroup_id, &id, &self.parts.log);
        }
        self.parts.log.end_session(id.clone());
        tracing::warn!(session = %id, outcome, "closed a session an earlier daemon left");
    }
}
