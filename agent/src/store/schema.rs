//! Schema and migrations. `PRAGMA user_version` is the schema version; each
//! migration runs once, in order, in its own transaction.

use std::{
    fs::{OpenOptions, Permissions},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: sessions and their events. `events.kind` is a `RecordKind` name
    // (exec, fork, exit, connect, socket, http, tls, approval, session, lost);
    // `verdict` a `RecordVerdict` name (allow, deny, killed, redirect, block,
    // pending, approved, denied, timed-out, revoked, expired, daemon-gap) or NULL; `detail` a JSON object whose
    // fields depend on the kind; `lost_events.kind` is a kernel event kind.
    "CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        identity    TEXT NOT NULL,
        subject     TEXT NOT NULL,
        issuer      TEXT NOT NULL,
        claims      TEXT NOT NULL,
        host        TEXT NOT NULL,
        uid         INTEGER NOT NULL,
        privileged  INTEGER NOT NULL,
        grants      TEXT NOT NULL,
        cgroup      TEXT NOT NULL,
        command     TEXT NOT NULL,
        started_at  TEXT NOT NULL,
        ended_at    TEXT
     );
     CREATE TABLE events (
        session_id  TEXT NOT NULL REFERENCES sessions(id),
        seq         INTEGER NOT NULL,
        at          TEXT NOT NULL,
        kind        TEXT NOT NULL,
        pid         INTEGER NOT NULL,
        verdict     TEXT,
        detail      TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
     ) WITHOUT ROWID;
     CREATE INDEX events_by_verdict ON events(verdict) WHERE verdict IS NOT NULL;
     CREATE TABLE lost_events (
        at          TEXT NOT NULL,
        kind        TEXT NOT NULL,
        count       INTEGER NOT NULL
     );",
    // 2: delegation chains, usage per grant rule and grant lifecycle.
    // `grant_usage` holds one row per rule and UTC day: a review over
    // months reads it, not the events. `grant_events.action` is expired,
    // revoked or renewed.
    "ALTER TABLE sessions ADD COLUMN parent TEXT REFERENCES sessions(id);
     ALTER TABLE sessions ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE sessions ADD COLUMN reason TEXT;
     ALTER TABLE sessions ADD COLUMN ttl_secs INTEGER;
     CREATE INDEX sessions_by_parent ON sessions(parent) WHERE parent IS NOT NULL;
     CREATE TABLE grant_usage (
        grant_name  TEXT NOT NULL,
        rule        TEXT NOT NULL,
        day         TEXT NOT NULL,
        count       INTEGER NOT NULL,
        last_at     TEXT NOT NULL,
        last_session TEXT NOT NULL,
        PRIMARY KEY (grant_name, rule, day)
     ) WITHOUT ROWID;
     CREATE TABLE grants_seen (
        grant_name  TEXT PRIMARY KEY,
        first_seen  TEXT NOT NULL
     );
     CREATE TABLE grant_events (
        at          TEXT NOT NULL,
        grant_name  TEXT NOT NULL,
        action      TEXT NOT NULL,
        by          TEXT,
        reason      TEXT
     );",
    // 3: the ledger (see ledger.rs): one host-wide hash chain over every
    // session opening, event and session end; the signed head; and the
    // signed checkpoints pruning leaves.
    "CREATE TABLE ledger (
        n           INTEGER PRIMARY KEY,
        kind        TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        seq         INTEGER,
        at          TEXT NOT NULL,
        hash        BLOB NOT NULL
     );
     CREATE INDEX ledger_by_session ON ledger(session_id, kind, seq);
     CREATE TABLE chain_head (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        n           INTEGER NOT NULL,
        hash        BLOB NOT NULL,
        signed_at   TEXT NOT NULL,
        signature   BLOB NOT NULL,
        public_key  TEXT NOT NULL
     );
     CREATE TABLE checkpoints (
        n               INTEGER PRIMARY KEY,
        hash            BLOB NOT NULL,
        pruned_sessions INTEGER NOT NULL,
        pruned_records  INTEGER NOT NULL,
        at              TEXT NOT NULL,
        until           TEXT NOT NULL,
        signature       BLOB NOT NULL
     );",
    // 4: no index on `events.verdict`. Almost every event has a verdict, so
    // it was a second insert per event that no query gained from: reviews
    // read every kind of decision over a time window, where a scan is as fast.
    "DROP INDEX IF EXISTS events_by_verdict;",
    // 5: the ledger is indexed by session only where it opens one. The index
    // over every place was a third B-tree insert per event; only the
    // search for sessions outside the chain (adoption, verify) wants a
    // session's place, and verify finds events outside it by a sorted
    // difference instead.
    "DROP INDEX IF EXISTS ledger_by_session;
     CREATE INDEX ledger_sessions ON ledger(session_id) WHERE kind = 'session';",
];

/// The session log holds every session's commands and traffic: root only.
const FILE_MODE: u32 = 0o600;

/// Makes the database (created if missing) and its WAL and shared-memory
/// files root-only, whatever the umask. SQLite creates the WAL and
/// shared-memory files later with the database file's mode.
fn restrict(path: &Path) -> Result<(), StoreError> {
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |source| StoreError::File { path, source }
    };
    OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(path).map_err(fail(path))?;
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    for file in [path.to_owned(), with_suffix("-wal"), with_suffix("-shm")] {
        if file.exists() {
            std::fs::set_permissions(&file, Permissions::from_mode(FILE_MODE)).map_err(fail(&file))?;
        }
    }
    Ok(())
}

/// Opens `path` for writing: root-only, WAL, foreign keys, schema migrated to the newest.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    restrict(path)?;
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew { found: version, known });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_refuse_a_newer_file() {
        let dir = tempfile_dir();
        let path = dir.join("log.db");
        drop(open(&path).expect("first open migrates"));
        drop(open(&path).expect("second open is a no-op"));
        let mode = std::fs::metadata(&path).expect("database").permissions().mode();
        assert_eq!(mode & 0o777, FILE_MODE, "the database is root-only");
        let conn = Connection::open(&path).expect("raw open");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        drop(conn);
        assert!(matches!(open(&path), Err(StoreError::TooNew { found: 99, .. })));
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tollgate-schema-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }
}
