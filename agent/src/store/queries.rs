//! Reading the session log (the control API's side; never writes).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use rusqlite::{Connection, OpenFlags, Row};
use serde::Serialize;
use serde_json::{Map, Value};

use tollgate_common::EventKind;

use super::{RecordKind, SessionId, SessionRecord, StoreError};

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
        let mut statement =
            conn.prepare("SELECT seq, at, kind, pid, verdict, detail FROM events WHERE session_id = ?1 ORDER BY seq")?;
        let events: Vec<Value> = statement
            .query_map([id.as_str()], |row| {
                let mut event = Map::new();
                event.insert("seq".into(), row.get::<_, i64>(0)?.into());
                event.insert("at".into(), row.get::<_, String>(1)?.into());
                event.insert("kind".into(), row.get::<_, String>(2)?.into());
                event.insert("pid".into(), row.get::<_, i64>(3)?.into());
                if let Some(verdict) = row.get::<_, Option<String>>(4)? {
                    event.insert("verdict".into(), verdict.into());
                }
                if let Ok(Value::Object(detail)) = serde_json::from_str::<Value>(&row.get::<_, String>(5)?) {
                    event.extend(detail);
                }
                Ok(Value::Object(event))
            })?
            .collect::<Result<_, _>>()?;
        let processes = process_tree(&events);
        Ok(SessionDetail { session, processes, events })
    }

    /// Counts of events the kernel could not deliver, by kind.
    pub fn lost_events(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let conn = self.connect()?;
        let mut statement = conn.prepare("SELECT kind, SUM(count) FROM lost_events GROUP BY kind")?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

const SESSION_COLUMNS: &str = "SELECT id, identity, subject, issuer, claims, host, uid, privileged, grants,
    cgroup, command, started_at, ended_at FROM sessions";

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    let json = |index: usize| -> rusqlite::Result<Value> {
        Ok(serde_json::from_str(&row.get::<_, String>(index)?).unwrap_or(Value::Null))
    };
    let strings = |value: Value| -> Vec<String> { serde_json::from_value(value).unwrap_or_default() };
    Ok(SessionRecord {
        id: SessionId(row.get(0)?),
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
    })
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
