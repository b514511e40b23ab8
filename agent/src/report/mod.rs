//! Per-host reports for reviewers: one period's sessions and delegation
//! chains by identity, what each exercised, denials, held requests (who
//! asked, who decided, how long it waited), masking, lost events and the
//! access-review findings, with the chain's signed head. The report is
//! signed as a whole with the host's ledger key, so a reviewer can check a
//! copy offline (`tollgate verify --report FILE --key PUB`).

pub mod fleet;
pub mod render;
pub mod window;

use std::collections::BTreeMap;

use base64::{Engine, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    policy::PolicySet,
    review::{self, AccessReviewError, ReviewQuery},
    session::GrantView,
    store::{
        Reader, RecordedDecision, SessionRecord, StoreError,
        ledger::{LedgerKey, SignedHead, signature_holds},
    },
};

/// Report schema version: fields are only ever added under one version.
pub const REPORT_VERSION: u32 = 1;

/// What a report covers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReportQuery {
    /// Start (RFC 3339).
    pub since: String,
    /// End (RFC 3339).
    pub until: String,
    /// Only this identity.
    #[serde(default)]
    pub identity: Option<String>,
}

/// One session in a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionEntry {
    /// The session record.
    #[serde(flatten)]
    pub record: SessionRecord,
    /// Records of it in the period, by kind.
    pub records_by_kind: BTreeMap<String, u64>,
    /// Kernel events of it that were counted instead of delivered.
    pub lost_events: u64,
}

/// One identity's part of a report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityEntry {
    /// The identity.
    pub identity: String,
    /// Its sessions started in the period, each top session followed by its children.
    pub sessions: Vec<SessionEntry>,
    /// Grant rules that decided something, with how often (`grant: rule` -> count).
    pub exercised: BTreeMap<String, u64>,
    /// Refusals, by the rule (or target) that refused.
    pub denials: BTreeMap<String, u64>,
}

/// A request that was held for a reviewer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldRequest {
    /// The session that asked.
    pub session: String,
    /// Its identity.
    pub identity: String,
    /// Method and path.
    pub request: String,
    /// Where it was going.
    pub destination: String,
    /// approved, denied or timed-out.
    pub decision: String,
    /// Who decided ("timeout" when nobody did).
    pub by: String,
    /// When it was asked.
    pub requested_at: String,
    /// Seconds it waited.
    pub waited_secs: f64,
}

/// Totals over the period; every section of the report adds up to them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Totals {
    /// Sessions started.
    pub sessions: u64,
    /// Records.
    pub records: u64,
    /// Refused execs, connects and sockets.
    pub denials: u64,
    /// Proxy requests refused by a block rule.
    pub blocked: u64,
    /// Requests held for a reviewer.
    pub held: u64,
    /// Values masked in responses.
    pub masked: u64,
    /// Kernel events counted instead of delivered.
    pub lost_events: u64,
}

/// A host's report for one period.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// The host.
    pub host: String,
    /// When it was made.
    pub generated_at: String,
    /// The period's start.
    pub since: String,
    /// The period's end.
    pub until: String,
    /// Totals.
    pub totals: Totals,
    /// Per identity.
    pub identities: Vec<IdentityEntry>,
    /// Held requests.
    pub held_requests: Vec<HeldRequest>,
    /// Values masked, per route.
    pub masked_by_route: BTreeMap<String, u64>,
    /// The access-review findings for the period.
    pub findings: Vec<review::Finding>,
    /// The log's chain head when the report was made, signed.
    pub head: Option<SignedHead>,
    /// The report's own signature (base64 Ed25519 over its JSON without this field).
    #[serde(default)]
    pub signature: Option<String>,
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The session log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The findings could not be made.
    #[error(transparent)]
    Review(#[from] AccessReviewError),
}

/// Builds the report for `query` (blocking: reads the session log) and signs it with `key`.
pub fn build(
    policies: &PolicySet,
    grant_views: impl FnOnce(&str, &str) -> Result<Vec<GrantView>, StoreError>,
    reader: &Reader,
    review_depth: u32,
    query: &ReportQuery,
    key: Option<&LedgerKey>,
) -> Result<Report, ReportError> {
    let in_scope = |identity: &str| query.identity.as_deref().is_none_or(|wanted| wanted == identity);
    let sessions: Vec<SessionRecord> =
        reader.sessions_between(&query.since, &query.until)?.into_iter().filter(|s| in_scope(&s.identity)).collect();
    let records: Vec<RecordedDecision> =
        reader.records_between(&query.since, &query.until)?.into_iter().filter(|r| in_scope(&r.identity)).collect();
    let mut totals = Totals { sessions: sessions.len() as u64, records: records.len() as u64, ..Totals::default() };
    let mut by_identity: BTreeMap<String, IdentityEntry> = BTreeMap::new();
    for session in ordered(&sessions) {
        let entry = by_identity.entry(session.identity.clone()).or_insert_with(|| IdentityEntry {
            identity: session.identity.clone(),
            sessions: Vec::new(),
            exercised: BTreeMap::new(),
            denials: BTreeMap::new(),
        });
        entry.sessions.push(SessionEntry { record: session.clone(), records_by_kind: BTreeMap::new(), lost_events: 0 });
    }
    let mut held: BTreeMap<String, HeldRequest> = BTreeMap::new();
    let mut masked_by_route: BTreeMap<String, u64> = BTreeMap::new();
    for record in &records {
        let detail = &record.detail;
        let text = |key: &str| detail.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
        let entry = by_identity.entry(record.identity.clone()).or_insert_with(|| IdentityEntry {
            identity: record.identity.clone(),
            sessions: Vec::new(),
            exercised: BTreeMap::new(),
            denials: BTreeMap::new(),
        });
        if let Some(session) = entry.sessions.iter_mut().find(|s| s.record.id == record.session) {
            *session.records_by_kind.entry(record.kind.clone()).or_default() += 1;
            if record.kind == "lost" {
                session.lost_events += detail.get("count").and_then(Value::as_u64).unwrap_or(0);
            }
        }
        if record.kind == "lost" {
            totals.lost_events += detail.get("count").and_then(Value::as_u64).unwrap_or(0);
        }
        for rule in detail.get("grant_rules").and_then(Value::as_array).into_iter().flatten() {
            let name = format!(
                "{}: {}",
                rule.get("grant").and_then(Value::as_str).unwrap_or_default(),
                rule.get("rule").and_then(Value::as_str).unwrap_or_default()
            );
            *entry.exercised.entry(name).or_default() += 1;
        }
        match (record.kind.as_str(), record.verdict.as_str()) {
            ("exec" | "connect" | "socket", "deny" | "killed") => {
                totals.denials += 1;
                let what =
                    detail.get("rule").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| {
                        match record.kind.as_str() {
                            "exec" => format!("exec {}", text("filename")),
                            "connect" => {
                                format!("connect {}:{}", text("addr"), detail.get("port").cloned().unwrap_or_default())
                            }
                            _ => "socket".to_owned(),
                        }
                    });
                *entry.denials.entry(what).or_default() += 1;
            }
            ("http" | "tls" | "sql", "block") => {
                totals.blocked += 1;
                let rules: Vec<String> = detail
                    .get("rules")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect();
                let what =
                    if rules.is_empty() { format!("{} {}", text("method"), text("path")) } else { rules.join("; ") };
                *entry.denials.entry(format!("blocked: {what}")).or_default() += 1;
            }
            ("approval", "pending") => {
                totals.held += 1;
                held.insert(
                    text("id"),
                    HeldRequest {
                        session: record.session.to_string(),
                        identity: record.identity.clone(),
                        request: format!("{} {}", text("method"), text("path")),
                        destination: text("destination"),
                        decision: "pending".into(),
                        by: String::new(),
                        requested_at: text("requested_at"),
                        waited_secs: 0.0,
                    },
                );
            }
            ("approval", decision) => {
                if let Some(request) = held.get_mut(&text("id")) {
                    request.decision = decision.to_owned();
                    request.by = text("by");
                    request.waited_secs = seconds_between(&request.requested_at, &text("at"));
                }
            }
            _ => {}
        }
        if let Some(masked) = detail.get("masked").and_then(Value::as_u64) {
            totals.masked += masked;
            *masked_by_route.entry(text("route")).or_default() += masked;
        }
    }
    let review_query = ReviewQuery {
        since: query.since.clone(),
        until: query.until.clone(),
        identity: query.identity.clone(),
        ..ReviewQuery::default()
    };
    let findings = review::run(policies, grant_views, reader, review_depth, &review_query)?.findings;
    let host = sessions.first().map(|s| s.host.clone()).unwrap_or_else(|| {
        hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into())
    });
    let mut report = Report {
        version: REPORT_VERSION,
        host,
        generated_at: crate::store::rfc3339(std::time::SystemTime::now()),
        since: query.since.clone(),
        until: query.until.clone(),
        totals,
        identities: by_identity.into_values().collect(),
        held_requests: held.into_values().collect(),
        masked_by_route,
        findings,
        head: reader.signed_head()?,
        signature: None,
    };
    if let Some(key) = key {
        report.signature = Some(STANDARD.encode(key.sign(&signed_bytes(&report))));
    }
    Ok(report)
}

/// Top sessions (oldest first), each followed by its children, depth first.
fn ordered(sessions: &[SessionRecord]) -> Vec<&SessionRecord> {
    let listed = |id: &str| sessions.iter().any(|s| s.id.as_str() == id);
    let mut out = Vec::new();
    let mut stack: Vec<&SessionRecord> =
        sessions.iter().filter(|s| s.parent.as_ref().is_none_or(|p| !listed(p.as_str()))).rev().collect();
    while let Some(session) = stack.pop() {
        out.push(session);
        let children: Vec<&SessionRecord> =
            sessions.iter().filter(|s| s.parent.as_ref() == Some(&session.id)).collect();
        stack.extend(children.into_iter().rev());
    }
    out
}

fn seconds_between(from: &str, to: &str) -> f64 {
    match (humantime::parse_rfc3339(from), humantime::parse_rfc3339(to)) {
        (Ok(from), Ok(to)) => to.duration_since(from).map_or(0.0, |d| d.as_secs_f64()),
        _ => 0.0,
    }
}

/// What a report's signature covers: its JSON without the signature.
fn signed_bytes(report: &Report) -> Vec<u8> {
    signed_bytes_of(serde_json::to_value(report).unwrap_or(Value::Null))
}

fn signed_bytes_of(mut value: Value) -> Vec<u8> {
    if let Value::Object(map) = &mut value {
        map.remove("signature");
    }
    let mut bytes = b"tollgate report\0".to_vec();
    bytes.extend(serde_json::to_vec(&value).unwrap_or_default());
    bytes
}

/// Checks a report (its JSON text) offline against the host's public key:
/// the report's own signature and its chain head's. Works on the JSON as
/// written, so fields a newer tollgate adds are covered too.
pub fn verify_report(text: &str, public: &str) -> Result<Value, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not a JSON report: {e}"))?;
    let signature = value.get("signature").and_then(Value::as_str).ok_or("the report is not signed")?;
    let signature = STANDARD.decode(signature).map_err(|_| "the report's signature is not base64".to_owned())?;
    if !signature_holds(public, &signed_bytes_of(value.clone()), &signature) {
        return Err("the report's signature does not hold under this key (edited, or another host's)".into());
    }
    let head: Option<SignedHead> = value.get("head").cloned().and_then(|h| serde_json::from_value(h).ok());
    if let Some(head) = &head
        && !head.holds_under(public)
    {
        return Err("the report's chain head is not signed by this key".into());
    }
    Ok(json!({
        "host": value["host"],
        "since": value["since"],
        "until": value["until"],
        "sessions": value["totals"]["sessions"],
        "head": head,
    }))
}
