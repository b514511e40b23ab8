//! [`SessionLog`]: the handle through which everything that records into
//! the session log does so.

use std::time::SystemTime;

use serde_json::Value;

use super::{
    Detail, EventRecord, RecordFields, RecordKind, RecordVerdict, SessionId, SessionRecord, StoreError, WriterHandle,
    clock::BootClock, rfc3339, stats::Exchange,
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
        self.stats.record(kind.as_str(), verdict.map(RecordVerdict::as_str), None);
        self.writer.event(session, EventRecord { at, kind, pid, verdict, detail });
    }

    /// Records something decided now in userspace (by the proxy, a
    /// reviewer, the session's lifecycle) rather than by the kernel.
    pub fn decided(&self, session: &SessionId, kind: RecordKind, verdict: RecordVerdict, detail: impl RecordFields) {
        // A decision about a request or a session, not about one process.
        self.decided_for(session, 0, kind, verdict, detail);
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
        let exchange = (kind == RecordKind::Http).then(|| Exchange {
            outcome: detail.field("outcome").and_then(Value::as_str).unwrap_or("unknown"),
            duration_ms: detail.field("duration_ms").and_then(Value::as_f64),
        });
        self.count(kind, verdict, exchange);
        self.write_decision(session, pid, kind, verdict, Detail::rendered(detail));
    }

    /// Records a decision made now about what process `pid` asked, whose
    /// detail is rendered already (the proxy's typed records), with how an
    /// HTTP exchange ended (for `/metrics`; only a record of kind HTTP
    /// counts as a request through the proxy).
    pub fn decided_rendered(
        &self,
        session: &SessionId,
        pid: u32,
        kind: RecordKind,
        verdict: RecordVerdict,
        detail: Detail,
        exchange: Option<Exchange<'_>>,
    ) {
        self.count(kind, verdict, exchange.filter(|_| kind == RecordKind::Http));
        self.write_decision(session, pid, kind, verdict, detail);
    }

    fn write_decision(&self, session: &SessionId, pid: u32, kind: RecordKind, verdict: RecordVerdict, detail: Detail) {
        let at = rfc3339(SystemTime::now());
        self.writer.event(session.clone(), EventRecord { at, kind, pid, verdict: Some(verdict), detail });
    }

    /// Records a fact about a session, now, that is no decision (events
    /// counted instead of delivered, say).
    pub fn noted(&self, session: &SessionId, kind: RecordKind, detail: impl RecordFields) {
        let at = rfc3339(SystemTime::now());
        self.writer
            .event(session.clone(), EventRecord { at, kind, pid: 0, verdict: None, detail: Detail::rendered(detail) });
    }

    /// Counts a userspace decision for `/metrics`, with how an HTTP
    /// exchange ended where it is one.
    fn count(&self, kind: RecordKind, verdict: RecordVerdict, exchange: Option<Exchange<'_>>) {
        self.stats.record(kind.as_str(), Some(verdict.as_str()), exchange);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use serde_json::Map;

    use crate::store::{FieldList, Writer};

    /// `/metrics` counts every userspace decision by kind and verdict, and
    /// an HTTP exchange's outcome and duration from its fields, whether
    /// they came as a field list or a map; other kinds' outcomes are not
    /// requests through the HTTP proxy.
    #[test]
    fn decisions_and_http_outcomes_are_counted_from_the_records_fields() {
        let dir = std::env::temp_dir().join(format!("tollgate-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("log.db");
        let _ = std::fs::remove_file(&path);
        let writer = Writer::start(&path, Duration::from_millis(10), None, 64).expect("writer");
        let log = SessionLog::new(writer.handle());
        let session = SessionId::generate();

        let mut exchange = FieldList::new();
        exchange.set("method", "GET");
        exchange.set("outcome", "forwarded");
        exchange.set("duration_ms", 2.0);
        log.decided_for(&session, 7, RecordKind::Http, RecordVerdict::ALLOW, exchange);
        let mut refused = Map::new();
        refused.insert("outcome".into(), "blocked".into());
        log.decided(&session, RecordKind::Http, RecordVerdict::Block, refused);
        let mut statement = FieldList::new();
        statement.set("outcome", "refused");
        log.decided_for(&session, 7, RecordKind::Sql, RecordVerdict::DENY, statement);

        let metrics = log.stats().prometheus();
        for line in [
            "tollgate_decisions_total{kind=\"http\",verdict=\"allow\"} 1",
            "tollgate_decisions_total{kind=\"http\",verdict=\"block\"} 1",
            "tollgate_decisions_total{kind=\"sql\",verdict=\"deny\"} 1",
            "tollgate_proxy_requests_total{outcome=\"forwarded\"} 1",
            "tollgate_proxy_requests_total{outcome=\"blocked\"} 1",
            "tollgate_proxy_request_duration_seconds_bucket{le=\"0.0025\"} 1",
            "tollgate_proxy_request_duration_seconds_count 1",
        ] {
            assert!(metrics.lines().any(|l| l == line), "no `{line}` in:\n{metrics}");
        }
        assert!(!metrics.contains("outcome=\"refused\""), "a statement counted as an HTTP request:\n{metrics}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
