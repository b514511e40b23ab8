//! Tamper evidence: every record of the session log (a session opening, an
//! event, a session's end) takes a place in one host-wide chain, the
//! ledger. Each place holds SHA-256 over the previous place's hash and the
//! record's content as stored, so an edited, deleted or inserted row, or a
//! deleted session, no longer fits. The writer signs the chain's head
//! (Ed25519, a key in the state directory) after every batch, so cutting
//! off the end shows too; pruning leaves a signed checkpoint.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::StoreError;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash the chain starts from.
pub const GENESIS: Hash = [0; 32];

/// What a place in the chain holds a record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A session's opening (its row, without its end).
    Session,
    /// One event of a session.
    Event,
    /// A session's end.
    End,
}

impl Entry {
    /// The name stored in `ledger.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Event => "event",
            Self::End => "end",
        }
    }
}

/// `SHA-256(prev || content)`.
pub fn link(prev: &Hash, content: &str) -> Hash {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(prev);
    context.update(content.as_bytes());
    let digest = context.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// What a signature over the chain's head covers.
pub fn head_message(n: i64, hash: &Hash) -> Vec<u8> {
    let mut message = b"tollgate ledger head\0".to_vec();
    message.extend_from_slice(&n.to_be_bytes());
    message.extend_from_slice(hash);
    message
}

/// What a checkpoint's signature covers: where pruning stopped and what it took.
pub fn checkpoint_message(n: i64, hash: &Hash, sessions: i64, records: i64) -> Vec<u8> {
    let mut message = b"tollgate ledger checkpoint\0".to_vec();
    message.extend_from_slice(&n.to_be_bytes());
    message.extend_from_slice(hash);
    message.extend_from_slice(&sessions.to_be_bytes());
    message.extend_from_slice(&records.to_be_bytes());
    message
}

/// The host's signing key.
pub struct LedgerKey {
    pair: Ed25519KeyPair,
    new: bool,
}

impl LedgerKey {
    /// Loads the key at `path`, creating it (root-only) if absent, and
    /// writes its public half next to it (`<path>.pub`, world-readable).
    /// [`LedgerKey::is_new`] tells whether it was created now.
    pub fn ensure(path: &Path) -> Result<Self, StoreError> {
        let fail = |source| StoreError::File { path: path.display().to_string(), source };
        let mut created = false;
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| fail(std::io::Error::other("cannot generate a key")))?;
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(fail)?;
                file.write_all(pkcs8.as_ref()).map_err(fail)?;
                created = true;
                pkcs8.as_ref().to_vec()
            }
            Err(e) => return Err(fail(e)),
        };
        let pair =
            Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| fail(std::io::Error::other("not an Ed25519 PKCS#8 key")))?;
        let key = Self { pair, new: created };
        std::fs::write(public_path(path), format!("{}\n", key.public_text())).map_err(fail)?;
        Ok(key)
    }

    /// Loads the key at `path` (it must exist).
    pub fn load(path: &Path) -> Result<Self, StoreError> {
        let fail = |source| StoreError::File { path: path.display().to_string(), source };
        let bytes = std::fs::read(path).map_err(fail)?;
        let pair =
            Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| fail(std::io::Error::other("not an Ed25519 PKCS#8 key")))?;
        Ok(Self { pair, new: false })
    }

    /// Was the key created by this start? A log may only be taken into the
    /// chain wholesale then (the host's first start with a ledger); once a
    /// key exists, rows outside the chain are edits, never adopted.
    pub fn is_new(&self) -> bool {
        self.new
    }

    /// The public key as `ed25519:BASE64`.
    pub fn public_text(&self) -> String {
        format!("ed25519:{}", STANDARD.encode(self.pair.public_key().as_ref()))
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// Where the public half of the key at `path` is written.
pub fn public_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// The host's public key as `verify` trusts it by default: derived from the
/// private key at `path` when it can be read (root), else the `.pub` file
/// the daemon rewrites from it at every start.
pub fn host_public_key(path: &Path) -> Result<String, StoreError> {
    if let Ok(key) = LedgerKey::load(path) {
        return Ok(key.public_text());
    }
    let public = public_path(path);
    std::fs::read_to_string(&public)
        .map(|text| text.trim().to_owned())
        .map_err(|source| StoreError::File { path: public.display().to_string(), source })
}

/// Checks `signature` over `message` with a public key in `ed25519:BASE64` form.
pub fn signature_holds(public: &str, message: &[u8], signature: &[u8]) -> bool {
    let Some(encoded) = public.trim().strip_prefix("ed25519:") else { return false };
    let Ok(bytes) = STANDARD.decode(encoded) else { return false };
    UnparsedPublicKey::new(&ED25519, bytes).verify(message, signature).is_ok()
}

/// One column of a record, for [`json_array`].
#[derive(Debug, Clone, Copy)]
pub enum Column<'a> {
    /// A TEXT value.
    Text(&'a str),
    /// An INTEGER value.
    Integer(i64),
    /// NULL.
    Null,
}

/// What SQLite's `json_array(...)` makes of these columns, built in Rust:
/// the writer holds the values it has just stored, and reading the row
/// back to have SQLite format it was a sixth of the writer's time. It must
/// agree byte for byte with SQLite's (verify recomputes contents there);
/// the tests compare the two over every ASCII character.
pub fn json_array(columns: &[Column<'_>]) -> String {
    let text_len: usize = columns.iter().map(|c| if let Column::Text(t) = c { t.len() } else { 0 }).sum();
    // Room for a JSON detail's own quotes, each escaped, without growing.
    let mut out = Vec::with_capacity(64 + text_len + text_len / 4);
    out.push(b'[');
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match column {
            Column::Text(text) => push_json_text(&mut out, text),
            // Writing to a Vec cannot fail.
            Column::Integer(n) => {
                let _ = write!(out, "{n}");
            }
            Column::Null => out.extend_from_slice(b"null"),
        }
    }
    out.push(b']');
    // Valid text with ASCII added only between its characters: always UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// How SQLite escapes each byte in a JSON string: 0 when it stands as is,
/// `u` for `\u00xx`, else the character after the backslash.
const JSON_ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// SQLite's string escaping: `"` and `\` get a backslash, the control
/// characters with a short form use it, other control characters are
/// `\u00xx` (lower-case hex), everything else (`'`, DEL, non-ASCII) as is.
fn push_json_text(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for &byte in text.as_bytes() {
        match JSON_ESCAPE[usize::from(byte)] {
            0 => out.push(byte),
            b'u' => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
            short => out.extend_from_slice(&[b'\\', short]),
        }
    }
    out.push(b'"');
}

/// The stored content of a session's opening: every column but its end.
pub fn session_content(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT json_array(id, identity, subject, issuer, claims, host, uid, privileged, grants, cgroup, command,
                started_at, parent, depth, reason, ttl_secs) FROM sessions WHERE id = ?1",
    )?
    .query_row([id], |row| row.get(0))
    .optional()
}

/// The stored content of one event.
pub fn event_content(conn: &Connection, session: &str, seq: i64) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT json_array(session_id, seq, at, kind, pid, verdict, detail) FROM events
         WHERE session_id = ?1 AND seq = ?2",
    )?
    .query_row(params![session, seq], |row| row.get(0))
    .optional()
}

/// The stored content of a session's end.
pub fn end_content(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT json_array(id, ended_at) FROM sessions WHERE id = ?1 AND ended_at IS NOT NULL")?
        .query_row([id], |row| row.get(0))
        .optional()
}

/// The content a ledger place stands for, as stored now (`None`: gone).
pub fn content_of(conn: &Connection, kind: &str, session: &str, seq: Option<i64>) -> rusqlite::Result<Option<String>> {
    match (kind, seq) {
        ("session", _) => session_content(conn, session),
        ("event", Some(seq)) => event_content(conn, session, seq),
        ("end", _) => end_content(conn, session),
        _ => Ok(None),
    }
}

/// The writer's end of the chain: appends places and signs the head.
pub struct Chain {
    /// The last place.
    pub n: i64,
    /// Its hash.
    pub hash: Hash,
    key: Option<LedgerKey>,
    dirty: bool,
}

impl Chain {
    /// The chain as `conn` holds it, signing with `key`. Rows written before
    /// the ledger existed (an older tollgate) are taken into it first, in
    /// the order they were recorded, but only by a key made at this start:
    /// a host that has signed before adopts nothing, and a log whose chain
    /// does not end at the head its key signed is refused (it was edited,
    /// cut, or re-signed by another key), so no edit is ever signed over.
    pub fn open(conn: &mut Connection, key: Option<LedgerKey>) -> Result<Self, StoreError> {
        let last: Option<(i64, Vec<u8>)> = conn
            .query_row("SELECT n, hash FROM ledger ORDER BY n DESC LIMIT 1", [], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        let checkpoint: Option<(i64, Vec<u8>)> = conn
            .query_row("SELECT n, hash FROM checkpoints ORDER BY n DESC LIMIT 1", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?;
        let (n, hash) = last.or(checkpoint).map_or((0, GENESIS), |(n, hash)| (n, to_hash(&hash)));
        if let Some(key) = &key {
            match signed_head(conn)? {
                Some(head) if !head.holds_under(&key.public_text()) => {
                    return Err(StoreError::Tampered(
                        "its chain head is not signed by this host's ledger key (re-signed, or the key was replaced)"
                            .into(),
                    ));
                }
                Some(head) if head.n != n || head.hash != hex(&hash) => {
                    return Err(StoreError::Tampered(format!(
                        "its chain ends at record {n} but the signed head is record {} (records cut off or added)",
                        head.n
                    )));
                }
                None if n > 0 => {
                    return Err(StoreError::Tampered("its chain has records but no signed head".into()));
                }
                None if !key.is_new() => tracing::warn!(
                    "the session log is new but this host's ledger key is not: an earlier log was removed or moved aside"
                ),
                _ => {}
            }
        }
        let adopt = key.as_ref().is_some_and(LedgerKey::is_new) && n == 0;
        let mut chain = Self { n, hash, key, dirty: false };
        let tx = conn.transaction()?;
        if adopt {
            chain.backfill(&tx)?;
        }
        chain.sign(&tx)?;
        tx.commit()?;
        Ok(chain)
    }

    fn backfill(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let sessions: Vec<(String, bool)> = {
            let mut statement = tx.prepare(
                "SELECT id, ended_at IS NOT NULL FROM sessions s
                 WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.kind = 'session' AND l.session_id = s.id)
                 ORDER BY started_at, id",
            )?;
            statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?
        };
        for (id, ended) in sessions {
            self.append(tx, Entry::Session, &id, None, "")?;
            let seqs: Vec<(i64, String)> = {
                let mut statement = tx.prepare("SELECT seq, at FROM events WHERE session_id = ?1 ORDER BY seq")?;
                statement.query_map([&id], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<_, _>>()?
            };
            for (seq, at) in seqs {
                self.append(tx, Entry::Event, &id, Some(seq), &at)?;
            }
            if ended {
                self.append(tx, Entry::End, &id, None, "")?;
            }
        }
        Ok(())
    }

    /// Appends the record (already written in `tx`) to the chain.
    pub fn append(
        &mut self,
        tx: &rusqlite::Transaction<'_>,
        kind: Entry,
        session: &str,
        seq: Option<i64>,
        at: &str,
    ) -> rusqlite::Result<()> {
        let Some(content) = content_of(tx, kind.as_str(), session, seq)? else { return Ok(()) };
        let mut insert_place = Self::insert_place(tx)?;
        self.append_with(&mut insert_place, kind, session, seq, at, &content)
    }

    /// The statement that stores a place, for [`Chain::append_with`].
    pub fn insert_place<'tx>(tx: &'tx rusqlite::Transaction<'_>) -> rusqlite::Result<rusqlite::CachedStatement<'tx>> {
        tx.prepare_cached("INSERT INTO ledger (n, kind, session_id, seq, at, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
    }

    /// Appends a record whose content (as [`content_of`] would read it
    /// back) the caller already has, through a statement from
    /// [`Chain::insert_place`] that it may keep for a whole batch.
    pub fn append_with(
        &mut self,
        insert_place: &mut rusqlite::Statement<'_>,
        kind: Entry,
        session: &str,
        seq: Option<i64>,
        at: &str,
        content: &str,
    ) -> rusqlite::Result<()> {
        let hash = link(&self.hash, content);
        let n = self.n + 1;
        let now;
        let at = if at.is_empty() {
            now = super::rfc3339(std::time::SystemTime::now());
            now.as_str()
        } else {
            at
        };
        insert_place.execute(params![n, kind.as_str(), session, seq, at, hash.as_slice()])?;
        self.n = n;
        self.hash = hash;
        self.dirty = true;
        Ok(())
    }

    /// Signs the head if anything was appended since the last signature.
    pub fn sign(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        let Some(key) = &self.key else { return Ok(()) };
        if !self.dirty && self.n > 0 {
            return Ok(());
        }
        let signature = key.sign(&head_message(self.n, &self.hash));
        tx.execute(
            "INSERT INTO chain_head (id, n, hash, signed_at, signature, public_key) VALUES (1, ?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET n = excluded.n, hash = excluded.hash, signed_at = excluded.signed_at,
                 signature = excluded.signature, public_key = excluded.public_key",
            params![
                self.n,
                self.hash.as_slice(),
                super::rfc3339(std::time::SystemTime::now()),
                signature,
                key.public_text()
            ],
        )?;
        self.dirty = false;
        Ok(())
    }

    /// The key, for checkpoints.
    pub fn key(&self) -> Option<&LedgerKey> {
        self.key.as_ref()
    }
}

/// What one pruning removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Sessions removed.
    pub sessions: i64,
    /// Chain places removed.
    pub records: i64,
}

/// Removes the sessions that ended before `cutoff` (RFC 3339), as far as
/// the chain allows: the longest prefix of it whose places all belong to
/// such sessions, and no session in part. The place the prefix ends at is
/// kept as a checkpoint signed with the host's key, so pruning shows.
pub fn prune(
    tx: &rusqlite::Transaction<'_>,
    chain: &Chain,
    cutoff: &str,
    not_after: Option<i64>,
) -> rusqlite::Result<Pruned> {
    let Some(key) = chain.key() else { return Ok(Pruned::default()) };
    let first_kept: Option<i64> = tx.query_row(
        "SELECT MIN(l.n) FROM ledger l JOIN sessions s ON s.id = l.session_id
         WHERE s.ended_at IS NULL OR s.ended_at >= ?1",
        [cutoff],
        |row| row.get(0),
    )?;
    let mut through = match first_kept {
        Some(n) => n - 1,
        None => chain.n,
    };
    // An exporter that has not sent these yet holds them back.
    if let Some(limit) = not_after {
        through = through.min(limit);
    }
    // A session with places on both sides of the cut stays whole: move the cut before it.
    loop {
        let split: Option<i64> = tx.query_row(
            "SELECT MIN(l.n) FROM ledger l WHERE l.n <= ?1 AND l.session_id IN
               (SELECT session_id FROM ledger WHERE n > ?1)",
            [through],
            |row| row.get(0),
        )?;
        match split {
            Some(n) => through = n - 1,
            None => break,
        }
    }
    let floor: i64 = tx.query_row("SELECT COALESCE(MIN(n), 1) - 1 FROM ledger", [], |row| row.get(0))?;
    if through <= floor {
        return Ok(Pruned::default());
    }
    let hash: Vec<u8> = tx.query_row("SELECT hash FROM ledger WHERE n = ?1", [through], |row| row.get(0))?;
    let hash = to_hash(&hash);
    let sessions: Vec<String> = {
        let mut statement = tx.prepare(
            "SELECT DISTINCT l.session_id FROM ledger l JOIN sessions s ON s.id = l.session_id
             WHERE l.n <= ?1 ORDER BY s.depth DESC",
        )?;
        statement.query_map([through], |row| row.get(0))?.collect::<Result<_, _>>()?
    };
    let records: i64 = tx.query_row("SELECT COUNT(*) FROM ledger WHERE n <= ?1", [through], |row| row.get(0))?;
    for id in &sessions {
        tx.execute("DELETE FROM events WHERE session_id = ?1", [id])?;
        tx.execute("DELETE FROM sessions WHERE id = ?1", [id])?;
    }
    tx.execute("DELETE FROM ledger WHERE n <= ?1", [through])?;
    let count = sessions.len() as i64;
    let signature = key.sign(&checkpoint_message(through, &hash, count, records));
    tx.execute(
        "INSERT INTO checkpoints (n, hash, pruned_sessions, pruned_records, at, until, signature)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            through,
            hash.as_slice(),
            count,
            records,
            super::rfc3339(std::time::SystemTime::now()),
            cutoff,
            signature
        ],
    )?;
    Ok(Pruned { sessions: count, records })
}

/// Bytes from the database as a hash (short or long values never match a real one).
pub fn to_hash(bytes: &[u8]) -> Hash {
    let mut out = [0u8; 32];
    let len = bytes.len().min(32);
    out[..len].copy_from_slice(&bytes[..len]);
    out
}

/// The signed head of the chain.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SignedHead {
    /// The number of the last place.
    pub n: i64,
    /// Its hash, hex.
    pub hash: String,
    /// When it was signed.
    pub signed_at: String,
    /// The signature, base64.
    pub signature: String,
    /// The host's public key, `ed25519:BASE64`.
    pub public_key: String,
}

impl SignedHead {
    /// Does the signature hold under `public` (the key a reviewer trusts)?
    pub fn holds_under(&self, public: &str) -> bool {
        let (Ok(hash), Ok(signature)) = (hex_decode(&self.hash), STANDARD.decode(&self.signature)) else {
            return false;
        };
        hash.len() == 32 && signature_holds(public, &head_message(self.n, &to_hash(&hash)), &signature)
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Result<Vec<u8>, ()> {
    if !text.len().is_multiple_of(2) {
        return Err(());
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| ())).collect()
}

/// Reads the signed head.
pub fn signed_head(conn: &Connection) -> rusqlite::Result<Option<SignedHead>> {
    conn.query_row("SELECT n, hash, signed_at, signature, public_key FROM chain_head WHERE id = 1", [], |row| {
        Ok(SignedHead {
            n: row.get(0)?,
            hash: hex(&row.get::<_, Vec<u8>>(1)?),
            signed_at: row.get(2)?,
            signature: STANDARD.encode(row.get::<_, Vec<u8>>(3)?),
            public_key: row.get(4)?,
        })
    })
    .optional()
}

/// What `verify` found: everything fits, or the first place that does not.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Places checked.
    pub records: i64,
    /// Sessions checked.
    pub sessions: i64,
    /// The signed head, if the log has one.
    pub head: Option<SignedHead>,
    /// Checkpoints left by pruning, oldest first.
    pub checkpoints: Vec<serde_json::Value>,
    /// The first thing that does not fit, if any.
    pub problem: Option<String>,
}

/// Recomputes the chain (all of it, or the places of `session`, or those
/// from `since` on) and checks the head's and checkpoints' signatures
/// against `public`: the host's own key or one a reviewer pinned, never the
/// key stored in the log beside the head (whoever edits the log can
/// replace that one too).
pub fn verify(
    conn: &Connection,
    session: Option<&str>,
    since: Option<&str>,
    public: &str,
) -> rusqlite::Result<Verification> {
    let head = signed_head(conn)?;
    let mut result =
        Verification { records: 0, sessions: 0, head: head.clone(), checkpoints: Vec::new(), problem: None };
    // Checkpoints: where pruning stopped, signed.
    let mut start: (i64, Hash) = (0, GENESIS);
    {
        let mut statement = conn.prepare(
            "SELECT n, hash, pruned_sessions, pruned_records, at, until, signature FROM checkpoints ORDER BY n",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, String>(5)?,
                row.get::<_, Vec<u8>>(6)?,
            ))
        })?;
        for row in rows {
            let (n, hash, sessions, records, at, until, signature) = row?;
            let hash = to_hash(&hash);
            if !signature_holds(public, &checkpoint_message(n, &hash, sessions, records), &signature) {
                result
                    .problem
                    .get_or_insert(format!("the checkpoint at record {n} ({at}) is not signed by the host's key"));
            }
            result.checkpoints.push(serde_json::json!({
                "n": n, "hash": hex(&hash), "pruned_sessions": sessions, "pruned_records": records,
                "at": at, "pruned_until": until,
            }));
            start = (n, hash);
        }
    }
    // The chain, place by place.
    let mut statement = conn.prepare("SELECT n, kind, session_id, seq, at, hash FROM ledger ORDER BY n")?;
    let mut rows = statement.query([])?;
    let (mut expected_n, mut prev) = (start.0 + 1, start.1);
    let mut seen_sessions = std::collections::BTreeSet::new();
    while let Some(row) = rows.next()? {
        let (n, kind, id, seq, at, stored): (i64, String, String, Option<i64>, String, Vec<u8>) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?);
        let stored = to_hash(&stored);
        let name = describe(n, &kind, &id, seq);
        let in_scope = session.is_none_or(|s| s == id) && since.is_none_or(|since| at.as_str() >= since);
        if result.problem.is_none() {
            if n != expected_n {
                result.problem = Some(format!("record {expected_n} is missing from the chain (the next is {name})"));
            } else if in_scope {
                match content_of(conn, &kind, &id, seq)? {
                    None => result.problem = Some(format!("{name} is gone (deleted)")),
                    Some(content) if link(&prev, &content) != stored => {
                        result.problem =
                            Some(format!("{name} does not match its hash (edited, or the chain before it was)"));
                    }
                    Some(_) => {}
                }
            }
        }
        if in_scope {
            result.records += 1;
            seen_sessions.insert(id);
        }
        expected_n = n + 1;
        prev = stored;
    }
    result.sessions = seen_sessions.len() as i64;
    if result.problem.is_none() {
        result.problem = unchained_rows(conn, session)?;
    }
    if result.problem.is_none() && session.is_none() {
        let last = (expected_n - 1, prev);
        result.problem = match &head {
            None if last.0 > start.0 => Some("the log has records but no signed head".into()),
            None => None,
            Some(head) if !head.holds_under(public) => Some("the chain's head is not signed by the host's key".into()),
            Some(head) if head.n != last.0 || head.hash != hex(&last.1) => Some(format!(
                "the chain ends at record {} but its signed head is record {} (records cut off or added after signing)",
                last.0, head.n
            )),
            Some(_) => None,
        };
    }
    Ok(result)
}

/// A row the chain does not account for: inserted behind the writer's back.
fn unchained_rows(conn: &Connection, session: Option<&str>) -> rusqlite::Result<Option<String>> {
    let filter = session.unwrap_or("%");
    let event: Option<(String, i64)> = conn
        .query_row(
            // A sorted difference: one pass over each table, not a lookup per event.
            "SELECT session_id, seq FROM events WHERE session_id LIKE ?1
             EXCEPT
             SELECT session_id, seq FROM ledger WHERE kind = 'event' AND session_id LIKE ?1
             ORDER BY 1, 2 LIMIT 1",
            [filter],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    if let Some((id, seq)) = event {
        return Ok(Some(format!("event {seq} of session {id} is not in the chain (inserted)")));
    }
    let session_row: Option<String> = conn
        .query_row(
            "SELECT s.id FROM sessions s WHERE s.id LIKE ?1 AND NOT EXISTS
               (SELECT 1 FROM ledger l WHERE l.kind = 'session' AND l.session_id = s.id) LIMIT 1",
            [filter],
            |row| row.get(0),
        )
        .optional()?;
    Ok(session_row.map(|id| format!("session {id} is not in the chain (inserted)")))
}

fn describe(n: i64, kind: &str, id: &str, seq: Option<i64>) -> String {
    match (kind, seq) {
        ("event", Some(seq)) => format!("record {n} (event {seq} of session {id})"),
        ("end", _) => format!("record {n} (the end of session {id})"),
        _ => format!("record {n} (session {id})"),
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::types::Value as SqlValue;

    use super::*;

    /// What SQLite's own `json_array` makes of the same columns.
    fn sqlite_json_array(conn: &Connection, columns: &[Column<'_>]) -> String {
        let values: Vec<SqlValue> = columns
            .iter()
            .map(|c| match c {
                Column::Text(t) => SqlValue::Text((*t).to_owned()),
                Column::Integer(n) => SqlValue::Integer(*n),
                Column::Null => SqlValue::Null,
            })
            .collect();
        let marks = vec!["?"; values.len()].join(",");
        conn.query_row(&format!("SELECT json_array({marks})"), rusqlite::params_from_iter(values), |row| row.get(0))
            .expect("json_array")
    }

    #[test]
    fn json_array_agrees_with_sqlite_over_every_ascii_character_and_beyond() {
        let conn = Connection::open_in_memory().expect("open");
        for byte in 0u8..=0x7f {
            let alone = (byte as char).to_string();
            let amid = format!("a{}b\u{e9}", byte as char);
            let columns = [Column::Text(&alone), Column::Text(&amid)];
            assert_eq!(json_array(&columns), sqlite_json_array(&conn, &columns), "byte {byte:#04x}");
        }
        let detail = r#"{"path":"C:\\x","q":"it's \"quoted\"","nl":"a
b","tab":"	","nul":"\u0000","emoji":"\u{1f512}","del":"\u{7f}"}"#;
        let columns = [
            Column::Text("s-0123"),
            Column::Integer(42),
            Column::Integer(-7),
            Column::Integer(i64::MAX),
            Column::Integer(i64::MIN),
            Column::Integer(0),
            Column::Null,
            Column::Text(""),
            Column::Text(detail),
        ];
        assert_eq!(json_array(&columns), sqlite_json_array(&conn, &columns));
    }

    #[test]
    fn an_events_content_built_by_the_writer_is_what_verify_reads_back() {
        let conn = Connection::open_in_memory().expect("open");
        conn.execute_batch(
            "CREATE TABLE events (session_id TEXT NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL, kind TEXT NOT NULL,
                pid INTEGER NOT NULL, verdict TEXT, detail TEXT NOT NULL, PRIMARY KEY (session_id, seq)) WITHOUT ROWID",
        )
        .expect("schema");
        let detail = "{\"argv\":[\"sh\",\"-c\",\"echo \\\"hi\\\"\\n\\u0001\"],\"cwd\":\"/tmp/caf\u{e9}\"}";
        for (seq, verdict) in [(1, Some("deny")), (2, None)] {
            conn.execute(
                "INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params!["s-1", seq, "2026-01-01T00:00:00.000000001Z", "exec", 4242u32, verdict, detail],
            )
            .expect("insert");
            let built = json_array(&[
                Column::Text("s-1"),
                Column::Integer(seq),
                Column::Text("2026-01-01T00:00:00.000000001Z"),
                Column::Text("exec"),
                Column::Integer(4242),
                verdict.map_or(Column::Null, Column::Text),
                Column::Text(detail),
            ]);
            assert_eq!(Some(built), event_content(&conn, "s-1", seq).expect("read back"));
        }
    }
}
