//! What the session log says of one governed connection or exchange: the
//! record type the HTTP and TLS paths share.

use std::time::Instant;

use hyper::StatusCode;
use serde_json::Value;

use super::Governed;
use crate::{
    approval::Answer,
    store::{FieldList, RecordKind, RecordVerdict, SessionLog},
};

/// Why a held request or statement does not go on.
pub enum Unapproved {
    /// A reviewer denied it.
    Denied {
        /// The held request's id.
        id: String,
        /// Who.
        by: String,
        /// Why, if they said.
        reason: Option<String>,
    },
    /// Nobody decided in time.
    TimedOut {
        /// The held request's id.
        id: String,
        /// How long it waited.
        timeout: std::time::Duration,
    },
    /// Its session already has as many held as it may.
    TooMany,
}

/// How an HTTP exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream and answered in full.
    Forwarded,
    /// Sent upstream, but the answer's body did not arrive whole.
    ForwardedIncomplete,
    /// Upgraded (101): a tunnel opened (recorded as it opens).
    Tunnelled,
    /// The tunnel closed (recorded with the bytes each way and its duration).
    TunnelClosed,
    /// Refused by a block rule (or a host the route does not govern).
    Blocked,
    /// Refused before any rule: ambiguous, too large, not a valid target.
    Refused,
    /// Held for approval and not approved.
    Denied,
    /// The proxy or the upstream failed.
    Error,
}

impl Outcome {
    /// The name stored in the record's `outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::ForwardedIncomplete => "forwarded-incomplete",
            Self::Tunnelled => "tunnelled",
            Self::TunnelClosed => "tunnel-closed",
            Self::Blocked => "blocked",
            Self::Refused => "refused",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }

    /// The record's verdict: only a whole answer counts as allowed.
    pub fn verdict(self) -> RecordVerdict {
        match self {
            Self::Forwarded | Self::Tunnelled | Self::TunnelClosed => RecordVerdict::ALLOW,
            Self::Blocked => RecordVerdict::Block,
            Self::ForwardedIncomplete | Self::Refused | Self::Denied | Self::Error => RecordVerdict::DENY,
        }
    }
}

/// The record of one connection (TLS) or exchange (HTTP), written once when it ends.
pub struct ProxyRecord {
    kind: RecordKind,
    detail: FieldList,
    started: Instant,
    route: std::sync::Arc<crate::policy::compile::SessionRoute>,
}

impl ProxyRecord {
    /// A record of `kind` for a connection of `governed`: `leading` fields
    /// first, then where it went and under which route.
    pub fn new(kind: RecordKind, governed: &Governed, leading: FieldList) -> Self {
        let mut detail = leading;
        detail.set("destination", governed.destination.to_string());
        detail.set("client_pid", governed.client_pid);
        detail.set("grant", governed.route.grant.clone());
        detail.set("route", governed.rule_name.clone());
        Self { kind, detail, started: Instant::now(), route: governed.route.clone() }
    }

    /// Notes a rule that matched, and the grant rule it is (`grant_rules`,
    /// which the session log counts as that rule's use).
    pub fn hit(&mut self, rule: &str) {
        push(&mut self.detail, "rules", rule.into());
        if let Some(grant_rule) = self.route.rule_of_hit(rule) {
            push(&mut self.detail, "grant_rules", serde_json::json!(grant_rule));
        }
    }

    /// Sets a field.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        self.detail.set(key, value);
    }

    /// Notes a reviewer's answer; `Err` when it does not let the request go on.
    pub fn answered(&mut self, answer: Answer) -> Result<(), Unapproved> {
        match answer {
            Answer::Window => {
                self.set("approval", "jit-window");
                Ok(())
            }
            Answer::Approved { id, by, window } => {
                self.set("approval_id", id);
                self.set("approved_by", by);
                if let Some(window) = window {
                    self.set("jit_window_secs", window.as_secs());
                }
                Ok(())
            }
            Answer::Denied { id, by, reason } => {
                self.set("approval_id", id.clone());
                self.set("denied_by", by.clone());
                Err(Unapproved::Denied { id, by, reason })
            }
            Answer::TimedOut { id, timeout } => {
                self.set("approval_id", id.clone());
                self.set("denied_by", "timeout");
                Err(Unapproved::TimedOut { id, timeout })
            }
            Answer::TooMany => Err(Unapproved::TooMany),
        }
    }

    /// Writes the record with `verdict`.
    pub fn finish(self, log: &SessionLog, governed: &Governed, verdict: RecordVerdict) {
        log.decided_for(&governed.session, governed.client_pid, self.kind, verdict, self.detail);
    }

    /// Writes an HTTP exchange's record: its outcome, status and duration.
    /// A refused exchange also gets one line in the daemon's log.
    pub fn finish_exchange(mut self, log: &SessionLog, governed: &Governed, outcome: Outcome, status: StatusCode) {
        if matches!(outcome, Outcome::Blocked | Outcome::Denied | Outcome::Refused) {
            let text = |key: &str| self.detail.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
            let rules: Vec<&str> = self
                .detail
                .get("rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            tracing::warn!(
                session = %governed.session,
                outcome = outcome.as_str(),
                method = text("method"),
                path = text("path"),
                destination = %governed.destination,
                rules = rules.join("; "),
                status = status.as_u16(),
                "request refused"
            );
        }
        self.set("outcome", outcome.as_str());
        self.set("status", status.as_u16());
        self.set("duration_ms", self.started.elapsed().as_secs_f64() * 1000.0);
        self.finish(log, governed, outcome.verdict());
    }
}

/// Appends `value` to the array at `key`, making it if absent.
fn push(detail: &mut FieldList, key: &'static str, value: Value) {
    match detail.get_mut(key) {
        Some(Value::Array(values)) => values.push(value),
        _ => detail.set(key, Value::Array(vec![value])),
    }
}
