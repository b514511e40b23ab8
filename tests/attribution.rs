//! Attribution: every process a governed command starts, however it forks, is logged in the
//! session of the identity that started it, with the right parentage and argv.

use std::path::Path;
use std::process::Command;

use harness::session_log::{
    argv, events, events_of_kind, exec_with_arg, execs_of_file, exit_of, expect_exec_with_arg, fork_of, parse_rfc3339,
    pretty, process, same_path, str_field, u64_field,
};
use harness::{Daemon, unique_tag};
use serde_json::Value;

const POLICY: &str = r#"
identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims:
      repository_owner: acme
grants:
  - name: build-bots-egress
    identity: build-bots
    network:
      allow: ["0.0.0.0/0", "::/0"]
"#;

const SUBJECT: &str = "repo:acme/widgets:ref:refs/heads/main";

#[test]
fn nested_forks_and_execs_are_attributed_with_their_creators() {
    let daemon = Daemon::start(POLICY);
    let token = daemon.mint(SUBJECT, &[("repository_owner", "acme")]);

    let tag = unique_tag();
    let level1 = format!("level1-{tag}");
    let level2 = format!("level2-{tag}");
    let level3 = format!("level3-{tag}");

    // The level-3 echo writes to a FIFO that level 1 relays to stdout. That keeps level 1 (the
    // session's main command) alive until level 3 has run, whether or not the daemon ends a
    // session's stragglers when its main command exits.
    let fifo = daemon.dir().join("level3.fifo");
    make_fifo(&fifo);
    let fifo = fifo.to_str().expect("temp paths are UTF-8");

    // Level 2 starts subshell A; A starts B in the background and exits at once. B sleeps so
    // that A is gone (B reparented) before B execs /bin/echo. The trailing `true` stops dash
    // from running the subshell in level 2's own process.
    let script2 = format!(r#"( ( sleep 0.5; exec /bin/echo {level3} > "{fifo}" ) & ); true"#);
    let script1 = format!(
        r#"echo "$TOLLGATE_SESSION"; /bin/sh -c '{script2}' {level2}; read -r line < "{fifo}"; echo "relayed: $line""#
    );
    let argv1 = ["/bin/sh", "-c", script1.as_str(), level1.as_str()];

    let out = daemon.run(&token, &argv1);
    assert_eq!(out.code(), Some(0), "the governed command failed: {out}");
    assert!(
        out.has_stdout_line(&format!("relayed: {level3}")),
        "level 3's output did not come back through level 1: {out}"
    );
    let session_id = out.first_line().to_owned();
    assert!(!session_id.is_empty(), "TOLLGATE_SESSION was empty in the command: {out}");

    let sessions = daemon.sessions();
    assert_eq!(
        sessions.len(),
        1,
        "one command should make exactly one session:\n{}",
        pretty(&Value::Array(sessions.clone()))
    );
    assert_eq!(daemon.last_session_id(), session_id, "TOLLGATE_SESSION is not the logged session");

    let show = daemon.show_until(&session_id, "all three levels and level 1's exit", |show| {
        let level1_exited = exec_with_arg(show, &level1)
            .and_then(|exec| exec["pid"].as_u64())
            .is_some_and(|pid| exit_of(show, pid).is_some());
        exec_with_arg(show, &level3).is_some() && level1_exited
    });
    let context = pretty(&show);

    let session = &show["session"];
    assert_eq!(session["id"], session_id.as_str(), "show returned another session:\n{context}");
    assert_eq!(session["identity"], "build-bots", "wrong identity:\n{context}");
    assert_eq!(session["subject"], SUBJECT, "wrong subject:\n{context}");
    assert_eq!(session["issuer"], "tollgate-dev", "wrong issuer:\n{context}");
    assert_eq!(session["claims"]["repository_owner"], "acme", "claims not recorded:\n{context}");
    assert_eq!(session["grants"], serde_json::json!(["build-bots-egress"]), "grants:\n{context}");
    assert_eq!(session["uid"], 0, "the session ran as root:\n{context}");
    assert_eq!(session["privileged"], true, "a root session is privileged:\n{context}");

    // Log order is seq order.
    let seqs: Vec<u64> = events(&show).iter().map(|event| u64_field(event, "seq")).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "events out of seq order:\n{context}");

    // Level 1: the session's first process, created by `tollgate run` itself.
    let exec1 = expect_exec_with_arg(&show, &level1);
    assert_eq!(argv(exec1), argv1, "level 1 argv:\n{context}");
    assert_exec_filename(exec1, "/bin/sh", &context);
    assert_eq!(u64_field(exec1, "ppid"), u64::from(out.pid), "level 1 ppid must be `tollgate run`:\n{context}");
    let pid1 = u64_field(exec1, "pid");

    // Level 2: forked by level 1, then exec'd /bin/sh.
    let exec2 = expect_exec_with_arg(&show, &level2);
    assert_eq!(argv(exec2), ["/bin/sh", "-c", script2.as_str(), level2.as_str()], "level 2 argv:\n{context}");
    assert_exec_filename(exec2, "/bin/sh", &context);
    let pid2 = u64_field(exec2, "pid");
    assert_ne!(pid2, pid1, "level 2 must be a new process:\n{context}");
    assert_eq!(u64_field(exec2, "ppid"), pid1, "level 2 ppid must be level 1:\n{context}");
    let fork2 =
        fork_of(&show, pid2).unwrap_or_else(|| panic!("no fork event creating level 2 (pid {pid2}):\n{context}"));
    assert_eq!(u64_field(fork2, "pid"), pid1, "level 2 was not forked by level 1:\n{context}");

    // Level 3: B, forked by subshell A, which level 2 forked; A exited before B exec'd.
    let exec3 = expect_exec_with_arg(&show, &level3);
    assert_eq!(argv(exec3), ["/bin/echo", level3.as_str()], "level 3 argv:\n{context}");
    assert_exec_filename(exec3, "/bin/echo", &context);
    let pid3 = u64_field(exec3, "pid");
    let fork3 =
        fork_of(&show, pid3).unwrap_or_else(|| panic!("no fork event creating level 3 (pid {pid3}):\n{context}"));
    let pid_a = u64_field(fork3, "pid");
    assert_ne!(pid_a, pid2, "level 3 should come from a double fork, not straight from level 2:\n{context}");
    let fork_a =
        fork_of(&show, pid_a).unwrap_or_else(|| panic!("no fork event creating subshell A (pid {pid_a}):\n{context}"));
    assert_eq!(u64_field(fork_a, "pid"), pid2, "subshell A was not forked by level 2:\n{context}");
    assert_eq!(
        u64_field(exec3, "ppid"),
        pid_a,
        "level 3 ppid must be its creator A even though A exited and B was reparented:\n{context}"
    );
    let exit_a =
        exit_of(&show, pid_a).unwrap_or_else(|| panic!("no exit event for subshell A (pid {pid_a}):\n{context}"));
    assert!(
        u64_field(exit_a, "seq") < u64_field(exec3, "seq"),
        "A should have exited before level 3 exec'd (the scenario under test):\n{context}"
    );
    assert_eq!(exit_a["exit_code"], 0, "subshell A exit code:\n{context}");

    for exec in [exec1, exec2, exec3] {
        assert_eq!(exec["verdict"], "allow", "nothing here is denied:\n{context}");
        assert_eq!(exec["argv_truncated"], false, "short argv reported truncated:\n{context}");
        assert_eq!(exec["uid"], 0, "exec uid:\n{context}");
    }

    // The processes table agrees with the events.
    let process3 =
        process(&show, pid3).unwrap_or_else(|| panic!("level 3 (pid {pid3}) missing from processes:\n{context}"));
    assert_eq!(u64_field(process3, "ppid"), pid_a, "level 3's recorded creator:\n{context}");
    assert_exec_filename(process3, "/bin/echo", &context);
    let process2 =
        process(&show, pid2).unwrap_or_else(|| panic!("level 2 (pid {pid2}) missing from processes:\n{context}"));
    assert_eq!(u64_field(process2, "ppid"), pid1, "level 2's recorded creator:\n{context}");
    let process1 =
        process(&show, pid1).unwrap_or_else(|| panic!("level 1 (pid {pid1}) missing from processes:\n{context}"));
    assert_eq!(process1["exit_code"], 0, "level 1 exit code:\n{context}");

    // The session ends once its command has.
    let ended = daemon.session_until(&session_id, "the session's ended_at", |session| !session["ended_at"].is_null());
    let started_at = parse_rfc3339(str_field(&ended, "started_at"))
        .unwrap_or_else(|| panic!("started_at is not RFC 3339:\n{}", pretty(&ended)));
    let ended_at = parse_rfc3339(str_field(&ended, "ended_at"))
        .unwrap_or_else(|| panic!("ended_at is not RFC 3339:\n{}", pretty(&ended)));
    assert!(ended_at >= started_at, "session ended before it started:\n{}", pretty(&ended));
}

#[test]
fn long_argv_is_recorded_truncated() {
    let daemon = Daemon::start(POLICY);
    let token = daemon.mint("argv-bot", &[("repository_owner", "acme")]);

    // 200 distinct 20-character arguments: 4 KiB of argv, more than an exec event carries.
    let tag = unique_tag();
    let args: Vec<String> = (0..200).map(|i| format!("{:0<20}", format!("a{i:03}-{tag}-"))).collect();
    assert!(args.iter().all(|arg| arg.len() == 20), "test bug: args are not 20 characters");
    let mut full_argv = vec!["/bin/echo".to_owned()];
    full_argv.extend(args.iter().cloned());

    let out = daemon.run(&token, &full_argv);
    assert_eq!(out.code(), Some(0), "the governed command failed: {out}");
    assert_eq!(out.stdout.trim_end(), args.join(" "), "the command itself must see its whole argv");

    let session_id = daemon.last_session_id();
    // Found by filename rather than by argument, so the test still reports clearly if the daemon
    // truncated so hard that not even the first argument survived.
    let echo = Path::new("/bin/echo");
    let show = daemon.show_until(&session_id, "the exec of /bin/echo with the long argv", |show| {
        !execs_of_file(show, echo).is_empty()
    });
    let context = pretty(&show);
    let exec = execs_of_file(&show, echo)[0];
    assert_eq!(exec["argv_truncated"], true, "4 KiB of argv was not flagged truncated:\n{context}");

    assert_argv_prefix(exec, &full_argv, &context);
}

/// An exec event carries the file name and the arguments one after the
/// other, only as many bytes of each as they use: with both at their
/// longest (a 300-byte path, 4 KiB of arguments) each is kept as a faithful
/// prefix of its full length, and flagged as cut.
#[test]
fn a_long_file_name_and_a_long_argv_are_each_kept_in_full_measure() {
    let daemon = Daemon::start(POLICY);
    let token = daemon.mint("argv-bot", &[("repository_owner", "acme")]);
    let mut dir = daemon.dir().to_path_buf();
    for level in 0..3 {
        dir.push(format!("{:x<100}", format!("level{level}-")));
    }
    std::fs::create_dir_all(&dir).expect("long directory");
    let program = dir.join("echo");
    std::fs::copy("/bin/echo", &program).expect("copy of echo");
    let program = program.to_str().expect("UTF-8 path").to_owned();
    assert!(program.len() > 300, "test bug: the path is only {} bytes", program.len());

    let tag = unique_tag();
    let mut full_argv = vec![program.clone()];
    full_argv.extend((0..200).map(|i| format!("{:0<20}", format!("a{i:03}-{tag}-"))));
    let out = daemon.run(&token, &full_argv);
    assert_eq!(out.code(), Some(0), "the governed command failed: {out}");

    let session_id = daemon.last_session_id();
    let cut_name = |show: &Value| -> Option<Value> {
        events_of_kind(show, "exec").into_iter().find(|event| event["filename_truncated"] == true).cloned()
    };
    let show = daemon.show_until(&session_id, "the exec with the long file name", |show| cut_name(show).is_some());
    let context = pretty(&show);
    let exec = &cut_name(&show).expect("found above");
    let filename = str_field(exec, "filename");
    assert_eq!(filename.len(), 255, "the file name was not kept to the most an event holds:\n{context}");
    assert!(program.starts_with(filename), "the recorded file name is not a prefix of the real one:\n{context}");
    assert_eq!(exec["argv_truncated"], true, "4 KiB of argv was not flagged truncated:\n{context}");
    // All 512 bytes of arguments follow the cut file name: NUL-separated
    // whole arguments, then one cut short (or none, where the cut fell on a NUL).
    let kept: usize = argv(exec).iter().map(|arg| arg.len() + 1).sum();
    assert!((512..=513).contains(&kept), "{kept} bytes of argv kept, not 512:\n{context}");
    assert_argv_prefix(exec, &full_argv, &context);
}

/// What was kept of an exec's argv is a faithful prefix of `full_argv`:
/// whole arguments, then possibly a cut-off last one, and less than all.
fn assert_argv_prefix(exec: &Value, full_argv: &[String], context: &str) {
    let recorded = argv(exec);
    assert!(recorded.len() <= full_argv.len(), "more argv recorded than passed:\n{context}");
    let (last, whole) = recorded.split_last().unwrap_or_else(|| panic!("exec event has an empty argv:\n{context}"));
    for (index, arg) in whole.iter().enumerate() {
        assert_eq!(*arg, full_argv[index], "recorded argv[{index}] differs:\n{context}");
    }
    assert!(
        full_argv[whole.len()].starts_with(last),
        "recorded argv[{}] is not a prefix of the real one:\n{context}",
        whole.len()
    );
    assert!(
        recorded.len() < full_argv.len() || *last != full_argv[full_argv.len() - 1],
        "argv_truncated is true but the whole argv was recorded:\n{context}"
    );
}

/// Checks an exec event's or process's filename against the path that was exec'd.
fn assert_exec_filename(record: &Value, expected: &str, context: &str) {
    let filename = str_field(record, "filename");
    assert!(same_path(filename, Path::new(expected)), "filename {filename:?} is not {expected}:\n{context}");
}

fn make_fifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap_or_else(|err| panic!("running mkfifo {}: {err}", path.display()));
    assert!(status.success(), "mkfifo {} failed with {status}", path.display());
}
