//! [`SessionLog`]: the handle through which everything that records into
//! the session log does so.

use std::time::SystemTime;

use serde_json::Value;

use super::{
    Detail, EventRecord, RecordFields, RecordKind, RecordVerdict, SessionId, SessionRecord, StoreError, WriterHandle,
    clock::BootClock, rfc3339,
};

/// Records sessions and their events. Cheap to clone.
#[derive(Clone)]
pub struct SessionLog {
    writer: WriterHandle,
    clock: BootClock,
    stats: std::sync::Arc<super::stats::Stats>,
}

impl SessionLog {
    /// Records through `writer`; kernel times are converted with a clock read now.
    pub fn new(writer: WriterHandle) -> Self {
        Self { writer, clock: BootClock::now(), stats: Default::default() }
    }

    /// Records a new session and waits until it is committed (blocking).
    pub fn open_session(&self, record: SessionRecord) -> Result<(), StoreError> {
        self.writer.open_session(record)
    }

    /// May kernel events be queued now? When not, they should wait in the
    /// ring buffer (see [`WriterHandle::has_room_for_kernel_events`]).
    pub fn has_room_for_kernel_events(&self) -> bool {
        self.writer.has_room_for_kernel_events()
    }

    /// Records an event the kernel reported at `boot_ns` (`CLOCK_BOOTTIME`).
    pub fn kernel_event(
        &self,
        session: SessionId,
        boot_ns: u64,
        pid: u32,
        kind: RecordKind,
        verdict: Option<RecordVerdict>,
        detail: Detail,
    ) {
        let at = rfc3339(self.clock.wall(boot_ns));
        self.stats.record(kind.as_str(), verdict.map(RecordVerdict::as_str));
        self.writer.event(session, EventRecord { at, kind, pid, verdict, detail });
    }

    /// Records something decided now in userspace (by the proxy, a
    /// reviewer, the session's lifecycle) rather than by the kernel.
    pub fn decided(&self, session: &SessionId, kind: RecordKind, verdict: RecordVerdict, detail: impl RecordFields) {
        let at = rfc3339(SystemTime::now());
        self.count(kind, verdict, &detail);
        // A decision about a request or a session, not about one process.
        self.writer.event(
            session.clone(),
            EventRecord { at, kind, pid: 0, verdict: Some(verdict), detail: Detail::rendered(detail) },
        );
    }

    /// Records a decision made now about what process `pid` of a session asked
    /// (a request through the proxy).
    pub fn decided_for(
        &self,
        session: &SessionId,
        pid: u32,
        kind: RecordKind,
        verdict: RecordVerdict,
        detail: impl RecordFields,
    ) {
        let at = rfc3339(SystemTime::now());
        self.count(kind, verdict, &detail);
        self.writer.event(
            session.clone(),
            EventRecord { at, kind, pid, verdict: Some(verdict), detail: Detail::rendered(detail) },
        );
    }

    /// Records a fact about a session, now, that is no decision (events
    /// counted instead of delivered, say).
    pub fn noted(&self, session: &SessionId, kind: RecordKind, detail: impl RecordFields) {
        let at = rfc3339(SystemTime::now());
        self.writer
            .event(session.clone(), EventRecord { at, kind, pid: 0, verdict: None, detail: Detail::rendered(detail) });
    }

    /// Counts a userspace decision for `/metrics`, and an HTTP exchange's
    /// outcome and duration.
    fn count(&self, kind: RecordKind, verdict: RecordVerdict, detail: &impl RecordFields) {
        self.stats.record(kind.as_str(), Some(verdict.as_str()));
        if kind == RecordKind::Http {
            let outcome = detail.field("outcome").and_then(Value::as_str).unwrap_or("unknown");
            self.stats.proxied(outcome, detail.field("duration_ms").and_then(Value::as_f64));
        }
    }

    /// Records the end of a session, now.
    pub fn end_session(&self, session: SessionId) {
        self.writer.end_session(session, rfc3339(SystemTime::now()));
    }

    /// Records a count of events the kernel could not deliver.
    pub fn lost(&self, kind: &str, count: u64) {
        self.writer.lost(kind, count);
    }

    /// What was recorded since the daemon started, counted.
    pub fn stats(&self) -> &super::stats::Stats {
        &self.stats
    }

    /// Events dropped because the writer's queue was full.
    pub fn dropped(&self) -> u64 {
        self.writer.dropped()
    }

    /// Records something that happened to a grant, now.
    pub fn grant_event(&self, grant: &str, action: &str, by: Option<String>, reason: Option<String>) {
        let at = rfc3339(SystemTime::now());
        self.writer.grant_event(super::GrantEvent {
            at,
            grant: grant.to_owned(),
            action: action.to_owned(),
            by,
            reason,
        });
    }

    /// Records the grants the policy has now (the first sighting of each is kept).
    pub fn grants_seen(&self, names: Vec<String>) {
        self.writer.grants_seen(names, rfc3339(SystemTime::now()));
    }

    /// Prunes sessions that ended before `cutoff`, leaving a signed
    /// checkpoint, not past ledger place `not_after` (an exporter's position).
    pub fn prune(&self, cutoff: SystemTime, not_after: Option<i64>) {
        self.writer.prune(rfc3339(cutoff), not_after);
    }

    /// Folds the WAL into the database file (at a clean stop).
    pub fn checkpoint(&self) {
        self.writer.checkpoint();
    }

    /// Waits until everything recorded so far is committed.
    pub fn flush(&self) {
        self.writer.flush();
    }
}
