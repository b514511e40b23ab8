//! The event pump: kernel events to session log records, the programs'
//! own log to the daemon's, and lost events to counts that are never silent.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{MapData, RingBuf};
use serde_json::{Map, Value, json};
use tokio::io::unix::AsyncFd;
use tollgate_common::{EventKind, LOST_BUFFER_FULL, LOST_SLOTS, LOST_THROTTLED, LostKey, Verdict};

use crate::{
    bpf::{
        ConsumedBytes, EventBacklog, KernelLogger, LostCounters,
        events::{self, KernelEvent},
    },
    policy::compile::{Decided, RuleRef},
    session::Sessions,
    store::{Detail, RecordKind, RecordVerdict, SessionLog},
};

/// Events the kernel could not deliver, per event kind slot, as counted so far.
pub type LostTotals = [AtomicU64; LOST_SLOTS as usize];

/// Events handled before the reader lets other tasks (the control socket,
/// the proxy) run: a flood must not make the daemon unresponsive.
const EVENTS_PER_TURN: usize = 256;

/// Reads the ring buffer for as long as the daemon runs. After each turn,
/// the bytes read of each session's events are told to the kernel, which
/// holds a session back only while its own unread events fill its share of
/// the buffer. While the log's writer is behind, events are left in the
/// ring buffer: there the kernel's per-session share decides what waits and
/// what is counted lost, so a flooding session cannot crowd a quiet one's
/// events out of the writer's queue.
pub async fn read(
    sessions: Arc<Sessions>,
    log: SessionLog,
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut consumed: ConsumedBytes,
    backlog: Arc<EventBacklog>,
) -> anyhow::Result<()> {
    let mut touched = Vec::new();
    // The programs wake this reader only once the buffer fills past a level;
    // below it, the reader drains on its own, often, and at once when a
    // session's end waits for its last events.
    let mut drain = tokio::time::interval(std::time::Duration::from_millis(tollgate_common::DRAIN_INTERVAL_MS));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if !log.has_room_for_kernel_events() {
            tokio::time::sleep(WRITER_BEHIND_PAUSE).await;
            continue;
        }
        let woken = tokio::select! {
            guard = ring.readable_mut() => Some(guard?),
            _ = drain.tick() => None,
            () = backlog.drain_requested() => None,
        };
        match woken {
            Some(mut guard) => {
                let turn = read_some(guard.get_inner_mut(), &sessions, &log, &mut consumed, &mut touched);
                if turn == Turn::Drained {
                    // Wait for the kernel (or the next tick).
                    guard.clear_ready();
                }
            }
            None => {
                while read_some(ring.get_mut(), &sessions, &log, &mut consumed, &mut touched) == Turn::Full {
                    tokio::task::yield_now().await;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// How long the reader leaves events in the ring buffer before it looks
/// again at a writer that was behind.
const WRITER_BEHIND_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// How a turn of reading ended.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// The ring buffer is empty.
    Drained,
    /// [`EVENTS_PER_TURN`] were read; there may be more.
    Full,
    /// The log's writer is behind; the rest waits in the ring buffer.
    WriterBehind,
}

/// Reads up to [`EVENTS_PER_TURN`] events, while the log has room for them.
fn read_some(
    buffer: &mut RingBuf<MapData>,
    sessions: &Sessions,
    log: &SessionLog,
    consumed: &mut ConsumedBytes,
    touched: &mut Vec<u64>,
) -> Turn {
    let mut turn = Turn::Full;
    for _ in 0..EVENTS_PER_TURN {
        if !log.has_room_for_kernel_events() {
            turn = Turn::WriterBehind;
            break;
        }
        let Some(item) = buffer.next() else {
            turn = Turn::Drained;
            break;
        };
        match events::decode(&item) {
            Ok(event) => {
                let cgroup_id = event.origin().cgroup_id;
                consumed.add(cgroup_id, item.len() as u64);
                if !touched.contains(&cgroup_id) {
                    touched.push(cgroup_id);
                }
                record(sessions, log, &event);
            }
            Err(e) => tracing::error!(error = %e, "undecodable kernel event"),
        }
    }
    consumed.publish(touched.drain(..));
    turn
}

fn record(sessions: &Sessions, log: &SessionLog, event: &KernelEvent) {
    let origin = event.origin();
    let Some(attribution) = sessions.attribute(event) else {
        tracing::debug!(cgroup_id = origin.cgroup_id, "event for a cgroup with no session");
        return;
    };
    let session = attribution.session;
    let mut detail = Map::new();
    let (kind, verdict) = match event {
        KernelEvent::Exec { ppid, uid, verdict, filename, filename_truncated, argv, argv_truncated, .. } => {
            // The creator, if we saw the fork, even when the process has since been reparented.
            detail.insert("ppid".into(), attribution.creator.unwrap_or(*ppid).into());
            detail.insert("parent_at_exec".into(), (*ppid).into());
            detail.insert("uid".into(), (*uid).into());
            detail.insert("filename".into(), filename.clone().into());
            detail.insert("filename_truncated".into(), (*filename_truncated).into());
            detail.insert("argv".into(), json!(argv));
            detail.insert("argv_truncated".into(), (*argv_truncated).into());
            insert_rules(&mut detail, attribution.rule.as_ref());
            if *verdict != Verdict::Allow {
                tracing::warn!(session = %session, pid = origin.pid, filename, "exec denied");
            }
            (EventKind::Exec, Some(*verdict))
        }
        KernelEvent::Fork { child_pid, .. } => {
            detail.insert("child_pid".into(), (*child_pid).into());
            (EventKind::Fork, None)
        }
        KernelEvent::Exit { code, signal, .. } => {
            detail.insert("exit_code".into(), code.map_or(Value::Null, Value::from));
            detail.insert("signal".into(), signal.map_or(Value::Null, Value::from));
            (EventKind::Exit, None)
        }
        KernelEvent::Connect { verdict, addr, port, family, protocol, send, .. } => {
            if *verdict == Verdict::Deny {
                tracing::info!(session = %session, pid = origin.pid, %addr, port, "connect denied");
            }
            let decided = attribution.rule.as_ref();
            let fields = ConnectDetail {
                rule: decided.map(ToString::to_string),
                grant_rules: decided.map(|d| d.0.as_slice()).filter(|rules| !rules.is_empty()),
                family: *family,
                addr: *addr,
                port: *port,
                protocol,
                send: *send,
            };
            let grant_rules = fields.grant_rules.unwrap_or_default();
            let grant_rules = grant_rules.iter().map(|r| (r.grant.clone(), r.rule.clone())).collect();
            match Detail::json(&fields, grant_rules) {
                Ok(detail) => {
                    log.kernel_event(
                        session,
                        origin.boot_ns,
                        origin.pid,
                        RecordKind::Kernel(EventKind::Connect),
                        Some(RecordVerdict::Kernel(*verdict)),
                        detail,
                    );
                }
                Err(e) => tracing::error!(session = %session, error = %e, "cannot record a connect"),
            }
            return;
        }
        KernelEvent::Socket { family, sock_type, protocol, .. } => {
            detail.insert("family".into(), (*family).into());
            detail.insert("type".into(), (*sock_type).into());
            detail.insert("protocol".into(), (*protocol).into());
            tracing::info!(session = %session, pid = origin.pid, family, sock_type, protocol, "socket refused");
            (EventKind::Socket, Some(Verdict::Deny))
        }
    };
    log.kernel_event(
        session,
        origin.boot_ns,
        origin.pid,
        RecordKind::Kernel(kind),
        verdict.map(RecordVerdict::Kernel),
        detail.into(),
    );
}

/// A connect's detail, typed: the hottest record. Fields in the order the
/// other kinds' maps keep theirs (`rule` first, then `grant_rules` when a
/// grant's rule decided).
#[derive(serde::Serialize)]
struct ConnectDetail<'a> {
    rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_rules: Option<&'a [RuleRef]>,
    family: u8,
    addr: std::net::IpAddr,
    port: u16,
    protocol: &'a str,
    send: bool,
}

/// Names the grant rules that decided (`grant_rules`: grant and rule of each),
/// which the session log counts as their use.
fn insert_rules(detail: &mut Map<String, Value>, decided: Option<&Decided>) {
    let Some(decided) = decided else { return };
    if decided.0.is_empty() {
        return;
    }
    detail.entry("rule").or_insert_with(|| decided.to_string().into());
    detail.insert("grant_rules".into(), json!(decided.0));
}

/// Forwards what the programs log (through `aya-log`) into the daemon's log.
pub async fn forward_kernel_log(logger: KernelLogger) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer fd and lives inside the AsyncFd.
    let mut logger =
        unsafe { AsyncFd::register(logger) }.map_err(|e| anyhow::anyhow!("cannot poll the eBPF log: {e}"))?;
    loop {
        let mut guard = logger.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Reports events the kernel did not deliver (the ring buffer was full, or
/// their session had used its share of it): each loss is recorded in its
/// session's record with its kind, count and reason, logged, counted in
/// `tollgate status` and in the log's lost-event table. Never silent.
pub async fn watch_lost(
    counters: LostCounters,
    sessions: Arc<Sessions>,
    log: SessionLog,
    totals: Arc<LostTotals>,
) -> anyhow::Result<()> {
    let mut seen: HashMap<LostKey, u64> = HashMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        for (key, count) in counters.read() {
            let previous = seen.entry(key).or_insert(0);
            if count <= *previous {
                continue;
            }
            let lost = count - *previous;
            *previous = count;
            let kind = events::kind_name(key.kind as usize);
            let reason = match key.reason {
                LOST_THROTTLED => "throttled",
                LOST_BUFFER_FULL => "ring-buffer-full",
                _ => "unknown",
            };
            if let Some(slot) = totals.get(key.kind as usize) {
                slot.fetch_add(lost, Ordering::Relaxed);
            }
            log.lost(kind, lost);
            match sessions.session_of(key.cgroup_id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed connect detail is the JSON its map used to be, key for key
    /// and in the same order, so records old and new read alike.
    #[test]
    fn a_connect_detail_is_the_json_the_map_made() {
        let rules = [RuleRef::new("ci-net", "network.allow 10.0.0.0/8")];
        let fields = ConnectDetail {
            rule: Some(Decided(rules.to_vec()).to_string()),
            grant_rules: Some(&rules),
            family: 6,
            addr: "2001:db8::1".parse().expect("an address"),
            port: 443,
            protocol: "tcp",
            send: false,
        };
        let mut map = Map::new();
        map.insert("rule".into(), "ci-net: network.allow 10.0.0.0/8".into());
        map.insert("grant_rules".into(), json!(rules));
        map.insert("family".into(), 6.into());
        map.insert("addr".into(), "2001:db8::1".into());
        map.insert("port".into(), 443.into());
        map.insert("protocol".into(), "tcp".into());
        map.insert("send".into(), false.into());
        let typed = Detail::json(&fields, vec![("ci-net".into(), "network.allow 10.0.0.0/8".into())]).expect("JSON");
        assert_eq!(typed.text().expect("text"), serde_json::to_string(&map).expect("JSON"));
        assert_eq!(typed.grant_rules(), Detail::from(map).grant_rules());

        // No rule decided: `rule` is null and there is no `grant_rules`.
        let fields = ConnectDetail { rule: None, grant_rules: None, ..fields };
        let text = serde_json::to_string(&fields).expect("JSON");
        assert_eq!(text, r#"{"rule":null,"family":6,"addr":"2001:db8::1","port":443,"protocol":"tcp","send":false}"#);
    }
}
