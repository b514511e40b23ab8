//! Enforcement: connects and execs inside sessions follow the policy, nothing outside sessions is
//! touched, and the daemon reports how it enforces and cleans up when stopped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::enforcement::{ALLOW_ALL, BUILD_BOTS, policy, strings};
use harness::net::{CONNECT_SCRIPT, Listener, session_connect_argv};
use harness::session_log::{
    connects_to, exec_with_arg, execs_of_file, exit_of, expect_exec_with_arg, pretty, str_field, u64_field,
};
use harness::{Daemon, RunOutput, host, run_with_timeout, unique_tag};
use serde_json::Value;
use tempfile::TempDir;

/// Claims that match the `no-grant-bots` identity, which no grant names.
const NO_GRANT_BOTS: &[(&str, &str)] = &[("repository_owner", "nogrant")];

/// A connect made from inside a fresh session, with that session's log.
struct GovernedConnect {
    out: RunOutput,
    show: Value,
    /// The connect event for the target.
    event: Value,
}

/// Connects to `host`:`port` from a new session and waits until the log has the connect event,
/// which records the destination as `logged_addr` (IPv4-mapped addresses are logged as IPv4).
fn governed_connect(daemon: &Daemon, token: &Path, host: &str, logged_addr: &str, port: u16) -> GovernedConnect {
    let out = daemon.run(token, &session_connect_argv(host, port));
    let session_id = out.first_line().to_owned();
    assert!(!session_id.is_empty(), "no session id printed for connect to {host}:{port}: {out}");
    let show = daemon.show_until(
        &session_id,
        &format!("a connect event for {logged_addr}:{port} (connect to {host})"),
        |show| !connects_to(show, logged_addr, port).is_empty(),
    );
    let event = connects_to(&show, logged_addr, port)[0].clone();
    assert_eq!(event["protocol"], "tcp", "connect event protocol:\n{}", pretty(&show));
    GovernedConnect { out, show, event }
}

impl GovernedConnect {
    fn assert_denied(&self, listener: &Listener, what: &str) {
        let log = pretty(&self.show);
        assert_ne!(self.out.code(), Some(0), "{what}: connect should have failed: {}", self.out);
        assert!(
            self.out.stderr.contains("Operation not permitted"),
            "{what}: connect should fail with EPERM: {}",
            self.out
        );
        assert_eq!(listener.take_connections(), 0, "{what}: the listener got a connection");
        assert_eq!(self.event["verdict"], "deny", "{what}: logged verdict:\n{log}");
    }

    fn assert_allowed(&self, listener: &Listener, what: &str) {
        let log = pretty(&self.show);
        assert_eq!(self.out.code(), Some(0), "{what}: connect should have succeeded: {}", self.out);
        assert_eq!(listener.take_connections(), 1, "{what}: the listener should have one connection");
        assert_eq!(self.event["verdict"], "allow", "{what}: logged verdict:\n{log}");
    }

    fn assert_family(&self, family: u64, what: &str) {
        assert_eq!(self.event["family"], family, "{what}: address family:\n{}", pretty(&self.show));
    }
}

#[test]
fn denied_ipv4_connect_gets_eperm_and_allowed_connect_succeeds() {
    let denied = Listener::bind("127.0.0.2");
    let allowed = Listener::bind("127.0.0.1");
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &strings(["127.0.0.2/32"]), &[]));
    let token = daemon.mint("connect-bot", BUILD_BOTS);

    let attempt = governed_connect(&daemon, &token, "127.0.0.2", "127.0.0.2", denied.port());
    attempt.assert_denied(&denied, "127.0.0.2 (denied /32)");
    attempt.assert_family(4, "127.0.0.2");

    let attempt = governed_connect(&daemon, &token, "127.0.0.1", "127.0.0.1", allowed.port());
    attempt.assert_allowed(&allowed, "127.0.0.1 (allowed by 0.0.0.0/0)");
    attempt.assert_family(4, "127.0.0.1");
}

#[test]
fn port_specific_rules_beat_address_rules_of_equal_prefix() {
    let open = Listener::bind("127.0.0.1");
    let closed_port = Listener::bind("127.0.0.1");
    let opened_port = Listener::bind("127.0.0.4");
    let closed_host = Listener::bind("127.0.0.4");
    let mut allow = strings(ALLOW_ALL);
    allow.push(format!("127.0.0.4/32:{}", opened_port.port()));
    let deny = vec![format!("127.0.0.1/32:{}", closed_port.port()), "127.0.0.4/32".to_owned()];
    let daemon = Daemon::start(&policy(&allow, &deny, &[]));
    let token = daemon.mint("port-bot", BUILD_BOTS);

    governed_connect(&daemon, &token, "127.0.0.1", "127.0.0.1", closed_port.port())
        .assert_denied(&closed_port, "127.0.0.1 on its one denied port");
    governed_connect(&daemon, &token, "127.0.0.1", "127.0.0.1", open.port())
        .assert_allowed(&open, "127.0.0.1 on another port");
    governed_connect(&daemon, &token, "127.0.0.4", "127.0.0.4", opened_port.port())
        .assert_allowed(&opened_port, "127.0.0.4 on its one allowed port despite the /32 deny");
    governed_connect(&daemon, &token, "127.0.0.4", "127.0.0.4", closed_host.port())
        .assert_denied(&closed_host, "127.0.0.4 on any other port");
}

#[test]
fn ipv6_and_ipv4_mapped_connects_are_governed() {
    let v6_denied = Listener::bind("::1");
    let v6_opened_port = Listener::bind("::1");
    let v4_denied = Listener::bind("127.0.0.2");
    let v4_allowed = Listener::bind("127.0.0.1");
    let mut allow = strings(ALLOW_ALL);
    // Proves IPv6 connects are evaluated, not refused wholesale.
    allow.push(format!("::1/128:{}", v6_opened_port.port()));
    let deny = strings(["::1/128", "127.0.0.2/32"]);
    let daemon = Daemon::start(&policy(&allow, &deny, &[]));
    let token = daemon.mint("v6-bot", BUILD_BOTS);

    let attempt = governed_connect(&daemon, &token, "::1", "::1", v6_denied.port());
    attempt.assert_denied(&v6_denied, "::1 (denied /128)");
    attempt.assert_family(6, "::1");

    let attempt = governed_connect(&daemon, &token, "::1", "::1", v6_opened_port.port());
    attempt.assert_allowed(&v6_opened_port, "::1 on its one allowed port");
    attempt.assert_family(6, "::1 allowed port");

    // bash uses an AF_INET6 socket for these; the policy's IPv4 rules must still apply.
    governed_connect(&daemon, &token, "::ffff:127.0.0.2", "127.0.0.2", v4_denied.port())
        .assert_denied(&v4_denied, "::ffff:127.0.0.2 (IPv4-mapped, denied as 127.0.0.2)");
    governed_connect(&daemon, &token, "::ffff:127.0.0.1", "127.0.0.1", v4_allowed.port())
        .assert_allowed(&v4_allowed, "::ffff:127.0.0.1 (IPv4-mapped, allowed as 127.0.0.1)");
}

#[test]
fn identity_without_grant_can_exec_but_not_connect() {
    let listener = Listener::bind("127.0.0.1");
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));

    // The listener is reachable for an identity with a grant...
    let granted = daemon.mint("granted-bot", BUILD_BOTS);
    governed_connect(&daemon, &granted, "127.0.0.1", "127.0.0.1", listener.port())
        .assert_allowed(&listener, "build-bots to an open listener");

    // ...but not for one without.
    let ungranted = daemon.mint("ungranted-bot", NO_GRANT_BOTS);
    let marker = format!("exec-ok-{}", unique_tag());
    let script = format!(r#"echo "$TOLLGATE_SESSION"; /bin/echo {marker}; {CONNECT_SCRIPT}"#);
    let port = listener.port().to_string();
    let out = daemon.run(&ungranted, &["/bin/bash", "-c", script.as_str(), "127.0.0.1", port.as_str()]);
    assert!(out.has_stdout_line(&marker), "exec without a grant should work: {out}");
    assert_ne!(out.code(), Some(0), "connect without a grant should fail: {out}");
    assert!(out.stderr.contains("Operation not permitted"), "expected EPERM: {out}");
    assert_eq!(listener.take_connections(), 0, "a session without a grant reached the listener");

    let session_id = out.first_line();
    let show = daemon.show_until(session_id, "the echo exec and the refused connect", |show| {
        exec_with_arg(show, &marker).is_some() && !connects_to(show, "127.0.0.1", listener.port()).is_empty()
    });
    let context = pretty(&show);
    assert_eq!(show["session"]["identity"], "no-grant-bots", "identity:\n{context}");
    assert_eq!(show["session"]["grants"], serde_json::json!([]), "grants:\n{context}");
    let exec = expect_exec_with_arg(&show, &marker);
    assert_eq!(exec["verdict"], "allow", "exec verdict:\n{context}");
    let connect = connects_to(&show, "127.0.0.1", listener.port())[0];
    assert_eq!(connect["verdict"], "deny", "connect verdict:\n{context}");
}

/// A copy of /bin/echo in its own world-accessible temp dir: the same program as /bin/echo but
/// a different inode, so a policy can deny one and not the other.
struct EchoCopy {
    _dir: TempDir,
    path: PathBuf,
}

impl EchoCopy {
    fn new() -> EchoCopy {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-denied-")
            .tempdir()
            .expect("creating a temp dir for the denied binary");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("making the denied binary's dir traversable");
        let path = dir.path().join("echo-copy");
        fs::copy("/bin/echo", &path).expect("copying /bin/echo");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("making the copy of /bin/echo executable");
        EchoCopy { _dir: dir, path }
    }

    fn path_str(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

/// What a denied exec looks like in each enforcement mode: the exit status a shell reports for
/// it, and the exec event's verdict.
fn denied_exec_expectations(mode: &str) -> (i32, &'static str) {
    match mode {
        // The LSM hook fails execve with EPERM; shells and `tollgate run` report 126.
        "lsm" => (126, "deny"),
        // The exec happens, then the process is SIGKILLed before it runs: 128 + 9.
        "kill-on-exec" => (137, "killed"),
        other => panic!("unknown exec_enforcement mode {other:?}"),
    }
}

#[test]
fn denied_exec_is_stopped_and_other_binaries_still_run() {
    let copy = EchoCopy::new();
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[copy.path.as_path()]));
    let status = daemon.status();
    let mode = str_field(&status, "exec_enforcement");
    let (denied_status, denied_verdict) = denied_exec_expectations(mode);
    let token = daemon.mint("exec-bot", BUILD_BOTS);
    let tag = unique_tag();

    // The denied binary as the session's own command.
    let direct_marker = format!("denied-direct-{tag}");
    let out = daemon.run(&token, &[copy.path_str(), direct_marker.as_str()]);
    assert!(!out.stdout.contains(&direct_marker), "the denied binary ran ({mode}): {out}");
    assert_eq!(out.code(), Some(denied_status), "exit status of a denied exec in {mode} mode: {out}");
    let session_id = daemon.last_session_id();
    let show =
        daemon.show_until(&session_id, "the denied exec's event", |show| !execs_of_file(show, &copy.path).is_empty());
    let exec = execs_of_file(&show, &copy.path)[0];
    assert_eq!(exec["verdict"], denied_verdict, "verdict in {mode} mode:\n{}", pretty(&show));

    // The denied binary from a shell in the session, then an allowed binary in the same session.
    let nested_marker = format!("denied-nested-{tag}");
    let allowed_marker = format!("allowed-{tag}");
    // A symlink to the denied file is the same file: denied too.
    let link_marker = format!("denied-link-{tag}");
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"; "$0" {nested_marker}; echo "status=$?"; ln -s "$0" "$0.link"; "$0.link" {link_marker}; echo "link_status=$?"; /bin/echo {allowed_marker}"#
    );
    let out = daemon.run(&token, &["/bin/sh", "-c", script.as_str(), copy.path_str()]);
    assert_eq!(out.code(), Some(0), "the session's shell should finish normally: {out}");
    assert!(!out.stdout.contains(&nested_marker), "the denied binary ran ({mode}): {out}");
    assert!(
        out.has_stdout_line(&format!("status={denied_status}")),
        "the shell should see status {denied_status} for the denied exec ({mode}): {out}"
    );
    assert!(out.has_stdout_line(&allowed_marker), "/bin/echo (another inode) should run: {out}");
    assert!(
        !out.stdout.contains(&link_marker) && out.has_stdout_line(&format!("link_status={denied_status}")),
        "a symlink to the denied binary ran ({mode}): {out}"
    );
    // The programs' own log (aya-log, debug-level: the daemon's own line is the
    // one at info) reaches the daemon's log.
    assert!(
        daemon.log().contains("denied exec: pid "),
        "the kernel side's log line about the denied exec is missing:\n{}",
        daemon.log()
    );

    let session_id = out.first_line();
    let show = daemon.show_until(session_id, "the denied and the allowed exec", |show| {
        !execs_of_file(show, &copy.path).is_empty() && exec_with_arg(show, &allowed_marker).is_some()
    });
    let context = pretty(&show);
    let denied = execs_of_file(&show, &copy.path)[0];
    assert_eq!(denied["verdict"], denied_verdict, "verdict in {mode} mode:\n{context}");
    let allowed = expect_exec_with_arg(&show, &allowed_marker);
    assert_eq!(allowed["verdict"], "allow", "verdict of /bin/echo:\n{context}");
    if mode == "kill-on-exec" {
        let pid = u64_field(denied, "pid");
        let show = daemon.show_until(session_id, "the killed process's exit", |show| exit_of(show, pid).is_some());
        let exit = exit_of(&show, pid).expect("show_until waited for this exit event");
        assert_eq!(exit["signal"], 9, "the denied process should die of SIGKILL:\n{}", pretty(&show));
    }
}

#[test]
fn nothing_is_enforced_outside_sessions() {
    let copy = EchoCopy::new();
    let denied = Listener::bind("127.0.0.2");
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &strings(["127.0.0.2/32"]), &[copy.path.as_path()]));

    // First show the policy is in force for sessions, so the checks below mean something.
    let token = daemon.mint("outside-bot", BUILD_BOTS);
    governed_connect(&daemon, &token, "127.0.0.2", "127.0.0.2", denied.port())
        .assert_denied(&denied, "127.0.0.2 inside a session");
    let sessions_before = daemon.sessions().len();

    let marker = format!("outside-{}", unique_tag());
    let out = run_directly(Command::new(&copy.path).arg(&marker));
    assert_eq!(out.code(), Some(0), "the copy should run outside sessions: {out}");
    assert_eq!(out.stdout.trim_end(), marker, "the copy should print its argument: {out}");

    let port = denied.port().to_string();
    let out = run_directly(Command::new("/bin/bash").args(["-c", CONNECT_SCRIPT, "127.0.0.2", &port]));
    assert_eq!(out.code(), Some(0), "the connect should succeed outside sessions: {out}");
    assert_eq!(denied.take_connections(), 1, "the listener should have the outside connection");

    assert_eq!(daemon.sessions().len(), sessions_before, "processes outside sessions must not create sessions");
}

fn run_directly(cmd: &mut Command) -> RunOutput {
    run_with_timeout(cmd, Duration::from_secs(60))
        .unwrap_or_else(|err| panic!("running a command outside any session: {err:#}"))
}

#[test]
fn status_reports_this_kernels_exec_enforcement() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let status = daemon.status();
    let context = pretty(&status);

    // Without BPF LSM only the fallback is possible. With it, the daemon must
    // use it unless the kernel refused the program, and then it must say why.
    let mode = str_field(&status, "exec_enforcement");
    if host::bpf_lsm_active() {
        match mode {
            "lsm" => {
                assert!(status["lsm_unavailable"].is_null(), "lsm mode with a reason it is unavailable:\n{context}")
            }
            "kill-on-exec" => assert!(
                status["lsm_unavailable"].as_str().is_some_and(|why| !why.is_empty()),
                "BPF LSM is active but unused, and the daemon does not say why:\n{context}"
            ),
            other => panic!("unknown exec_enforcement {other:?}:\n{context}"),
        }
    } else {
        assert_eq!(mode, "kill-on-exec", "active LSMs are {:?}:\n{context}", host::active_lsms());
        assert!(status["lsm_unavailable"].is_string(), "the fallback should say why LSM is unavailable:\n{context}");
    }
    assert_eq!(status["sessions_active"], 0, "no sessions yet:\n{context}");
    assert!(status["events_lost"].is_u64(), "events_lost should be a count:\n{context}");

    let cgroup = PathBuf::from(str_field(&status, "cgroup"));
    assert_eq!(
        cgroup.file_name().and_then(|name| name.to_str()),
        Some(daemon.cgroup_name()),
        "the daemon's cgroup is not the configured one:\n{context}"
    );
    let mount = host::cgroup2_mount();
    assert!(cgroup.starts_with(&mount), "cgroup is not under the cgroup2 mount {}:\n{context}", mount.display());
    assert!(cgroup.is_dir(), "the daemon's cgroup does not exist:\n{context}");
}

#[test]
fn sigterm_stops_the_daemon_and_removes_its_cgroup() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("short-lived-bot", BUILD_BOTS);
    // A finished session leaves a session cgroup behind for the daemon to clean up.
    let out = daemon.run(&token, &["/bin/true"]);
    assert_eq!(out.code(), Some(0), "a trivial session failed: {out}");
    let status = daemon.status();
    let cgroup = PathBuf::from(str_field(&status, "cgroup"));
    assert!(cgroup.is_dir(), "the daemon's cgroup does not exist:\n{}", pretty(&status));

    let stopped = daemon.stop();
    assert!(
        stopped.status.success(),
        "the daemon should exit 0 on SIGTERM, got {}; its log:\n{}",
        stopped.status,
        stopped.log
    );
    assert!(!cgroup.exists(), "the daemon left its cgroup {} behind; its log:\n{}", cgroup.display(), stopped.log);
}

/// IPv6 rules govern IPv6 only: `allow: ["::/0"]` must not open IPv4
/// (IPv4 is kept as mapped IPv6 inside the kernel maps). The connect event
/// names the rule that decided, or none.
#[test]
fn ipv6_rules_do_not_cover_ipv4_and_events_name_their_rule() {
    let listener = Listener::bind("127.0.0.1");
    let v6_listener = Listener::bind("::1");
    let daemon = Daemon::start(&policy(&strings(["::/0"]), &[], &[]));
    let token = daemon.mint("v6-only-bot", BUILD_BOTS);

    let v4 = governed_connect(&daemon, &token, "127.0.0.1", "127.0.0.1", listener.port());
    v4.assert_denied(&listener, "IPv4 under an IPv6-only allow");
    assert!(v4.event["rule"].is_null(), "no rule decided the IPv4 connect:\n{}", pretty(&v4.show));

    let v6 = governed_connect(&daemon, &token, "::1", "::1", v6_listener.port());
    v6.assert_allowed(&v6_listener, "IPv6 under an IPv6 allow");
    assert_eq!(
        v6.event["rule"],
        "build-bots-egress: network.allow ::/0",
        "the allowing rule is named:\n{}",
        pretty(&v6.show)
    );
}
