//! Isolation: a session cannot get out from under its policy. It cannot leave its cgroup, create
//! raw sockets or read other sessions' records, and an identity can forbid root sessions
//! altogether. (A session opened from inside one is its child, never wider: see `delegation`.)

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use harness::enforcement::{ALLOW_ALL, BUILD_BOTS, policy, strings};
use harness::session_log::{events_of_kind, pretty, str_field};
use harness::{Daemon, run_with_timeout, unique_tag};
use serde_json::Value;

/// Reports, one `key=value` per line, the session's view of its cgroup and the results of trying
/// to move itself (the shell process, `$$`) to the cgroup2 root and to its session cgroup's
/// parent. Uses shell builtins for everything that must happen in the governed process itself.
const ESCAPE_SCRIPT: &str = r#"
echo "session=$TOLLGATE_SESSION"
echo "uid=$(/usr/bin/id -u)"
own_cgroup() {
  while IFS= read -r line; do
    case $line in 0::*) echo "${line#0::}" ;; esac
  done < /proc/self/cgroup
}
while read -r key value; do
  [ "$key" = "NoNewPrivs:" ] && echo "no_new_privs=$value"
done < /proc/self/status
mount=
while read -r _id _parent _dev _root mount_point rest; do
  case " $rest " in *" - cgroup2 "*) mount=$mount_point; break ;; esac
done < /proc/self/mountinfo
echo "mount=$mount"
# $(...) runs in a forked child, which shares the shell's cgroup.
before=$(own_cgroup)
echo "before=$before"
if echo $$ > "$mount/cgroup.procs"; then echo "root=moved"; else echo "root=refused"; fi
parent=${before%/*}
if echo $$ > "$mount$parent/cgroup.procs"; then echo "parent=moved"; else echo "parent=refused"; fi
echo "after=$(own_cgroup)"
"#;

#[test]
fn unprivileged_session_cannot_leave_its_cgroup() {
    const NOBODY: u32 = 65534;
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("unprivileged-bot", BUILD_BOTS);

    let out = daemon.run_as(NOBODY, NOBODY, &token, &["/bin/sh", "-c", ESCAPE_SCRIPT]);
    assert_eq!(out.code(), Some(0), "the escape script should run to the end: {out}");
    let report = |key: &str| -> String {
        let prefix = format!("{key}=");
        out.stdout
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("the escape script reported no {key}: {out}"))
            .to_owned()
    };
    assert_eq!(report("uid"), NOBODY.to_string(), "the session should run as the caller: {out}");
    assert_eq!(report("no_new_privs"), "1", "sessions run with no_new_privs: {out}");
    assert_eq!(report("root"), "refused", "moving to the cgroup2 root must fail: {out}");
    assert_eq!(report("parent"), "refused", "moving to the session's parent cgroup must fail: {out}");
    let before = report("before");
    assert_eq!(report("after"), before, "the process left its session cgroup: {out}");
    assert!(
        before.split('/').any(|part| part == daemon.cgroup_name()),
        "the session cgroup {before:?} is not under the daemon's subtree {}: {out}",
        daemon.cgroup_name()
    );

    let session = daemon.session(&report("session"));
    let context = pretty(&session);
    assert_eq!(session["uid"], NOBODY, "session uid:\n{context}");
    assert_eq!(session["privileged"], false, "a non-root session is not privileged:\n{context}");
    let expected_cgroup = format!("{}{before}", report("mount"));
    assert_eq!(
        Path::new(str_field(&session, "cgroup")),
        Path::new(&expected_cgroup),
        "the session record's cgroup is not where the process is:\n{context}\n{out}"
    );
}

/// Raw and ICMP sockets reach the network without a connect the policy sees:
/// sessions may not create them (here as root, which could otherwise).
#[test]
fn sessions_cannot_create_raw_sockets() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("raw-bot", BUILD_BOTS);
    let script = "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\n    print('raw=allowed')\nexcept PermissionError as e:\n    print('raw=refused', e.errno)\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()\nprint('udp=ok')\n";
    let out = daemon.run(&token, &["python3", "-c", script]);
    assert!(out.has_stdout_line("raw=refused 1"), "a raw socket was not refused with EPERM: {out}");
    assert!(out.has_stdout_line("udp=ok"), "a UDP socket should still work: {out}");
    let id = daemon.last_session_id();
    let show = daemon.show_until(&id, "the refused socket", |show| !events_of_kind(show, "socket").is_empty());
    let event = events_of_kind(&show, "socket")[0];
    assert_eq!((event["verdict"].as_str(), event["type"].as_u64()), (Some("deny"), Some(3)), "{}", pretty(&show));

    // Outside any session the same socket is allowed (root has CAP_NET_RAW).
    let mut outside = Command::new("python3");
    outside.args(["-c", script]);
    let out = run_with_timeout(&mut outside, Duration::from_secs(30)).expect("python3 runs");
    assert!(out.has_stdout_line("raw=allowed"), "outside sessions nothing is refused: {out}");
}

/// Root sessions are off unless an identity opts in (`allow_root: true`):
/// an explicit `allow_root: false` and an identity that says nothing both
/// refuse them, the refusal names why, and nothing starts.
#[test]
fn identities_refuse_root_sessions_unless_they_opt_in() {
    let policy = "identities:\n  - name: no-root-bots\n    issuer: tollgate-dev\n    allow_root: false\n    claims:\n      team: explicit\n  - name: default-bots\n    issuer: tollgate-dev\n    claims:\n      team: default\n";
    let daemon = Daemon::start(policy);
    for team in ["explicit", "default"] {
        let token = daemon.mint("root-bot", &[("team", team)]);
        let marker = daemon.dir().join(format!("ran-{}", unique_tag()));
        let script = format!("touch {}", marker.display());
        let out = daemon.run(&token, &["/bin/sh", "-c", script.as_str()]);
        assert_eq!(out.code(), Some(1), "a root session of a {team} no-root identity started: {out}");
        assert!(out.stderr.contains("may not run sessions as root"), "the refusal should say why: {out}");
        assert!(!marker.exists(), "the command of a refused {team} session ran");
    }
    assert!(daemon.sessions().is_empty(), "a refused session left a record");
}

/// A root session of an identity that allows it is marked privileged in
/// the text of `sessions` and `show`, not only in their JSON.
#[test]
fn root_sessions_are_marked_privileged_in_text() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("root-bot", BUILD_BOTS);
    let out = daemon.run(&token, &["/bin/sh", "-c", "echo \"$TOLLGATE_SESSION\""]);
    let id = out.first_line().to_owned();
    let socket = daemon.socket().to_str().expect("UTF-8 path").to_owned();
    let cli = |args: &[&str]| {
        let mut command = Command::new(harness::tollgate_bin());
        command.arg("--socket").arg(&socket).args(args);
        run_with_timeout(&mut command, Duration::from_secs(30)).expect("tollgate runs")
    };
    let listed = cli(&["sessions"]);
    let line = listed.stdout.lines().find(|line| line.starts_with(id.as_str())).unwrap_or_default();
    assert!(line.contains(" 0!"), "the session's line should mark uid 0 as privileged: {listed}");
    assert!(listed.stdout.contains("PRIVILEGED"), "the list should say what the mark means: {listed}");
    let shown = cli(&["show", id.as_str()]);
    assert!(shown.stdout.lines().any(|l| l.starts_with("uid") && l.contains("PRIVILEGED")), "{shown}");
}

/// A governed process sees its own session's record and no other: records
/// hold other sessions' arguments and token claims.
#[test]
fn a_session_reads_only_its_own_record() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("reader-bot", BUILD_BOTS);
    let first = daemon.run(&token, &["/bin/sh", "-c", "echo \"$TOLLGATE_SESSION\""]);
    let first_id = first.first_line().to_owned();
    let bin = harness::tollgate_bin();
    let script = r#"echo "$TOLLGATE_SESSION"; "$0" --socket "$1" sessions --format json; "$0" --socket "$1" show "$2" --format json; echo "show_status=$?""#;
    let out = daemon.run(
        &token,
        &[
            "/bin/sh",
            "-c",
            script,
            bin.to_str().expect("UTF-8 path"),
            daemon.socket().to_str().expect("UTF-8 path"),
            first_id.as_str(),
        ],
    );
    let own_id = out.first_line().to_owned();
    // stdout: the session id, the JSON list, then the status line.
    let json: String =
        out.stdout.lines().skip(1).take_while(|line| !line.starts_with("show_status=")).collect::<Vec<_>>().join("\n");
    let listed: Vec<Value> =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("no session list in the output ({e}): {out}"));
    let ids: Vec<&str> = listed.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(ids, vec![own_id.as_str()], "a session listed sessions other than its own: {out}");
    assert!(out.has_stdout_line("show_status=1"), "a session read another session's record: {out}");
    // Outside sessions, root reads both.
    assert_eq!(daemon.sessions().len(), 2);
}

/// The state directory, the session log (with its WAL and shared-memory
/// files) and the dev issuer's key are root-only even when the daemon
/// starts with umask 000; another user cannot read the log.
#[test]
fn the_state_directory_and_session_log_are_root_only_whatever_the_umask() {
    let daemon = Daemon::builder().policy(&policy(&strings(ALLOW_ALL), &[], &[])).umask(0).start();
    let token = daemon.mint("state-bot", BUILD_BOTS);
    let out = daemon.run(&token, &["/bin/true"]);
    assert_eq!(out.code(), Some(0), "{out}");
    let state = daemon.state_dir().to_owned();
    let mode = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
    };
    assert_eq!(mode(&state), 0o700, "state directory");
    for file in ["sessions.db", "sessions.db-wal", "sessions.db-shm", "dev-issuer.pk8"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
    // On the receiving side: another user gets nothing out of the log.
    let mut cat = Command::new("setpriv");
    cat.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "cat"]).arg(state.join("sessions.db"));
    let read = run_with_timeout(&mut cat, Duration::from_secs(10)).expect("setpriv runs");
    assert_ne!(read.code(), Some(0), "another user read the session log: {read}");
    assert!(read.stdout.is_empty(), "another user read bytes of the session log");
}

/// The held child must be one that has executed nothing since the caller
/// forked it. A caller that forks and then executes its own program again
/// (same executable path, so a path comparison would pass) is refused, and
/// the process is not placed in any session.
#[test]
fn a_child_that_executed_the_callers_own_program_again_is_not_placed() {
    let daemon = Daemon::start(&policy(&strings(ALLOW_ALL), &[], &[]));
    let token = daemon.mint("reexec-bot", BUILD_BOTS);
    let token_text = std::fs::read_to_string(&token).expect("token");
    let script = r#"
import ctypes, json, os, socket, sys, time
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(20)"])
time.sleep(1)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall((json.dumps({"op": "run", "token": sys.argv[2].strip(), "pid": pid, "command": ["sleep"]}) + "\n").encode())
print(s.makefile().readline().strip())
print("cgroup=" + open("/proc/%d/cgroup" % pid).read().strip())
os.kill(pid, 9)
"#;
    let mut command = Command::new("python3");
    command.args(["-c", script]).arg(daemon.socket()).arg(token_text.trim());
    let out = run_with_timeout(&mut command, Duration::from_secs(30)).expect("python3 runs");
    let answer: Value = serde_json::from_str(out.first_line()).unwrap_or_else(|e| panic!("no answer ({e}): {out}"));
    assert_eq!(answer["error"]["kind"], "forbidden", "the re-executed child was accepted: {out}");
    assert!(
        answer["error"]["message"].as_str().is_some_and(|m| m.contains("already executed")),
        "the refusal should say why: {out}"
    );
    assert!(
        !out.stdout.contains(&daemon.cgroup_name().to_owned()),
        "the child was moved into the daemon's cgroups: {out}"
    );
    assert!(daemon.sessions().is_empty(), "a refused session left a record");
}
