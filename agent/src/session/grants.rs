//! The life of each grant on this host: when it was last exercised, and
//! whether it is still honoured. A grant with `expire_unused_after` stops
//! being honoured once it goes that long unused; a reviewer can revoke a
//! grant or renew it. Withdrawn grants keep what they refuse (see
//! [`crate::policy::compile::compile`]), so withdrawal never widens a session.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    policy::PolicySet,
    store::{GrantEvent, Reader, StoreError},
};

/// Whether a grant is honoured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantState {
    /// Honoured.
    Active,
    /// Went unused for longer than its `expire_unused_after`.
    Expired,
    /// A reviewer revoked it.
    Revoked,
}

impl GrantState {
    /// The name shown in `grants` and reviews.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    state: GrantState,
    /// When the unused clock started: first seen, or last renewed.
    since: SystemTime,
    last_exercised: Option<SystemTime>,
    /// The event that put it in its state (None while active and never renewed).
    last_event: Option<GrantEvent>,
}

/// Every grant's state, kept in step with the session log.
#[derive(Debug, Default)]
pub struct GrantBook {
    entries: BTreeMap<String, Entry>,
}

/// Why a reviewer's change to a grant was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// No grant of that name in the policy.
    #[error("no grant '{0}' in the loaded policy")]
    Unknown(String),
    /// Revoking a grant that is already revoked.
    #[error("grant '{0}' is already revoked")]
    AlreadyRevoked(String),
}

/// One rule of a grant as `tollgate grants` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleUse {
    /// The rule, as records name it.
    pub rule: String,
    /// Decisions it made in the window asked for.
    pub count: i64,
    /// Its last decision ever (RFC 3339).
    pub last_used: Option<String>,
}

/// Uses between two UTC days, per grant and per rule.
#[derive(Debug, Default)]
pub struct Uses {
    per_grant: BTreeMap<String, i64>,
    per_rule: BTreeMap<(String, String), (i64, Option<String>)>,
}

/// One grant as `tollgate grants` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GrantView {
    /// Its name.
    pub name: String,
    /// Its identity.
    pub identity: String,
    /// active, expired or revoked.
    pub state: GrantState,
    /// Its rules, as records name them.
    pub rules: Vec<String>,
    /// Each rule's use: decisions in the window and the last one ever.
    pub rule_use: Vec<RuleUse>,
    /// The last time one of its rules let something through (RFC 3339).
    pub last_exercised: Option<String>,
    /// Decisions its rules made in the window asked for (allowed and refused).
    pub count: i64,
    /// When it expires if still unused (RFC 3339), for grants with `expire_unused_after`.
    pub expires_at: Option<String>,
    /// The event behind its state (who revoked it and why, when it expired or was renewed).
    pub last_event: Option<GrantEvent>,
}

fn parse(at: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(at).ok()
}

impl GrantBook {
    /// The book for `policies`, from what the session log holds: first
    /// sightings, last uses, and expiries, revocations and renewals.
    pub fn load(policies: &PolicySet, reader: &Reader, now: SystemTime) -> Result<Self, StoreError> {
        let seen = reader.grants_seen()?;
        let mut last_use: BTreeMap<String, SystemTime> = BTreeMap::new();
        for usage in reader.rule_usage("0000-00-00", "9999-99-99")? {
            if !gives(&usage.rule) {
                continue;
            }
            if let Some(at) = usage.last_at.as_deref().and_then(parse) {
                let slot = last_use.entry(usage.grant).or_insert(at);
                *slot = (*slot).max(at);
            }
        }
        let events = reader.grant_events()?;
        let mut book = Self::default();
        for grant in &policies.grants {
            let since = seen.get(&grant.name).and_then(|at| parse(at)).unwrap_or(now);
            let mut entry = Entry {
                state: GrantState::Active,
                since,
                last_exercised: last_use.get(&grant.name).copied(),
                last_event: None,
            };
            for event in events.iter().filter(|e| e.grant == grant.name) {
                entry.state = match event.action.as_str() {
                    "expired" => GrantState::Expired,
                    "revoked" => GrantState::Revoked,
                    _ => {
                        entry.since = parse(&event.at).unwrap_or(entry.since);
                        GrantState::Active
                    }
                };
                entry.last_event = Some(event.clone());
            }
            book.entries.insert(grant.name.clone(), entry);
        }
        Ok(book)
    }

    /// The grants no longer honoured.
    pub fn withdrawn(&self) -> BTreeSet<String> {
        self.entries.iter().filter(|(_, e)| e.state != GrantState::Active).map(|(name, _)| name.clone()).collect()
    }

    /// A rule of `grant` decided something at `at`.
    pub fn exercised(&mut self, grant: &str, at: SystemTime) {
        if let Some(entry) = self.entries.get_mut(grant) {
            entry.last_exercised = Some(entry.last_exercised.map_or(at, |last| last.max(at)));
        }
    }

    /// When `grant` expires if it stays unused, if it can.
    fn expires_at(&self, policies: &PolicySet, name: &str) -> Option<SystemTime> {
        let limit = policies.grants.iter().find(|g| g.name == name)?.expire_unused_after?;
        let entry = self.entries.get(name)?;
        let start = entry.last_exercised.map_or(entry.since, |last| last.max(entry.since));
        Some(start + limit)
    }

    /// Marks the active grants that have gone unused too long as expired
    /// and returns the expiry of each.
    pub fn expire_due(&mut self, policies: &PolicySet, now: SystemTime) -> Vec<GrantEvent> {
        let due: Vec<(String, Duration)> = policies
            .grants
            .iter()
            .filter_map(|grant| {
                let limit = grant.expire_unused_after?;
                let active = self.entries.get(&grant.name)?.state == GrantState::Active;
                let at = self.expires_at(policies, &grant.name)?;
                (active && at <= now).then(|| (grant.name.clone(), limit))
            })
            .collect();
        due.into_iter()
            .filter_map(|(name, limit)| {
                let event = GrantEvent {
                    at: crate::store::rfc3339(now),
                    grant: name.clone(),
                    action: "expired".into(),
                    by: None,
                    reason: Some(format!("not exercised for {}", humantime::format_duration(limit))),
                };
                let entry = self.entries.get_mut(&name)?;
                entry.state = GrantState::Expired;
                entry.last_event = Some(event.clone());
                Some(event)
            })
            .collect()
    }

    /// Applies a recorded event (expired, revoked, renewed) to the book.
    pub fn apply(&mut self, event: &GrantEvent) -> Result<(), GrantError> {
        let entry = self.entries.get_mut(&event.grant).ok_or_else(|| GrantError::Unknown(event.grant.clone()))?;
        match event.action.as_str() {
            "revoked" if entry.state == GrantState::Revoked => {
                return Err(GrantError::AlreadyRevoked(event.grant.clone()));
            }
            "revoked" => entry.state = GrantState::Revoked,
            "expired" => entry.state = GrantState::Expired,
            _ => {
                entry.state = GrantState::Active;
                entry.since = parse(&event.at).unwrap_or_else(SystemTime::now);
            }
        }
        entry.last_event = Some(event.clone());
        Ok(())
    }

    /// Starts keeping the grants of reloaded `policies` that are new (their
    /// unused clock starts now).
    pub fn add_grants(&mut self, policies: &PolicySet, now: SystemTime) {
        for grant in &policies.grants {
            self.entries.entry(grant.name.clone()).or_insert(Entry {
                state: GrantState::Active,
                since: now,
                last_exercised: None,
                last_event: None,
            });
        }
    }

    /// Every grant of the policy with its state, for `tollgate grants`;
    /// `uses` are those in the window asked for.
    pub fn views(&self, policies: &PolicySet, uses: &Uses) -> Vec<GrantView> {
        policies
            .grants
            .iter()
            .map(|grant| {
                let entry = self.entries.get(&grant.name);
                let rules = rule_names(grant);
                GrantView {
                    name: grant.name.clone(),
                    identity: grant.identity.clone(),
                    state: entry.map_or(GrantState::Active, |e| e.state.clone()),
                    rule_use: rules
                        .iter()
                        .map(|rule| {
                            let (count, last_used) =
                                uses.per_rule.get(&(grant.name.clone(), rule.clone())).cloned().unwrap_or_default();
                            RuleUse { rule: rule.clone(), count, last_used }
                        })
                        .collect(),
                    rules,
                    last_exercised: entry.and_then(|e| e.last_exercised).map(crate::store::rfc3339),
                    count: uses.per_grant.get(&grant.name).copied().unwrap_or(0),
                    expires_at: self.expires_at(policies, &grant.name).map(crate::store::rfc3339),
                    last_event: entry.and_then(|e| e.last_event.clone()),
                }
            })
            .collect()
    }
}

/// Uses per grant and rule between two UTC days.
fn use_counts(reader: &Reader, since_day: &str, until_day: &str) -> Result<Uses, StoreError> {
    let mut uses = Uses::default();
    for usage in reader.rule_usage(since_day, until_day)? {
        *uses.per_grant.entry(usage.grant.clone()).or_default() += usage.count;
        let slot = uses.per_rule.entry((usage.grant, usage.rule)).or_default();
        slot.0 += usage.count;
        slot.1 = slot.1.take().max(usage.last_at);
    }
    Ok(uses)
}

/// Every grant with its state and use, from the session log alone (no daemon running).
pub fn views_from_log(
    policies: &PolicySet,
    reader: &Reader,
    since_day: &str,
    until_day: &str,
) -> Result<Vec<GrantView>, StoreError> {
    let book = GrantBook::load(policies, reader, SystemTime::now())?;
    Ok(book.views(policies, &use_counts(reader, since_day, until_day)?))
}

/// Does a rule give something (rather than refuse it)? Only those count as
/// a grant being exercised: a grant whose allows go unused is stale however
/// often its denies are hit.
pub fn gives(rule: &str) -> bool {
    rule.starts_with("exec.allow") || rule.starts_with("network.allow") || rule.starts_with("network.proxy")
}

/// The rules of a grant, spelled as records and usage counts name them.
pub fn rule_names(grant: &crate::policy::Grant) -> Vec<String> {
    let mut rules = Vec::new();
    rules.extend(grant.exec.deny.iter().map(|p| format!("exec.deny {}", p.0.display())));
    rules.extend(grant.exec.allow.iter().map(|p| format!("exec.allow {p}")));
    rules.extend(grant.network.allow.iter().map(|d| format!("network.allow {d}")));
    rules.extend(grant.network.deny.iter().map(|d| format!("network.deny {d}")));
    rules.extend(grant.network.proxy.iter().map(|r| format!("network.proxy {}", r.to)));
    for route in &grant.network.proxy {
        let hits = crate::policy::compile::RouteHits::of(&grant.name, route);
        rules.extend(hits.block.into_iter().chain(hits.approve).map(|r| r.rule));
    }
    rules
}

impl super::Sessions {
    /// Loads the grant book from the session log and records the grants
    /// the policy has now (the first sighting starts their unused clock).
    pub fn load_grants(&self, reader: &Reader) -> Result<(), StoreError> {
        let policies = self.policies();
        self.parts.log.grants_seen(policies.grants.iter().map(|g| g.name.clone()).collect());
        *self.book() = GrantBook::load(&policies, reader, SystemTime::now())?;
        Ok(())
    }

    /// Puts reloaded policies and issuers in force: new sessions get them;
    /// live sessions keep theirs, except that a grant the new policies no
    /// longer have is taken from them at once (and recorded in each).
    pub async fn reload(self: &std::sync::Arc<Self>, policies: PolicySet, verifier: crate::identity::Verifier) {
        let old = self.policies();
        let removed: Vec<String> = old
            .grants
            .iter()
            .filter(|g| !policies.grants.iter().any(|n| n.name == g.name))
            .map(|g| g.name.clone())
            .collect();
        self.parts.log.grants_seen(policies.grants.iter().map(|g| g.name.clone()).collect());
        self.book().add_grants(&policies, SystemTime::now());
        self.replace_loaded(super::sessions::Loaded::new(policies, verifier));
        if removed.is_empty() {
            return;
        }
        for grant in &removed {
            self.withdrawn_from_live(grant, "removed", None, Some("removed from the policy on reload".into())).await;
        }
    }

    /// The grants no longer honoured (expired or revoked).
    pub fn withdrawn_grants(&self) -> std::collections::BTreeSet<String> {
        self.book().withdrawn()
    }

    /// Every grant with its state and its use in `[since_day, until_day]`.
    pub fn grant_views(&self, reader: &Reader, since_day: &str, until_day: &str) -> Result<Vec<GrantView>, StoreError> {
        Ok(self.book().views(&self.policies(), &use_counts(reader, since_day, until_day)?))
    }

    /// Expires the grants that went unused past their `expire_unused_after`.
    pub(super) async fn expire_grants(self: &std::sync::Arc<Self>) {
        let due = self.book().expire_due(&self.policies(), SystemTime::now());
        for event in due {
            tracing::warn!(grant = event.grant, reason = event.reason, "grant expired: it is no longer honoured");
            self.parts.log.grant_event(&event.grant, "expired", None, event.reason.clone());
            self.withdrawn_from_live(&event.grant, "expired", None, event.reason).await;
        }
    }

    /// A reviewer revokes a grant: recorded with who and why, and taken
    /// from every live session at once.
    pub async fn revoke_grant(
        self: &std::sync::Arc<Self>,
        grant: &str,
        by: String,
        reason: Option<String>,
    ) -> Result<(), GrantError> {
        let event = GrantEvent {
            at: crate::store::rfc3339(SystemTime::now()),
            grant: grant.to_owned(),
            action: "revoked".into(),
            by: Some(by.clone()),
            reason: reason.clone(),
        };
        self.book().apply(&event)?;
        self.parts.log.grant_event(grant, "revoked", Some(by.clone()), reason.clone());
        tracing::warn!(grant, by, reason = reason.as_deref().unwrap_or(""), "grant revoked");
        self.withdrawn_from_live(grant, "revoked", Some(by), reason).await;
        Ok(())
    }

    /// A reviewer renews an expired or revoked grant (or restarts an active
    /// one's unused clock): new sessions get it again, and live sessions whose
    /// identity holds it get it back.
    pub async fn renew_grant(self: &std::sync::Arc<Self>, grant: &str, by: String) -> Result<(), GrantError> {
        let event = GrantEvent {
            at: crate::store::rfc3339(SystemTime::now()),
            grant: grant.to_owned(),
            action: "renewed".into(),
            by: Some(by.clone()),
            reason: None,
        };
        self.book().apply(&event)?;
        self.parts.log.grant_event(grant, "renewed", Some(by.clone()), None);
        tracing::info!(grant, by, "grant renewed");
        self.recompile_live().await;
        Ok(())
    }

    /// Records the withdrawal in each live session that held the grant, then
    /// brings every live session's rules up to date.
    async fn withdrawn_from_live(
        self: &std::sync::Arc<Self>,
        grant: &str,
        action: &str,
        by: Option<String>,
        reason: Option<String>,
    ) {
        let holders: Vec<crate::store::SessionId> = self
            .state()
            .registry
            .active()
            .filter(|s| s.own_grants.iter().any(|g| g == grant))
            .map(|s| s.id.clone())
            .collect();
        for id in holders {
            let mut detail = serde_json::Map::new();
            detail.insert("grant".into(), grant.into());
            detail.insert("by".into(), by.clone().into());
            detail.insert("reason".into(), reason.clone().into());
            let verdict = if action == "revoked" || action == "removed" {
                crate::store::RecordVerdict::Revoked
            } else {
                crate::store::RecordVerdict::Expired
            };
            self.parts.log.decided(&id, crate::store::RecordKind::Grant, verdict, detail);
        }
        self.recompile_live().await;
    }

    /// Compiles every live session's rules again with the grants honoured
    /// now (parents before children, each child cut down to its parent's new
    /// rules) and swaps them into the maps without a moment with none. Each
    /// session keeps the policies it was opened under, except that a grant
    /// the policies in force no longer have counts as withdrawn.
    pub(super) async fn recompile_live(self: &std::sync::Arc<Self>) {
        type Live = (u32, u64, Option<u64>, Vec<String>, std::sync::Arc<PolicySet>);
        let mut live: Vec<Live> = self
            .state()
            .registry
            .active()
            .map(|s| (s.depth, s.cgroup_id, s.parent, s.own_grants.clone(), s.policies.clone()))
            .collect();
        live.sort_by_key(|(depth, cgroup_id, ..)| (*depth, *cgroup_id));
        let mut withdrawn = self.book().withdrawn();
        let current = self.policies();
        for (.., own, _) in &live {
            withdrawn.extend(own.iter().filter(|g| !current.grants.iter().any(|c| &c.name == *g)).cloned());
        }
        let compiled = tokio::task::spawn_blocking(move || {
            let mut done: BTreeMap<u64, crate::policy::compile::SessionRules> = BTreeMap::new();
            for (_, cgroup_id, parent, own, policies) in live {
                let parent_rules = parent.and_then(|p| done.get(&p));
                let rules = super::sessions::effective_rules(&policies, &own, &withdrawn, parent_rules);
                done.insert(cgroup_id, rules);
            }
            done
        })
        .await;
        let Ok(compiled) = compiled else {
            tracing::error!("recompiling live sessions failed; their rules are unchanged");
            return;
        };
        let mut state = self.state();
        let super::sessions::State { maps, registry } = &mut *state;
        for (cgroup_id, rules) in compiled {
            let Some(session) = registry.get_mut(cgroup_id) else { continue };
            if let Err(e) = maps.add_session(cgroup_id, &rules, None) {
                // Fail closed: a session whose rules cannot be written is ended.
                tracing::error!(session = %session.id, error = %e, "cannot update a session's rules; killing it");
                let _ = super::cgroup::kill_all(&session.cgroup);
                continue;
            }
            maps.purge_stale(cgroup_id, &rules);
            session.rules = rules;
        }
    }
}
