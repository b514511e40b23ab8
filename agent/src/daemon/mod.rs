//! The daemon: loads policy and programs, serves the control socket, turns
//! kernel events into session log records, ends sessions whose last process
//! has exited, and cleans up on SIGTERM.

mod clock;
mod events;
mod mounts;
mod review;
mod sessions;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    bpf::{Enforcer, ExecEnforcement},
    config::Config,
    identity::{Verifier, dev},
    policy::PolicySet,
    session::{Registry, cgroup},
    store::{Reader, Writer, WriterHandle},
};

pub use clock::BootClock;
pub use sessions::Caller;

/// Where a process runs, as far as sessions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Outside every session of this daemon.
    Outside,
    /// Inside a session (named, when the cgroup is one this daemon made).
    Inside(Option<crate::store::SessionId>),
}

/// Everything the daemon's tasks share.
pub struct Daemon {
    config: Config,
    policies: PolicySet,
    verifier: Verifier,
    tree: cgroup::CgroupTree,
    mount: PathBuf,
    host: String,
    state: Mutex<State>,
    writer: WriterHandle,
    reader: Reader,
    clock: BootClock,
    mode: ExecEnforcement,
    lsm_reason: Option<String>,
    /// Requests held for a reviewer.
    approvals: crate::approval::Approvals,
    /// Notices for the approval webhook, posted by one worker thread.
    webhook_queue: std::sync::OnceLock<std::sync::mpsc::SyncSender<serde_json::Value>>,
    /// Set when the daemon begins to stop: no new sessions after that.
    closing: std::sync::atomic::AtomicBool,
    /// Events the kernel could not deliver, per event kind slot.
    lost: [AtomicU64; tollgate_common::LOST_SLOTS as usize],
}

struct State {
    enforcer: Enforcer,
    registry: Registry,
}

impl Daemon {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not stop enforcement bookkeeping.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The session log reader.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// Where `pid` runs, from one read of `/proc/PID/cgroup`: outside the
    /// sessions, or inside (with its session when it can be named). A process
    /// that cannot be placed counts as inside: fail closed.
    pub fn placement(&self, pid: u32) -> Placement {
        let Some(path) = cgroup::of_process(pid) else { return Placement::Inside(None) };
        let full = self.mount.join(path.trim_start_matches('/'));
        match full.strip_prefix(&self.tree.sessions) {
            Ok(relative) => Placement::Inside(
                relative.components().next().and_then(|c| c.as_os_str().to_str()).and_then(|name| name.parse().ok()),
            ),
            Err(_) => Placement::Outside,
        }
    }

    /// Held requests.
    pub fn approvals(&self) -> &crate::approval::Approvals {
        &self.approvals
    }

    /// Where a connection the proxy accepted was going (the kernel's entry is taken).
    pub fn take_original(&self, key: &tollgate_common::ConnectionKey) -> Option<tollgate_common::OriginalDst> {
        self.state().enforcer.take_original(key)
    }

    /// The session and route of a redirected connection.
    pub fn governed_connection(
        &self,
        cgroup_id: u64,
        rule_id: u32,
        destination: std::net::SocketAddr,
    ) -> Option<crate::proxy::Governed> {
        let mut state = self.state();
        let session = state.registry.get_mut(cgroup_id)?;
        let route = session.rules.routes.get(&rule_id)?.clone();
        Some(crate::proxy::Governed {
            uid: session.uid,
            session: session.id.clone(),
            identity: session.identity.clone(),
            subject: session.subject.clone(),
            destination,
            rule_name: session.rules.rules.get(rule_id as usize).cloned().unwrap_or_default(),
            route: Arc::new(route),
        })
    }

    /// Records something the proxy saw or decided.
    pub fn record_proxy_event(
        &self,
        session: &crate::store::SessionId,
        kind: &str,
        verdict: &str,
        detail: serde_json::Map<String, serde_json::Value>,
    ) {
        self.writer.event(
            session.clone(),
            crate::store::EventRecord {
                at: crate::store::rfc3339(std::time::SystemTime::now()),
                kind: kind.to_owned(),
                // The proxy sees a connection, not a process.
                pid: 0,
                verdict: Some(verdict.to_owned()),
                detail,
            },
        );
    }

    /// True when `pid` runs inside one of this daemon's sessions.
    pub fn is_governed(&self, pid: u32) -> bool {
        matches!(self.placement(pid), Placement::Inside(_))
    }

    /// What `tollgate status` shows.
    pub fn status(&self) -> serde_json::Value {
        let sessions_active = self.state().registry.active_count();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "exec_enforcement": self.mode.as_str(),
            "lsm_unavailable": self.lsm_reason,
            "sessions_active": sessions_active,
            "events_lost": self.lost.iter().map(|n| n.load(Ordering::Relaxed)).sum::<u64>() + self.writer.dropped(),
            "events_lost_by_kind": self.lost.iter().enumerate().skip(1)
                .map(|(slot, n)| (crate::bpf::events::kind_name(slot), n.load(Ordering::Relaxed)))
                .chain([("log_queue", self.writer.dropped())])
                .collect::<std::collections::BTreeMap<_, _>>(),
            "cgroup": self.tree.root.display().to_string(),
            "sessions_cgroup": self.tree.sessions.display().to_string(),
            "policy_files": self.policies.files.len(),
            "identities": self.policies.identities.len(),
            "grants": self.policies.grants.len(),
            "dev_issuer": self.config.dev_issuer,
            "state_dir": self.config.state_dir.display().to_string(),
        })
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("the daemon must run as root (it loads eBPF programs and manages cgroups)");
    }
    let policies = PolicySet::load(&config.policies).context("policies did not load")?;
    mounts::ensure()?;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state directory {}", config.state_dir.display()))?;

    let dev_jwks = if config.dev_issuer {
        let key = dev::ensure_key(&Config::dev_key_path(&config.state_dir))?;
        tracing::warn!(
            "the dev issuer is trusted (dev_issuer: true): anyone who can read the state directory can mint tokens"
        );
        Some(dev::jwks(&key)?)
    } else {
        None
    };
    let verifier = Verifier::new(&config.issuers, dev_jwks);

    // The socket first: a second daemon on the same config must stop here,
    // before it touches the cgroups of the one already running.
    let listener = crate::api::server::bind(&config.socket)?;
    let mount = cgroup::cgroup2_mount()?;
    let tree = cgroup::CgroupTree::create(&mount, &config.cgroup)?;
    // If starting fails from here on, nothing was started: leave no cgroup
    // behind (declared before the enforcer, so its programs detach first).
    let _cleanup = TreeCleanup(tree.clone());
    let mut enforcer = Enforcer::load(&tree.sessions, config.event_buffer_kib * 1024, config.proxy_port)
        .context("cannot load the eBPF programs")?;
    let mode = enforcer.exec_enforcement();
    let lsm_reason = enforcer.lsm_unavailable_reason().map(str::to_owned);
    match &lsm_reason {
        None => tracing::info!(mode = mode.as_str(), "exec enforcement: denied execs fail with EPERM"),
        Some(why) => {
            tracing::warn!(mode = mode.as_str(), reason = %why, "exec enforcement: BPF LSM unavailable, denied execs are killed before the new image runs")
        }
    }
    let ring = enforcer.take_events().context("event ring buffer missing")?;
    let kernel_log = enforcer.take_logger();

    let writer = Writer::start(&config.database_path(), config.flush_interval())?;
    let reader = Reader::new(&config.database_path());
    let proxy_listeners = crate::proxy::bind(config.proxy_port).await?;

    let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into());
    let daemon = Arc::new(Daemon {
        policies,
        verifier,
        tree,
        mount,
        host,
        state: Mutex::new(State { enforcer, registry: Registry::default() }),
        writer: writer.handle(),
        reader,
        clock: BootClock::now(),
        mode,
        lsm_reason,
        lost: Default::default(),
        closing: Default::default(),
        approvals: crate::approval::Approvals::new(config.approval_timeout),
        webhook_queue: std::sync::OnceLock::new(),
        config,
    });
    tracing::info!(
        socket = %daemon.config.socket.display(),
        cgroup = %daemon.tree.sessions.display(),
        policies = daemon.policies.files.len(),
        "tollgate daemon ready"
    );

    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until
    // the reader task ends, so the fd stays valid while registered.
    let ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("cannot poll the event ring buffer: {e}"))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(events::read(daemon.clone(), ring));
    tasks.spawn(sessions::reap(daemon.clone()));
    tasks.spawn(events::watch_lost(daemon.clone()));
    tasks.spawn(crate::api::server::serve(daemon.clone(), listener));
    tasks.spawn(crate::proxy::serve(daemon.clone(), proxy_listeners));
    if let Some(logger) = kernel_log {
        tasks.spawn(events::forward_kernel_log(logger));
    }

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let outcome = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        Some(done) = tasks.join_next() => match done {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Err(anyhow::anyhow!("a daemon task stopped unexpectedly")),
            Err(e) => Err(anyhow::anyhow!("a daemon task panicked: {e}")),
        },
    };
    tracing::info!("stopping");
    // Sessions first, while the event reader still runs to record their ends.
    sessions::shutdown(&daemon).await;
    tokio::time::sleep(REAP_INTERVAL * 2).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&daemon.config.socket);
    daemon.writer.flush();
    let tree = daemon.tree.clone();
    drop(daemon);
    drop(writer);
    // Programs detach when the enforcer drops, before the cgroups go.
    tree.remove();
    outcome
}

/// Removes the daemon's cgroup subtree when dropped (it fails quietly if
/// the subtree is busy or already gone).
struct TreeCleanup(cgroup::CgroupTree);

impl Drop for TreeCleanup {
    fn drop(&mut self) {
        self.0.remove();
    }
}

/// How often session cgroups are checked for their last process.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);
