//! Exec allow lists: only the files a grant's `exec.allow` names may run.
//! A copy at another path, an in-memory file, the dynamic loader run as a
//! program are refused (checked on the receiving side: the marker file the
//! program would write never appears); a listed file replaced by a package
//! upgrade keeps working; a deny of any grant wins, and `policy explain
//! --exec` says which entry decides.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::{Daemon, run_with_timeout};
use serde_json::json;
use tempfile::TempDir;

/// The x86-64 dynamic loader, which runs any file given to it.
const LOADER: &str = "/lib64/ld-linux-x86-64.so.2";

struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::Builder::new().prefix("tollgate-allow-").tempdir().expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::create_dir(dir.path().join("listed-dir")).expect("dir");
        for name in ["tool", "copy-of-touch", "listed-dir/inner", "user-owned"] {
            fs::copy("/usr/bin/touch", dir.path().join(name)).expect("copy touch");
        }
        // Listed, but a session's user could rewrite it: never allowed.
        std::os::unix::fs::chown(dir.path().join("user-owned"), Some(65534), Some(65534)).expect("chown");
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn policy(grants: &str) -> String {
    format!("identities:\n  - name: listed-bots\n    issuer: tollgate-dev\n    allow_root: true\ngrants:\n{grants}")
}

#[test]
fn only_listed_files_run_and_copies_memfds_and_the_loader_do_not() {
    assert!(Path::new(LOADER).exists(), "this test needs the x86-64 loader at {LOADER}");
    let files = Files::new();
    let d = files.dir.path().display();
    let daemon = Daemon::start(&policy(&format!(
        "  - name: listed\n    identity: listed-bots\n    exec:\n      allow: [/usr/bin/bash, /usr/bin/touch, \"/usr/bin/python3*\", \"{d}/tool\", \"{d}/listed-dir/\", \"{d}/user-owned\"]\n    network:\n      allow: [\"127.0.0.0/8\"]\n"
    )));
    let token = daemon.mint("listed-bot", &[]);
    let memfd = format!(
        "import os\nfd = os.memfd_create('t', 0)\nos.write(fd, open('/usr/bin/touch', 'rb').read())\nprint('memfd-attempt', flush=True)\nos.execv('/proc/self/fd/%d' % fd, ['touch', '{d}/m-memfd'])\n"
    );
    let script = format!(
        "/usr/bin/touch {d}/m-touch; {d}/tool {d}/m-tool; {d}/listed-dir/inner {d}/m-inner; {d}/user-owned {d}/m-user; \
         {d}/copy-of-touch {d}/m-copy; {LOADER} /usr/bin/touch {d}/m-loader; /usr/bin/python3 -c \"$0\"; echo done",
    );
    let out = daemon.run(&token, &["/usr/bin/bash", "-c", script.as_str(), memfd.as_str()]);
    assert!(out.stdout.contains("done"), "the session's shell did not run to the end: {out}");
    // The memfd check means something only if the listed python got to its exec.
    assert!(out.stdout.contains("memfd-attempt"), "python did not run to the memfd exec: {out}");
    for allowed in ["m-touch", "m-tool", "m-inner"] {
        assert!(files.path(allowed).exists(), "a listed program did not run ({allowed}): {out}");
    }
    for refused in ["m-copy", "m-loader", "m-memfd", "m-user"] {
        assert!(!files.path(refused).exists(), "a program not on the list ran ({refused}): {out}");
    }
    // The same programs run outside sessions: nothing else is touched.
    let mut outside = Command::new(files.path("copy-of-touch"));
    outside.arg(files.path("m-outside"));
    run_with_timeout(&mut outside, Duration::from_secs(10)).expect("runs");
    assert!(files.path("m-outside").exists());
}

#[test]
fn a_listed_program_replaced_by_an_upgrade_keeps_running() {
    let files = Files::new();
    let d = files.dir.path().display();
    let daemon = Daemon::start(&policy(&format!(
        "  - name: listed\n    identity: listed-bots\n    exec:\n      allow: [/usr/bin/bash, /usr/bin/sleep, /usr/bin/seq, /usr/bin/touch, \"{d}/tool\"]\n"
    )));
    let token = daemon.mint("listed-bot", &[]);
    // Runs the tool, waits for the upgrade, then tries it again for up to 10 s.
    let script = format!(
        "{d}/tool {d}/m-before; while [ ! -e {d}/upgraded ]; do sleep 0.05; done; \
         for i in $(seq 1 100); do {d}/tool {d}/m-after 2>/dev/null && break; sleep 0.1; done; echo done"
    );
    let out = thread::scope(|scope| {
        let session = scope.spawn(|| daemon.run(&token, &["/usr/bin/bash", "-c", script.as_str()]));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !files.path("m-before").exists() {
            assert!(Instant::now() < deadline, "the tool never ran before the upgrade");
            thread::sleep(Duration::from_millis(20));
        }
        // As dpkg does: a new file renamed over the old one (a new inode).
        fs::copy("/usr/bin/touch", files.path("tool.new")).expect("new version");
        fs::rename(files.path("tool.new"), files.path("tool")).expect("rename over");
        fs::write(files.path("upgraded"), "").expect("go");
        session.join().expect("session thread")
    });
    assert!(out.stdout.contains("done"), "{out}");
    assert!(files.path("m-after").exists(), "the upgraded program was refused: {out}\n{}", daemon.log());
}

#[test]
fn a_deny_of_any_grant_wins_over_an_allow_and_explain_says_which_entry_decides() {
    let files = Files::new();
    let d = files.dir.path().display();
    let grants = "  - name: tools\n    identity: listed-bots\n    exec:\n      allow: [/usr/bin/]\n  - name: no-touch\n    identity: listed-bots\n    exec:\n      deny: [/usr/bin/touch]\n";
    let daemon = Daemon::start(&policy(grants));
    let token = daemon.mint("listed-bot", &[]);
    let script = format!("/usr/bin/touch {d}/m-touch; /usr/bin/id -u > {d}/m-id; {d}/tool {d}/m-tool; echo done");
    let out = daemon.run(&token, &["/usr/bin/bash", "-c", script.as_str()]);
    assert!(out.stdout.contains("done"), "{out}");
    assert!(!files.path("m-touch").exists(), "a file allowed by one grant and denied by another ran");
    assert!(files.path("m-id").exists(), "a file the allow list names did not run: {out}");
    assert!(!files.path("m-tool").exists(), "a file no allow list names ran");

    // Each exec's record names the grant rule that decided it, which the
    // grant's use is counted from; a refusal no list names has none.
    let session = daemon.last_session_id();
    let show = daemon.show_until(&session, "the three execs recorded", |show| {
        harness::session_log::events_of_kind(show, "exec").len() >= 4
    });
    let decided = |program: &str| {
        let exec = harness::session_log::events_of_kind(&show, "exec")
            .into_iter()
            .find(|e| e["filename"] == program)
            .unwrap_or_else(|| panic!("no exec of {program} recorded: {show:#}"));
        // Refused: `deny` where the LSM hook runs, `killed` in kill-on-exec mode.
        let refused = matches!(exec["verdict"].as_str(), Some("deny" | "killed"));
        (exec.get("rule").cloned(), exec.get("grant_rules").cloned(), refused)
    };
    assert_eq!(
        decided("/usr/bin/id"),
        (
            Some(json!("tools: exec.allow /usr/bin/")),
            Some(json!([{"grant": "tools", "rule": "exec.allow /usr/bin/"}])),
            false
        )
    );
    assert_eq!(
        decided("/usr/bin/touch"),
        (
            Some(json!("no-touch: exec.deny /usr/bin/touch")),
            Some(json!([{"grant": "no-touch", "rule": "exec.deny /usr/bin/touch"}])),
            true
        )
    );
    let tool = format!("{d}/tool");
    assert_eq!(decided(&tool), (None, None, true));

    let policy_file = files.path("policy.yaml");
    fs::write(&policy_file, policy(grants)).expect("policy file");
    let explain = |path: &str| {
        let mut command = Command::new(harness::tollgate_bin());
        command.args(["policy", "explain", "--identity", "listed-bots", "--exec", path, "--policy"]).arg(&policy_file);
        let out = run_with_timeout(&mut command, Duration::from_secs(30)).expect("explain runs");
        assert!(out.success(), "{out}");
        out.stdout.trim().to_owned()
    };
    assert_eq!(explain("/usr/bin/touch"), "deny (no-touch: exec.deny /usr/bin/touch)");
    assert_eq!(explain("/usr/bin/id"), "allow (tools: exec.allow /usr/bin/)");
    let tool = files.path("tool");
    assert_eq!(explain(tool.to_str().expect("UTF-8")), "deny (not on any allow list: the default with one)");
}
