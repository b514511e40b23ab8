//! Usage per grant and access reviews: every decision counts for the grant rule that made it;
//! `grants` and `review` report stale and over-privileged delegations, idle identities and
//! repeated denials; `review --suggest` prints a narrowed policy that still runs the workload;
//! unused grants expire on their own, and reviewers renew or revoke them.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::net::Listener;
use harness::proxy::{REVIEWERS, path_str};
use harness::rounds::Rounds;
use harness::session_log::{events_of_kind, pretty};
use harness::upstream::Upstream;
use harness::{Daemon, RunOutput, run_with_timeout, tollgate_bin, unique_tag};
use serde_json::Value;

const BUILD_BOTS: &[(&str, &str)] = &[("repository_owner", "acme")];

fn connect_argv(host: &str, port: u16) -> Vec<String> {
    ["/bin/bash", "-c", r#"exec 3<>"/dev/tcp/$0/$1""#, host]
        .map(str::to_owned)
        .into_iter()
        .chain([port.to_string()])
        .collect()
}

fn json_of(out: &RunOutput) -> Value {
    assert!(out.success(), "the command failed: {out}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn grants(daemon: &Daemon) -> Vec<Value> {
    json_of(&daemon.tollgate(&["grants", "--format", "json"])).as_array().cloned().unwrap_or_default()
}

fn grant<'a>(grants: &'a [Value], name: &str) -> &'a Value {
    grants.iter().find(|g| g["name"] == name).unwrap_or_else(|| panic!("no grant {name}: {grants:?}"))
}

/// Polls `grants` until `done` holds for them.
fn grants_until(daemon: &Daemon, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = grants(daemon);
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {}", pretty(&Value::Array(now)));
        thread::sleep(Duration::from_millis(100));
    }
}

fn findings<'a>(review: &'a Value, kind: &str) -> Vec<&'a Value> {
    review["findings"].as_array().into_iter().flatten().filter(|f| f["kind"] == kind).collect()
}

fn review(daemon: &Daemon, extra: &[&str]) -> Value {
    let mut args = vec!["review", "--format", "json"];
    args.extend(extra);
    json_of(&daemon.tollgate(&args))
}

/// A grant used once and one never used are told apart in `grants` and `review`, with wide
/// rules narrowed to what they reached, idle identities and repeated denials; filters work; only
/// reviewers outside sessions may ask.
#[test]
fn grants_and_review_report_use_and_misuse() {
    let policy = r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims: { repository_owner: acme }
  - name: idle-bots
    issuer: tollgate-dev
    claims: { repository_owner: idle }
grants:
  - name: used-net
    identity: build-bots
    network:
      allow: ["127.0.0.0/8"]
      deny: ["127.0.0.3/32"]
  - name: never-used
    identity: build-bots
    network:
      allow: ["10.9.0.0/16:443"]
  - name: idle-grant
    identity: idle-bots
    network:
      allow: ["127.0.0.0/8"]
"#;
    let daemon = Daemon::builder().policy(policy).config_line(REVIEWERS).start();
    let token = daemon.mint("review-bot", BUILD_BOTS);
    let (open, denied) = (Listener::bind("127.0.0.5"), Listener::bind("127.0.0.3"));
    let out = daemon.run(&token, &connect_argv("127.0.0.5", open.port()));
    assert!(out.success(), "{out}");
    for _ in 0..3 {
        let out = daemon.run(&token, &connect_argv("127.0.0.3", denied.port()));
        assert!(!out.success(), "{out}");
    }
    assert_eq!((open.take_connections(), denied.take_connections()), (1, 0));

    let now = grants_until(&daemon, "the uses to be counted", Duration::from_secs(10), |g| {
        grant(g, "used-net")["count"] == 4
    });
    let used = grant(&now, "used-net");
    assert_eq!(used["state"], "active");
    assert!(used["last_exercised"].is_string(), "{}", pretty(used));
    let never = grant(&now, "never-used");
    assert_eq!((never["count"].as_i64(), never["last_exercised"].is_null()), (Some(0), true), "{}", pretty(never));
    assert_eq!(never["rules"], serde_json::json!(["network.allow 10.9.0.0/16:443"]));

    let all = review(&daemon, &[]);
    let unused_grants: Vec<&str> = findings(&all, "unused_grant").iter().filter_map(|f| f["grant"].as_str()).collect();
    assert!(unused_grants.contains(&"never-used") && unused_grants.contains(&"idle-grant"), "{}", pretty(&all));
    assert!(!unused_grants.contains(&"used-net"), "a used grant is not stale: {}", pretty(&all));
    let wide = findings(&all, "unused_rule");
    let wide =
        wide.iter().find(|f| f["rule"] == "network.allow 127.0.0.0/8").unwrap_or_else(|| panic!("{}", pretty(&all)));
    assert_eq!(
        wide["evidence"]["only_reached"],
        serde_json::json!([format!("127.0.0.5:{}", open.port())]),
        "{}",
        pretty(&all)
    );
    let idle: Vec<&str> = findings(&all, "idle_identity").iter().filter_map(|f| f["identity"].as_str()).collect();
    assert_eq!(idle, vec!["idle-bots"], "{}", pretty(&all));
    let denials = findings(&all, "denied_attempts");
    assert_eq!(denials.len(), 1, "{}", pretty(&all));
    assert_eq!(denials[0]["rule"], "used-net: network.deny 127.0.0.3/32");
    assert_eq!(
        (denials[0]["identity"].as_str(), denials[0]["evidence"]["count"].as_u64()),
        (Some("build-bots"), Some(3))
    );
    assert_eq!(denials[0]["evidence"]["example_sessions"].as_array().map(Vec::len), Some(3));
    // The sessions ran as root: each is a privileged_session finding.
    let privileged = findings(&all, "privileged_session");
    assert_eq!(privileged.len(), 4, "{}", pretty(&all));
    assert!(privileged.iter().all(|f| f["evidence"]["uid"] == 0 && f["identity"] == "build-bots"), "{}", pretty(&all));

    // Filters: by identity, by claim, by resource.
    let only_idle = review(&daemon, &["--identity", "idle-bots"]);
    assert!(
        only_idle["findings"].as_array().into_iter().flatten().all(|f| f["identity"] == "idle-bots"),
        "{}",
        pretty(&only_idle)
    );
    assert!(!findings(&only_idle, "idle_identity").is_empty());
    let by_claim = review(&daemon, &["--claim", "repository_owner=acme"]);
    assert!(findings(&by_claim, "idle_identity").is_empty(), "{}", pretty(&by_claim));
    assert!(!findings(&by_claim, "denied_attempts").is_empty(), "{}", pretty(&by_claim));
    let exec_only = review(&daemon, &["--resource", "exec"]);
    assert!(
        exec_only["findings"].as_array().is_some_and(Vec::is_empty),
        "no exec findings here: {}",
        pretty(&exec_only)
    );
    let later = review(&daemon, &["--since", "2000-01-01", "--until", "2000-01-02"]);
    assert!(findings(&later, "denied_attempts").is_empty(), "a window without the denials: {}", pretty(&later));

    // Bad input is named.
    let out = daemon.tollgate(&["review", "--identity", "nobody-like-this"]);
    assert!(!out.success() && out.stderr.contains("no identity 'nobody-like-this'"), "{out}");
    let out = daemon.tollgate(&["review", "--since", "last tuesday"]);
    assert!(!out.success() && out.stderr.contains("last tuesday"), "{out}");

    // Not a reviewer, or inside a session: refused.
    let mut nobody = Command::new("setpriv");
    nobody.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]).arg(tollgate_bin());
    nobody.arg("--socket").arg(daemon.socket()).args(["review"]);
    let out = run_with_timeout(&mut nobody, Duration::from_secs(30)).expect("setpriv runs");
    assert!(!out.success() && out.stderr.contains("is not a reviewer"), "{out}");
    let inside = r#""$0" --socket "$1" grants revoke used-net; echo "revoke_status=$?"; "$0" --socket "$1" review; echo "review_status=$?""#;
    let out = daemon.run(&token, &["/bin/sh", "-c", inside, path_str(&tollgate_bin()), path_str(daemon.socket())]);
    assert!(out.has_stdout_line("revoke_status=1") && out.has_stdout_line("review_status=1"), "{out}");
    assert!(out.stderr.contains("inside a session cannot review"), "{out}");
    assert_eq!(grant(&grants(&daemon), "used-net")["state"], "active", "a session revoked a grant");
}

/// `review --suggest` prints a policy that passes `policy check`; a session under it can do what
/// the original session did (the same connect, the same proxied request, the same programs) and
/// nothing else.
#[test]
fn suggested_policy_runs_the_workload_and_nothing_more() {
    let upstream = Upstream::start("127.0.0.1", 200, r#"{"ok":true}"#);
    let wide = format!(
        r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims: {{ repository_owner: acme }}
grants:
  - name: wide
    identity: build-bots
    exec:
      deny: ["/usr/bin/wget"]
    network:
      allow: ["0.0.0.0/0", "::/0"]
      proxy:
        - to: "127.0.0.1/32:{port}"
          protocol: http
          block: [{{ method: DELETE }}]
"#,
        port = upstream.port()
    );
    let (open, other) = (Listener::bind("127.0.0.5"), Listener::bind("127.0.0.6"));
    let workload = format!(
        r#"exec 3<>"/dev/tcp/127.0.0.5/{open}" && exec 3>&- && curl -sS -o /dev/null -w '%{{http_code}}\n' {url}/work"#,
        open = open.port(),
        url = upstream.base_url()
    );
    let argv = ["/bin/bash", "-c", workload.as_str()];

    let daemon = Daemon::builder().policy(&wide).config_line(REVIEWERS).start();
    let token = daemon.mint("suggest-bot", BUILD_BOTS);
    let out = daemon.run(&token, &argv);
    assert!(out.success() && out.stdout.contains("200"), "the workload runs under the wide policy: {out}");
    assert_eq!(open.take_connections(), 1);
    let id = daemon.last_session_id();
    daemon.show_until(&id, "the session's end", |s| !s["session"]["ended_at"].is_null());

    let out = daemon.tollgate(&["review", "--suggest", "--identity", "build-bots"]);
    assert!(out.success(), "{out}");
    let suggested = out.stdout.clone();
    let file = daemon.dir().join(format!("suggested-{}.yaml", unique_tag()));
    fs::write(&file, &suggested).expect("writing the suggestion");
    let check = daemon.tollgate(&["policy", "check", path_str(&file)]);
    assert!(check.success(), "the suggestion must pass policy check as printed:\n{suggested}\n{check}");
    assert!(suggested.contains("/usr/bin/wget"), "the original denies are kept:\n{suggested}");
    assert!(!suggested.contains("0.0.0.0/0"), "the wide allow is gone:\n{suggested}");
    drop(daemon);

    let narrowed = Daemon::builder().policy(&suggested).start();
    let token = narrowed.mint("suggest-bot", BUILD_BOTS);
    let before = upstream.requests().len();
    let out = narrowed.run(&token, &argv);
    assert!(
        out.success() && out.stdout.contains("200"),
        "the same workload runs under the suggestion:\n{suggested}\n{out}"
    );
    assert_eq!(open.take_connections(), 1, "the same destination is reached");
    assert_eq!(upstream.requests().len(), before + 1, "the same request went through the proxy");

    // Nothing more: another destination, another program, a blocked method.
    let out = narrowed.run(&token, &connect_argv("127.0.0.6", other.port()));
    assert!(!out.success(), "{out}");
    assert_eq!(other.take_connections(), 0, "a destination the workload never reached");
    let marks = tempfile::Builder::new().prefix("tollgate-marks-").tempdir().expect("temp dir");
    fs::set_permissions(marks.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let marker = marks.path().join("touched");
    let out = narrowed.run(&token, &["/usr/bin/touch", path_str(&marker)]);
    assert!(!out.success() && !Path::new(&marker).exists(), "a program the workload never ran: {out}");
    let delete = format!("curl -sS -o /dev/null -w '%{{http_code}}\\n' -X DELETE {}/work", upstream.base_url());
    let out = narrowed.run(&token, &["/bin/bash", "-c", delete.as_str()]);
    assert!(out.stdout.contains("403"), "the copied route still blocks: {out}");
    assert_eq!(upstream.requests().len(), before + 1, "the DELETE never reached the upstream");
}

/// A grant with a few seconds of `expire_unused_after` stops working for new and live sessions
/// once it goes unused, is recorded and reviewed as expired, and `renew` brings it back;
/// `revoke` takes a grant from live sessions at once, recorded with who and why.
#[test]
fn unused_grants_expire_and_reviewers_renew_and_revoke() {
    let policy = r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims: { repository_owner: acme }
grants:
  - name: short-lived
    identity: build-bots
    expire_unused_after: 4s
    network: { allow: ["127.0.0.5/32"] }
  - name: base
    identity: build-bots
    network: { allow: ["127.0.0.6/32"] }
"#;
    let daemon = Daemon::builder().policy(policy).config_line(REVIEWERS).start();
    let token = daemon.mint("expiry-bot", BUILD_BOTS);
    let (five, six) = (Listener::bind("127.0.0.5"), Listener::bind("127.0.0.6"));
    let live = Rounds::new(daemon.dir());
    let body = format!(
        r#"r=""
  if /bin/bash -c 'exec 3<>"/dev/tcp/127.0.0.5/{five}"' 2>/dev/null; then r="$r five=ok"; else r="$r five=refused"; fi
  if /bin/bash -c 'exec 3<>"/dev/tcp/127.0.0.6/{six}"' 2>/dev/null; then r="$r six=ok"; else r="$r six=refused"; fi
  echo "$r""#,
        five = five.port(),
        six = six.port()
    );
    let script = live.script(5, &body);
    let argv = ["/bin/sh", "-c", script.as_str()];
    thread::scope(|scope| {
        let running = scope.spawn(|| daemon.run(&token, &argv));
        assert_eq!(live.next(), "five=ok six=ok", "both grants hold at first");
        let expired = grants_until(&daemon, "short-lived to expire", Duration::from_secs(20), |g| {
            grant(g, "short-lived")["state"] == "expired"
        });
        let event = &grant(&expired, "short-lived")["last_event"];
        assert_eq!((event["action"].as_str(), event["by"].is_null()), (Some("expired"), true), "{}", pretty(event));
        assert_eq!(grant(&expired, "base")["state"], "active");
        assert_eq!(live.next(), "five=refused six=ok", "the live session lost the expired grant");
        let out = daemon.run(&token, &connect_argv("127.0.0.5", five.port()));
        assert!(!out.success(), "a new session does not get an expired grant: {out}");
        assert_eq!(five.take_connections(), 1, "only the first round reached 127.0.0.5");

        let reviewed = review(&daemon, &[]);
        assert!(
            findings(&reviewed, "expired_grant").iter().any(|f| f["grant"] == "short-lived"),
            "{}",
            pretty(&reviewed)
        );

        let out = daemon.tollgate(&["grants", "renew", "short-lived"]);
        assert!(out.success() && out.stdout.contains("active"), "{out}");
        assert_eq!(live.next(), "five=ok six=ok", "renew gives the live session the grant back");
        let out = daemon.run(&token, &connect_argv("127.0.0.5", five.port()));
        assert!(out.success(), "a new session gets the renewed grant: {out}");

        let out = daemon.tollgate(&["grants", "revoke", "base", "--reason", "no longer needed"]);
        assert!(out.success(), "{out}");
        assert!(live.next().ends_with("six=refused"), "revoke applies to the live session at once");
        let now = grants(&daemon);
        let event = &grant(&now, "base")["last_event"];
        assert_eq!(grant(&now, "base")["state"], "revoked");
        assert_eq!(
            (event["by"].as_str(), event["reason"].as_str()),
            (Some("root"), Some("no longer needed")),
            "{}",
            pretty(event)
        );
        let out = daemon.tollgate(&["grants", "revoke", "base"]);
        assert!(!out.success() && out.stderr.contains("already revoked"), "{out}");
        let reviewed = review(&daemon, &[]);
        let revoked = findings(&reviewed, "revoked_grant");
        assert!(
            revoked.iter().any(|f| f["grant"] == "base" && f.to_string().contains("no longer needed")),
            "the revocation shows in the review with its reason: {}",
            pretty(&reviewed)
        );
        // A process inside a session can neither renew, revoke, list nor review, whatever it asks.
        let socket = daemon.socket().display().to_string();
        for args in
            [vec!["grants", "renew", "base"], vec!["grants", "revoke", "short-lived"], vec!["grants"], vec!["review"]]
        {
            let mut argv = vec![harness::tollgate_bin().display().to_string(), "--socket".into(), socket.clone()];
            argv.extend(args.iter().map(|a| (*a).to_owned()));
            let out = daemon.run(&token, &argv);
            assert!(!out.success() && out.stderr.contains("inside a session"), "{args:?} from a session: {out}");
        }
        let now = grants(&daemon);
        assert_eq!(
            (grant(&now, "base")["state"].as_str(), grant(&now, "short-lived")["state"].as_str()),
            (Some("revoked"), Some("active"))
        );
        let out = daemon.tollgate(&["grants", "renew", "no-such-grant"]);
        assert!(!out.success() && out.stderr.contains("no grant 'no-such-grant'"), "{out}");
        assert_eq!(six.take_connections(), 3, "127.0.0.6 reached in the three rounds before the revoke");

        live.next();
        let out = running.join().expect("the live session");
        assert!(out.success(), "{out}");
    });
    let live_id = daemon
        .sessions()
        .into_iter()
        .min_by_key(|s| s["started_at"].as_str().map(str::to_owned))
        .and_then(|s| s["id"].as_str().map(str::to_owned))
        .expect("the live session");
    let show = daemon.show_until(&live_id, "the grant records", |s| events_of_kind(s, "grant").len() >= 2);
    let records = events_of_kind(&show, "grant");
    assert!(records.iter().any(|e| e["grant"] == "short-lived" && e["verdict"] == "expired"), "{}", pretty(&show));
    assert!(
        records.iter().any(|e| e["grant"] == "base" && e["verdict"] == "revoked" && e["by"] == "root"),
        "{}",
        pretty(&show)
    );
}
