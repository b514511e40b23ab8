//! Delegation chains: `tollgate run` inside a session opens a child session whose rights are the
//! intersection of its own grants and its parent's, nested in the parent's cgroup, recorded with
//! its parent, reason, ttl and depth, and ended with its parent.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;

use harness::net::Listener;
use harness::proxy::{
    LONG_APPROVAL_TIMEOUT, REVIEWERS, approval_id, curl_argv, http_events, path_str, wait_for_approvals,
};
use harness::rounds::Rounds;
use harness::session_log::{connects_to, events_of_kind, pretty, str_field};
use harness::upstream::Upstream;
use harness::{Daemon, RunOutput, tollgate_bin, unique_tag};
use serde_json::Value;

/// Claims of the `lead-agents` identity (the top of the chains here).
const LEAD: &[(&str, &str)] = &[("role", "lead")];
/// Claims of the `sub-agents` identity, whose tokens the lead hands to its sub-agents.
const SUB: &[(&str, &str)] = &[("role", "sub")];

/// A root-owned copy of `/usr/bin/touch` in `dir`: a binary that, if it runs, leaves a marker file.
fn toucher(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    fs::copy("/usr/bin/touch", &path).unwrap_or_else(|err| panic!("copying touch to {}: {err}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod 755");
    path
}

/// A script file each level of a chain runs: it reports the session it is in, tries each
/// destination and each marker binary, then (for `token FILE` or `grant NAME`) opens the next
/// level running the same script, which reports under the next level's name.
fn chain_script(dir: &Path, daemon: &Daemon, tries: &[(&str, &str, u16)], markers: &[(&Path, &Path)]) -> PathBuf {
    let mut body = String::from("level=$1; mode=$2; arg=$3; next=$4\necho \"$level session=$TOLLGATE_SESSION\"\n");
    for (name, host, port) in tries {
        body.push_str(&format!(
            "if /bin/bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' {host} {port} 2>/dev/null; then echo \"$level {name}=ok\"; else echo \"$level {name}=refused\"; fi\n"
        ));
    }
    for (binary, marks) in markers {
        let name = binary.file_name().and_then(|n| n.to_str()).expect("file name");
        body.push_str(&format!(
            "{} {}/{name}-$level 2>/dev/null; echo \"$level {name}_status=$?\"\n",
            binary.display(),
            marks.display()
        ));
    }
    body.push_str(&format!(
        r#"case "$mode" in
  token) {bin} --socket {socket} run --token-file "$arg" --reason "sub-task for $level" -- /bin/sh "$0" "$next" grant sub-net L2 ;;
  grant) {bin} --socket {socket} run --grant "$arg" --reason "narrow helper" -- /bin/sh "$0" "$next" none none none ;;
  *) true ;;
esac
echo "$level next_status=$?"
"#,
        bin = tollgate_bin().display(),
        socket = daemon.socket().display(),
    ));
    let path = dir.join(format!("chain-{}.sh", unique_tag()));
    fs::write(&path, body).expect("writing the chain script");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod 755");
    path
}

fn reported<'a>(out: &'a RunOutput, level: &str, key: &str) -> &'a str {
    let prefix = format!("{level} {key}=");
    out.stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("level {level} reported no {key}: {out}"))
}

/// The two identities every policy here has: the lead agents and the sub-agents they start.
const IDENTITIES: &str = "identities:
  - name: lead-agents
    issuer: tollgate-dev
    allow_root: true
    claims: { role: lead }
  - name: sub-agents
    issuer: tollgate-dev
    allow_root: true
    claims: { role: sub }
";

fn chain_policy(touch_top: &Path, touch_child: &Path) -> String {
    format!(
        r#"{IDENTITIES}grants:
  - name: lead-net
    identity: lead-agents
    exec: {{ deny: ["{top}"] }}
    network:
      allow: ["127.0.0.0/8", "::1/128"]
      deny: ["127.0.0.3/32"]
  - name: sub-net
    identity: sub-agents
    exec: {{ deny: ["{child}"] }}
    network:
      allow: ["0.0.0.0/0"]
      deny: ["127.0.0.4/32"]
  - name: sub-extra
    identity: sub-agents
    network:
      allow: ["::1/128"]
"#,
        top = touch_top.display(),
        child = touch_child.display(),
    )
}

/// top session (lead token) -> child (a sub-agent token that allows all of IPv4) -> grandchild
/// (`--grant sub-net` only). Each level is refused what any level above refuses, checked on the
/// listeners and marker files; the chain is recorded and shown.
#[test]
fn a_three_level_chain_only_narrows_and_is_recorded() {
    let bins = tempfile::Builder::new().prefix("tollgate-chain-").tempdir().expect("temp dir");
    fs::set_permissions(bins.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let marks = bins.path().join("marks");
    fs::create_dir(&marks).expect("marks dir");
    let touch_top = toucher(bins.path(), "touch-top");
    let touch_child = toucher(bins.path(), "touch-child");
    let daemon = Daemon::builder()
        .policy(&chain_policy(&touch_top, &touch_child))
        .config_line(REVIEWERS)
        .config_line("delegation: { review_depth: 1 }")
        .start();
    let lead = daemon.mint("lead-agent", LEAD);
    let sub = daemon.mint("sub-agent", SUB);

    let (denied_by_top, denied_by_child, open, v6) =
        (Listener::bind("127.0.0.3"), Listener::bind("127.0.0.4"), Listener::bind("127.0.0.5"), Listener::bind("::1"));
    let script = chain_script(
        bins.path(),
        &daemon,
        &[
            ("top_denied", "127.0.0.3", denied_by_top.port()),
            // The same address as IPv4-mapped IPv6: another family, the same destination.
            ("top_denied_mapped", "::ffff:127.0.0.3", denied_by_top.port()),
            ("child_denied", "127.0.0.4", denied_by_child.port()),
            ("open", "127.0.0.5", open.port()),
            ("v6", "::1", v6.port()),
        ],
        &[(&touch_top, &marks), (&touch_child, &marks)],
    );
    let out = daemon.run(&lead, &["/bin/sh", path_str(&script), "L0", "token", path_str(&sub), "L1"]);
    assert_eq!(out.code(), Some(0), "the chain should run to its end: {out}");
    for level in ["L0", "L1", "L2"] {
        assert_eq!(reported(&out, level, "next_status"), "0", "{level} should finish: {out}");
        assert_eq!(reported(&out, level, "top_denied"), "refused", "{level}: the top's deny: {out}");
        assert_eq!(reported(&out, level, "top_denied_mapped"), "refused", "{level}: the top's deny, mapped: {out}");
        assert_eq!(reported(&out, level, "open"), "ok", "{level}: allowed at every level: {out}");
    }
    assert_eq!(reported(&out, "L0", "child_denied"), "ok", "{out}");
    assert_eq!(reported(&out, "L1", "child_denied"), "refused", "{out}");
    assert_eq!(reported(&out, "L2", "child_denied"), "refused", "{out}");
    assert_eq!(reported(&out, "L0", "v6"), "ok", "{out}");
    assert_eq!(reported(&out, "L1", "v6"), "ok", "the child holds sub-extra: {out}");
    assert_eq!(reported(&out, "L2", "v6"), "refused", "--grant sub-net leaves sub-extra out: {out}");
    // The receiving side: what each listener got.
    assert_eq!(denied_by_top.take_connections(), 0, "a more permissive child token reached the top's denied address");
    assert_eq!(denied_by_child.take_connections(), 1, "only the top may reach 127.0.0.4");
    assert_eq!(open.take_connections(), 3, "every level reaches 127.0.0.5");
    assert_eq!(v6.take_connections(), 2, "top and child reach ::1, the grandchild not");
    // And the marker files the denied binaries would have written.
    let marked = |name: &str| marks.join(name).exists();
    for level in ["L0", "L1", "L2"] {
        assert!(!marked(&format!("touch-top-{level}")), "the top's denied binary ran at {level}: {out}");
    }
    assert!(marked("touch-child-L0"), "the top may run what only the child denies: {out}");
    assert!(!marked("touch-child-L1") && !marked("touch-child-L2"), "the child's denied binary ran: {out}");

    let ids: Vec<String> = ["L0", "L1", "L2"].iter().map(|l| reported(&out, l, "session").to_owned()).collect();
    let sessions = daemon.sessions();
    let record =
        |id: &str| sessions.iter().find(|s| s["id"] == id).cloned().unwrap_or_else(|| panic!("no record {id}"));
    let (top, child, grandchild) = (record(&ids[0]), record(&ids[1]), record(&ids[2]));
    let all = pretty(&Value::Array(sessions.clone()));
    assert_eq!((top["parent"].clone(), top["depth"].clone()), (Value::Null, 0.into()), "{all}");
    assert_eq!((child["parent"].as_str(), child["depth"].as_u64()), (Some(ids[0].as_str()), Some(1)), "{all}");
    assert_eq!(
        (grandchild["parent"].as_str(), grandchild["depth"].as_u64()),
        (Some(ids[1].as_str()), Some(2)),
        "{all}"
    );
    assert_eq!((str_field(&top, "identity"), str_field(&child, "identity")), ("lead-agents", "sub-agents"), "{all}");
    assert_eq!(str_field(&grandchild, "identity"), "sub-agents", "--grant keeps the identity: {all}");
    assert_eq!(child["reason"], "sub-task for L0", "{all}");
    assert_eq!(grandchild["grants"], serde_json::json!(["sub-net"]), "{all}");
    assert_eq!(child["grants"], serde_json::json!(["sub-net", "sub-extra"]), "{all}");
    // Nested cgroups: each child's cgroup is inside its parent's.
    assert!(str_field(&child, "cgroup").starts_with(&format!("{}/", str_field(&top, "cgroup"))), "{all}");
    assert!(str_field(&grandchild, "cgroup").starts_with(&format!("{}/", str_field(&child, "cgroup"))), "{all}");

    // The refusal names the rule of the level that refused.
    let show = daemon.show_until(&ids[2], "the grandchild's refused connect", |show| {
        !connects_to(show, "127.0.0.3", denied_by_top.port()).is_empty()
    });
    let refused = connects_to(&show, "127.0.0.3", denied_by_top.port())[0];
    assert_eq!(refused["verdict"], "deny", "{}", pretty(&show));
    assert_eq!(refused["rule"], "lead-net: network.deny 127.0.0.3/32", "{}", pretty(&show));

    // `show` prints the chain up to the top; `sessions` indents children under their parent.
    let text = daemon.tollgate(&["show", &ids[2]]);
    assert!(text.stdout.contains("delegated by"), "{text}");
    let chain_line = |id: &str| text.stdout.lines().any(|l| l.trim_start().starts_with(id));
    assert!(chain_line(&ids[1]) && chain_line(&ids[0]), "show names both ancestors: {text}");
    assert!(text.stdout.contains("reason: sub-task for L0") && text.stdout.contains("identity lead-agents"), "{text}");
    let list = daemon.tollgate(&["sessions"]);
    let line_of = |id: &str| list.stdout.lines().find(|l| l.contains(id)).map(str::to_owned).unwrap_or_default();
    assert!(line_of(&ids[0]).starts_with(&ids[0]), "{list}");
    assert!(line_of(&ids[1]).starts_with(&format!("└ {}", ids[1])), "{list}");
    assert!(line_of(&ids[2]).starts_with(&format!("  └ {}", ids[2])), "{list}");
    let order: Vec<usize> = ids.iter().map(|id| list.stdout.find(id.as_str()).unwrap_or(usize::MAX)).collect();
    assert!(order[0] < order[1] && order[1] < order[2], "the tree is in order: {list}");

    // A chain deeper than the review threshold (1 here) is a finding, about the deep session only.
    let out = daemon.tollgate(&["review", "--format", "json"]);
    let review: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out}"));
    let deep: Vec<&Value> =
        review["findings"].as_array().into_iter().flatten().filter(|f| f["kind"] == "deep_delegation").collect();
    assert_eq!(deep.len(), 1, "{}", pretty(&review));
    assert_eq!(
        (deep[0]["evidence"]["session"].as_str(), deep[0]["evidence"]["depth"].as_u64()),
        (Some(ids[2].as_str()), Some(2))
    );
    assert_eq!(deep[0]["evidence"]["parent"].as_str(), Some(ids[1].as_str()));
}

/// Policy for the proxy tests: the lead proxies the upstream with a DELETE block; the sub-agent
/// token allows everything directly, or proxies it with a POST block of its own.
fn proxy_policy(port: u16, sub_proxies: bool) -> String {
    let sub_network = if sub_proxies {
        format!(
            "      allow: [\"0.0.0.0/0\"]\n      proxy:\n        - to: \"127.0.0.1/32:{port}\"\n          protocol: http\n          block: [{{ method: POST }}]\n"
        )
    } else {
        "      allow: [\"0.0.0.0/0\", \"::/0\"]\n".to_owned()
    };
    format!(
        r#"{IDENTITIES}grants:
  - name: lead-net
    identity: lead-agents
    network:
      allow: ["127.0.0.0/8"]
      proxy:
        - to: "127.0.0.1/32:{port}"
          protocol: http
          block: [{{ method: DELETE }}]
  - name: sub-net
    identity: sub-agents
    network:
{sub_network}"#
    )
}

/// Runs curl in a child session (sub-agent token) opened from a lead session.
fn curl_in_child(daemon: &Daemon, lead: &Path, sub: &Path, args: &[&str]) -> RunOutput {
    let mut argv: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        r#"bin=$1; socket=$2; token=$3; shift 3; exec "$bin" --socket "$socket" run --token-file "$token" -- "$@""#
            .into(),
        "sh".into(),
        tollgate_bin().display().to_string(),
        daemon.socket().display().to_string(),
        sub.display().to_string(),
    ];
    argv.extend(curl_argv(args));
    daemon.run(lead, &argv)
}

/// A child whose token allows the upstream directly still goes through the parent's proxy and
/// its block rule; where both levels govern it, both levels' rules apply.
#[test]
fn a_child_cannot_skip_its_parents_proxy_rules() {
    for sub_proxies in [false, true] {
        let upstream = Upstream::start("127.0.0.1", 200, r#"{"ok":true}"#);
        let daemon = Daemon::builder()
            .policy(&proxy_policy(upstream.port(), sub_proxies))
            .config_line(harness::proxy::REVIEWERS)
            .start();
        let (lead, sub) = (daemon.mint("lead", LEAD), daemon.mint("sub", SUB));
        let url = format!("{}/items/1", upstream.base_url());

        let out = curl_in_child(&daemon, &lead, &sub, &["-X", "DELETE", &url]);
        assert!(
            out.stdout.trim_end().ends_with("403"),
            "the parent's block applies in the child ({sub_proxies}): {out}"
        );
        let out = curl_in_child(&daemon, &lead, &sub, &["-X", "POST", &url]);
        let post_status = if sub_proxies { "403" } else { "200" };
        assert!(out.stdout.trim_end().ends_with(post_status), "POST in the child ({sub_proxies}): {out}");
        let out = curl_in_child(&daemon, &lead, &sub, &[&url]);
        assert!(out.stdout.trim_end().ends_with("200"), "GET passes ({sub_proxies}): {out}");

        let methods: Vec<String> =
            upstream.request_lines().iter().filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect();
        let expected: Vec<&str> = if sub_proxies { vec!["GET"] } else { vec!["POST", "GET"] };
        assert_eq!(methods, expected, "what reached the upstream ({sub_proxies}): {}", upstream.describe());

        // The exchanges are recorded in the child session, which went through the proxy.
        let child = daemon.sessions().into_iter().find(|s| s["depth"] == 1).expect("a child session");
        let show = daemon.show_until(str_field(&child, "id"), "the child's exchange", |s| !http_events(s).is_empty());
        assert!(!http_events(&show).is_empty(), "{}", pretty(&show));

        // Each block that fired counts as a use of the grant rule it came from, the parent's
        // included, though the child's merged route applied it.
        let expected =
            if sub_proxies { vec![("lead-net", "DELETE"), ("sub-net", "POST")] } else { vec![("lead-net", "DELETE")] };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let grants = daemon.tollgate(&["grants", "--format", "json"]);
            let grants: Value =
                serde_json::from_str(&grants.stdout).unwrap_or_else(|e| panic!("grants as JSON: {e}: {grants}"));
            let uses = |grant: &str, method: &str| -> i64 {
                grants
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| g["name"] == grant)
                    .flat_map(|g| g["rule_use"].as_array().cloned().unwrap_or_default())
                    .filter(|r| r["rule"].as_str().is_some_and(|r| r.starts_with("proxy.block") && r.contains(method)))
                    .map(|r| r["count"].as_i64().unwrap_or(0))
                    .sum()
            };
            let counted: Vec<i64> = expected.iter().map(|(grant, method)| uses(grant, method)).collect();
            if counted.iter().all(|c| *c == 1) {
                assert_eq!(uses("sub-net", "DELETE"), 0, "the parent's block counted for the child's grant: {grants}");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "block uses {expected:?} ({sub_proxies}) are {counted:?}: {}",
                pretty(&grants)
            );
            thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// The `lead-agents` identity, which requires a reason for every session, with one network grant.
const REASONED_LEAD: &str = r#"identities:
  - name: lead-agents
    issuer: tollgate-dev
    allow_root: true
    require_reason: true
    claims: { role: lead }
grants:
  - name: lead-net
    identity: lead-agents
    network: { allow: ["127.0.0.0/8"] }
"#;

/// `sh -c SCRIPT` with the tollgate binary as `$1`, the daemon's socket as `$2` and `extra` after.
fn shell_with_tollgate(daemon: &Daemon, script: String, extra: &[&Path]) -> Vec<String> {
    let mut argv = vec![
        "/bin/sh".to_owned(),
        "-c".into(),
        script,
        "sh".into(),
        tollgate_bin().display().to_string(),
        daemon.socket().display().to_string(),
    ];
    argv.extend(extra.iter().map(|path| path.display().to_string()));
    argv
}

/// `--reason` is required where the identity says so, `--grant` works only inside a session and
/// only for grants the parent holds, the depth is bounded, and `--ttl` ends the session.
#[test]
fn reasons_ttls_grants_and_depth_are_enforced() {
    let daemon = Daemon::builder().policy(REASONED_LEAD).config_line("delegation: { max_depth: 2 }").start();
    let lead = daemon.mint("lead", LEAD);
    let marks = tempfile::Builder::new().prefix("tollgate-marks-").tempdir().expect("temp dir");
    let marker = |name: &str| marks.path().join(name);
    let touch = |name: &str| vec!["/usr/bin/touch".to_owned(), marker(name).display().to_string()];
    let socket = daemon.socket().display().to_string();

    // No reason: refused with exit 2, nothing ran, nothing recorded.
    let out = daemon.run(&lead, &touch("no-reason"));
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("requires a reason") && out.stderr.contains("--reason"), "{out}");
    assert!(!marker("no-reason").exists(), "the command ran without a reason");
    assert!(daemon.sessions().is_empty(), "a refused session left a record: {:?}", daemon.sessions());

    // --grant outside a session: refused with exit 2.
    let out = daemon.tollgate(&[
        "run",
        "--grant",
        "lead-net",
        "--reason",
        "x",
        "--",
        "/usr/bin/touch",
        &marker("outside").display().to_string(),
    ]);
    assert_eq!(out.code(), Some(2), "{out}");
    assert!(out.stderr.contains("only inside a session"), "{out}");
    assert!(!marker("outside").exists());

    // Inside: a grant the parent does not hold, and a chain deeper than max_depth, are refused.
    let inner = format!(
        r#"bin=$1; socket=$2
"$bin" --socket "$socket" run --grant no-such-grant --reason r -- /usr/bin/touch {unknown}; echo "unknown_status=$?"
"$bin" --socket "$socket" run --grant lead-net --reason "level 1" -- /bin/sh -c '"$0" --socket "$1" run --grant lead-net --reason "level 2" -- /usr/bin/touch {deep}; echo "deep_status=$?"' "$bin" "$socket"
echo "child_status=$?""#,
        unknown = marker("unknown").display(),
        deep = marker("deep").display(),
    );
    let out = run_with_reason(&daemon, &lead, "top level", &shell_with_tollgate(&daemon, inner, &[]));
    assert!(out.has_stdout_line("unknown_status=2"), "{out}");
    assert!(out.stderr.contains("holds no grant 'no-such-grant'"), "{out}");
    assert!(out.has_stdout_line("deep_status=2") && out.has_stdout_line("child_status=0"), "{out}");
    assert!(out.stderr.contains("at most 2 sessions deep"), "{out}");
    assert!(!marker("unknown").exists() && !marker("deep").exists(), "a refused child ran its command");
    let sessions = daemon.sessions();
    assert_eq!(sessions.len(), 2, "the top and one child: {}", pretty(&Value::Array(sessions.clone())));
    assert!(sessions.iter().any(|s| s["reason"] == "top level" && s["depth"] == 0));

    // --ttl: the session is killed once it passes, and the record says why.
    let started = std::time::Instant::now();
    let mut argv = vec!["run".to_owned(), "--socket".into(), socket, "--token-file".into(), lead.display().to_string()];
    argv.extend(
        ["--reason", "bounded", "--ttl", "2s", "--", "/bin/sh", "-c", "echo $TOLLGATE_SESSION; sleep 30; touch $0"]
            .map(str::to_owned),
    );
    argv.push(marker("ttl").display().to_string());
    let out = daemon.tollgate(&argv);
    assert!(started.elapsed() < std::time::Duration::from_secs(25), "the ttl did not end the session: {out}");
    assert_eq!(out.code(), Some(77), "ended by policy (the ttl): {out}");
    assert!(out.stderr.contains("session reached its --ttl"), "{out}");
    assert!(!marker("ttl").exists());
    let id = out.first_line().to_owned();
    let show = daemon
        .show_until(&id, "the ttl expiry", |s| events_of_kind(s, "session").iter().any(|e| e["verdict"] == "expired"));
    let expired = events_of_kind(&show, "session").into_iter().find(|e| e["verdict"] == "expired").cloned();
    assert_eq!(expired.map(|e| e["ttl_secs"].clone()), Some(2.into()), "{}", pretty(&show));
    assert_eq!(show["session"]["ttl_secs"], 2, "{}", pretty(&show));
}

fn run_with_reason(daemon: &Daemon, token: &Path, reason: &str, argv: &[String]) -> RunOutput {
    let mut args = vec!["run".to_owned(), "--socket".into(), daemon.socket().display().to_string()];
    args.extend([
        "--token-file".to_owned(),
        token.display().to_string(),
        "--reason".into(),
        reason.into(),
        "--".into(),
    ]);
    args.extend(argv.iter().cloned());
    daemon.tollgate(&args)
}

/// Revoking a session ends its children too, and each child's record says so.
#[test]
fn revoking_a_parent_ends_its_children() {
    let daemon = Daemon::builder().policy(&proxy_policy(9, false)).config_line(REVIEWERS).start();
    let (lead, sub) = (daemon.mint("lead", LEAD), daemon.mint("sub", SUB));
    let inner = r#"echo "top=$TOLLGATE_SESSION"; "$0" --socket "$1" run --token-file "$2" -- /bin/sh -c 'echo "child=$TOLLGATE_SESSION"; exec sleep 60'; echo "child_status=$?""#;
    let argv = [
        "/bin/sh".to_owned(),
        "-c".into(),
        inner.into(),
        tollgate_bin().display().to_string(),
        daemon.socket().display().to_string(),
        sub.display().to_string(),
    ];
    thread::scope(|scope| {
        let running = scope.spawn(|| daemon.run(&lead, &argv));
        let child = wait_for_depth(&daemon, 1);
        let top = child["parent"].as_str().expect("parent").to_owned();
        let out = daemon.tollgate(&["revoke", &top, "--reason", "done with it"]);
        assert!(out.success(), "{out}");
        let out = running.join().expect("the session thread");
        assert!(out.stdout.contains("child=") && !out.has_stdout_line("child_status=0"), "{out}");
        let child_id = str_field(&child, "id").to_owned();
        let show = daemon.show_until(&child_id, "the child's end", |s| !s["session"]["ended_at"].is_null());
        let revoked = events_of_kind(&show, "session").into_iter().find(|e| e["verdict"] == "revoked").cloned();
        let revoked = revoked.unwrap_or_else(|| panic!("the child has no revoked record:\n{}", pretty(&show)));
        assert_eq!(
            (revoked["ended_with"].as_str(), revoked["by"].as_str()),
            (Some(top.as_str()), Some("root")),
            "{}",
            pretty(&show)
        );
        let top_record = daemon.session_until(&top, "the top's end", |s| !s["ended_at"].is_null());
        assert!(!top_record["ended_at"].is_null());
    });
}

fn wait_for_depth(daemon: &Daemon, depth: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(s) = daemon.sessions().into_iter().find(|s| s["depth"] == depth && s["ended_at"].is_null()) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "no live session at depth {depth}: {:?}", daemon.sessions());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A child's held request shows the reviewer the whole chain (who delegated, under which
/// identity, why), and nothing reaches the upstream until it is decided.
#[test]
fn held_requests_of_a_child_show_the_chain() {
    let upstream = Upstream::start("127.0.0.1", 200, r#"{"ok":true}"#);
    let policy =
        proxy_policy(upstream.port(), false).replace("block: [{ method: DELETE }]", "approve: [{ method: POST }]");
    let daemon = Daemon::builder().policy(&policy).config_line(REVIEWERS).config_line(LONG_APPROVAL_TIMEOUT).start();
    let (lead, sub) = (daemon.mint("lead", LEAD), daemon.mint("sub", SUB));
    let url = format!("{}/deploy", upstream.base_url());
    let mut argv: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        r#"bin=$1; socket=$2; token=$3; shift 3; exec "$bin" --socket "$socket" run --token-file "$token" --reason "deploy step" -- "$@""#.into(),
        "sh".into(),
        tollgate_bin().display().to_string(),
        daemon.socket().display().to_string(),
        sub.display().to_string(),
    ];
    argv.extend(curl_argv(&["-X", "POST", &url]));
    thread::scope(|scope| {
        let running = scope.spawn(|| run_with_reason(&daemon, &lead, "release train", &argv));
        let held = wait_for_approvals(&daemon, 1);
        let chain = held[0]["chain"].as_array().cloned().unwrap_or_default();
        assert_eq!(chain.len(), 2, "{}", pretty(&held[0]));
        assert_eq!(
            (chain[0]["identity"].as_str(), chain[0]["reason"].as_str()),
            (Some("sub-agents"), Some("deploy step"))
        );
        assert_eq!(
            (chain[1]["identity"].as_str(), chain[1]["reason"].as_str()),
            (Some("lead-agents"), Some("release train"))
        );
        assert_eq!((chain[0]["depth"].as_u64(), chain[1]["depth"].as_u64()), (Some(1), Some(0)));
        assert!(upstream.requests().is_empty(), "a held request reached the upstream");
        let text = daemon.tollgate(&["approvals"]);
        assert!(text.stdout.contains("lead-agents") && text.stdout.contains("release train"), "{text}");
        let id = approval_id(&held[0]);
        assert!(daemon.tollgate(&["deny", &id, "--reason", "not today"]).success());
        let out = running.join().expect("the session");
        assert!(out.stdout.trim_end().ends_with("403"), "{out}");
    });
    assert!(upstream.requests().is_empty(), "a denied request reached the upstream");
}

/// Killing the daemon does not widen a child: while no daemon runs the kernel keeps the child's
/// narrowed rules, and the next daemon adopts parent and child with the chain intact (a revoke
/// of the parent still ends the child).
#[test]
fn a_chain_survives_a_killed_daemon_still_narrowed() {
    let bins = tempfile::Builder::new().prefix("tollgate-chain-").tempdir().expect("temp dir");
    fs::set_permissions(bins.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let touch_top = toucher(bins.path(), "touch-top");
    let touch_child = toucher(bins.path(), "touch-child");
    let mut daemon = Daemon::builder().policy(&chain_policy(&touch_top, &touch_child)).config_line(REVIEWERS).start();
    let (lead, sub) = (daemon.mint("lead", LEAD), daemon.mint("sub", SUB));
    let (denied_by_top, open) = (Listener::bind("127.0.0.3"), Listener::bind("127.0.0.5"));
    let rounds = Rounds::new(bins.path());
    fs::set_permissions(rounds.dir(), fs::Permissions::from_mode(0o777)).expect("chmod");
    // The child: each round, once told to, try both destinations and say what happened.
    let body = format!(
        r#"r=""
  if /bin/bash -c 'exec 3<>"/dev/tcp/127.0.0.3/{a}"' 2>/dev/null; then r="$r denied=ok"; else r="$r denied=refused"; fi
  if /bin/bash -c 'exec 3<>"/dev/tcp/127.0.0.5/{b}"' 2>/dev/null; then r="$r open=ok"; else r="$r open=refused"; fi
  echo "$r""#,
        a = denied_by_top.port(),
        b = open.port(),
    );
    let child = format!(
        "echo \"$TOLLGATE_SESSION\" > {dir}/child-id\n{rounds}\nexec sleep 60",
        dir = rounds.dir().display(),
        rounds = rounds.script(3, &body)
    );
    let top = [
        "/bin/sh".to_owned(),
        "-c".into(),
        r#"echo "$TOLLGATE_SESSION"; "$0" --socket "$1" run --token-file "$2" -- /bin/sh -c "$3""#.into(),
        tollgate_bin().display().to_string(),
        daemon.socket().display().to_string(),
        sub.display().to_string(),
        child,
    ];
    let mut command = std::process::Command::new(tollgate_bin());
    command.arg("--socket").arg(daemon.socket()).arg("run").arg("--token-file").arg(&lead).arg("--").args(top);
    let running = thread::spawn(move || harness::run_with_timeout(&mut command, std::time::Duration::from_secs(60)));
    assert_eq!(rounds.next(), "denied=refused open=ok");
    daemon.kill_hard();
    assert_eq!(rounds.next(), "denied=refused open=ok", "with no daemon the child keeps its narrowed rules");
    daemon.restart();
    assert_eq!(daemon.status()["sessions_active"], 2, "parent and child adopted: {}", pretty(&daemon.status()));
    assert_eq!(rounds.next(), "denied=refused open=ok", "adopted, the child is still narrowed");
    assert_eq!(denied_by_top.take_connections(), 0, "the parent's denied address was reached");
    assert_eq!(open.take_connections(), 3);

    let child_id = fs::read_to_string(rounds.dir().join("child-id")).expect("child id").trim().to_owned();
    let child = daemon.session(&child_id);
    let parent = child["parent"].as_str().expect("the child's parent").to_owned();
    let out = daemon.tollgate(&["revoke", &parent]);
    assert!(out.success(), "{out}");
    let out = running.join().expect("the session thread").expect("tollgate run");
    assert_ne!(out.code(), Some(0), "{out}");
    let show = daemon.show_until(&child_id, "the adopted child's end", |s| !s["session"]["ended_at"].is_null());
    let kinds: Vec<(&str, &str)> = events_of_kind(&show, "session")
        .iter()
        .map(|e| {
            (e["verdict"].as_str().unwrap_or(""), e["outcome"].as_str().or(e["ended_with"].as_str()).unwrap_or(""))
        })
        .collect();
    assert!(kinds.contains(&("daemon-gap", "adopted")), "{}", pretty(&show));
    assert!(kinds.contains(&("revoked", parent.as_str())), "the revoke reached the adopted child: {}", pretty(&show));
}

/// A child needs a reason of its own where its identity requires one, and its `--ttl` ends it
/// (exit 77) while the parent goes on; a parent whose own processes have all exited stays open
/// while a child of it still runs, and both end once the child's last process has.
#[test]
fn a_childs_reason_and_ttl_are_its_own_and_a_parent_lives_while_a_child_runs() {
    let daemon = Daemon::start(REASONED_LEAD);
    let lead = daemon.mint("lead", LEAD);
    let marks = tempfile::Builder::new().prefix("tollgate-marks-").tempdir().expect("temp dir");
    let marker = |name: &str| marks.path().join(name).display().to_string();
    let script = format!(
        r#"bin=$1; socket=$2
"$bin" --socket "$socket" run --grant lead-net -- /usr/bin/touch {no_reason}; echo "no_reason_status=$?"
"$bin" --socket "$socket" run --grant lead-net --reason bounded --ttl 2s -- /bin/sh -c 'sleep 30; touch {ttl}'; echo "ttl_status=$?"
echo "parent_alive=$TOLLGATE_SESSION""#,
        no_reason = marker("no-reason"),
        ttl = marker("ttl"),
    );
    let started = std::time::Instant::now();
    let argv = shell_with_tollgate(&daemon, script, &[]);
    let out = run_with_reason(&daemon, &lead, "top", &argv);
    assert!(started.elapsed() < std::time::Duration::from_secs(25), "the child's ttl did not end it: {out}");
    assert!(out.has_stdout_line("no_reason_status=2"), "a child without a reason ran: {out}");
    assert!(out.stderr.contains("requires a reason"), "{out}");
    assert!(out.has_stdout_line("ttl_status=77") && out.stderr.contains("session reached its --ttl"), "{out}");
    assert!(out.stdout.contains("parent_alive=s-") && out.success(), "the parent went on: {out}");
    thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !Path::new(&marker("no-reason")).exists() && !Path::new(&marker("ttl")).exists(),
        "a refused or expired child ran on"
    );
    let sessions = daemon.sessions();
    let child = sessions.iter().find(|s| s["reason"] == "bounded").expect("the ttl child's record");
    assert_eq!((child["depth"].clone(), child["ttl_secs"].clone()), (1.into(), 2.into()), "{}", pretty(child));
    assert_eq!(sessions.len(), 2, "the refused child left no record: {}", pretty(&Value::Array(sessions.clone())));

    // The parent's own processes exit (its `run` of the child is killed); the child runs on.
    let script = format!(
        r#"bin=$1; socket=$2
"$bin" --socket "$socket" run --grant lead-net --reason outlives -- /bin/sh -c 'sleep 4; touch {late}' &
sleep 1; kill -9 $!; echo "parent_done""#,
        late = marker("late"),
    );
    let argv = shell_with_tollgate(&daemon, script, &[]);
    thread::scope(|scope| {
        let running = scope.spawn(|| run_with_reason(&daemon, &lead, "parent of a long child", &argv));
        thread::sleep(std::time::Duration::from_millis(2500));
        let sessions = daemon.sessions();
        let child = sessions.iter().find(|s| s["reason"] == "outlives").expect("the long child's record").clone();
        let parent = sessions.iter().find(|s| s["id"] == child["parent"]).expect("its parent's record").clone();
        let parent_procs = daemon.show(str_field(&parent, "id"));
        assert!(!Path::new(&marker("late")).exists(), "the child finished too early for this test");
        assert!(
            child["ended_at"].is_null() && parent["ended_at"].is_null(),
            "a parent with a running child ended: {}\n{}",
            pretty(&Value::Array(sessions.clone())),
            pretty(&parent_procs)
        );
        let out = running.join().expect("the session thread");
        assert!(out.has_stdout_line("parent_done"), "{out}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let sessions = daemon.sessions();
            let ended = |id: &Value| sessions.iter().any(|s| s["id"] == *id && !s["ended_at"].is_null());
            if ended(&child["id"]) && ended(&parent["id"]) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{}", pretty(&Value::Array(sessions.clone())));
            thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    assert!(Path::new(&marker("late")).exists(), "the child did not run to its end");
}

/// Exec allow lists add up along a chain: a child runs only what its own list and every list
/// above it allow (files checked by the markers they would write).
#[test]
fn a_childs_exec_allow_list_is_narrowed_by_its_parents() {
    let bins = tempfile::Builder::new().prefix("tollgate-bins-").tempdir().expect("temp dir");
    fs::set_permissions(bins.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let (both, parent_only, child_only) =
        (toucher(bins.path(), "both"), toucher(bins.path(), "parent-only"), toucher(bins.path(), "child-only"));
    let marks = tempfile::Builder::new().prefix("tollgate-marks-").tempdir().expect("temp dir");
    let marker = |name: &str| marks.path().join(name);
    let policy = format!(
        r#"{IDENTITIES}grants:
  - name: lead-tools
    identity: lead-agents
    exec:
      allow: [/usr/bin/dash, "{tollgate}", "{both}", "{parent_only}"]
  - name: sub-tools
    identity: sub-agents
    exec:
      allow: [/usr/bin/dash, "{both}", "{child_only}"]
"#,
        tollgate = tollgate_bin().display(),
        both = both.display(),
        parent_only = parent_only.display(),
        child_only = child_only.display(),
    );
    let daemon = Daemon::start(&policy);
    let (lead, sub) = (daemon.mint("lead", LEAD), daemon.mint("sub", SUB));
    let script = format!(
        r#"bin=$1; socket=$2; token=$3
{parent_only} {parent_mark}
"$bin" --socket "$socket" run --token-file "$token" -- /bin/sh -c '{both} {a}; {child_only} {b}; {parent_only} {c}; echo child_done'
echo "child_status=$?""#,
        parent_only = parent_only.display(),
        parent_mark = marker("parent-ran").display(),
        both = both.display(),
        child_only = child_only.display(),
        a = marker("both").display(),
        b = marker("child-only").display(),
        c = marker("parent-only").display(),
    );
    let argv = shell_with_tollgate(&daemon, script, &[&sub]);
    let out = daemon.run(&lead, &argv);
    assert!(out.stdout.contains("child_done"), "{out}");
    assert!(marker("parent-ran").exists(), "the parent's own list lets it run parent-only: {out}");
    assert!(marker("both").exists(), "a file both lists allow runs in the child: {out}");
    assert!(!marker("child-only").exists(), "the child ran a file its parent's list does not allow: {out}");
    assert!(!marker("parent-only").exists(), "the child ran a file its own list does not allow: {out}");
}
