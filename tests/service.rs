//! The daemon as an SRE runs it and the CLI as a governed job meets it: SIGHUP reloads (all or
//! nothing), logs without colour in files, JSON or journal priorities on request, one log line per
//! refusal, no guessing without a configuration, denials explained by `tollgate run` where they
//! happen, and distinct exit codes.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::net::Listener;
use harness::proxy::path_str;
use harness::rounds::Rounds;
use harness::session_log::{events_of_kind, pretty};
use harness::{Daemon, run_with_timeout, tollgate_bin};
use serde_json::Value;

use harness::enforcement::{BUILD_BOTS, BUILD_BOTS_IDENTITY};

fn policy(extra_grants: &str) -> String {
    format!(
        r#"{BUILD_BOTS_IDENTITY}grants:
  - name: base
    identity: build-bots
    exec: {{ deny: ["/usr/bin/wget"] }}
    network:
      allow: ["127.0.0.5/32"]
      deny: ["127.0.0.3/32"]
{extra_grants}"#
    )
}

const SIX: &str = "  - name: six\n    identity: build-bots\n    network: { allow: [\"127.0.0.6/32\"] }\n";

fn hup(daemon: &Daemon) {
    // SAFETY: kill(2) on the daemon this test started.
    assert_eq!(unsafe { libc::kill(daemon.pid() as libc::pid_t, libc::SIGHUP) }, 0);
}

fn connect(daemon: &Daemon, token: &Path, host: &str, port: u16) -> bool {
    let argv = ["/bin/bash".to_owned(), "-c".into(), format!("exec 3<>/dev/tcp/{host}/{port}")];
    daemon.run(token, &argv).success()
}

fn loaded_at(daemon: &Daemon) -> String {
    daemon.status()["policies_loaded_at"].as_str().expect("policies_loaded_at").to_owned()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A reload that fails keeps everything and says so once; one that loads gives new sessions the
/// new policy, and takes a removed grant from a live session at once (recorded).
#[test]
fn sighup_reloads_policies_all_or_nothing() {
    let daemon = Daemon::start(&policy(SIX));
    let token = daemon.mint("reload-bot", BUILD_BOTS);
    let (five, six, seven) = (Listener::bind("127.0.0.5"), Listener::bind("127.0.0.6"), Listener::bind("127.0.0.7"));
    let policy_file = daemon.dir().join("policies").join("policy-0.yaml");
    let first = loaded_at(&daemon);

    // A broken file: the reload fails, nothing changes, one line says why.
    fs::write(daemon.dir().join("policies").join("broken.yaml"), "grants: [\n").expect("broken policy");
    hup(&daemon);
    wait_for("the failed reload's log line", || daemon.log().contains("reload failed"));
    assert_eq!(daemon.log().matches("reload failed").count(), 1, "{}", daemon.log());
    assert!(daemon.log().contains("broken.yaml:2"), "the error names the file and line: {}", daemon.log());
    assert_eq!(loaded_at(&daemon), first, "a failed reload changed the loaded policies");
    assert!(connect(&daemon, &token, "127.0.0.6", six.port()), "the old policy still holds");
    assert_eq!(six.take_connections(), 1, "the listener got the connect the old policy allows");
    fs::remove_file(daemon.dir().join("policies").join("broken.yaml")).expect("remove");

    // A live session, then a reload that drops grant `six` and adds `seven`.
    let rounds = Rounds::new(daemon.dir());
    let body = format!(
        "if /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.6/{p}' 2>/dev/null; then echo ok; else echo refused; fi",
        p = six.port()
    );
    let script = rounds.script(2, &body);
    thread::scope(|scope| {
        let running = scope.spawn(|| daemon.run(&token, &["/bin/sh", "-c", &script]));
        assert_eq!(rounds.next(), "ok");
        let seven_grant = "  - name: seven\n    identity: build-bots\n    network: { allow: [\"127.0.0.7/32\"] }\n";
        fs::write(&policy_file, policy(seven_grant)).expect("new policy");
        hup(&daemon);
        wait_for("the reload", || loaded_at(&daemon) != first);
        assert_eq!(rounds.next(), "refused", "the live session kept a grant the reload removed");
        assert!(running.join().expect("session").success());
    });
    assert_eq!(six.take_connections(), 1, "only the first round reached 127.0.0.6");
    assert!(!connect(&daemon, &token, "127.0.0.6", six.port()), "a new session got a removed grant");
    assert!(connect(&daemon, &token, "127.0.0.7", seven.port()), "a new session lacks the new grant");
    assert!(connect(&daemon, &token, "127.0.0.5", five.port()));
    assert_eq!(
        (six.take_connections(), seven.take_connections(), five.take_connections()),
        (0, 1, 1),
        "what the listeners got after the reload"
    );
    let status = daemon.status();
    assert_eq!(status["policy_file_paths"].as_array().map(Vec::len), Some(1), "{}", pretty(&status));
    // The text says the same: when the policies were loaded and from which file.
    let text = daemon.tollgate(&["status"]);
    assert!(
        text.stdout.contains("policies loaded") && text.stdout.contains(policy_file.to_str().expect("path")),
        "{text}"
    );
    let live = daemon
        .sessions()
        .into_iter()
        .find(|s| s["command"][2].as_str().is_some_and(|c| c.contains("go-$round")))
        .expect("the live session");
    let show = daemon.show(live["id"].as_str().expect("id"));
    let removed = events_of_kind(&show, "grant");
    assert!(removed.iter().any(|e| e["grant"] == "six" && e["verdict"] == "revoked"), "{}", pretty(&show));
}

/// The log file has no colour codes, and each refusal is one line at info or above; `log_format:
/// json` gives JSON lines; under systemd (JOURNAL_STREAM) each line carries its priority.
#[test]
fn logs_are_plain_json_or_journal_with_one_line_per_refusal() {
    let daemon = Daemon::start(&policy(""));
    let token = daemon.mint("log-bot", BUILD_BOTS);
    let listener = Listener::bind("127.0.0.3");
    assert!(!connect(&daemon, &token, "127.0.0.3", listener.port()));
    assert!(!daemon.run(&token, &["/usr/bin/wget", "-q", "http://127.0.0.1/"]).success());
    wait_for("the refusals in the log", || {
        daemon.log().contains("exec denied") && daemon.log().contains("connect denied")
    });
    let log = daemon.log();
    assert!(!log.contains('\u{1b}'), "colour codes in a log file:\n{log}");
    let at_info = |needle: &str| log.lines().filter(|l| l.contains(needle) && !l.contains("DEBUG")).count();
    assert_eq!(at_info("/usr/bin/wget"), 1, "one line for the denied exec:\n{log}");
    assert_eq!(at_info("connect denied"), 1, "one line for the denied connect:\n{log}");

    let json = Daemon::builder().policy(&policy("")).config_line("log_format: json").start();
    let lines: Vec<Value> = json.log().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "tollgate daemon ready" && l["level"] == "INFO"),
        "{}",
        json.log()
    );

    let journal = Daemon::builder().policy(&policy("")).env("JOURNAL_STREAM", "8:12345").start();
    let log = journal.log();
    let ready = log.lines().find(|l| l.contains("tollgate daemon ready")).expect("the ready line");
    assert!(ready.starts_with("<6>"), "journal priority for info: {ready}");
    assert!(log.lines().any(|l| l.starts_with("<4>")), "warnings carry priority 4:\n{log}");
    assert!(!log.contains('\u{1b}'));
}

/// `tollgate run` says what was refused and by which grant and rule, on stderr, as it happens;
/// the session shows as ended as soon as `run` returns.
#[test]
fn run_explains_denials_where_they_happen() {
    let daemon = Daemon::start(&policy(""));
    let token = daemon.mint("told-bot", BUILD_BOTS);
    let listener = Listener::bind("127.0.0.3");
    let script = format!("exec 3<>/dev/tcp/127.0.0.3/{}; /usr/bin/wget -q http://127.0.0.1/; exit 5", listener.port());
    let out = daemon.run(&token, &["/bin/bash", "-c", &script]);
    assert_eq!(out.code(), Some(5), "the command's own exit code: {out}");
    let connect_line =
        format!("tollgate: connect 127.0.0.3:{} denied by grant base (network.deny 127.0.0.3/32)", listener.port());
    assert!(out.stderr.lines().any(|l| l == connect_line), "{out}");
    assert!(
        out.stderr.lines().any(|l| l == "tollgate: exec /usr/bin/wget denied by grant base (exec.deny /usr/bin/wget)"),
        "{out}"
    );
    assert_eq!(listener.take_connections(), 0, "the denied connect reached the listener");
    let id = daemon.last_session_id();
    let session = daemon.session(&id);
    assert!(
        !session["ended_at"].is_null(),
        "the session still shows as running after run returned: {}",
        pretty(&session)
    );
}

/// Exit codes: the command's own, 2 for a refused token, 64 for a usage error, 69 when no daemon
/// answers, 77 when policy ended the session.
#[test]
fn exit_codes_are_distinct() {
    let daemon = Daemon::start(&policy(""));
    let token = daemon.mint("exit-bot", BUILD_BOTS);
    assert_eq!(daemon.run(&token, &["/bin/sh", "-c", "exit 3"]).code(), Some(3));
    let bad = daemon.write_token("not.a.token");
    let out = daemon.run(&bad, &["/usr/bin/true"]);
    assert_eq!(out.code(), Some(2), "{out}");
    let out = daemon.tollgate(&["sessoins"]);
    assert_eq!(out.code(), Some(64), "{out}");
    // Options appear only on the commands that use them: policy check never talks to a daemon.
    let out = daemon.tollgate(&["policy", "check", "--socket", "/x", "/dev/null"]);
    assert_eq!(out.code(), Some(64), "{out}");
    let out = daemon.tollgate(&["status", "--socket", path_str(daemon.socket())]);
    assert!(out.success(), "{out}");
    let out = daemon.tollgate(&["run", "--ttl", "1s", "--token-file", path_str(&token), "--", "sleep", "20"]);
    assert_eq!(out.code(), Some(77), "{out}");
    let empty = daemon.dir().join("empty-config.yaml");
    fs::write(&empty, format!("state_dir: {}\n", daemon.dir().join("nowhere").display())).expect("config");
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["--socket", "/nonexistent/control.sock", "sessions", "--config", path_str(&empty)]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("tollgate runs");
    assert_eq!(out.code(), Some(69), "{out}");
    assert!(out.stderr.contains("cannot reach the tollgate daemon"), "{out}");
    // `run` too: no daemon, no session, and the command never started.
    let marker = daemon.dir().join("ran-without-a-daemon");
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["run", "--socket", "/nonexistent/control.sock", "--token-file", path_str(&token), "--"])
        .args(["/usr/bin/touch", path_str(&marker)]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("tollgate runs");
    assert_eq!(out.code(), Some(69), "{out}");
    assert!(!marker.exists(), "the command ran without a daemon");
}

/// With no --config and no /etc/tollgate/config.yaml, `daemon` and `token mint` refuse and say what
/// to pass, and make nothing (no key, no state).
#[test]
fn nothing_is_guessed_without_a_configuration() {
    let scratch = tempfile::Builder::new().prefix("tollgate-noconfig-").tempdir().expect("temp dir");
    let empty = scratch.path().join("empty");
    fs::create_dir(&empty).expect("empty dir");
    // Hide any real /etc/tollgate in a private mount namespace.
    let hide = if Path::new("/etc/tollgate").exists() {
        format!("mount --bind {} /etc/tollgate && ", empty.display())
    } else {
        String::new()
    };
    for args in ["daemon", "token mint --sub someone"] {
        let script = format!("{hide}exec {} {args}", tollgate_bin().display());
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]).env("HOME", scratch.path());
        let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("tollgate runs");
        assert_eq!(out.code(), Some(1), "`tollgate {args}` with no configuration: {out}");
        assert!(out.stderr.contains("no configuration: pass --config FILE"), "{out}");
    }
    assert!(!Path::new("/var/lib/tollgate/dev-issuer.pk8").exists(), "a throwaway key was made");
}

/// `policy explain` asks the running daemon (its loaded policy, reloads included), answers for
/// each address a host name has, and explains execs.
#[test]
fn explain_asks_the_running_daemon() {
    let daemon = Daemon::start(&policy(""));
    let explain = |args: &[&str]| {
        let mut all = vec!["policy", "explain", "--identity", "build-bots"];
        all.extend(args);
        daemon.tollgate(&all)
    };
    let out = explain(&["--to", "127.0.0.3:80"]);
    assert_eq!(out.stdout.trim(), "deny (base: network.deny 127.0.0.3/32)", "{out}");
    let out = explain(&["--to", "localhost:80"]);
    assert!(out.stdout.lines().any(|l| l == "127.0.0.1:80: deny (no entry matches: the default)"), "{out}");
    let out = explain(&["--exec", "/usr/bin/wget"]);
    assert_eq!(out.stdout.trim(), "deny (base: exec.deny /usr/bin/wget)", "{out}");
    // After a reload, the daemon's answer follows the new policy.
    let file = daemon.dir().join("policies").join("policy-0.yaml");
    fs::write(&file, policy(SIX)).expect("policy");
    let before = loaded_at(&daemon);
    hup(&daemon);
    wait_for("the reload", || loaded_at(&daemon) != before);
    let out = explain(&["--to", "127.0.0.6:80"]);
    assert_eq!(out.stdout.trim(), "allow (six: network.allow 127.0.0.6/32)", "{out}");
    let out = explain(&["--to", "no-such-host.invalid:80"]);
    assert!(!out.success() && out.stderr.contains("no-such-host.invalid:80"), "{out}");
}

/// `sessions` filters by identity, state and start, and shows local times with ages.
#[test]
fn sessions_filter_and_show_local_times() {
    let daemon = Daemon::start(&policy(""));
    let token = daemon.mint("list-bot", BUILD_BOTS);
    assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    let list = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["sessions", "--format", "json"];
        all.extend(args);
        serde_json::from_str(&daemon.tollgate(&all).stdout).expect("json")
    };
    assert_eq!(list(&["--identity", "build-bots"]).len(), 1);
    assert_eq!(list(&["--identity", "other"]).len(), 0);
    assert_eq!(list(&["--state", "ended"]).len(), 1, "run returned: the session shows ended");
    assert_eq!(list(&["--state", "running"]).len(), 0);
    assert_eq!(list(&["--since", "1h"]).len(), 1);
    assert_eq!(list(&["--since", "2100-01-01"]).len(), 0);
    let text = daemon.tollgate(&["sessions"]);
    let line = text.stdout.lines().nth(1).expect("a session line");
    let has_local_time = line.split_whitespace().any(|w| w.len() == 8 && w.chars().filter(|c| *c == ':').count() == 2);
    assert!(has_local_time && line.contains("s ago)"), "{text}");
}

/// When the daemon goes away while a session runs, `run` says so (the pinned programs keep
/// governing the session) and still returns the command's own exit code.
#[test]
fn run_says_when_the_daemon_went_away() {
    let mut daemon = Daemon::start(&policy(""));
    let token = daemon.mint("orphan-bot", BUILD_BOTS);
    // The command itself says it runs: a session the daemon counts may not
    // have had its answer sent yet, and without one `run` (rightly) never
    // starts the command.
    let started = daemon.dir().join("command-started");
    let script = format!("touch {}; sleep 2; exit 4", started.display());
    let mut command = Command::new(tollgate_bin());
    command
        .args(["run", "--socket", path_str(daemon.socket()), "--token-file", path_str(&token), "--"])
        .args(["/bin/sh", "-c", &script]);
    let running = thread::spawn(move || run_with_timeout(&mut command, Duration::from_secs(60)).expect("tollgate run"));
    wait_for("the command to start in its session", || started.exists());
    daemon.kill_hard();
    let out = running.join().expect("the run thread");
    assert_eq!(out.code(), Some(4), "{out}");
    assert!(out.stderr.contains("the daemon went away while the session ran"), "{out}");
    daemon.restart();
}
