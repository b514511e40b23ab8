//! A `tollgate daemon` started for one test, and the CLI calls tests make against it.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use tempfile::TempDir;

use crate::process::{RunOutput, run_with_timeout};
use crate::session_log::{parse_rfc3339, pretty};
use crate::{tollgate_bin, unique_tag};

/// How long the daemon may take to answer `status` after being spawned (it loads BPF programs).
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Upper bound for any single CLI call or governed command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Events may reach the session log up to about a second after the fact; allow ample slack.
const LOG_POLL_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Where an extra issuer's signing keys come from.
pub enum Jwks {
    /// A JWKS document; the harness writes it to a file and configures `jwks_file`.
    Json(String),
    /// A URL the daemon fetches the JWKS from (`jwks_url`).
    Url(String),
}

/// An issuer trusted in addition to (or instead of) the built-in dev issuer.
pub struct Issuer {
    pub issuer: String,
    pub audience: String,
    pub jwks: Jwks,
}

/// Configures a [`Daemon`] beyond the common single-policy case.
pub struct DaemonBuilder {
    policies: Vec<String>,
    issuers: Vec<Issuer>,
    dev_issuer: bool,
    extra_config: String,
    umask: Option<u32>,
    env: Vec<(String, String)>,
}

impl DaemonBuilder {
    /// Adds a policy file (YAML text) to the daemon's policy directory.
    pub fn policy(mut self, yaml: &str) -> Self {
        self.policies.push(yaml.to_owned());
        self
    }

    /// Trusts another issuer.
    pub fn issuer(mut self, issuer: Issuer) -> Self {
        self.issuers.push(issuer);
        self
    }

    /// Whether to trust the built-in dev issuer (`tollgate token mint`); on by default.
    pub fn dev_issuer(mut self, trusted: bool) -> Self {
        self.dev_issuer = trusted;
        self
    }

    /// Starts the daemon with this umask (the test process's otherwise).
    pub fn umask(mut self, mask: u32) -> Self {
        self.umask = Some(mask);
        self
    }

    /// Starts the daemon with this environment variable set.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Appends a raw `key: value` line to the daemon's configuration.
    pub fn config_line(mut self, line: &str) -> Self {
        self.extra_config.push_str(line);
        self.extra_config.push('\n');
        self
    }

    /// Writes the configuration, spawns the daemon and waits until it answers `status`.
    pub fn start(self) -> Daemon {
        // SAFETY: geteuid(2) cannot fail and has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "tollgate's integration tests load BPF programs and must run as root");
        let mut daemon = self.spawn().unwrap_or_else(|err| panic!("could not start tollgate daemon: {err:#}"));
        if let Err(err) = daemon.wait_ready() {
            // Dropping the daemon while panicking prints its log.
            panic!("tollgate daemon did not become ready: {err:#}");
        }
        daemon
    }

    fn spawn(self) -> anyhow::Result<Daemon> {
        let bin = tollgate_bin();
        let dir =
            tempfile::Builder::new().prefix("tollgate-test-").tempdir().context("creating the daemon's temp dir")?;
        // Tests run governed commands as an unprivileged user too; it must reach token files.
        set_mode(dir.path(), 0o755)?;

        let state_dir = dir.path().join("state");
        let socket = dir.path().join("control.sock");
        let policy_dir = dir.path().join("policies");
        let tokens_dir = dir.path().join("tokens");
        for subdir in [&policy_dir, &tokens_dir] {
            fs::create_dir(subdir).with_context(|| format!("creating {}", subdir.display()))?;
            set_mode(subdir, 0o755)?;
        }
        for (index, yaml) in self.policies.iter().enumerate() {
            let path = policy_dir.join(format!("policy-{index}.yaml"));
            fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        }

        // Unique per daemon, so tests in this and other test binaries can run side by side.
        let cgroup_name = format!("tollgate-test-{}", unique_tag());
        let mut config = format!(
            "state_dir: {}\nsocket: {}\npolicies: [{}]\ncgroup: {}\ndev_issuer: {}\n",
            yaml_path(&state_dir)?,
            yaml_path(&socket)?,
            yaml_path(&policy_dir)?,
            yaml_str(&cgroup_name),
            self.dev_issuer,
        );
        // Every daemon's proxy needs its own port, free on both loopbacks.
        if !self.extra_config.contains("proxy_port:") {
            config.push_str(&format!("proxy_port: {}\n", free_loopback_port()?));
        }
        config.push_str(&self.extra_config);
        if self.issuers.is_empty() {
            config.push_str("issuers: []\n");
        } else {
            config.push_str("issuers:\n");
        }
        for (index, issuer) in self.issuers.iter().enumerate() {
            config.push_str(&format!(
                "  - issuer: {}\n    audience: {}\n",
                yaml_str(&issuer.issuer),
                yaml_str(&issuer.audience)
            ));
            match &issuer.jwks {
                Jwks::Json(json) => {
                    let path = dir.path().join(format!("jwks-{index}.json"));
                    fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
                    config.push_str(&format!("    jwks_file: {}\n", yaml_path(&path)?));
                }
                Jwks::Url(url) => config.push_str(&format!("    jwks_url: {}\n", yaml_str(url))),
            }
        }
        let config_path = dir.path().join("config.yaml");
        fs::write(&config_path, &config).with_context(|| format!("writing {}", config_path.display()))?;

        let log_path = dir.path().join("daemon.log");
        let child = launch(&bin, &config_path, &log_path, self.umask, &self.env)?;

        Ok(Daemon {
            bin,
            child: Some(child),
            config_path,
            dir,
            socket,
            state_dir,
            tokens_dir,
            cgroup_name,
            log_path,
            tokens_written: AtomicUsize::new(0),
        })
    }
}

/// A running `tollgate daemon` with its own temp dir, socket, policies and cgroup subtree.
///
/// Dropping it sends SIGTERM (SIGKILL after a grace period); if the test is failing, the daemon's
/// log is printed so the failure output shows what the daemon saw.
pub struct Daemon {
    bin: PathBuf,
    /// `None` once stopped.
    child: Option<Child>,
    config_path: PathBuf,
    dir: TempDir,
    socket: PathBuf,
    state_dir: PathBuf,
    tokens_dir: PathBuf,
    cgroup_name: String,
    log_path: PathBuf,
    tokens_written: AtomicUsize,
}

impl Daemon {
    /// Starts a daemon with one policy file and the dev issuer trusted.
    pub fn start(policy_yaml: &str) -> Daemon {
        Daemon::builder().policy(policy_yaml).start()
    }

    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            policies: Vec::new(),
            issuers: Vec::new(),
            dev_issuer: true,
            extra_config: String::new(),
            umask: None,
            env: Vec::new(),
        }
    }

    /// The daemon's state directory (session log, dev issuer key).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon is running").id()
    }

    /// Kills the daemon with SIGKILL: no cleanup of any kind runs.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("the daemon is running");
        child.kill().expect("SIGKILL to the daemon");
        child.wait().expect("reaping the killed daemon");
    }

    /// Stops the daemon cleanly (SIGTERM) but keeps its directory, state and
    /// configuration: for reading a stopped host's log, or [`Daemon::restart`].
    pub fn halt(&mut self) {
        let child = self.child.take().expect("the daemon is running");
        match terminate(child) {
            Ok(Stopped::Exited(status)) => self.check_nothing_left(status),
            Ok(Stopped::Killed) => panic!("tollgate daemon did not exit within {STOP_GRACE:?} of SIGTERM"),
            Err(err) => panic!("stopping tollgate daemon: {err:#}"),
        }
    }

    /// The daemon's configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Asks the daemon to stop for a handover (SIGUSR2) and waits for it to exit.
    pub fn handover(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0, "SIGUSR2 to the daemon");
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the daemon") {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not stop on SIGUSR2");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the daemon again on the same configuration and state, after
    /// [`Daemon::kill_hard`] or [`Daemon::handover`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        let child = launch(&self.bin, &self.config_path, &self.log_path, None, &[]).expect("restarting the daemon");
        self.child = Some(child);
        if let Err(err) = self.wait_ready() {
            panic!("the restarted daemon did not become ready: {err:#}");
        }
    }

    /// The daemon's temp dir (mode 0755); tests may put their own files here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The name configured as the daemon's own cgroup subtree.
    pub fn cgroup_name(&self) -> &str {
        &self.cgroup_name
    }

    /// Everything the daemon has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path)
            .unwrap_or_else(|err| format!("<could not read {}: {err}>", self.log_path.display()))
    }

    /// Mints a dev-issuer token for `sub` with the given claims (a repeated key becomes an
    /// array claim) and returns the path of a world-readable file holding it.
    pub fn mint(&self, sub: &str, claims: &[(&str, &str)]) -> PathBuf {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["token", "mint", "--state-dir"]).arg(&self.state_dir).args(["--sub", sub]);
        for (key, value) in claims {
            cmd.arg("--claim").arg(format!("{key}={value}"));
        }
        let out = self.finish(&mut cmd, "tollgate token mint");
        assert!(out.success(), "tollgate token mint failed: {out}");
        let jwt = out.stdout.trim();
        assert!(jwt.split('.').count() == 3, "tollgate token mint printed something that is not a JWT: {out}");
        self.write_token(jwt)
    }

    /// Writes `jwt` (any text, valid or not) to a world-readable token file.
    pub fn write_token(&self, jwt: &str) -> PathBuf {
        let index = self.tokens_written.fetch_add(1, Ordering::Relaxed);
        let path = self.tokens_dir.join(format!("token-{index}.jwt"));
        fs::write(&path, jwt)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o644)))
            .unwrap_or_else(|err| panic!("writing token file {}: {err}", path.display()));
        path
    }

    /// Runs `argv` in a new session under the token in `token_file`, as root.
    pub fn run<S: AsRef<OsStr>>(&self, token_file: &Path, argv: &[S]) -> RunOutput {
        let mut cmd = Command::new(&self.bin);
        self.add_run_args(&mut cmd, token_file, argv);
        self.finish(&mut cmd, "tollgate run")
    }

    /// Runs `argv` in a new session, with `tollgate run` itself started as `uid`/`gid` with no
    /// supplementary groups.
    pub fn run_as<S: AsRef<OsStr>>(&self, uid: u32, gid: u32, token_file: &Path, argv: &[S]) -> RunOutput {
        // setpriv execs the binary, so the pid we record is still that of `tollgate run`.
        let mut cmd = Command::new("setpriv");
        cmd.arg("--reuid")
            .arg(uid.to_string())
            .arg("--regid")
            .arg(gid.to_string())
            .arg("--clear-groups")
            .arg(&self.bin);
        self.add_run_args(&mut cmd, token_file, argv);
        self.finish(&mut cmd, "setpriv ... tollgate run")
    }

    fn add_run_args<S: AsRef<OsStr>>(&self, cmd: &mut Command, token_file: &Path, argv: &[S]) {
        cmd.arg("run").arg("--socket").arg(&self.socket).arg("--token-file").arg(token_file).arg("--").args(argv);
    }

    /// Runs `tollgate ARGS...` with `TOLLGATE_SOCKET` naming this daemon.
    pub fn tollgate<S: AsRef<OsStr>>(&self, args: &[S]) -> RunOutput {
        let mut cmd = self.cli();
        cmd.args(args);
        self.finish(&mut cmd, "tollgate CLI call")
    }

    /// `tollgate status --format json`.
    pub fn status(&self) -> Value {
        self.query_json(&["status", "--format", "json"])
    }

    /// `tollgate sessions --format json`: every session this daemon knows.
    pub fn sessions(&self) -> Vec<Value> {
        match self.query_json(&["sessions", "--format", "json"]) {
            Value::Array(sessions) => sessions,
            other => panic!("`sessions --format json` is not a JSON array:\n{}", pretty(&other)),
        }
    }

    /// The session record with this id, from `sessions`.
    pub fn session(&self, id: &str) -> Value {
        let sessions = self.sessions();
        sessions
            .iter()
            .find(|session| session["id"].as_str() == Some(id))
            .cloned()
            .unwrap_or_else(|| panic!("no session {id:?} in `sessions`:\n{}", pretty(&Value::Array(sessions))))
    }

    /// Polls `sessions` until the record for `id` satisfies `done`; `what` describes the wait in
    /// the failure message.
    pub fn session_until(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.poll(what, LOG_POLL_TIMEOUT, || self.session(id), done)
    }

    /// The id of the most recently started session.
    pub fn last_session_id(&self) -> String {
        let sessions = self.sessions();
        let latest = sessions.iter().max_by_key(|session| {
            let started_at = session["started_at"].as_str().unwrap_or_default();
            parse_rfc3339(started_at)
                .unwrap_or_else(|| panic!("session has an invalid started_at:\n{}", pretty(session)))
        });
        match latest.map(|session| &session["id"]) {
            Some(Value::String(id)) => id.clone(),
            Some(other) => panic!("session id is not a string: {other}"),
            None => panic!("the daemon has no sessions"),
        }
    }

    /// `tollgate show ID --format json`: the session, its processes and its events.
    pub fn show(&self, id: &str) -> Value {
        self.query_json(&["show", id, "--format", "json"])
    }

    /// Polls `show` until `done` holds, because events reach the log asynchronously; `what`
    /// describes the wait in the failure message.
    pub fn show_until(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.show_within(id, what, LOG_POLL_TIMEOUT, done)
    }

    /// [`Daemon::show_until`] with a wait of its own, for records that take
    /// longer than usual to arrive (a flood's).
    pub fn show_within(&self, id: &str, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        self.poll(what, timeout, || self.show(id), done)
    }

    fn poll(&self, what: &str, timeout: Duration, fetch: impl Fn() -> Value, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = fetch();
            if done(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; last answer:\n{}", pretty(&value));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// A clean stop (exit 0: not a handover, not a kill) detaches the
    /// programs and removes the daemon's pins and cgroups: panics, with the
    /// daemon's log, if any is left.
    fn check_nothing_left(&self, status: ExitStatus) {
        if !status.success() {
            return;
        }
        let left = left_behind(&self.cgroup_name);
        assert!(
            left.is_empty(),
            "a clean stop left {left:?} behind\n===== tollgate daemon log =====\n{}\n===== end of daemon log =====",
            self.log()
        );
    }

    /// Sends SIGTERM and waits for the daemon to exit. Panics if it needed SIGKILL.
    pub fn stop(mut self) -> StopReport {
        let child = self.child.take().expect("a Daemon's child is only taken when it stops");
        match terminate(child) {
            Ok(Stopped::Exited(status)) => {
                self.check_nothing_left(status);
                StopReport { status, log: self.log() }
            }
            Ok(Stopped::Killed) => {
                panic!("tollgate daemon did not exit within {STOP_GRACE:?} of SIGTERM")
            }
            Err(err) => panic!("stopping tollgate daemon: {err:#}"),
        }
    }

    fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        // The clients' variable, not `--socket`: commands that talk to no daemon refuse that.
        cmd.env("TOLLGATE_SOCKET", &self.socket);
        cmd
    }

    fn query_json(&self, args: &[&str]) -> Value {
        let out = self.tollgate(args);
        assert!(out.success(), "`tollgate {}` failed: {out}", args.join(" "));
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|err| panic!("`tollgate {}` did not print valid JSON ({err}): {out}", args.join(" ")))
    }

    fn finish(&self, cmd: &mut Command, what: &str) -> RunOutput {
        run_with_timeout(cmd, COMMAND_TIMEOUT).unwrap_or_else(|err| panic!("{what}: {err:#}"))
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().context("daemon already stopped")?;
            if let Some(status) = child.try_wait().context("checking on the daemon")? {
                bail!("the daemon exited during startup with {status}");
            }
            let probe = run_with_timeout(self.cli().arg("status"), Duration::from_secs(5))?;
            if probe.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no successful `status` within {READY_TIMEOUT:?}; last attempt: {probe}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            match terminate(child) {
                Ok(Stopped::Exited(status)) if !status.success() => {
                    eprintln!("tollgate daemon exited with {status} after SIGTERM");
                }
                Ok(Stopped::Exited(status)) if !thread::panicking() => self.check_nothing_left(status),
                Ok(Stopped::Exited(_)) => {}
                Ok(Stopped::Killed) => {
                    eprintln!("tollgate daemon ignored SIGTERM for {STOP_GRACE:?}; killed it");
                }
                Err(err) => eprintln!("stopping tollgate daemon: {err:#}"),
            }
        }
        if thread::panicking() {
            eprintln!(
                "===== tollgate daemon log ({}) =====\n{}\n===== end of daemon log =====",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// How a daemon stopped with [`Daemon::stop`] ended.
pub struct StopReport {
    pub status: ExitStatus,
    /// Its complete log, shutdown included.
    pub log: String,
}

enum Stopped {
    Exited(ExitStatus),
    /// It outlived the grace period and was killed.
    Killed,
}

/// What a daemon configured with cgroup `cgroup_name` left on the host: its
/// pin directory and its cgroup, where they still exist.
pub fn left_behind(cgroup_name: &str) -> Vec<PathBuf> {
    [Path::new("/sys/fs/bpf").join(cgroup_name), crate::host::cgroup2_mount().join(cgroup_name)]
        .into_iter()
        .filter(|path| path.exists())
        .collect()
}

/// SIGTERM, then SIGKILL if the process is still there after [`STOP_GRACE`].
fn terminate(mut child: Child) -> anyhow::Result<Stopped> {
    let pid = libc::pid_t::try_from(child.id()).context("daemon pid out of range")?;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
    if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sending SIGTERM to the daemon");
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("waiting for the daemon")? {
            return Ok(Stopped::Exited(status));
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.kill().context("killing the daemon")?;
    child.wait().context("reaping the killed daemon")?;
    Ok(Stopped::Killed)
}

/// Spawns `tollgate daemon` on `config`, appending to the log at `log_path`.
fn launch(
    bin: &Path,
    config: &Path,
    log_path: &Path,
    umask: Option<u32>,
    env: &[(String, String)],
) -> anyhow::Result<Child> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_for_stdout = log.try_clone().context("duplicating the daemon log handle")?;
    let mut cmd = Command::new(bin);
    cmd.arg("daemon").arg("--config").arg(config).stdin(Stdio::null()).stdout(log_for_stdout).stderr(log);
    // An informative log is what makes a failing test diagnosable (the
    // programs' own lines are debug-level); respect an explicit choice.
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info,tollgate_ebpf=debug");
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(mask) = umask {
        use std::os::unix::process::CommandExt;
        // SAFETY: umask(2) is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask as libc::mode_t);
                Ok(())
            });
        }
    }
    cmd.spawn().with_context(|| format!("spawning {} daemon", bin.display()))
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A YAML scalar for `text`: a JSON string literal is also a valid double-quoted YAML scalar, so
/// nothing in it needs escaping by hand.
fn yaml_str(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

fn yaml_path(path: &Path) -> anyhow::Result<String> {
    let text = path.to_str().with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(yaml_str(text))
}

/// A TCP port free on both 127.0.0.1 and ::1 right now.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    // Below the kernel's ephemeral range: upstreams and clients that bind
    // port 0 can never be handed a proxy port between our probe and the
    // daemon's bind. A counter keeps the tests of one process apart.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    const FIRST: u16 = 20000;
    const COUNT: u16 = 10000;
    let offset = (std::process::id() % u32::from(COUNT)) as u16;
    for _ in 0..200 {
        let port = FIRST + (offset + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT;
        let v4 = std::net::TcpListener::bind(("127.0.0.1", port));
        if v4.is_ok() && std::net::TcpListener::bind(("::1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no TCP port in {FIRST}..{} is free on both 127.0.0.1 and ::1", FIRST + COUNT)
}
