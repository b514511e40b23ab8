//! The event pump: kernel events to session log records, the programs'
//! own log to the daemon's, and lost events to counts that are never silent.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use serde_json::value::RawValue;
use tokio::io::unix::AsyncFd;
use tollgate_common::{EventHeader, EventKind, Verdict};

use crate::{
    bpf::{
        ConsumedBytes, EventBacklog, KernelLogger,
        events::{self, KernelEvent},
    },
    policy::compile::{Decided, RuleRef},
    session::Sessions,
    store::{Detail, RecordKind, RecordVerdict, SessionId, SessionLog},
};

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
    let mut refusals = RefusalLines::default();
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
                let turn =
                    read_some(guard.get_inner_mut(), &sessions, &log, &mut consumed, &mut touched, &mut refusals);
                if turn == Turn::Drained {
                    // Wait for the kernel (or the next tick).
                    guard.clear_ready();
                }
            }
            None => {
                while read_some(ring.get_mut(), &sessions, &log, &mut consumed, &mut touched, &mut refusals)
                    == Turn::Full
                {
                    tokio::task::yield_now().await;
                }
                refusals.report_ended(Instant::now());
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
    refusals: &mut RefusalLines,
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
        // Credited to its session once read, decodable or not: the share
        // of the buffer it held is free again.
        if let Some(header) = tollgate_common::read::<EventHeader>(&item) {
            consumed.add(header.cgroup_id, item.len() as u64);
            if !touched.contains(&header.cgroup_id) {
                touched.push(header.cgroup_id);
            }
        }
        match events::decode(&item) {
            Ok(event) => record(sessions, log, &event, refusals),
            Err(e) => tracing::error!(error = %e, "undecodable kernel event"),
        }
    }
    consumed.publish(touched.drain(..));
    turn
}

/// Refusal lines in the daemon's log per session and kind in each
/// [`REFUSAL_LINE_WINDOW`]; past that they are counted, and the count is
/// logged once the window ends.
const REFUSAL_LINES_PER_WINDOW: u32 = 5;
const REFUSAL_LINE_WINDOW: Duration = Duration::from_secs(1);

/// The daemon's log lines for refused execs, connects and sockets, a few per
/// session and kind each second: a session refused in a loop must neither
/// flood the daemon's log (and the journal) nor spend the reader's time on
/// lines while its events wait. Every refusal is in the session's record.
#[derive(Default)]
struct RefusalLines {
    windows: HashMap<SessionId, Vec<RefusalWindow>>,
}

struct RefusalWindow {
    kind: &'static str,
    started: Instant,
    shown: u32,
    hidden: u64,
}

impl RefusalWindow {
    fn new(kind: &'static str, started: Instant) -> Self {
        Self { kind, started, shown: 0, hidden: 0 }
    }
}

impl RefusalLines {
    /// Whether this refusal gets its own line.
    fn shown(&mut self, session: &SessionId, kind: &'static str, now: Instant) -> bool {
        // Looked up before inserting: no copy of the id per refusal.
        let windows = match self.windows.get_mut(session) {
            Some(windows) => windows,
            None => self.windows.entry(session.clone()).or_default(),
        };
        let at = windows.iter().position(|w| w.kind == kind).unwrap_or_else(|| {
            windows.push(RefusalWindow::new(kind, now));
            windows.len() - 1
        });
        let window = &mut windows[at];
        if now.duration_since(window.started) >= REFUSAL_LINE_WINDOW {
            report_hidden(session, window);
            *window = RefusalWindow::new(kind, now);
        }
        if window.shown < REFUSAL_LINES_PER_WINDOW {
            window.shown += 1;
            true
        } else {
            window.hidden += 1;
            false
        }
    }

    /// Logs the counts of windows that have ended, and forgets them.
    fn report_ended(&mut self, now: Instant) {
        self.windows.retain(|session, windows| {
            windows.retain(|window| {
                let ended = now.duration_since(window.started) >= REFUSAL_LINE_WINDOW;
                if ended {
                    report_hidden(session, window);
                }
                !ended
            });
            !windows.is_empty()
        });
    }
}

fn report_hidden(session: &SessionId, window: &RefusalWindow) {
    if window.hidden > 0 {
        tracing::warn!(session = %session, kind = window.kind, count = window.hidden, "refusals not logged one by one (more than a few a second); each is in the session's record");
    }
}

fn record(sessions: &Sessions, log: &SessionLog, event: &KernelEvent, refusals: &mut RefusalLines) {
    let origin = event.origin();
    let Some(attribution) = sessions.attribute(event) else {
        tracing::debug!(cgroup_id = origin.cgroup_id, "event for a cgroup with no session");
        return;
    };
    let session = attribution.session;
    let decided = attribution.rule.as_ref();
    // Where a grant's rules decided: the session log counts them as their use.
    let by_grant = decided.filter(|d| !d.rules().is_empty());
    let grant_rules = by_grant.map(Decided::rules);
    // Each kind's detail is typed and serialized here, on the reader, so
    // the log's writer gets one string to store (see `Detail::json`).
    let (kind, verdict, detail) = match event {
        KernelEvent::Exec { ppid, uid, verdict, filename, filename_truncated, argv, argv_truncated, .. } => {
            if *verdict != Verdict::Allow && refusals.shown(&session, "exec", Instant::now()) {
                tracing::warn!(session = %session, pid = origin.pid, filename, "exec denied");
            }
            let fields = ExecDetail {
                // The creator, if we saw the fork, even when the process has since been reparented.
                ppid: attribution.creator.unwrap_or(*ppid),
                parent_at_exec: *ppid,
                uid: *uid,
                filename,
                filename_truncated: *filename_truncated,
                argv,
                argv_truncated: *argv_truncated,
                rule: by_grant.map(Decided::text_json),
                grant_rules: by_grant.map(Decided::rules_json),
            };
            (EventKind::Exec, Some(*verdict), detail_of(&fields, grant_rules))
        }
        KernelEvent::Fork { child_pid, .. } => {
            (EventKind::Fork, None, detail_of(&ForkDetail { child_pid: *child_pid }, None))
        }
        KernelEvent::Exit { code, signal, .. } => {
            (EventKind::Exit, None, detail_of(&ExitDetail { exit_code: *code, signal: *signal }, None))
        }
        KernelEvent::Connect { verdict, addr, port, family, protocol, send, .. } => {
            if *verdict == Verdict::Deny && refusals.shown(&session, "connect", Instant::now()) {
                tracing::info!(session = %session, pid = origin.pid, %addr, port, "connect denied");
            }
            let fields = ConnectDetail {
                rule: decided.map(Decided::text_json),
                grant_rules: by_grant.map(Decided::rules_json),
                family: *family,
                addr: *addr,
                port: *port,
                protocol,
                send: *send,
            };
            (EventKind::Connect, Some(*verdict), detail_of(&fields, grant_rules))
        }
        KernelEvent::Socket { family, sock_type, protocol, .. } => {
            if refusals.shown(&session, "socket", Instant::now()) {
                tracing::info!(session = %session, pid = origin.pid, family, sock_type, protocol, "socket refused");
            }
            let fields = SocketDetail { family: *family, sock_type: *sock_type, protocol: *protocol };
            (EventKind::Socket, Some(Verdict::Deny), detail_of(&fields, None))
        }
    };
    match detail {
        Ok(detail) => log.kernel_event(
            session,
            origin.boot_ns,
            origin.pid,
            RecordKind::Kernel(kind),
            verdict.map(RecordVerdict::Kernel),
            detail,
        ),
        Err(e) => tracing::error!(session = %session, error = %e, kind = ?kind, "cannot record a kernel event"),
    }
}

/// `fields` as a record's detail, naming the `grant_rules` that decided.
fn detail_of<T: serde::Serialize>(fields: &T, grant_rules: Option<&[RuleRef]>) -> serde_json::Result<Detail> {
    let named = grant_rules.unwrap_or_default().iter().map(|r| (r.grant.clone(), r.rule.clone())).collect();
    Detail::json(fields, named)
}

/// An exec's detail. The details below are typed, not maps (an allocation
/// per key and value, freed on the writer's thread); their fields keep the
/// order the maps had, so records old and new read alike.
#[derive(serde::Serialize)]
struct ExecDetail<'a> {
    ppid: u32,
    parent_at_exec: u32,
    uid: u32,
    filename: &'a str,
    filename_truncated: bool,
    argv: &'a [String],
    argv_truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_rules: Option<&'a RawValue>,
}

/// A fork's detail.
#[derive(serde::Serialize)]
struct ForkDetail {
    child_pid: u32,
}

/// An exit's detail.
#[derive(serde::Serialize)]
struct ExitDetail {
    exit_code: Option<u8>,
    signal: Option<u8>,
}

/// A refused socket's detail.
#[derive(serde::Serialize)]
struct SocketDetail {
    family: u32,
    #[serde(rename = "type")]
    sock_type: u32,
    protocol: u32,
}

/// A connect's detail: the hottest record. `rule` is always there (null
/// when none decided), and `grant_rules` follows it when a grant's rules
/// did; both are the decided rule's JSON, made once (see [`Decided`]).
#[derive(serde::Serialize)]
struct ConnectDetail<'a> {
    rule: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_rules: Option<&'a RawValue>,
    family: u8,
    addr: std::net::IpAddr,
    port: u16,
    protocol: &'a str,
    send: bool,
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

/// Reports, once a second, what the kernel could not deliver (see
/// [`crate::session::LostEvents`]); a session's end reports its own first.
pub async fn watch_lost(sessions: Arc<Sessions>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        sessions.report_lost();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;

    /// The typed exec, fork, exit and socket details are the JSON their maps
    /// used to be, key for key and in the same order.
    #[test]
    fn process_and_socket_details_are_the_json_the_maps_made() {
        let rules = [RuleRef::new("ci-exec", "exec.allow /usr/bin/git")];
        let decided = Decided::new(rules.to_vec());
        let argv = vec!["git".to_owned(), "say \"hi\"\n\u{1}".to_owned(), "caf\u{e9}".to_owned()];
        for with_rules in [true, false] {
            let fields = ExecDetail {
                ppid: 7,
                parent_at_exec: 1,
                uid: 1000,
                filename: "/usr/bin/git",
                filename_truncated: false,
                argv: &argv,
                argv_truncated: true,
                rule: with_rules.then(|| decided.text_json()),
                grant_rules: with_rules.then(|| decided.rules_json()),
            };
            let mut map = Map::new();
            map.insert("ppid".into(), 7.into());
            map.insert("parent_at_exec".into(), 1.into());
            map.insert("uid".into(), 1000.into());
            map.insert("filename".into(), "/usr/bin/git".into());
            map.insert("filename_truncated".into(), false.into());
            map.insert("argv".into(), json!(argv));
            map.insert("argv_truncated".into(), true.into());
            if with_rules {
                map.insert("rule".into(), "ci-exec: exec.allow /usr/bin/git".into());
                map.insert("grant_rules".into(), json!(rules));
            }
            let typed = detail_of(&fields, with_rules.then_some(&rules[..])).expect("JSON");
            assert_eq!(typed.text().expect("text"), serde_json::to_string(&map).expect("JSON"), "rules: {with_rules}");
            assert_eq!(typed.grant_rules(), Detail::from(map).grant_rules());
        }
        fn text<T: serde::Serialize>(fields: &T) -> String {
            detail_of(fields, None).expect("JSON").text().expect("text").into_owned()
        }
        assert_eq!(text(&ForkDetail { child_pid: 42 }), r#"{"child_pid":42}"#);
        assert_eq!(text(&ExitDetail { exit_code: Some(3), signal: None }), r#"{"exit_code":3,"signal":null}"#);
        assert_eq!(
            text(&SocketDetail { family: 17, sock_type: 3, protocol: 768 }),
            r#"{"family":17,"type":3,"protocol":768}"#
        );
        let exit = Map::from_iter([("exit_code".to_owned(), Value::Null), ("signal".to_owned(), 9.into())]);
        assert_eq!(serde_json::to_string(&exit).expect("JSON"), text(&ExitDetail { exit_code: None, signal: Some(9) }));
    }

    /// The typed connect detail is the JSON its map used to be, key for key
    /// and in the same order, so records old and new read alike.
    #[test]
    fn a_connect_detail_is_the_json_the_map_made() {
        let rules = [RuleRef::new("ci-net", "network.allow 10.0.0.0/8")];
        let decided = Decided::new(rules.to_vec());
        let fields = ConnectDetail {
            rule: Some(decided.text_json()),
            grant_rules: Some(decided.rules_json()),
            family: 6,
            addr: "2001:db8::1".parse().expect("an address"),
            port: 443,
            protocol: "tcp",
            send: false,
        };
        // The map a connect to [2001:db8::1]:443 made, decided by `rules`.
        let map_of = |rule: &str, rules: &[RuleRef]| {
            let mut map = Map::new();
            map.insert("rule".into(), rule.into());
            map.insert("grant_rules".into(), json!(rules));
            map.insert("family".into(), 6.into());
            map.insert("addr".into(), "2001:db8::1".into());
            map.insert("port".into(), 443.into());
            map.insert("protocol".into(), "tcp".into());
            map.insert("send".into(), false.into());
            map
        };
        let map = map_of("ci-net: network.allow 10.0.0.0/8", &rules);
        let typed = Detail::json(&fields, vec![("ci-net".into(), "network.allow 10.0.0.0/8".into())]).expect("JSON");
        assert_eq!(typed.text().expect("text"), serde_json::to_string(&map).expect("JSON"));
        assert_eq!(typed.grant_rules(), Detail::from(map).grant_rules());

        // A child session's connect: a rule of each level, innermost first,
        // made into JSON once, as the map would have made it.
        let chain = [
            RuleRef::new("sub-agent", "network.allow 10.1.0.0/16"),
            RuleRef::new("ci-net", "network.allow 10.0.0.0/8"),
        ];
        let both = Decided::new(chain.to_vec());
        let fields = ConnectDetail { rule: Some(both.text_json()), grant_rules: Some(both.rules_json()), ..fields };
        let map = map_of("sub-agent: network.allow 10.1.0.0/16 & ci-net: network.allow 10.0.0.0/8", &chain);
        assert_eq!(serde_json::to_string(&fields).expect("JSON"), serde_json::to_string(&map).expect("JSON"));

        // No rule decided: `rule` is null and there is no `grant_rules`.
        let fields = ConnectDetail { rule: None, grant_rules: None, ..fields };
        let text = serde_json::to_string(&fields).expect("JSON");
        assert_eq!(text, r#"{"rule":null,"family":6,"addr":"2001:db8::1","port":443,"protocol":"tcp","send":false}"#);
    }

    /// A few refusals a second per session and kind get a line each; the
    /// rest are counted, and the count goes once the second has ended.
    #[test]
    fn refusal_lines_are_a_few_a_second_per_session_and_kind() {
        let mut lines = RefusalLines::default();
        let (flood, quiet): (SessionId, SessionId) =
            ("s-00000000000000aa".parse().expect("id"), "s-00000000000000bb".parse().expect("id"));
        let start = Instant::now();
        let shown = (0..100).filter(|_| lines.shown(&flood, "connect", start)).count();
        assert_eq!(shown, REFUSAL_LINES_PER_WINDOW as usize);
        assert!(lines.shown(&flood, "exec", start), "another kind has lines of its own");
        assert!(lines.shown(&quiet, "connect", start), "another session has lines of its own");
        let hidden = |lines: &RefusalLines, session: &SessionId, kind: &str| {
            lines.windows.get(session).and_then(|w| w.iter().find(|w| w.kind == kind)).map(|w| w.hidden)
        };
        assert_eq!(hidden(&lines, &flood, "connect"), Some(95));

        // Within the second nothing ends; after it, every window is reported and forgotten.
        lines.report_ended(start + REFUSAL_LINE_WINDOW / 2);
        assert_eq!(hidden(&lines, &flood, "connect"), Some(95));
        lines.report_ended(start + REFUSAL_LINE_WINDOW);
        assert!(lines.windows.is_empty());

        // A refusal after the window opens a new one, with lines again.
        let later = start + REFUSAL_LINE_WINDOW * 2;
        let shown = (0..10).filter(|_| lines.shown(&flood, "connect", later)).count();
        assert_eq!(shown, REFUSAL_LINES_PER_WINDOW as usize);
        assert!(lines.shown(&flood, "connect", later + REFUSAL_LINE_WINDOW), "the next window shows lines again");
        assert_eq!(hidden(&lines, &flood, "connect"), Some(0));
    }
}
