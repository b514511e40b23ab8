//! Access reviews: what the session log says about each identity and grant
//! over a window, as findings a reviewer acts on, or as a narrowed policy
//! built from what was actually exercised (`--suggest`).
//!
//! Counts and last uses come from the per-day usage table; evidence that
//! names destinations and files reads the window's decisions.

mod suggest;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    policy::{Grant, PolicySet},
    session::{
        GrantState, GrantView,
        grants::{gives, rule_names},
    },
    store::{Reader, RecordedDecision, RuleUsage, SessionRecord, StoreError},
};

/// A reviewer must see repeated denials, not every mistyped command.
const DENIALS_WORTH_A_FINDING: usize = 3;
/// Example session ids given as evidence, at most.
const EXAMPLES: usize = 3;
/// A used wide rule is reported with the destinations it reached when
/// they are at most this many (a handful of uses of a 0.0.0.0/0).
const FEW_DESTINATIONS: usize = 16;

/// What an access review asks about.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ReviewQuery {
    /// The window's start (RFC 3339).
    pub since: String,
    /// The window's end (RFC 3339).
    pub until: String,
    /// Only this identity.
    #[serde(default)]
    pub identity: Option<String>,
    /// Only sessions whose token had this claim value: (name, value).
    #[serde(default)]
    pub claim: Option<(String, String)>,
    /// Only findings about this kind of resource: exec, network or http.
    #[serde(default)]
    pub resource: Option<String>,
    /// Instead of findings: a narrowed policy built from what was exercised.
    #[serde(default)]
    pub suggest: bool,
}

/// Why a review could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AccessReviewError {
    /// The session log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `--identity` names no identity of the policy.
    #[error("no identity '{0}' in the loaded policy")]
    UnknownIdentity(String),
    /// `--resource` is not exec, network or http.
    #[error("resource '{0}' is not one of exec, network, http")]
    UnknownResource(String),
}

/// One thing a reviewer should look at.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Finding {
    /// unused_grant, unused_rule, idle_identity, denied_attempts,
    /// privileged_session, deep_delegation, expired_grant, revoked_grant.
    pub kind: String,
    /// The identity it is about.
    pub identity: Option<String>,
    /// The grant it is about.
    pub grant: Option<String>,
    /// The rule it is about.
    pub rule: Option<String>,
    /// What the log shows.
    pub evidence: Value,
    /// What to do about it.
    pub action: String,
}

impl Finding {
    /// A finding about one grant (and, for rule findings, one of its rules).
    fn about_grant(kind: &str, grant: &Grant, rule: Option<&str>, evidence: Value, action: String) -> Self {
        Finding {
            kind: kind.into(),
            identity: Some(grant.identity.clone()),
            grant: Some(grant.name.clone()),
            rule: rule.map(str::to_owned),
            evidence,
            action,
        }
    }
}

/// A review's answer: findings, or a suggested policy.
#[derive(Debug, Clone, Serialize)]
pub struct Review {
    /// The window, RFC 3339.
    pub since: String,
    /// The window's end.
    pub until: String,
    /// The findings (empty for `--suggest`).
    pub findings: Vec<Finding>,
    /// For `--suggest`: the narrowed policy, YAML.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggested_policy: Option<String>,
}

/// Which kind of resource a rule governs.
fn resource_of_rule(rule: &str) -> &'static str {
    if rule.starts_with("exec.") {
        "exec"
    } else if rule.starts_with("network.proxy") || rule.starts_with("proxy.") {
        "http"
    } else {
        "network"
    }
}

/// Runs a review (blocking: reads the session log). `grant_views` gives
/// every grant's state and its use between two UTC days: the live daemon's
/// grant book, or one loaded from the log when no daemon runs.
pub fn run(
    policies: &PolicySet,
    grant_views: impl FnOnce(&str, &str) -> Result<Vec<GrantView>, StoreError>,
    reader: &Reader,
    review_depth: u32,
    query: &ReviewQuery,
) -> Result<Review, AccessReviewError> {
    if let Some(identity) = &query.identity
        && !policies.identities.iter().any(|i| &i.name == identity)
    {
        return Err(AccessReviewError::UnknownIdentity(identity.clone()));
    }
    if let Some(resource) = &query.resource
        && !["exec", "network", "http"].contains(&resource.as_str())
    {
        return Err(AccessReviewError::UnknownResource(resource.clone()));
    }
    let window = Window::read(reader, query)?;
    let in_scope = window.identities_in_scope(policies, query);
    if query.suggest {
        let yaml = suggest::policy(policies, &window, &in_scope);
        return Ok(Review {
            since: query.since.clone(),
            until: query.until.clone(),
            findings: Vec::new(),
            suggested_policy: Some(yaml),
        });
    }
    let since_day = query.since.get(..10).unwrap_or_default();
    let until_day = query.until.get(..10).unwrap_or_default();
    let views = grant_views(since_day, until_day)?;
    let mut findings = Vec::new();
    for grant in policies.grants.iter().filter(|g| in_scope.contains(&g.identity)) {
        let Some(view) = views.iter().find(|v| v.name == grant.name) else { continue };
        let usage: Vec<&RuleUsage> = window.usage.iter().filter(|u| u.grant == grant.name).collect();
        match view.state {
            GrantState::Expired => findings.push(Finding::about_grant(
                "expired_grant",
                grant,
                None,
                json!({"last_exercised": view.last_exercised, "event": view.last_event}),
                format!("let it go, or renew it if still needed: tollgate grants renew {}", grant.name),
            )),
            GrantState::Revoked => findings.push(Finding::about_grant(
                "revoked_grant",
                grant,
                None,
                json!({"event": view.last_event}),
                "remove it from the policy".into(),
            )),
            GrantState::Active => {}
        }
        // A grant that only refuses is never stale: it gives nothing.
        let gives_something = rule_names(grant).iter().any(|r| gives(r));
        let used = usage.iter().any(|u| gives(&u.rule) && u.count > 0);
        if view.state == GrantState::Active && gives_something && !used {
            findings.push(Finding::about_grant(
                "unused_grant",
                grant,
                None,
                json!({
                    "uses_in_window": 0,
                    "last_exercised": view.last_exercised,
                    "expires_at": view.expires_at,
                    "rules": view.rules,
                }),
                format!(
                    "stale delegation: revoke it (tollgate grants revoke {}) or give it expire_unused_after",
                    grant.name
                ),
            ));
            continue;
        }
        if view.state == GrantState::Active {
            unused_rules(grant, &usage, &window, &mut findings);
        }
    }
    findings.extend(window.idle_identities(policies, &in_scope));
    findings.extend(window.denied_attempts(&in_scope));
    for session in window.sessions.iter().filter(|s| in_scope.contains(&s.identity)) {
        let about = |kind: &str, evidence, action| Finding {
            kind: kind.into(),
            identity: Some(session.identity.clone()),
            grant: None,
            rule: None,
            evidence,
            action,
        };
        if session.privileged {
            findings.push(about(
                "privileged_session",
                json!({"session": session.id, "uid": session.uid, "command": session.command, "started_at": session.started_at}),
                "it ran as root and could have undone its confinement: check why, or set allow_root: false".into(),
            ));
        }
        if session.depth > review_depth {
            findings.push(about(
                "deep_delegation",
                json!({"session": session.id, "depth": session.depth, "parent": session.parent, "reason": session.reason}),
                format!("a chain {} levels below its top (review threshold {review_depth}): check each delegation is needed", session.depth),
            ));
        }
    }
    if let Some(resource) = &query.resource {
        findings.retain(|f| match f.kind.as_str() {
            "unused_rule" | "denied_attempts" => f.evidence.get("resource").and_then(Value::as_str) == Some(resource),
            "unused_grant" | "expired_grant" | "revoked_grant" => f.grant.as_ref().is_some_and(|name| {
                policies
                    .grants
                    .iter()
                    .any(|g| &g.name == name && rule_names(g).iter().any(|r| resource_of_rule(r) == resource))
            }),
            _ => false,
        });
    }
    Ok(Review { since: query.since.clone(), until: query.until.clone(), findings, suggested_policy: None })
}

/// The rules of a used grant that gave more than was used: never exercised
/// in the window, or (a wide network allow) exercised for only a few destinations.
fn unused_rules(grant: &Grant, usage: &[&RuleUsage], window: &Window, findings: &mut Vec<Finding>) {
    for rule in rule_names(grant).into_iter().filter(|r| gives(r)) {
        let used = usage.iter().find(|u| u.rule == rule);
        let count = used.map_or(0, |u| u.count);
        if count == 0 {
            findings.push(Finding::about_grant(
                "unused_rule",
                grant,
                Some(&rule),
                json!({
                    "resource": resource_of_rule(&rule),
                    "uses_in_window": 0,
                    "last_exercised": used.and_then(|u| u.last_at.clone()),
                }),
                "over-privileged: remove the rule".into(),
            ));
            continue;
        }
        if !rule.starts_with("network.allow") {
            continue;
        }
        let reached = window.reached_by(&grant.name, &rule);
        let wide = rule.split_whitespace().nth(1).is_some_and(|d| {
            d.parse::<crate::policy::Destination>()
                .is_ok_and(|d| d.port.is_none() || d.net.prefix_len() < d.net.max_prefix_len())
        });
        if wide && !reached.is_empty() && reached.len() <= FEW_DESTINATIONS {
            findings.push(Finding::about_grant(
                "unused_rule",
                grant,
                Some(&rule),
                json!({
                    "resource": "network",
                    "uses_in_window": count,
                    "only_reached": reached,
                    "example_sessions": used.and_then(|u| u.last_session.clone()).into_iter().collect::<Vec<_>>(),
                }),
                format!(
                    "over-privileged: only {} destination(s) of it were used; narrow it to them (see review --suggest)",
                    reached.len()
                ),
            ));
        }
    }
}

/// What the session log holds for a window.
pub(crate) struct Window {
    /// Sessions started in it.
    pub sessions: Vec<SessionRecord>,
    /// Every session ever, for last-seen evidence.
    pub all_sessions: Vec<SessionRecord>,
    /// Use per rule.
    pub usage: Vec<RuleUsage>,
    /// Decisions in it.
    pub decisions: Vec<RecordedDecision>,
}

impl Window {
    fn read(reader: &Reader, query: &ReviewQuery) -> Result<Self, StoreError> {
        let since_day = query.since.get(..10).unwrap_or_default();
        let until_day = query.until.get(..10).unwrap_or_default();
        let mut sessions = reader.sessions_between(&query.since, &query.until)?;
        let mut decisions = reader.decisions_between(
            &query.since,
            &query.until,
            &["allow", "redirect", "deny", "killed", "block", "denied", "timed-out"],
        )?;
        if let Some((name, value)) = &query.claim {
            sessions.retain(|s| claim_matches(&s.claims, name, value));
            let keep: BTreeSet<_> = sessions.iter().map(|s| s.id.clone()).collect();
            decisions.retain(|d| keep.contains(&d.session));
        }
        Ok(Self {
            sessions,
            all_sessions: reader.sessions()?,
            usage: reader.rule_usage(since_day, until_day)?,
            decisions,
        })
    }

    /// The identities a query is about: the one named, or those the claim
    /// filter matches (in the policy, or in a session's token), or all.
    fn identities_in_scope(&self, policies: &PolicySet, query: &ReviewQuery) -> BTreeSet<String> {
        let mut scope: BTreeSet<String> = match &query.claim {
            None => policies.identities.iter().map(|i| i.name.clone()).collect(),
            Some((name, value)) => {
                let mut found: BTreeSet<String> = policies
                    .identities
                    .iter()
                    .filter(|i| {
                        i.claims
                            .get(name)
                            .is_some_and(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned) == *value)
                    })
                    .map(|i| i.name.clone())
                    .collect();
                found.extend(self.sessions.iter().map(|s| s.identity.clone()));
                found
            }
        };
        if let Some(identity) = &query.identity {
            scope.retain(|i| i == identity);
        }
        scope
    }

    /// Distinct destinations a network rule of a grant let through in the window.
    fn reached_by(&self, grant: &str, rule: &str) -> Vec<String> {
        let mut reached = BTreeSet::new();
        for RecordedDecision { kind, verdict, detail, .. } in &self.decisions {
            if kind != "connect" || !(verdict == "allow" || verdict == "redirect") {
                continue;
            }
            let names_rule = detail.get("grant_rules").and_then(Value::as_array).is_some_and(|rules| {
                rules.iter().any(|r| {
                    r.get("grant").and_then(Value::as_str) == Some(grant)
                        && r.get("rule").and_then(Value::as_str) == Some(rule)
                })
            });
            if names_rule && let Some(target) = connect_target(detail) {
                reached.insert(target);
            }
        }
        reached.into_iter().collect()
    }

    fn idle_identities(&self, policies: &PolicySet, scope: &BTreeSet<String>) -> Vec<Finding> {
        policies
            .identities
            .iter()
            .filter(|i| scope.contains(&i.name))
            .filter(|i| !self.sessions.iter().any(|s| s.identity == i.name))
            .map(|identity| {
                let last = self.all_sessions.iter().filter(|s| s.identity == identity.name).map(|s| s.started_at.clone()).max();
                Finding {
                    kind: "idle_identity".into(),
                    identity: Some(identity.name.clone()),
                    grant: None,
                    rule: None,
                    evidence: json!({"sessions_in_window": 0, "last_session_started": last, "grants": policies.grants_for(&identity.name).map(|g| g.name.clone()).collect::<Vec<_>>()}),
                    action: "no token of it opened a session: remove the identity and its grants, or let them expire".into(),
                }
            })
            .collect()
    }

    fn denied_attempts(&self, scope: &BTreeSet<String>) -> Vec<Finding> {
        // (identity, what was refused) -> (resource, count, example sessions, last at)
        let mut groups: BTreeMap<(String, String), (&'static str, usize, Vec<String>)> = BTreeMap::new();
        for RecordedDecision { session, identity, kind, verdict, detail } in &self.decisions {
            if !scope.contains(identity)
                || !["deny", "killed", "block", "denied", "timed-out"].contains(&verdict.as_str())
            {
                continue;
            }
            let resource = match kind.as_str() {
                "exec" => "exec",
                "connect" | "socket" => "network",
                _ => "http",
            };
            let what = detail
                .get("rule")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| match resource {
                    "exec" => detail.get("filename").and_then(Value::as_str).map(|f| format!("exec {f}")),
                    "network" => connect_target(detail).map(|t| format!("connect {t}")),
                    _ => detail.get("path").and_then(Value::as_str).map(|p| format!("request {p}")),
                })
                .unwrap_or_else(|| kind.clone());
            let entry = groups.entry((identity.clone(), what)).or_insert((resource, 0, Vec::new()));
            entry.1 += 1;
            if entry.2.len() < EXAMPLES && !entry.2.contains(&session.to_string()) {
                entry.2.push(session.to_string());
            }
        }
        groups
            .into_iter()
            .filter(|(_, (_, count, _))| *count >= DENIALS_WORTH_A_FINDING)
            .map(|((identity, what), (resource, count, examples))| Finding {
                kind: "denied_attempts".into(),
                identity: Some(identity),
                grant: None,
                rule: Some(what),
                evidence: json!({"resource": resource, "count": count, "example_sessions": examples}),
                action:
                    "it keeps trying something it may not do: find out why (a misconfigured job, or an agent probing)"
                        .into(),
            })
            .collect()
    }
}

/// `addr:port` of a connect decision, with IPv6 in brackets.
fn connect_target(detail: &Value) -> Option<String> {
    let addr = detail.get("addr").and_then(Value::as_str)?;
    let port = detail.get("port").and_then(Value::as_u64)?;
    Some(if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") })
}

/// Does a token's claim `name` equal `value` (or, for an array, hold it)?
fn claim_matches(claims: &Value, name: &str, value: &str) -> bool {
    let text = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    match claims.get(name) {
        Some(Value::Array(items)) => items.iter().any(|item| text(item) == value),
        Some(other) => text(other) == value,
        None => false,
    }
}
