//! What the session log says of one governed connection or exchange: the
//! record type the HTTP and TLS paths share.

use std::{sync::Arc, time::Instant};

use hyper::StatusCode;
use serde::{Serialize, Serializer, ser::SerializeMap};
use serde_json::Value;

use super::Governed;
use crate::{
    approval::Answer,
    policy::compile::{RuleRef, SessionRoute},
    store::{Detail, FieldList, RecordKind, RecordVerdict, SessionLog, stats::Exchange},
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

/// The record of one connection (TLS, PostgreSQL) or exchange (HTTP),
/// written once when it ends. Typed, and rendered to JSON once as it is
/// written: a list of JSON values built per exchange was about a tenth of
/// the proxy threads' time.
pub struct ProxyRecord {
    kind: RecordKind,
    /// What the record says first: an exchange's request line, or a
    /// connection's fields.
    leading: Leading,
    /// Rules that matched, in order.
    rules: Vec<String>,
    /// The grant rule each block or approve rule that matched is.
    grant_rules: Vec<RuleRef>,
    /// Everything else, in the order set.
    fields: FieldList,
    started: Instant,
    route: Arc<SessionRoute>,
}

/// What a record says before where it went.
enum Leading {
    /// An HTTP exchange: what was asked.
    Exchange { method: hyper::Method, path: String, host: String },
    /// Fields of a connection (TLS, PostgreSQL).
    Fields(FieldList),
}

/// The fields every record writes from what it holds ([`Stored`]).
const WRITTEN: [&str; 9] =
    ["method", "path", "host", "destination", "client_pid", "grant", "route", "rules", "grant_rules"];

/// The fields an exchange's end writes ([`Ended`]).
const ENDED: [&str; 3] = ["outcome", "status", "duration_ms"];

/// How an HTTP exchange ended.
#[derive(Clone, Copy)]
struct Ended {
    outcome: Outcome,
    status: StatusCode,
    duration_ms: f64,
}

impl ProxyRecord {
    /// A record of `kind` for a connection of `governed`: `leading` fields
    /// first, then where it went and under which route.
    pub fn new(kind: RecordKind, governed: &Governed, leading: FieldList) -> Self {
        debug_assert_ne!(kind, RecordKind::Http, "an exchange's record is made by ProxyRecord::exchange");
        Self::with_leading(kind, governed, Leading::Fields(leading))
    }

    /// The record of one HTTP exchange, before any rule has matched.
    pub fn exchange(governed: &Governed, method: &hyper::Method, path: &str, host: &str) -> Self {
        let leading = Leading::Exchange { method: method.clone(), path: path.to_owned(), host: host.to_owned() };
        Self::with_leading(RecordKind::Http, governed, leading)
    }

    fn with_leading(kind: RecordKind, governed: &Governed, leading: Leading) -> Self {
        Self {
            kind,
            leading,
            rules: Vec::new(),
            grant_rules: Vec::new(),
            fields: FieldList::new(),
            started: Instant::now(),
            route: governed.route.clone(),
        }
    }

    /// Notes a rule that matched, and the grant rule it is (`grant_rules`,
    /// which the session log counts as that rule's use).
    pub fn hit(&mut self, rule: &str) {
        self.rules.push(rule.to_owned());
        if let Some(grant_rule) = self.route.rule_of_hit(rule) {
            self.grant_rules.push(grant_rule.clone());
        }
    }

    /// Sets a field; not one the record writes itself ([`WRITTEN`], and an
    /// exchange's end), which would then stand twice in the stored object.
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        let written = WRITTEN.contains(&key) || (self.kind == RecordKind::Http && ENDED.contains(&key));
        debug_assert!(!written, "`{key}` is a field the record writes itself");
        self.fields.set(key, value);
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
        self.write(log, governed, verdict, None);
    }

    /// Writes an HTTP exchange's record: its outcome, status and duration.
    /// A refused exchange also gets one line in the daemon's log.
    pub fn finish_exchange(self, log: &SessionLog, governed: &Governed, outcome: Outcome, status: StatusCode) {
        if matches!(outcome, Outcome::Blocked | Outcome::Denied | Outcome::Refused) {
            let (method, path) = match &self.leading {
                Leading::Exchange { method, path, .. } => (method.as_str(), path.as_str()),
                Leading::Fields(_) => ("", ""),
            };
            tracing::warn!(
                session = %governed.session,
                outcome = outcome.as_str(),
                method,
                path,
                destination = %governed.destination_text,
                rules = self.rules.join("; "),
                status = status.as_u16(),
                "request refused"
            );
        }
        let ended = Ended { outcome, status, duration_ms: self.started.elapsed().as_secs_f64() * 1000.0 };
        self.write(log, governed, outcome.verdict(), Some(ended));
    }

    fn write(self, log: &SessionLog, governed: &Governed, verdict: RecordVerdict, ended: Option<Ended>) {
        let exchange = (self.kind == RecordKind::Http).then(|| Exchange {
            outcome: ended.map_or("unknown", |ended| ended.outcome.as_str()),
            duration_ms: ended.map(|ended| ended.duration_ms),
        });
        let grant_rules = self.grant_rules.iter().map(|rule| (rule.grant.clone(), rule.rule.clone())).collect();
        let detail = Detail::render(&Stored { record: &self, governed, ended }, grant_rules);
        log.decided_rendered(&governed.session, governed.client_pid, self.kind, verdict, detail, exchange);
    }
}

/// A record as the session log stores it: its leading fields, where the
/// connection went and under which route (read off the connection where
/// the record is written, not copied into each exchange's), the rules that
/// matched, the other fields in the order set, and how an exchange ended.
struct Stored<'a> {
    record: &'a ProxyRecord,
    governed: &'a Governed,
    ended: Option<Ended>,
}

impl Serialize for Stored<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Self { record, governed, ended } = self;
        let mut map = serializer.serialize_map(None)?;
        match &record.leading {
            Leading::Exchange { method, path, host } => {
                map.serialize_entry("method", method.as_str())?;
                map.serialize_entry("path", path)?;
                map.serialize_entry("host", host)?;
            }
            Leading::Fields(fields) => {
                for (key, value) in fields.iter() {
                    map.serialize_entry(key, value)?;
                }
            }
        }
        map.serialize_entry("destination", &governed.destination_text)?;
        map.serialize_entry("client_pid", &governed.client_pid)?;
        map.serialize_entry("grant", &governed.route.grant)?;
        map.serialize_entry("route", &governed.rule_name)?;
        // An exchange always says which rules matched, even when none did.
        if record.kind == RecordKind::Http || !record.rules.is_empty() {
            map.serialize_entry("rules", &record.rules)?;
        }
        if !record.grant_rules.is_empty() {
            map.serialize_entry("grant_rules", &record.grant_rules)?;
        }
        for (key, value) in record.fields.iter() {
            map.serialize_entry(key, value)?;
        }
        if let Some(Ended { outcome, status, duration_ms }) = ended {
            map.serialize_entry("outcome", outcome.as_str())?;
            map.serialize_entry("status", &status.as_u16())?;
            map.serialize_entry("duration_ms", duration_ms)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use std::time::Duration;

    use super::*;
    use crate::store::{SessionRecord, Writer};

    use crate::proxy::testing::governed;

    fn stored(record: &ProxyRecord, governed: &Governed, ended: Option<Ended>) -> Value {
        let text = serde_json::to_string(&Stored { record, governed, ended }).expect("renders");
        serde_json::from_str(&text).expect("JSON")
    }

    /// The typed record stores the fields the map of JSON values it
    /// replaced stored, under the same names: reports, reviews and replay
    /// read them by name.
    #[test]
    fn an_exchange_stores_its_request_connection_rules_fields_and_end() {
        let governed = governed();
        let mut record = ProxyRecord::exchange(&governed, &hyper::Method::DELETE, "/a\"b", "api:8080");
        assert_eq!(
            stored(&record, &governed, None),
            json!({
                "method": "DELETE", "path": "/a\"b", "host": "api:8080",
                "destination": "127.0.0.1:8080", "client_pid": 42, "grant": "builds",
                "route": "builds: network.proxy 127.0.0.1/32:8080", "rules": [],
            }),
            "an exchange names its rules even when none matched"
        );
        record.set("request_bytes", 0);
        record.hit("block[0]: method DELETE");
        record.hit("ambiguous: two Host headers");
        record.set("request_bytes", 3);
        let ended = Ended { outcome: Outcome::Blocked, status: StatusCode::FORBIDDEN, duration_ms: 1.5 };
        let rule = governed.route.rule_of_hit("block[0]: method DELETE").expect("a grant rule").clone();
        assert_eq!(
            stored(&record, &governed, Some(ended)),
            json!({
                "method": "DELETE", "path": "/a\"b", "host": "api:8080",
                "destination": "127.0.0.1:8080", "client_pid": 42, "grant": "builds",
                "route": "builds: network.proxy 127.0.0.1/32:8080",
                "rules": ["block[0]: method DELETE", "ambiguous: two Host headers"],
                "grant_rules": [{"grant": rule.grant, "rule": rule.rule}],
                "request_bytes": 3,
                "outcome": "blocked", "status": 403, "duration_ms": 1.5,
            })
        );
    }

    /// Through the session log: the stored row is the record, `/metrics`
    /// counts the exchange's outcome and duration, and the grant rule that
    /// matched is counted as used.
    #[test]
    fn a_finished_exchange_is_stored_counted_and_its_grant_rule_used() {
        let dir = std::env::temp_dir().join(format!("tollgate-proxy-record-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("log.db");
        let writer = Writer::start(&path, Duration::from_millis(10), None, 64).expect("writer");
        let log = SessionLog::new(writer.handle());
        let governed = governed();
        let session = SessionRecord {
            id: governed.session.clone(),
            identity: "bots".into(),
            subject: "b".into(),
            issuer: "tollgate-dev".into(),
            claims: Value::Null,
            host: "test".into(),
            uid: 0,
            privileged: true,
            grants: vec!["builds".into()],
            cgroup: "/sys/fs/cgroup/test".into(),
            command: vec!["curl".into()],
            started_at: crate::store::rfc3339(std::time::SystemTime::now()),
            ended_at: None,
            parent: None,
            depth: 0,
            reason: None,
            ttl_secs: None,
        };
        log.open_session(session).expect("the session is on record");
        let mut record = ProxyRecord::exchange(&governed, &hyper::Method::DELETE, "/x", "api:8080");
        record.hit("block[0]: method DELETE");
        record.finish_exchange(&log, &governed, Outcome::Blocked, StatusCode::FORBIDDEN);
        log.flush();

        let metrics = log.stats().prometheus();
        for line in [
            "tollgate_decisions_total{kind=\"http\",verdict=\"block\"} 1",
            "tollgate_proxy_requests_total{outcome=\"blocked\"} 1",
            "tollgate_proxy_request_duration_seconds_count 1",
        ] {
            assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
        }
        let conn = rusqlite::Connection::open(&path).expect("the log");
        let (kind, verdict, pid, detail): (String, String, u32, String) = conn
            .query_row(
                "SELECT kind, verdict, pid, detail FROM events WHERE session_id = ?1",
                [governed.session.as_str()],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .expect("one stored record");
        assert_eq!((kind.as_str(), verdict.as_str(), pid), ("http", "block", 42));
        let detail: Value = serde_json::from_str(&detail).expect("JSON");
        let rule = governed.route.rule_of_hit("block[0]: method DELETE").expect("a grant rule").clone();
        assert_eq!(detail["rules"], json!(["block[0]: method DELETE"]));
        assert_eq!(detail["grant_rules"], json!([{"grant": rule.grant, "rule": rule.rule}]));
        assert_eq!((detail["outcome"].as_str(), detail["status"].as_u64()), (Some("blocked"), Some(403)));
        assert_eq!(detail["destination"], "127.0.0.1:8080");
        let used: i64 = conn
            .query_row(
                "SELECT count FROM grant_usage WHERE grant_name = ?1 AND rule = ?2",
                [rule.grant.as_str(), rule.rule.as_str()],
                |row| row.get(0),
            )
            .expect("the grant rule counted");
        assert_eq!(used, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A field the record writes itself, set again, would stand twice in
    /// the stored object (readers disagree on which one counts).
    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "is a field the record writes itself")]
    fn a_field_the_record_writes_itself_is_not_set_again() {
        let governed = governed();
        let mut record = ProxyRecord::exchange(&governed, &hyper::Method::GET, "/", "api:8080");
        record.set("outcome", "forwarded");
    }

    #[test]
    fn a_connection_stores_its_leading_fields_and_rules_only_where_one_matched() {
        let governed = governed();
        let mut leading = FieldList::new();
        leading.set("user", "app");
        let mut record = ProxyRecord::new(RecordKind::Sql, &governed, leading);
        record.set("outcome", "forwarded");
        let mut expected = json!({
            "user": "app", "destination": "127.0.0.1:8080", "client_pid": 42, "grant": "builds",
            "route": "builds: network.proxy 127.0.0.1/32:8080", "outcome": "forwarded",
        });
        assert_eq!(stored(&record, &governed, None), expected, "no rules matched, none named");
        record.hit("guardrail: a DELETE without WHERE");
        expected["rules"] = json!(["guardrail: a DELETE without WHERE"]);
        assert_eq!(stored(&record, &governed, None), expected);
    }
}
