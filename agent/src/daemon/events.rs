//! Kernel events to session log records.

use std::sync::{Arc, atomic::Ordering};

use aya::maps::{MapData, RingBuf};
use serde_json::{Map, Value, json};
use tokio::io::unix::AsyncFd;
use tollgate_common::Verdict;

use super::Daemon;
use crate::{
    bpf::events::{self, KernelEvent},
    store::{EventRecord, rfc3339},
};

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Killed => "killed",
        Verdict::Redirect => "redirect",
    }
}

/// Reads the ring buffer for as long as the daemon runs.
pub async fn read(daemon: Arc<Daemon>, mut ring: AsyncFd<RingBuf<MapData>>) -> anyhow::Result<()> {
    loop {
        let mut guard = ring.readable_mut().await?;
        let buffer = guard.get_inner_mut();
        while let Some(item) = buffer.next() {
            match events::decode(&item) {
                Ok(event) => daemon.record(event),
                Err(e) => tracing::error!(error = %e, "undecodable kernel event"),
            }
        }
        guard.clear_ready();
    }
}

impl Daemon {
    fn record(&self, event: KernelEvent) {
        let origin = event.origin();
        let mut state = self.state();
        let Some(session) = state.registry.session_of(origin.cgroup_id) else {
            tracing::debug!(cgroup_id = origin.cgroup_id, "event for a cgroup with no session");
            return;
        };
        let mut detail = Map::new();
        let (kind, verdict) = match &event {
            KernelEvent::Exec { ppid, uid, verdict, filename, filename_truncated, argv, argv_truncated, .. } => {
                // The creator, if we saw the fork, even when the process has since been reparented.
                let creator = state
                    .registry
                    .get_mut(origin.cgroup_id)
                    .and_then(|s| s.creators.get(&origin.pid).copied())
                    .unwrap_or(*ppid);
                detail.insert("ppid".into(), creator.into());
                detail.insert("parent_at_exec".into(), (*ppid).into());
                detail.insert("uid".into(), (*uid).into());
                detail.insert("filename".into(), filename.clone().into());
                detail.insert("filename_truncated".into(), (*filename_truncated).into());
                detail.insert("argv".into(), json!(argv));
                detail.insert("argv_truncated".into(), (*argv_truncated).into());
                if *verdict != Verdict::Allow {
                    tracing::warn!(session = %session, pid = origin.pid, filename, "exec denied");
                }
                ("exec", Some(verdict_name(*verdict)))
            }
            KernelEvent::Fork { child_pid, .. } => {
                if let Some(active) = state.registry.get_mut(origin.cgroup_id) {
                    active.creators.insert(*child_pid, origin.pid);
                }
                detail.insert("child_pid".into(), (*child_pid).into());
                ("fork", None)
            }
            KernelEvent::Exit { code, signal, .. } => {
                if let Some(active) = state.registry.get_mut(origin.cgroup_id) {
                    active.creators.remove(&origin.pid);
                }
                detail.insert("exit_code".into(), code.map_or(Value::Null, Value::from));
                detail.insert("signal".into(), signal.map_or(Value::Null, Value::from));
                ("exit", None)
            }
            KernelEvent::Connect { verdict, addr, port, family, protocol, send, rule_id, .. } => {
                let rule = rule_id.and_then(|id| {
                    state.registry.get_mut(origin.cgroup_id).and_then(|s| s.rules.rules.get(id as usize).cloned())
                });
                detail.insert("rule".into(), rule.map_or(Value::Null, Value::from));
                detail.insert("family".into(), (*family).into());
                detail.insert("addr".into(), addr.to_string().into());
                detail.insert("port".into(), (*port).into());
                detail.insert("protocol".into(), protocol.clone().into());
                detail.insert("send".into(), (*send).into());
                if *verdict == Verdict::Deny {
                    tracing::info!(session = %session, pid = origin.pid, %addr, port, "connect denied");
                }
                ("connect", Some(verdict_name(*verdict)))
            }
            KernelEvent::Socket { family, sock_type, protocol, .. } => {
                detail.insert("family".into(), (*family).into());
                detail.insert("type".into(), (*sock_type).into());
                detail.insert("protocol".into(), (*protocol).into());
                tracing::info!(session = %session, pid = origin.pid, family, sock_type, protocol, "socket refused");
                ("socket", Some("deny"))
            }
        };
        drop(state);
        self.writer.event(
            session,
            EventRecord {
                at: rfc3339(self.clock.wall(origin.boot_ns)),
                kind: kind.to_owned(),
                pid: origin.pid,
                verdict: verdict.map(str::to_owned),
                detail,
            },
        );
    }
}

/// Forwards what the programs log (through `aya-log`) into the daemon's log.
pub async fn forward_kernel_log(logger: crate::bpf::KernelLogger) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer fd and lives inside the AsyncFd.
    let mut logger =
        unsafe { AsyncFd::register(logger) }.map_err(|e| anyhow::anyhow!("cannot poll the eBPF log: {e}"))?;
    loop {
        let mut guard = logger.readable_mut().await?;
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// Reports events the kernel could not deliver (ring buffer full): logged,
/// recorded, and counted in `tollgate status`. Never silent.
pub async fn watch_lost(daemon: Arc<Daemon>) -> anyhow::Result<()> {
    let mut seen = vec![0u64; tollgate_common::LOST_SLOTS as usize];
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = daemon.state().enforcer.lost_events();
        for (slot, (&count, previous)) in now.iter().zip(seen.iter_mut()).enumerate() {
            if count > *previous {
                let lost = count - *previous;
                let kind = events::kind_name(slot);
                tracing::error!(kind, lost, "kernel events lost: the ring buffer was full");
                daemon.writer.lost(kind, lost);
                daemon.lost[slot].fetch_add(lost, Ordering::Relaxed);
                *previous = count;
            }
        }
    }
}
