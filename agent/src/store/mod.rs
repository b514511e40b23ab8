//! The session log: a SQLite database on the host (WAL), written by one
//! batching writer thread, read by the control API.

mod clock;
pub mod ledger;
mod log;
mod queries;
mod record;
mod schema;
pub mod stats;
mod writer;
mod yielding;

use std::{fmt, str::FromStr, sync::Arc};

use serde::{Deserialize, Serialize};

pub use clock::BootClock;
pub use log::SessionLog;
pub use queries::{Reader, RecordedDecision, RecordedLoss, RuleUsage, SessionDetail};
pub use record::{Detail, EventRecord, FieldList, RecordFields, RecordKind, RecordVerdict};
pub use writer::{Writer, WriterHandle};

/// Errors of the session log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused something.
    #[error("session log: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer tollgate.
    #[error("session log schema version {found} is newer than this tollgate understands ({known})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest known here.
        known: i64,
    },
    /// No such session.
    #[error("no session '{0}'")]
    NoSuchSession(String),
    /// The writer thread has stopped.
    #[error("session log writer has stopped")]
    WriterGone,
    /// The log does not fit the head this host signed: the writer will not
    /// sign anything over it.
    #[error(
        "the session log was changed behind tollgate's back: {0}; `tollgate verify` names the first record that does not fit; move the log aside (keep it as evidence) to start a new one"
    )]
    Tampered(String),
    /// A file of the session log could not be made root-only.
    #[error("session log file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A session's id: short, random, safe in paths and cgroup names. Shared,
/// not copied: every record of the session carries it to the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(Arc<str>);

impl SessionId {
    /// A new random id, `s-` and 16 hex digits.
    pub fn generate() -> Self {
        Self(format!("s-{:016x}", rand::random::<u64>()).into())
    }

    /// An id as the store holds it, not checked again.
    fn stored(text: String) -> Self {
        Self(text.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SessionId {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let valid = text.len() <= 64
            && !text.is_empty()
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if valid { Ok(Self(text.into())) } else { Err(format!("'{text}' is not a session id")) }
    }
}

/// A session as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Its id.
    pub id: SessionId,
    /// The policy identity the token matched.
    pub identity: String,
    /// The token's `sub`.
    pub subject: String,
    /// The token's `iss`.
    pub issuer: String,
    /// Every claim of the token.
    pub claims: serde_json::Value,
    /// This host's name.
    pub host: String,
    /// The uid the session runs as.
    pub uid: u32,
    /// True when the session runs as root (it could undo its own confinement).
    pub privileged: bool,
    /// The grants that applied.
    pub grants: Vec<String>,
    /// The session's cgroup directory.
    pub cgroup: String,
    /// The command as asked for.
    pub command: Vec<String>,
    /// RFC 3339.
    pub started_at: String,
    /// RFC 3339, once the last process has exited.
    pub ended_at: Option<String>,
    /// The session it was opened from (a nested agent's), or `None` at the top.
    #[serde(default)]
    pub parent: Option<SessionId>,
    /// 0 at the top of a chain, one more per level below.
    #[serde(default)]
    pub depth: u32,
    /// Why it was opened, as the caller said.
    #[serde(default)]
    pub reason: Option<String>,
    /// The lifetime the caller gave it (`--ttl`), in seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// Something that happened to a grant (not to one session).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantEvent {
    /// RFC 3339.
    pub at: String,
    /// The grant.
    pub grant: String,
    /// `expired`, `revoked` or `renewed`.
    pub action: String,
    /// Who (a reviewer), or `None` when the daemon decided.
    pub by: Option<String>,
    /// Why.
    pub reason: Option<String>,
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}
