//! Events the kernel could not deliver (the ring buffer was full, or their
//! session had used its share of it): the kernel counts them per session,
//! kind and reason; here each loss goes into its session's record with its
//! kind, count and reason, into the daemon's log, `tollgate status` and the
//! log's lost-event table. Never silent, and in a session's record before
//! its end.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::Map;
use tollgate_common::{LOST_BUFFER_FULL, LOST_SLOTS, LOST_THROTTLED, LostKey};

use crate::{
    bpf::{LostCounters, events},
    store::{RecordKind, RecordedLoss, SessionId, SessionLog},
};

/// How a session's record names a `LostKey::reason`.
fn reason_name(reason: u32) -> &'static str {
    match reason {
        LOST_THROTTLED => "throttled",
        LOST_BUFFER_FULL => "ring-buffer-full",
        _ => "unknown",
    }
}

/// Events the kernel could not deliver, per event kind slot, as counted so far.
pub type LostTotals = [AtomicU64; LOST_SLOTS as usize];

/// The kernel's loss counters, and how much of each is already reported.
pub struct LostEvents {
    counters: LostCounters,
    /// Each counter's value when it was last reported. Held while reporting,
    /// so a loss read by two reporters at once is reported once.
    reported: Mutex<HashMap<LostKey, u64>>,
    totals: Arc<LostTotals>,
    /// Whether the counters are an earlier daemon's, reused from their pins.
    carried: bool,
}

impl LostEvents {
    /// Reports from `counters`, adding to `totals` (what `status` shows).
    /// `carried`: the counters are an earlier daemon's (pinned, reused).
    pub fn new(counters: LostCounters, totals: Arc<LostTotals>, carried: bool) -> Self {
        Self { counters, reported: Mutex::default(), totals, carried }
    }

    /// Takes what a session's record already counts as lost as reported: an
    /// earlier daemon reported it from the same (pinned) counters, which a
    /// new daemon must not report again. Fresh counters hold nothing of what
    /// the record counts: then nothing is taken.
    pub(super) fn already_reported(&self, cgroup_id: u64, recorded: &[RecordedLoss]) {
        if !self.carried {
            return;
        }
        let mut reported = self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for loss in recorded {
            let kind = (1..LOST_SLOTS).find(|&slot| events::kind_name(slot as usize) == loss.kind);
            // The log's own drops (log-queue-full) are no kernel counter's.
            let reason =
                [LOST_THROTTLED, LOST_BUFFER_FULL].into_iter().find(|&reason| reason_name(reason) == loss.reason);
            if let (Some(kind), Some(reason)) = (kind, reason) {
                reported.insert(LostKey { cgroup_id, kind, reason }, loss.count);
            }
        }
    }

    /// Reports what every session lost since the last report.
    pub(super) fn report_all(&self, session_of: impl Fn(u64) -> Option<SessionId>, log: &SessionLog) {
        self.report(self.counters.read(), session_of, log);
    }

    /// Reports what the session in `cgroup_id` lost since the last report.
    pub(super) fn report_session(&self, cgroup_id: u64, session: &SessionId, log: &SessionLog) {
        self.report(self.counters.read_session(cgroup_id), |_| Some(session.clone()), log);
    }

    fn report(&self, counts: Vec<(LostKey, u64)>, session_of: impl Fn(u64) -> Option<SessionId>, log: &SessionLog) {
        let mut reported = self.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (key, count) in counts {
            let previous = reported.entry(key).or_insert(0);
            // Counters only grow: a smaller count was read before a report that came first.
            if count <= *previous {
                continue;
            }
            let lost = count - *previous;
            *previous = count;
            let kind = events::kind_name(key.kind as usize);
            let reason = reason_name(key.reason);
            if let Some(slot) = self.totals.get(key.kind as usize) {
                slot.fetch_add(lost, Ordering::Relaxed);
            }
            log.lost(kind, lost);
            match session_of(key.cgroup_id) {
                Some(session) => {
                    tracing::error!(session = %session, kind, lost, reason, "kernel events of a session were not delivered");
                    let mut detail = Map::new();
                    detail.insert("lost_kind".into(), kind.into());
                    detail.insert("count".into(), lost.into());
                    detail.insert("reason".into(), reason.into());
                    log.noted(&session, RecordKind::Lost, detail);
                }
                None => {
                    tracing::error!(
                        cgroup_id = key.cgroup_id,
                        kind,
                        lost,
                        reason,
                        "kernel events lost for a cgroup with no session"
                    );
                }
            }
        }
    }
}
