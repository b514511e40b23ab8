//! Requests and responses on the control socket.

use serde::{Deserialize, Serialize};

pub use crate::{report::ReportQuery, review::ReviewQuery};

/// Largest request accepted (a token plus a command line).
pub const MAX_REQUEST_BYTES: u64 = 256 * 1024;

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Open a session for the caller's held child `pid` under `token`, or
    /// (inside a session) a child session with some of the parent's `grants`.
    Run {
        /// The JWT.
        #[serde(default)]
        token: Option<String>,
        /// Inside a session, instead of a token: which of the parent's grants.
        #[serde(default)]
        grants: Vec<String>,
        /// The caller's child, not yet executed.
        pid: u32,
        /// The command it will execute, for the record.
        command: Vec<String>,
        /// Why, for the record.
        #[serde(default)]
        reason: Option<String>,
        /// The session ends after this many seconds.
        #[serde(default)]
        ttl_secs: Option<u64>,
        /// The caller's terminal size (rows, columns), for a recorded terminal.
        #[serde(default)]
        terminal_size: Option<(u16, u16)>,
    },
    /// Every grant with its state and use (reviewers).
    Grants {
        /// The window's start (RFC 3339).
        since: String,
        /// The window's end (RFC 3339).
        until: String,
    },
    /// Honour a grant again and restart its unused clock (reviewers).
    RenewGrant {
        /// The grant.
        grant: String,
    },
    /// Stop honouring a grant, in live sessions at once (reviewers).
    RevokeGrant {
        /// The grant.
        grant: String,
        /// Why, for the record.
        reason: Option<String>,
    },
    /// An access review (reviewers).
    Review(ReviewQuery),
    /// A session and its child sessions as one timeline.
    Replay {
        /// The session id.
        session: String,
    },
    /// Recompute the session log's hash chain (reviewers).
    Verify {
        /// Only this session's records.
        #[serde(default)]
        session: Option<String>,
        /// Only records from this time on (RFC 3339).
        #[serde(default)]
        since: Option<String>,
        /// A public key the caller trusts (`ed25519:BASE64`); else the host's own.
        #[serde(default)]
        key: Option<String>,
    },
    /// This host's signed report for a period (reviewers).
    Report(ReportQuery),
    /// What the loaded policy decides for an identity (`policy explain`).
    Explain {
        /// The identity.
        identity: String,
        /// A SQL statement to judge by the postgres route of `to`.
        #[serde(default)]
        sql: Option<String>,
        /// `ADDR:PORT` or `HOST:PORT`.
        #[serde(default)]
        to: Option<String>,
        /// An executable's path.
        #[serde(default)]
        exec: Option<String>,
    },
    /// List sessions.
    Sessions,
    /// One session in full.
    Show {
        /// The session id.
        session: String,
    },
    /// The daemon's state.
    Status,
    /// Requests held for approval.
    Approvals,
    /// Approve a held request, optionally opening a JIT window.
    Approve {
        /// The approval id.
        id: String,
        /// Seconds during which matching requests of that session pass without asking.
        window_secs: Option<u64>,
    },
    /// Deny a held request.
    Deny {
        /// The approval id.
        id: String,
        /// Why, for the requester.
        reason: Option<String>,
    },
    /// The JIT windows open now (reviewers).
    Windows,
    /// Close a JIT window now (reviewers).
    CloseWindow {
        /// The window's id.
        id: String,
    },
    /// End a live session now (reviewers).
    Revoke {
        /// The session id.
        session: String,
        /// Why, for the record.
        reason: Option<String>,
    },
}

/// Why a request failed; `kind` lets the CLI pick its exit code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The token was refused (or matched no identity).
    Token,
    /// The caller may not do this.
    Forbidden,
    /// No such session.
    NotFound,
    /// The request was malformed.
    BadRequest,
    /// The session was refused for what it asked (a grant the parent does
    /// not hold, no reason where one is required, too deep a chain).
    Refused,
    /// The daemon failed.
    Internal,
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// Success, with a request-specific body.
    Ok(serde_json::Value),
    /// Failure.
    Error {
        /// What kind.
        kind: ErrorKind,
        /// One line for the user.
        message: String,
    },
}

impl Response {
    /// An error response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Error { kind, message: message.into() }
    }
}
