//! Reading the session log (the control API's side; never writes).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use serde::Serialize;
use serde_json::{Map, Value};

use tollgate_common::EventKind;

use super::{GrantEvent, RecordKind, SessionId, SessionRecord, StoreError};

/// Opens read-only connections to the session log.
#[derive(Debug, Clone)]
pub struct Reader {
    path: PathBuf,
}

/// One session with its process tree and its events, in order.
#[derive(Debug, Serialize)]
pub struct SessionDetail {
    /// The session.
    pub session: SessionRecord,
    /// Every process seen, by first appearance.
    pub processes: Vec<Value>,
    /// Every event, in order.
    pub events: Vec<Value>,
    /// The sessions above it, its parent first, up to the top of its chain.
    pub chain: Vec<SessionRecord>,
}

impl Reader {
    /// Reads the database at `path`.
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned() }
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Every session, newest first.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare(&format!("{SESSION_COLUMNS} ORDER BY started_at DESC, id"))?;
        let rows = statement.query_map([], session_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One session, its processes and its events.
    pub fn show(&self, id: &SessionId) -> Result<SessionDetail, StoreError> {
        let conn = self.connect()?;
        let session = conn
            .query_row(&format!("{SESSION_COLUMNS} WHERE id = ?1"), [id.as_str()], session_from_row)
            .map_err(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => StoreError::NoSuchSession(id.to_string()),
                other => other.into(),
            })?;
        let events: Vec<Value> = events_of(&conn, id)?.into_iter().map(Value::Object).collect();
        let processes = process_tree(&events);
        let mut chain: Vec<SessionRecord> = Vec::new();
        let mut next = session.parent.clone();
        // Bounded: a chain is at most as long as the log has sessions.
        while let Some(parent) = next.take() {
            if chain.iter().any(|s| s.id == parent) {
                break;
            }
            match conn.query_row(&format!("{SESSION_COLUMNS} WHERE id = ?1"), [parent.as_str()], session_from_row) {
                Ok(record) => {
                    next = record.parent.clone();
                    chain.push(record);
                }
                Err(rusqlite::Error::QueryReturnedNoRows) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(SessionDetail { session, processes, events, chain })
    }

    /// Sessions started in `[since, until)` (RFC 3339 bounds), oldest first.
    pub fn sessions_between(&self, since: &str, until: &str) -> Result<Vec<SessionRecord>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare(&format!(
            "{SESSION_COLUMNS} WHERE started_at >= ?1 AND started_at < ?2 ORDER BY started_at, id"
        ))?;
        let rows = statement.query_map([since, until], session_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Use of each grant rule: the count over the UTC days from `since_day`
    /// to `until_day` (inclusive, `YYYY-MM-DD`), and the last use ever.
    pub fn rule_usage(&self, since_day: &str, until_day: &str) -> Result<Vec<RuleUsage>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare(
            "SELECT grant_name, rule,
                    SUM(CASE WHEN day >= ?1 AND day <= ?2 THEN count ELSE 0 END),
                    MAX(last_at),
                    (SELECT u2.last_session FROM grant_usage u2 WHERE u2.grant_name = u.grant_name
                       AND u2.rule = u.rule ORDER BY u2.last_at DESC LIMIT 1)
             FROM grant_usage u GROUP BY grant_name, rule ORDER BY grant_name, rule",
        )?;
        let rows = statement.query_map([since_day, until_day], |row| {
            Ok(RuleUsage {
                grant: row.get(0)?,
                rule: row.get(1)?,
                count: row.get(2)?,
                last_at: row.get(3)?,
                last_session: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When each grant was first in the policy.
    pub fn grants_seen(&self) -> Result<BTreeMap<String, String>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare("SELECT grant_name, first_seen FROM grants_seen")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What happened to grants (expired, revoked, renewed), oldest first.
    pub fn grant_events(&self) -> Result<Vec<GrantEvent>, StoreError> {
        let conn = self.connect()?;
        let mut statement =
            conn.prepare("SELECT at, grant_name, action, by, reason FROM grant_events ORDER BY at, rowid")?;
        let rows = statement.query_map([], |row| {
            Ok(GrantEvent {
                at: row.get(0)?,
                grant: row.get(1)?,
                action: row.get(2)?,
                by: row.get(3)?,
                reason: row.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every record in `[since, until)` (RFC 3339), in time order, with its
    /// session's identity; records with no verdict have an empty one.
    pub fn records_between(&self, since: &str, until: &str) -> Result<Vec<RecordedDecision>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare(
            "SELECT e.session_id, s.identity, e.kind, COALESCE(e.verdict, ''), e.detail, e.at, e.pid
             FROM events e JOIN sessions s ON s.id = e.session_id
             WHERE e.at >= ?1 AND e.at < ?2 ORDER BY e.at",
        )?;
        let rows = statement.query_map([since, until], |row| {
            let mut detail: Value = serde_json::from_str(&row.get::<_, String>(4)?).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut detail {
                map.insert("at".into(), row.get::<_, String>(5)?.into());
                map.insert("pid".into(), row.get::<_, i64>(6)?.into());
            }
            Ok(RecordedDecision {
                session: SessionId::stored(row.get(0)?),
                identity: row.get(1)?,
                kind: row.get(2)?,
                verdict: row.get(3)?,
                detail,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Decisions recorded in `[since, until)` with one of `verdicts`, with
    /// their session's identity.
    pub fn decisions_between(
        &self,
        since: &str,
        until: &str,
        verdicts: &[&str],
    ) -> Result<Vec<RecordedDecision>, StoreError> {
        let conn = self.connect()?;
        let list = verdicts.iter().map(|v| format!("'{}'", v.replace('\'', ""))).collect::<Vec<_>>().join(",");
        let mut statement = conn.prepare(&format!(
            "SELECT e.session_id, s.identity, e.kind, e.verdict, e.detail FROM events e JOIN sessions s ON s.id = e.session_id
             WHERE e.verdict IN ({list}) AND e.at >= ?1 AND e.at < ?2 ORDER BY e.at"
        ))?;
        let rows = statement.query_map([since, until], |row| {
            let detail: String = row.get(4)?;
            Ok(RecordedDecision {
                session: SessionId::stored(row.get(0)?),
                identity: row.get(1)?,
                kind: row.get(2)?,
                verdict: row.get(3)?,
                detail: serde_json::from_str(&detail).unwrap_or(Value::Null),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Recomputes the log's hash chain (see [`super::ledger::verify`]).
    pub fn verify(
        &self,
        session: Option<&SessionId>,
        since: Option<&str>,
        public_key: &str,
    ) -> Result<super::ledger::Verification, StoreError> {
        let conn = self.connect()?;
        Ok(super::ledger::verify(&conn, session.map(SessionId::as_str), since, public_key)?)
    }

    /// The signed head of the log's chain.
    pub fn signed_head(&self) -> Result<Option<super::ledger::SignedHead>, StoreError> {
        Ok(super::ledger::signed_head(&self.connect()?)?)
    }

    /// A session and its child sessions (all the way down) as one timeline:
    /// every event in time order, each with its `session` and `depth`, and
    /// the sessions themselves.
    pub fn timeline(&self, id: &SessionId) -> Result<(Vec<SessionRecord>, Vec<Value>), StoreError> {
        let conn = self.connect()?;
        let top = conn
            .query_row(&format!("{SESSION_COLUMNS} WHERE id = ?1"), [id.as_str()], session_from_row)
            .map_err(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => StoreError::NoSuchSession(id.to_string()),
                other => other.into(),
            })?;
        let mut sessions = vec![top];
        let mut index = 0;
        while index < sessions.len() {
            let parent = sessions[index].id.clone();
            let mut statement =
                conn.prepare(&format!("{SESSION_COLUMNS} WHERE parent = ?1 ORDER BY started_at, id"))?;
            let children: Vec<SessionRecord> =
                statement.query_map([parent.as_str()], session_from_row)?.collect::<Result<_, _>>()?;
            sessions.extend(children);
            index += 1;
        }
        let mut events = Vec::new();
        for session in &sessions {
            for mut event in events_of(&conn, &session.id)? {
                event.insert("session".into(), session.id.to_string().into());
                event.insert("depth".into(), session.depth.into());
                events.push(Value::Object(event));
            }
        }
        // RFC 3339 with fixed nanoseconds and Z sorts as text; equal times keep their order.
        events.sort_by(|a, b| a["at"].as_str().cmp(&b["at"].as_str()));
        Ok((sessions, events))
    }

    /// The chain's places after `after` (at most `limit`, from `since` on if
    /// given), each with the record it stands for: for exporters, in the
    /// order they were written.
    pub fn ledger_after(&self, after: i64, since: Option<&str>, limit: usize) -> Result<Vec<Value>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare(
            "SELECT l.n, l.kind, l.session_id, l.seq, l.at, l.hash, s.identity, s.host FROM ledger l
             LEFT JOIN sessions s ON s.id = l.session_id
             WHERE l.n > ?1 AND l.at >= ?2 ORDER BY l.n LIMIT ?3",
        )?;
        /// One ledger place and the session it belongs to.
        struct Place {
            n: i64,
            kind: String,
            session: String,
            seq: Option<i64>,
            at: String,
            hash: Vec<u8>,
            identity: Option<String>,
            host: Option<String>,
        }
        let rows: Vec<Place> = statement
            .query_map(params![after, since.unwrap_or(""), limit as i64], |row| {
                Ok(Place {
                    n: row.get(0)?,
                    kind: row.get(1)?,
                    session: row.get(2)?,
                    seq: row.get(3)?,
                    at: row.get(4)?,
                    hash: row.get(5)?,
                    identity: row.get(6)?,
                    host: row.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for Place { n, kind, session, seq, at, hash, identity, host } in rows {
            let record = match (kind.as_str(), seq) {
                ("event", Some(seq)) => conn
                    .query_row(
                        "SELECT kind, pid, verdict, detail FROM events WHERE session_id = ?1 AND seq = ?2",
                        params![session, seq],
                        |row| {
                            let detail: String = row.get(3)?;
                            Ok(serde_json::json!({
                                "seq": seq,
                                "kind": row.get::<_, String>(0)?,
                                "pid": row.get::<_, i64>(1)?,
                                "verdict": row.get::<_, Option<String>>(2)?,
                                "detail": serde_json::from_str::<Value>(&detail).unwrap_or(Value::Null),
                            }))
                        },
                    )
                    .optional()?,
                ("session", _) => conn
                    .query_row(&format!("{SESSION_COLUMNS} WHERE id = ?1"), [&session], session_from_row)
                    .optional()?
                    .map(|record| serde_json::to_value(record).unwrap_or_default()),
                _ => conn
                    .query_row("SELECT ended_at FROM sessions WHERE id = ?1", [&session], |row| {
                        row.get::<_, Option<String>>(0)
                    })
                    .optional()?
                    .map(|ended| serde_json::json!({"ended_at": ended})),
            };
            out.push(serde_json::json!({
                "n": n,
                "entry": kind,
                "session": session,
                "identity": identity,
                "host": host,
                "at": at,
                "hash": super::ledger::hex(&hash),
                "record": record,
            }));
        }
        Ok(out)
    }

    /// What each of `ids`' records already counts as lost, per kind and
    /// reason (its `lost` events), through one connection.
    pub fn recorded_losses(&self, ids: &[SessionId]) -> Result<HashMap<SessionId, Vec<RecordedLoss>>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare(
            "SELECT json_extract(detail, '$.lost_kind'), json_extract(detail, '$.reason'),
                    SUM(json_extract(detail, '$.count'))
             FROM events WHERE session_id = ?1 AND kind = 'lost' GROUP BY 1, 2",
        )?;
        let mut losses = HashMap::new();
        for id in ids {
            let rows = statement.query_map([id.as_str()], |row| {
                Ok(RecordedLoss {
                    kind: row.get::<_, Option<String>>(0)?.unwrap_or_default(),
                    reason: row.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    count: row.get::<_, Option<i64>>(2)?.map_or(0, |count| u64::try_from(count).unwrap_or(0)),
                })
            })?;
            losses.insert(id.clone(), rows.collect::<Result<_, _>>()?);
        }
        Ok(losses)
    }

    /// Counts of events the kernel could not deliver, by kind.
    pub fn lost_events(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare("SELECT kind, SUM(count) FROM lost_events GROUP BY kind")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A session's events in order, each its stored fields and its detail.
fn events_of(conn: &Connection, id: &SessionId) -> Result<Vec<Map<String, Value>>, StoreError> {
    let mut statement =
        conn.prepare("SELECT seq, at, kind, pid, verdict, detail FROM events WHERE session_id = ?1 ORDER BY seq")?;
    let rows = statement.query_map([id.as_str()], |row| {
        let mut event = Map::new();
        event.insert("seq".into(), row.get::<_, i64>(0)?.into());
        event.insert("at".into(), row.get::<_, String>(1)?.into());
        event.insert("kind".into(), row.get::<_, String>(2)?.into());
        event.insert("pid".into(), row.get::<_, i64>(3)?.into());
        if let Some(verdict) = row.get::<_, Option<String>>(4)? {
            event.insert("verdict".into(), verdict.into());
        }
        if let Ok(Value::Object(detail)) = serde_json::from_str::<Value>(&row.get::<_, String>(5)?) {
            for (key, value) in detail {
                event.entry(key).or_insert(value);
            }
        }
        Ok(event)
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

const SESSION_COLUMNS: &str = "SELECT id, identity, subject, issuer, claims, host, uid, privileged, grants,
    cgroup, command, started_at, ended_at, parent, depth, reason, ttl_secs FROM sessions";

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    let json = |index: usize| -> rusqlite::Result<Value> {
        Ok(serde_json::from_str(&row.get::<_, String>(index)?).unwrap_or(Value::Null))
    };
    let strings = |value: Value| -> Vec<String> { serde_json::from_value(value).unwrap_or_default() };
    Ok(SessionRecord {
        id: SessionId::stored(row.get(0)?),
        identity: row.get(1)?,
        subject: row.get(2)?,
        issuer: row.get(3)?,
        claims: json(4)?,
        host: row.get(5)?,
        uid: row.get(6)?,
        privileged: row.get(7)?,
        grants: strings(json(8)?),
        cgroup: row.get(9)?,
        command: strings(json(10)?),
        started_at: row.get(11)?,
        ended_at: row.get(12)?,
        parent: row.get::<_, Option<String>>(13)?.map(SessionId::stored),
        depth: row.get(14)?,
        reason: row.get(15)?,
        ttl_secs: row.get(16)?,
    })
}

/// What a session's record counts as lost of one kind for one reason.
#[derive(Debug, Clone)]
pub struct RecordedLoss {
    /// The kind of event (`lost_kind`: exec, connect...).
    pub kind: String,
    /// Why (`throttled`, `ring-buffer-full`, `log-queue-full`).
    pub reason: String,
    /// How many, over all the record's `lost` events.
    pub count: u64,
}

/// One recorded decision, with its session's identity.
#[derive(Debug, Clone)]
pub struct RecordedDecision {
    /// The session.
    pub session: SessionId,
    /// The session's identity.
    pub identity: String,
    /// The record kind (exec, connect, http, ...).
    pub kind: String,
    /// The verdict's name.
    pub verdict: String,
    /// The record's detail.
    pub detail: Value,
}

/// How much one grant rule was used.
#[derive(Debug, Clone, Serialize)]
pub struct RuleUsage {
    /// The grant.
    pub grant: String,
    /// The rule.
    pub rule: String,
    /// Uses in the window asked for.
    pub count: i64,
    /// The last use ever (RFC 3339).
    pub last_at: Option<String>,
    /// The session of the last use.
    pub last_session: Option<String>,
}

/// Processes from fork, exec and exit events: who made whom, what each ran
/// last, how each ended. A pid reused later in the session starts a new entry.
fn process_tree(events: &[Value]) -> Vec<Value> {
    let mut processes: Vec<Map<String, Value>> = Vec::new();
    let mut live: BTreeMap<u64, usize> = BTreeMap::new();
    let field = |event: &Value, name: &str| event.get(name).and_then(Value::as_u64);
    for event in events {
        let Some(pid) = field(event, "pid") else { continue };
        let kind = event.get("kind").and_then(Value::as_str).and_then(RecordKind::from_name);
        match kind {
            Some(RecordKind::Kernel(EventKind::Fork)) => {
                if let Some(child) = field(event, "child_pid") {
                    let mut process = Map::new();
                    process.insert("pid".into(), child.into());
                    process.insert("ppid".into(), pid.into());
                    process.insert("filename".into(), Value::Null);
                    process.insert("exit_code".into(), Value::Null);
                    live.insert(child, processes.len());
                    processes.push(process);
                }
            }
            Some(RecordKind::Kernel(EventKind::Exec)) => {
                let index = *live.entry(pid).or_insert_with(|| {
                    let mut process = Map::new();
                    process.insert("pid".into(), pid.into());
                    process.insert("ppid".into(), event.get("ppid").cloned().unwrap_or(Value::Null));
                    process.insert("exit_code".into(), Value::Null);
                    processes.push(process);
                    processes.len() - 1
                });
                processes[index].insert("filename".into(), event.get("filename").cloned().unwrap_or(Value::Null));
            }
            Some(RecordKind::Kernel(EventKind::Exit)) => {
                if let Some(index) = live.remove(&pid) {
                    processes[index].insert("exit_code".into(), event.get("exit_code").cloned().unwrap_or(Value::Null));
                    processes[index].insert("signal".into(), event.get("signal").cloned().unwrap_or(Value::Null));
                }
            }
            _ => {}
        }
    }
    processes.into_iter().map(Value::Object).collect()
}
