//! The daemon: only the wiring. It loads policy and programs, builds the
//! handles each concern works through ([`Sessions`], [`SessionLog`],
//! [`Reviews`], the proxy's and the control socket's contexts), runs the
//! event pump, and cleans up on SIGTERM.

mod events;
mod heartbeat;
mod mounts;
mod notify;
mod reload;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use anyhow::Context;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    api::server::Control,
    approval::Reviews,
    bpf::{
        self,
        pins::{Found, PinDir},
    },
    config::Config,
    identity::{Verifier, dev},
    policy::PolicySet,
    proxy::ProxyCtx,
    session::{Gap, LeftOpen, LostEvents, LostTotals, REAP_INTERVAL, Sessions, SessionsParts, cgroup},
    store::{Reader, SessionLog, Writer, ledger::LedgerKey},
};

/// What `tollgate status` shows.
fn status(
    config: &Config,
    sessions: &Sessions,
    log: &SessionLog,
    lost: &LostTotals,
    lsm_unavailable: Option<&str>,
    pinning: &Pinning,
    otlp: Option<&crate::export::otlp::Progress>,
) -> serde_json::Value {
    let lost_now = |slot: usize| lost[slot].load(Ordering::Relaxed);
    let policies = sessions.policies();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "exec_enforcement": sessions.exec_enforcement().as_str(),
        "lsm_unavailable": lsm_unavailable,
        "sessions_active": sessions.active_count(),
        "events_lost": (0..lost.len()).map(lost_now).sum::<u64>() + log.dropped(),
        "events_lost_by_kind": (1..lost.len())
            .map(|slot| (bpf::events::kind_name(slot), lost_now(slot)))
            .chain([("log_queue", log.dropped())])
            .collect::<BTreeMap<_, _>>(),
        "cgroup": sessions.tree().root.display().to_string(),
        "sessions_cgroup": sessions.tree().sessions.display().to_string(),
        "policy_files": policies.files.len(),
        "policy_file_paths": policies.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "policies_loaded_at": crate::store::rfc3339(sessions.loaded().at),
        "identities": policies.identities.len(),
        "grants": policies.grants.len(),
        "enforcement_survives_daemon": pinning.survives,
        "pinning_unavailable": pinning.unavailable,
        "dev_issuer": config.dev_issuer,
        "state_dir": config.state_dir.display().to_string(),
        "child_ptrace_confined": ptrace_confined(),
        "otlp": otlp.map(|progress| serde_json::json!({
            "endpoint": config.otlp_endpoint,
            "exported_through": progress.exported_through.load(Ordering::Relaxed),
            "backlog": progress.backlog.load(Ordering::Relaxed),
            "skipped": progress.skipped.load(Ordering::Relaxed),
        })),
        "ledger_public_key": std::fs::read_to_string(crate::store::ledger::public_path(&Config::ledger_key_path(&config.state_dir)))
            .map(|key| key.trim().to_owned())
            .ok(),
    })
}

/// Prunes sessions past `retention` now and then on a schedule (every hour,
/// or half the retention when that is shorter).
/// Records the OTLP exporter has not sent yet are kept, unless it is more
/// than `backlog_max` behind.
async fn prune(
    log: SessionLog,
    retention: std::time::Duration,
    otlp: Option<Arc<crate::export::otlp::Progress>>,
    backlog_max: u64,
) -> anyhow::Result<()> {
    let every = (retention / 2).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let not_after = otlp.as_ref().and_then(|progress| {
            let behind = u64::try_from(progress.backlog.load(Ordering::Relaxed)).unwrap_or(0);
            (behind <= backlog_max).then(|| progress.exported_through.load(Ordering::Relaxed))
        });
        if let Some(cutoff) = std::time::SystemTime::now().checked_sub(retention) {
            log.prune(cutoff, not_after);
        }
    }
}

/// Whether Yama stops a process from ptracing anything but its own
/// descendants (`ptrace_scope` 1 or more). Without it, a child session's
/// processes can ptrace their parent session's (same uid) and act with the
/// parent's wider rights.
fn ptrace_confined() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|scope| scope.trim().parse::<u32>().ok())
        .is_some_and(|scope| scope >= 1)
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the
/// configuration at `config_path` and its policies.
pub async fn run(config: Config, config_path: PathBuf) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("the daemon must run as root (it loads eBPF programs and manages cgroups)");
    }
    // Taken over before anything is made: a stop asked for while the daemon
    // starts waits until it can clean up, where the default action would
    // kill it and leave its cgroups and pinned programs behind.
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut handover = tokio::signal::unix::signal(SignalKind::user_defined2())?;
    let mut hangup = tokio::signal::unix::signal(SignalKind::hangup())?;
    let policies = PolicySet::load(&config.policies).context("policies did not load")?;
    mounts::ensure();
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create state directory {}", config.state_dir.display()))?;
    // The session log and the dev issuer's key live here: root only, whatever the umask.
    std::fs::set_permissions(&config.state_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("cannot make state directory {} root-only", config.state_dir.display()))?;

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
    let cleanup = TreeCleanup(Some(tree.clone()));
    // Pinned, enforcement outlives this process; an earlier daemon's pins
    // mean its sessions were governed while none ran, and can be adopted.
    let (pins, pinning_unavailable) = match PinDir::open(&config.cgroup) {
        Ok(pins) => (Some(pins), None),
        Err(why) => {
            tracing::error!(reason = %why, "cannot pin the eBPF programs: enforcement ends with this daemon, and sessions left by an earlier one are killed");
            (None, Some(why))
        }
    };
    let found = pins.as_ref().map_or(Found::Nothing, PinDir::found);
    // An earlier daemon's loss counters, reused, already went into records
    // as far as it reported them; fresh ones (another layout) did not.
    let losses_carried = pins.as_ref().is_some_and(|pins| pins.map("LOST").exists());
    // Pins this start made are removed if it fails; an earlier daemon's stay.
    let mut unpin_on_failure = PinCleanup(pins.clone().filter(|_| found == Found::Nothing));
    let loaded = bpf::load(&tree.sessions, config.event_buffer_kib * 1024, config.proxy_port, pins)
        .context("cannot load the eBPF programs")?;
    let bpf::Loaded {
        programs,
        session_maps,
        originals,
        lost,
        consumed,
        backlog,
        events: ring,
        logger,
        mode,
        lsm_unavailable,
    } = loaded;
    match &lsm_unavailable {
        None => tracing::info!(mode = mode.as_str(), "exec enforcement: denied execs fail with EPERM"),
        Some(why) => {
            tracing::warn!(mode = mode.as_str(), reason = %why, "exec enforcement: BPF LSM unavailable, denied execs are killed before the new image runs")
        }
    }

    let ledger_key = LedgerKey::ensure(&Config::ledger_key_path(&config.state_dir))?;
    let writer =
        Writer::start(&config.database_path(), config.flush_interval(), Some(ledger_key), config.log_queue_records)?;
    let log = SessionLog::new(writer.handle());
    let reader = Reader::new(&config.database_path());
    let proxy_listeners = crate::proxy::bind(config.proxy_port).await?;

    let host = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into());
    let host_name = host.clone();
    let policy_files = policies.files.len();
    let max_depth = config.delegation.max_depth;
    if !ptrace_confined() {
        tracing::warn!(
            "Yama ptrace_scope is 0 or absent: a child session's processes could ptrace their parent session's (same uid) and use its wider rights; set kernel.yama.ptrace_scope=1 where child sessions must stay narrow"
        );
    }
    let loaded = crate::session::Loaded::new(policies, verifier);
    let lost_totals: Arc<LostTotals> = Arc::default();
    let lost = LostEvents::new(lost, lost_totals.clone(), losses_carried);
    let parts = SessionsParts { tree, mount, host, mode, log: log.clone(), max_depth, lost };
    let sessions = Arc::new(Sessions::new(parts, loaded, session_maps));
    // Before adoption, so adopted sessions are watched too.
    match crate::session::EmptiedWatch::new() {
        Ok(watch) => sessions.set_emptied_watch(Arc::new(watch)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch sessions' cgroups (inotify); sessions end at the reap tick after their last process")
        }
    }
    // Before adoption: adopted sessions get resolvers of their own too.
    if config.dns.enabled {
        let dns =
            crate::dns::Dns::start(sessions.clone(), log.clone(), config.dns.upstream.clone(), config.dns.min_ttl);
        sessions.set_resolvers(dns);
    }
    {
        let (sessions, reader) = (sessions.clone(), reader.clone());
        tokio::task::spawn_blocking(move || sessions.load_grants(&reader))
            .await
            .context("reading grant state from the session log")?
            .context("reading grant state from the session log")?;
    }
    // What an earlier daemon left is adopted or closed before any event is
    // read, so events it left in the (pinned) ring buffer find their session.
    let gap = Gap { enforced: found == Found::Enforcing, last_alive: heartbeat::last(&config.state_dir) };
    let left_open: Vec<LeftOpen> = {
        let reader = reader.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<LeftOpen>, crate::store::StoreError> {
            let open: Vec<_> = reader.sessions()?.into_iter().filter(|record| record.ended_at.is_none()).collect();
            let ids: Vec<_> = open.iter().map(|record| record.id.clone()).collect();
            let mut losses = reader.recorded_losses(&ids)?;
            Ok(open
                .into_iter()
                .map(|record| LeftOpen { losses: losses.remove(&record.id).unwrap_or_default(), record })
                .collect())
        })
        .await
        .context("reading the session log")?
        .context("reading the session log")?
    };
    sessions.recover(left_open, &gap).await;
    programs.retire_earlier_layouts();
    let survives = programs.pinned();
    let reviews = Arc::new(Reviews::new(
        config.approval_timeout,
        config.reviewers.clone(),
        config.approval_webhook.clone(),
        sessions.clone(),
        log.clone(),
    ));
    let proxy =
        Arc::new(ProxyCtx::new(sessions.clone(), reviews.clone(), log.clone(), originals, config.record_body_bytes));
    let otlp = config.otlp_endpoint.as_ref().map(|_| Arc::new(crate::export::otlp::Progress::default()));
    let config = Arc::new(config);
    let reviews_handle = reviews.clone();
    let control = Arc::new(Control {
        sessions: sessions.clone(),
        reviews,
        review_depth: config.delegation.review_depth,
        log: log.clone(),
        output_cap_bytes: config.output_cap_bytes,
        dns_upstreams: if config.dns.upstream.is_empty() {
            crate::dns::host_resolvers()
        } else {
            config.dns.upstream.clone()
        },
        ledger_key: LedgerKey::load(&Config::ledger_key_path(&config.state_dir)).ok().map(Arc::new),
        reader: reader.clone(),
        status: {
            let (config, sessions, log, lost_totals, otlp) =
                (config.clone(), sessions.clone(), log.clone(), lost_totals.clone(), otlp.clone());
            let pinning = Pinning { survives, unavailable: pinning_unavailable };
            Box::new(move || {
                status(&config, &sessions, &log, &lost_totals, lsm_unavailable.as_deref(), &pinning, otlp.as_deref())
            })
        },
    });
    // The report listener is bound before the daemon says it is ready: a
    // port or certificate problem stops the start with a clear error.
    let report_listener = match (&config.report_listen, &config.report_tls) {
        (Some(addr), Some(tls)) => {
            let acceptor = crate::api::pull::acceptor(tls)?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for report pulls on {addr}"))?;
            let pull = crate::api::pull::Pull { control: control.clone(), log: log.clone() };
            tracing::info!(listen = %addr, "report listener ready (HTTPS)");
            Some((Arc::new(pull), listener, acceptor))
        }
        _ => None,
    };
    // Loading the programs freed tens of MB that an idle daemon would keep.
    crate::memory::give_back_freed();
    tracing::info!(
        socket = %config.socket.display(),
        cgroup = %sessions.tree().sessions.display(),
        policies = policy_files,
        "tollgate daemon ready"
    );

    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd until
    // the reader task ends, so the fd stays valid while registered.
    let ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("cannot poll the event ring buffer: {e}"))?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(heartbeat::beat(config.state_dir.clone()));
    if let Some((pull, listener, acceptor)) = report_listener {
        tasks.spawn(crate::api::pull::serve(pull, listener, acceptor));
    }
    tasks.spawn(events::read(sessions.clone(), log.clone(), ring, consumed, backlog.clone()));
    tasks.spawn(sessions.clone().reap(backlog.clone()));
    tasks.spawn(sessions.clone().end_as_emptied(backlog));
    tasks.spawn(events::watch_lost(sessions.clone()));
    if let Some(retention) = config.retention {
        tasks.spawn(prune(log.clone(), retention, otlp.clone(), config.otlp_backlog_max));
    }
    if let (Some(endpoint), Some(progress)) = (&config.otlp_endpoint, &otlp) {
        let cursor = Config::otlp_cursor_path(&config.state_dir);
        tasks.spawn(crate::export::otlp::run(
            reader.clone(),
            endpoint.clone(),
            cursor,
            host_name.clone(),
            progress.clone(),
        ));
    }
    tasks.spawn(crate::api::server::serve(control, listener));
    tasks.spawn(crate::proxy::serve(proxy, proxy_listeners));
    if let Some(logger) = logger {
        tasks.spawn(events::forward_kernel_log(logger));
    }

    unpin_on_failure.0 = None;

    notify::ready();
    let (outcome, keep_sessions) = loop {
        tokio::select! {
            _ = term.recv() => break (Ok(()), false),
            _ = int.recv() => break (Ok(()), false),
            _ = handover.recv() => break (Ok(()), true),
            _ = hangup.recv() => {
                notify::reloading();
                reload::reload(&config, &config_path, &sessions, &reviews_handle).await;
                notify::ready();
            }
            Some(done) = tasks.join_next() => break (match done {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(anyhow::anyhow!("a daemon task stopped unexpectedly")),
                Err(e) => Err(anyhow::anyhow!("a daemon task panicked: {e}")),
            }, false),
        }
    };
    notify::stopping();
    // A handover leaves the sessions to the pinned programs and the next
    // daemon; without pins nothing would govern them, so they end instead.
    let keep_sessions = keep_sessions && survives;
    if keep_sessions {
        tracing::warn!(
            "stopping for a handover: sessions keep running, enforced by the pinned programs, until the next daemon adopts them"
        );
    } else {
        tracing::info!("stopping");
        // Sessions first, while the event reader still runs to record their ends.
        sessions.shutdown().await;
        tokio::time::sleep(REAP_INTERVAL * 2).await;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_file(&config.socket);
    log.checkpoint();
    log.flush();
    drop(sessions);
    drop(log);
    drop(writer);
    if keep_sessions {
        // The pins keep the programs attached and the maps alive.
        drop(programs);
        cleanup.keep();
        heartbeat::stop(&config.state_dir);
    } else {
        // Programs detach before the cgroups go.
        programs.release();
        drop(cleanup);
        heartbeat::remove(&config.state_dir);
    }
    outcome
}

/// Whether enforcement outlives the daemon, for `status`.
struct Pinning {
    survives: bool,
    unavailable: Option<String>,
}

/// Removes pins this start made if it fails before it is ready.
struct PinCleanup(Option<PinDir>);

impl Drop for PinCleanup {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take() {
            pins.remove();
        }
    }
}

/// Removes the daemon's cgroup subtree when dropped (it fails quietly if
/// the subtree is busy or already gone), unless told to keep it.
struct TreeCleanup(Option<cgroup::CgroupTree>);

impl TreeCleanup {
    /// Leaves the subtree for the next daemon (a handover).
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TreeCleanup {
    fn drop(&mut self) {
        if let Some(tree) = self.0.take() {
            tree.remove();
        }
    }
}
