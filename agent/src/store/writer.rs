//! The one writer of the session log. Events arrive on a channel and are
//! committed in batches; opening a session commits at once and is
//! acknowledged, so no process runs in a session that has no record.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rusqlite::{Connection, params};

use super::{
    EventRecord, GrantEvent, RecordKind, RecordVerdict, SessionId, SessionRecord, StoreError,
    ledger::{Chain, Column, Entry, LedgerKey, json_array},
    schema,
    yielding::Yielding,
};

/// Records committed together at most. A session's end waits for the batch
/// being gathered: at 2,000 that was 15 ms more after a connect loop, for
/// about 4% less of the writer's CPU than at 500.
const MAX_BATCH: usize = 500;

enum Op {
    Open(Box<SessionRecord>, mpsc::Sender<Result<(), String>>),
    Event(SessionId, EventRecord),
    End(SessionId, String),
    Lost(String, u64),
    Grant(GrantEvent),
    GrantsSeen(Vec<String>, String),
    Prune(String, Option<i64>),
    Checkpoint,
    Flush(mpsc::Sender<()>),
}

/// Owns the writer thread, which stops once every handle is dropped, after
/// committing what was queued. Call [`WriterHandle::flush`] to wait for that.
pub struct Writer {
    _thread: JoinHandle<()>,
    handle: WriterHandle,
}

/// Sends work to the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::SyncSender<Op>,
    dropped: Arc<AtomicU64>,
    dropped_by_session: Arc<Dropped>,
    yielding: Arc<Yielding>,
    /// Queued records past which kernel events wait in the ring buffer.
    kernel_room: usize,
    /// The writer thread, woken from a nap by work somebody waits on.
    writer: std::thread::Thread,
}

/// Events dropped because the queue was full, by session and kind, not yet
/// written into their sessions' records (the next batch does that).
type Dropped = Mutex<HashMap<(SessionId, &'static str), u64>>;

impl Writer {
    /// Opens (creating and migrating) the database and starts the thread,
    /// which chains every record and signs the chain's head with `key`.
    /// At most `queue` records wait for it; past that they are dropped and
    /// counted (a flooding session must not exhaust the daemon's memory).
    pub fn start(
        path: &Path,
        flush_interval: Duration,
        key: Option<LedgerKey>,
        queue: usize,
    ) -> Result<Self, StoreError> {
        let mut conn = schema::open(path)?;
        let chain = Chain::open(&mut conn, key)?;
        Self::start_with_queue(conn, chain, flush_interval, queue)
    }

    fn start_with_queue(
        conn: Connection,
        chain: Chain,
        flush_interval: Duration,
        queue: usize,
    ) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let kernel_room = queue - queue / 4;
        // Raised before kernel events have to wait in the ring buffer.
        let yielding = Arc::new(Yielding::new(kernel_room / 2));
        let dropped_by_session = Arc::new(Dropped::default());
        let thread = {
            let (yielding, dropped) = (yielding.clone(), dropped_by_session.clone());
            std::thread::Builder::new()
                .name("session-log".into())
                .spawn(move || run(conn, chain, rx, flush_interval, &yielding, &dropped))
                .map_err(|_| StoreError::WriterGone)?
        };
        Yielding::start_nudger(&yielding).map_err(|_| StoreError::WriterGone)?;
        let writer = thread.thread().clone();
        let handle = WriterHandle { tx, dropped: Arc::default(), dropped_by_session, yielding, kernel_room, writer };
        Ok(Self { _thread: thread, handle })
    }

    /// A handle to send work with.
    pub fn handle(&self) -> WriterHandle {
        self.handle.clone()
    }
}

impl WriterHandle {
    /// Records a new session and waits until it is committed.
    pub fn open_session(&self, record: SessionRecord) -> Result<(), StoreError> {
        let (ack, done) = mpsc::channel();
        self.send(Op::Open(Box::new(record), ack))?;
        match done.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(StoreError::Sqlite(rusqlite::Error::ToSqlConversionFailure(why.into()))),
            Err(_) => Err(StoreError::WriterGone),
        }
    }

    /// Queues an event; when the queue is full the event is dropped and counted.
    pub fn event(&self, session: SessionId, event: EventRecord) {
        self.yielding.queued(false);
        match self.tx.try_send(Op::Event(session, event)) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(op)) => {
                self.yielding.refused(false);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if let Op::Event(session, event) = op {
                    let mut dropped = self.dropped_by_session.lock().unwrap_or_else(PoisonError::into_inner);
                    *dropped.entry((session, event.kind.as_str())).or_insert(0) += 1;
                }
            }
            Err(mpsc::TrySendError::Disconnected(_)) => self.yielding.refused(false),
        }
    }

    /// May the reader of kernel events queue more? Not past three quarters
    /// of the queue: the rest is kept for records that have no ring buffer
    /// to wait in (the proxy's, the resolver's, the sessions' own).
    pub fn has_room_for_kernel_events(&self) -> bool {
        self.yielding.backlog() < self.kernel_room
    }

    /// Events dropped because the writer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues the end of a session.
    pub fn end_session(&self, session: SessionId, ended_at: String) {
        let _ = self.send(Op::End(session, ended_at));
    }

    /// Queues a count of events the kernel could not deliver.
    pub fn lost(&self, kind: &str, count: u64) {
        let _ = self.send(Op::Lost(kind.to_owned(), count));
    }

    /// Queues something that happened to a grant.
    pub fn grant_event(&self, event: GrantEvent) {
        let _ = self.send(Op::Grant(event));
    }

    /// Queues the names of the grants the policy has now: the first time a
    /// grant is seen starts the clock of its `expire_unused_after`.
    pub fn grants_seen(&self, names: Vec<String>, at: String) {
        let _ = self.send(Op::GrantsSeen(names, at));
    }

    /// Queues the pruning of sessions that ended before `cutoff` (RFC 3339),
    /// not past ledger place `not_after`.
    pub fn prune(&self, cutoff: String, not_after: Option<i64>) {
        let _ = self.send(Op::Prune(cutoff, not_after));
    }

    /// Queues a WAL checkpoint: the database file alone then holds everything.
    pub fn checkpoint(&self) {
        let _ = self.send(Op::Checkpoint);
    }

    /// Waits until everything queued so far is committed.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        if self.send(Op::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }

    /// Queues `op`, waiting for room; raises the writer if `op` is waited
    /// on or the queue is long.
    fn send(&self, op: Op) -> Result<(), StoreError> {
        let waited_on = op.is_waited_on();
        self.yielding.queued(waited_on);
        self.tx.send(op).map_err(|_| {
            self.yielding.refused(waited_on);
            StoreError::WriterGone
        })?;
        if waited_on {
            // Cut its nap short: a session's start or end waits on this.
            self.writer.unpark();
        }
        Ok(())
    }
}

impl Op {
    /// Does somebody wait until this op is committed?
    fn is_waited_on(&self) -> bool {
        matches!(self, Op::Open(..) | Op::Flush(_))
    }
}

/// How long the writer naps between looks at the queue while a batch is open.
const BATCH_NAP: Duration = Duration::from_millis(5);

fn run(
    mut conn: Connection,
    mut chain: Chain,
    rx: mpsc::Receiver<Op>,
    flush_interval: Duration,
    yielding: &Yielding,
    dropped: &Dropped,
) {
    yielding.writer_started();
    let mut seqs: HashMap<SessionId, i64> = HashMap::new();
    // Opening a session and flushing are waited on: commit at once.
    let urgent = |batch: &[Op]| batch.last().is_some_and(Op::is_waited_on);
    let receive = |op: Op| {
        yielding.taken();
        op
    };
    while let Ok(first) = rx.recv().map(receive) {
        let mut batch = vec![first];
        let deadline = Instant::now() + flush_interval;
        'collect: loop {
            while !urgent(&batch) && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(receive(op)),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            if urgent(&batch) || batch.len() >= MAX_BATCH || now >= deadline {
                break 'collect;
            }
            // Nap rather than wait on the channel: a wakeup per record would
            // preempt, on a small machine, the very processes recorded. Work
            // somebody waits on wakes it (`WriterHandle::send`).
            std::thread::park_timeout(BATCH_NAP.min(deadline - now));
        }
        // Commit at idle priority while nothing waits on this batch and the
        // queue is short (see `yielding`).
        yielding.settle();
        let answered = batch.iter().filter(|op| op.is_waited_on()).count();
        commit(&mut conn, &mut chain, &mut seqs, batch, dropped);
        (0..answered).for_each(|_| yielding.answered());
    }
}

fn commit(
    conn: &mut Connection,
    chain: &mut Chain,
    seqs: &mut HashMap<SessionId, i64>,
    batch: Vec<Op>,
    dropped: &Dropped,
) {
    let mut acks = Vec::new();
    let mut flushes = Vec::new();
    // A batch that fails leaves the chain where it was.
    let (chain_n, chain_hash) = (chain.n, chain.hash);
    let mut checkpoint = false;
    let result = (|| -> rusqlite::Result<()> {
        let tx = conn.transaction()?;
        let mut statements = EventStatements::prepare(&tx)?;
        let mut usage = Usage::default();
        for op in batch {
            match op {
                Op::Open(record, ack) => {
                    let outcome = insert_session(&tx, &record)
                        .and_then(|_| chain.append(&tx, Entry::Session, record.id.as_str(), None, &record.started_at))
                        .map_err(|e| e.to_string());
                    if outcome.is_ok() {
                        seqs.insert(record.id.clone(), 0);
                    }
                    acks.push((ack, outcome));
                }
                Op::Event(session, event) => {
                    write_event(&tx, &mut statements, chain, seqs, &mut usage, &session, event)?;
                }
                Op::End(session, ended_at) => {
                    let ended = tx.execute(
                        "UPDATE sessions SET ended_at = ?2 WHERE id = ?1 AND ended_at IS NULL",
                        params![session.as_str(), ended_at],
                    )?;
                    if ended > 0 {
                        chain.append(&tx, Entry::End, session.as_str(), None, &ended_at)?;
                    }
                    seqs.remove(&session);
                }
                Op::Lost(kind, count) => {
                    tx.execute(
                        "INSERT INTO lost_events (at, kind, count) VALUES (?1, ?2, ?3)",
                        params![super::rfc3339(std::time::SystemTime::now()), kind, count as i64],
                    )?;
                }
                Op::Grant(event) => {
                    tx.execute(
                        "INSERT INTO grant_events (at, grant_name, action, by, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![event.at, event.grant, event.action, event.by, event.reason],
                    )?;
                }
                Op::GrantsSeen(names, at) => {
                    for name in names {
                        tx.execute(
                            "INSERT OR IGNORE INTO grants_seen (grant_name, first_seen) VALUES (?1, ?2)",
                            params![name, at],
                        )?;
                    }
                }
                Op::Prune(cutoff, not_after) => {
                    let pruned = super::ledger::prune(&tx, chain, &cutoff, not_after)?;
                    if pruned.sessions > 0 {
                        tracing::info!(
                            sessions = pruned.sessions,
                            records = pruned.records,
                            until = cutoff,
                            "pruned the session log past its retention; a signed checkpoint marks it"
                        );
                        seqs.clear();
                    }
                }
                Op::Checkpoint => checkpoint = true,
                Op::Flush(ack) => flushes.push(ack),
            }
        }
        // No drop is silent: each goes into its session's record.
        let drops = std::mem::take(&mut *dropped.lock().unwrap_or_else(PoisonError::into_inner));
        for ((session, kind), count) in drops {
            tracing::error!(session = %session, kind, count, "the session log's queue was full: events of a session were dropped");
            let at = super::rfc3339(std::time::SystemTime::now());
            tx.execute(
                "INSERT INTO lost_events (at, kind, count) VALUES (?1, 'log_queue', ?2)",
                params![at, count as i64],
            )?;
            let mut detail = serde_json::Map::new();
            detail.insert("lost_kind".into(), kind.into());
            detail.insert("count".into(), count.into());
            detail.insert("reason".into(), "log-queue-full".into());
            let event = EventRecord { at, kind: RecordKind::Lost, pid: 0, verdict: None, detail: detail.into() };
            write_event(&tx, &mut statements, chain, seqs, &mut usage, &session, event)?;
        }
        drop(statements);
        usage.write(&tx)?;
        chain.sign(&tx)?;
        tx.commit()
    })();
    if let Err(e) = &result {
        tracing::error!(error = %e, "session log batch failed");
        chain.n = chain_n;
        chain.hash = chain_hash;
    }
    if checkpoint && let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        tracing::warn!(error = %e, "cannot checkpoint the session log's WAL");
    }
    for (ack, outcome) in acks {
        let outcome = match (&result, outcome) {
            (Err(e), _) => Err(e.to_string()),
            (Ok(()), outcome) => outcome,
        };
        let _ = ack.send(outcome);
    }
    for ack in flushes {
        let _ = ack.send(());
    }
}

/// The statements every event runs, looked up in the connection's cache
/// once per batch rather than once per event.
struct EventStatements<'tx> {
    insert_event: rusqlite::CachedStatement<'tx>,
    insert_place: rusqlite::CachedStatement<'tx>,
}

impl<'tx> EventStatements<'tx> {
    fn prepare(tx: &'tx rusqlite::Transaction<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            insert_event: tx.prepare_cached(
                "INSERT INTO events (session_id, seq, at, kind, pid, verdict, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?,
            insert_place: Chain::insert_place(tx)?,
        })
    }
}

/// Writes one event of `session` and chains it.
fn write_event(
    tx: &rusqlite::Transaction<'_>,
    statements: &mut EventStatements<'_>,
    chain: &mut Chain,
    seqs: &mut HashMap<SessionId, i64>,
    usage: &mut Usage,
    session: &SessionId,
    event: EventRecord,
) -> rusqlite::Result<()> {
    let detail = match event.detail.text() {
        Ok(detail) => detail,
        Err(e) => {
            tracing::error!(session = %session, error = %e, "cannot record event");
            return Ok(());
        }
    };
    let seq = match seqs.get_mut(session) {
        Some(seq) => seq,
        None => {
            let last: i64 = tx.query_row(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE session_id = ?1",
                [session.as_str()],
                |row| row.get(0),
            )?;
            seqs.entry(session.clone()).or_insert(last)
        }
    };
    *seq += 1;
    usage.count(session, &event);
    let inserted = statements.insert_event.execute(params![
        session.as_str(),
        *seq,
        event.at,
        event.kind.as_str(),
        event.pid,
        event.verdict.map(RecordVerdict::as_str),
        detail
    ]);
    match inserted {
        Ok(_) => {
            let content = json_array(&[
                Column::Text(session.as_str()),
                Column::Integer(*seq),
                Column::Text(&event.at),
                Column::Text(event.kind.as_str()),
                Column::Integer(i64::from(event.pid)),
                event.verdict.map_or(Column::Null, |v| Column::Text(v.as_str())),
                Column::Text(&detail),
            ]);
            chain.append_with(
                &mut statements.insert_place,
                Entry::Event,
                session.as_str(),
                Some(*seq),
                &event.at,
                &content,
            )?
        }
        Err(e) => tracing::error!(session = %session, error = %e, "cannot record event"),
    }
    Ok(())
}

/// The grant rules a batch's decisions name (`grant_rules` in their
/// detail), added up per rule and UTC day and written once per batch into
/// the usage table, so reviews over months need not scan events.
#[derive(Default)]
struct Usage {
    /// (grant, rule, day) and their use. A batch names few rules: a search
    /// of a short list, not a key made per event.
    counts: Vec<((String, String, String), RuleUse)>,
}

/// How often a rule was used in a batch, and its last use.
struct RuleUse {
    count: i64,
    last_at: String,
    last_session: Option<SessionId>,
}

impl Usage {
    fn count(&mut self, session: &SessionId, event: &EventRecord) {
        let day = event.at.get(..10).unwrap_or_default();
        for (grant, name) in event.detail.grant_rules() {
            let found = self.counts.iter().position(|((g, r, d), _)| g == grant && r == name && d == day);
            let index = found.unwrap_or_else(|| {
                let key = (grant.to_owned(), name.to_owned(), day.to_owned());
                self.counts.push((key, RuleUse { count: 0, last_at: String::new(), last_session: None }));
                self.counts.len() - 1
            });
            let entry = &mut self.counts[index].1;
            entry.count += 1;
            if event.at > entry.last_at {
                entry.last_at.clone_from(&event.at);
                entry.last_session = Some(session.clone());
            }
        }
    }

    fn write(self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        for ((grant, rule, day), RuleUse { count, last_at, last_session }) in self.counts {
            let last_session = last_session.as_ref().map_or("", SessionId::as_str);
            tx.execute(
                "INSERT INTO grant_usage (grant_name, rule, day, count, last_at, last_session)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (grant_name, rule, day) DO UPDATE SET
                    count = count + excluded.count, last_at = MAX(last_at, excluded.last_at),
                    last_session = CASE WHEN excluded.last_at >= last_at THEN excluded.last_session ELSE last_session END",
                params![grant, rule, day, count, last_at, last_session],
            )?;
        }
        Ok(())
    }
}

fn insert_session(tx: &rusqlite::Transaction<'_>, r: &SessionRecord) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO sessions (id, identity, subject, issuer, claims, host, uid, privileged, grants,
                               cgroup, command, started_at, ended_at, parent, depth, reason, ttl_secs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        params![
            r.id.as_str(),
            r.identity,
            r.subject,
            r.issuer,
            r.claims.to_string(),
            r.host,
            r.uid,
            r.privileged,
            serde_json::to_string(&r.grants).unwrap_or_else(|_| "[]".into()),
            r.cgroup,
            serde_json::to_string(&r.command).unwrap_or_else(|_| "[]".into()),
            r.started_at,
            r.ended_at,
            r.parent.as_ref().map(SessionId::as_str),
            r.depth,
            r.reason,
            r.ttl_secs,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &SessionId) -> SessionRecord {
        SessionRecord {
            id: id.clone(),
            identity: "flood-bots".into(),
            subject: "flood-bot".into(),
            issuer: "tollgate-dev".into(),
            claims: Default::default(),
            host: "test".into(),
            uid: 0,
            privileged: false,
            grants: Vec::new(),
            cgroup: "/sys/fs/cgroup/test".into(),
            command: Vec::new(),
            started_at: super::super::rfc3339(std::time::SystemTime::now()),
            ended_at: None,
            parent: None,
            depth: 0,
            reason: None,
            ttl_secs: None,
        }
    }

    fn connect_event() -> EventRecord {
        let mut detail = serde_json::Map::new();
        detail.insert("addr".into(), "127.0.0.1".into());
        EventRecord {
            at: super::super::rfc3339(std::time::SystemTime::now()),
            kind: RecordKind::Kernel(tollgate_common::EventKind::Connect),
            pid: 7,
            verdict: Some(RecordVerdict::ALLOW),
            detail: detail.into(),
        }
    }

    /// Events that find the queue full are dropped, and every one is
    /// accounted for in its session's record: stored connects plus the
    /// counts of `lost` events (reason `log-queue-full`) make all of them.
    #[test]
    fn events_dropped_at_a_full_queue_are_counted_in_their_sessions_record() {
        const SENT: u64 = 20_000;
        let dir = std::env::temp_dir().join(format!("tollgate-writer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("log.db");
        let _ = std::fs::remove_file(&path);
        let mut conn = schema::open(&path).expect("open");
        let chain = Chain::open(&mut conn, None).expect("chain");
        // A queue of 8: a tight loop of sends overruns it.
        let writer = Writer::start_with_queue(conn, chain, Duration::from_millis(10), 8).expect("writer");
        let log = writer.handle();
        let session = SessionId::generate();
        log.open_session(record(&session)).expect("session opens");
        for _ in 0..SENT {
            log.event(session.clone(), connect_event());
        }
        log.flush();
        // Drops that came after the last batch are written by the next one.
        log.flush();
        assert!(log.dropped() > 0, "a queue of 8 kept up with {SENT} events; the test proves nothing");
        let conn = Connection::open(&path).expect("read");
        let stored: u64 = conn
            .query_row(
                "SELECT count(*) FROM events WHERE session_id = ?1 AND kind = 'connect'",
                [session.as_str()],
                |r| r.get(0),
            )
            .expect("count");
        let lost: u64 = conn
            .query_row(
                "SELECT COALESCE(SUM(json_extract(detail, '$.count')), 0) FROM events
                 WHERE session_id = ?1 AND kind = 'lost' AND json_extract(detail, '$.reason') = 'log-queue-full'
                   AND json_extract(detail, '$.lost_kind') = 'connect'",
                [session.as_str()],
                |r| r.get(0),
            )
            .expect("lost");
        assert_eq!(lost, log.dropped(), "every drop is in the session's record");
        assert_eq!(stored + lost, SENT, "stored {stored} + lost {lost}");
        let table: u64 = conn
            .query_row("SELECT COALESCE(SUM(count), 0) FROM lost_events WHERE kind = 'log_queue'", [], |r| r.get(0))
            .expect("lost_events");
        assert_eq!(table, lost);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
