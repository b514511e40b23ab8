//! The session log as evidence: `verify` recomputes its hash chain and names the first record that
//! does not fit (edits made with the sqlite3 CLI), `replay` gives back what happened, reports agree
//! across formats and are checked offline, reads work with the daemon stopped, and retention
//! leaves a signed checkpoint.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::net::Listener;
use harness::proxy::{LONG_APPROVAL_TIMEOUT, REVIEWERS, approval_id, curl_argv, path_str, wait_for_approvals};
use harness::session_log::pretty;
use harness::upstream::Upstream;
use harness::{Daemon, RunOutput, run_with_timeout, tollgate_bin, unique_tag};
use serde_json::Value;

use harness::enforcement::{BUILD_BOTS, BUILD_BOTS_IDENTITY};

fn policy(extra_network: &str) -> String {
    format!(
        r#"{BUILD_BOTS_IDENTITY}grants:
  - name: net
    identity: build-bots
    exec:
      deny: ["/usr/bin/wget"]
    network:
      allow: ["127.0.0.0/8"]
      deny: ["127.0.0.3/32"]
{extra_network}"#
    )
}

fn sqlite(db: &Path, sql: &str) {
    let mut cmd = Command::new("sqlite3");
    cmd.arg(db).arg(sql);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("sqlite3 runs");
    assert!(out.success(), "sqlite3 {sql}: {out}");
}

fn local(daemon: &Daemon, args: &[&str]) -> RunOutput {
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(args).arg("--config").arg(daemon.config_path());
    run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("tollgate runs")
}

fn wait_ended(daemon: &Daemon, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sessions = daemon.sessions();
        if sessions.len() >= count && sessions.iter().all(|s| !s["ended_at"].is_null()) {
            return sessions;
        }
        assert!(Instant::now() < deadline, "sessions did not end: {}", pretty(&Value::Array(sessions)));
        thread::sleep(Duration::from_millis(100));
    }
}

/// `verify` passes on the log as written, then names the first record that does not fit after each
/// kind of edit: a changed row, a deleted row, a deleted session, an inserted row, a cut-off end, a
/// head re-signed by another key.
#[test]
fn verify_catches_edits_deletions_insertions_and_a_cut_end() {
    let mut daemon = Daemon::start(&policy(""));
    let token = daemon.mint("audit-bot", BUILD_BOTS);
    let listener = Listener::bind("127.0.0.5");
    for argv in [
        vec!["/bin/sh".to_owned(), "-c".into(), "/usr/bin/true; /usr/bin/wget -q http://127.0.0.1/ ; exit 0".into()],
        vec!["/bin/bash".to_owned(), "-c".into(), format!("exec 3<>/dev/tcp/127.0.0.5/{}", listener.port())],
    ] {
        assert!(daemon.run(&token, &argv).success());
    }
    let sessions = wait_ended(&daemon, 2);
    let out = daemon.tollgate(&["verify"]);
    assert!(out.success() && out.stdout.contains("in 2 session(s)"), "{out}");
    let first = sessions.iter().min_by_key(|s| s["started_at"].as_str().map(str::to_owned)).expect("a session");
    let first = first["id"].as_str().expect("id").to_owned();
    let out = daemon.tollgate(&["verify", &first]);
    assert!(out.success() && out.stdout.contains("in 1 session(s)"), "{out}");
    let out = daemon.tollgate(&["verify", "--since", "2000-01-01"]);
    assert!(out.success() && out.stdout.contains("in 2 session(s)"), "{out}");
    let out = daemon.tollgate(&["verify", "--since", "2100-01-01"]);
    assert!(out.success() && out.stdout.contains("verified 0 record(s)"), "{out}");
    let pub_key = daemon.status()["ledger_public_key"].as_str().expect("the host's public key").to_owned();
    // The running daemon checks against a key the caller pins, too.
    let other_key = daemon.dir().join("other.pub");
    fs::write(&other_key, "ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").expect("key");
    let out = daemon.tollgate(&["verify", "--key", path_str(&other_key)]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("not signed by the host's key"), "{out}");

    daemon.halt();
    let db = daemon.state_dir().join("sessions.db");
    let pristine = daemon.dir().join("pristine.db");
    sqlite(&db, &format!(".backup {}", pristine.display()));
    let restore = || {
        for suffix in ["-wal", "-shm"] {
            let _ = fs::remove_file(format!("{}{suffix}", db.display()));
        }
        fs::copy(&pristine, &db).expect("restoring the log");
    };
    let cases = [
        (
            "an edited row",
            format!(
                "UPDATE events SET detail = replace(detail, 'true', 'evil') WHERE session_id = '{first}' AND kind = 'exec'"
            ),
            "does not match its hash",
        ),
        ("a deleted row", format!("DELETE FROM events WHERE session_id = '{first}' AND seq = 2"), "is gone (deleted)"),
        (
            "a deleted session",
            format!(
                "PRAGMA foreign_keys = OFF; DELETE FROM ledger WHERE session_id = '{first}'; DELETE FROM events WHERE session_id = '{first}'; DELETE FROM sessions WHERE id = '{first}'"
            ),
            "is missing from the chain",
        ),
        (
            "an inserted row",
            format!(
                "INSERT INTO events SELECT session_id, 999, at, kind, pid, verdict, detail FROM events WHERE session_id = '{first}' AND seq = 1"
            ),
            "not in the chain (inserted)",
        ),
        ("a cut-off end", "DELETE FROM ledger WHERE n = (SELECT MAX(n) FROM ledger)".to_owned(), "signed head"),
    ];
    for (what, sql, expected) in cases {
        restore();
        sqlite(&db, &sql);
        let out = local(&daemon, &["verify"]);
        assert_eq!(out.code(), Some(1), "{what} went unnoticed: {out}");
        assert!(out.stdout.contains("NOT VERIFIED") && out.stdout.contains(expected), "{what}: {out}");
    }
    // A head re-signed with another key does not hold under the host's.
    restore();
    let out = local(&daemon, &["verify", "--key", path_str(&other_key)]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("not signed by the host's key"), "{out}");
    let host_key = daemon.dir().join("host.pub");
    fs::write(&host_key, &pub_key).expect("key");
    let out = local(&daemon, &["verify", "--key", path_str(&host_key)]);
    assert_eq!(out.code(), Some(0), "the untouched log verifies under the host's key: {out}");
    assert!(out.stderr.contains("read-only"), "it says it read the log itself: {out}");
}

/// Copies the log at `from` (consistent, through SQLite) over the log at `to`, with no WAL left behind.
fn copy_log(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", to.display()));
    }
    sqlite(from, &format!(".backup {}", to.display()));
}

/// Starts a daemon on `daemon`'s configuration and expects it to refuse to start, naming why.
/// Forges the stopped `daemon`'s log: edits `session`'s exec, removes the chain and the key file,
/// and lets the daemon start once, so a key made for it adopts the edited log and signs it.
fn forge(daemon: &mut Daemon, session: &str) {
    sqlite(
        &daemon.state_dir().join("sessions.db"),
        &format!(
            "UPDATE events SET detail = replace(detail, 'true', 'evil') WHERE session_id = '{session}' AND kind = 'exec';
             DELETE FROM ledger; DELETE FROM chain_head; DELETE FROM checkpoints"
        ),
    );
    fs::remove_file(daemon.state_dir().join("ledger-key.pk8")).expect("the daemon's key file");
    daemon.restart();
    daemon.halt();
}

/// Nothing of the chain is written over: its places and its signed head stay as they were.
fn refuses_to_start(daemon: &Daemon, why: &str) {
    let db = daemon.state_dir().join("sessions.db");
    let chain = || {
        let out = Command::new("sqlite3")
            .arg(&db)
            .arg(
                "SELECT COUNT(*), COALESCE(MAX(n), 0) FROM ledger; SELECT n, hex(hash), hex(signature) FROM chain_head",
            )
            .output()
            .expect("sqlite3 reads the chain");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = chain();
    let mut cmd = Command::new(tollgate_bin());
    cmd.arg("daemon").arg("--config").arg(daemon.config_path());
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("the daemon exits by itself");
    assert!(!out.success(), "a daemon started on an edited log: {out}");
    assert!(out.stderr.contains("changed behind tollgate's back") && out.stderr.contains(why), "{out}");
    assert_eq!(chain(), before, "the refusing daemon wrote to the chain");
}

/// Whoever can write the log cannot make it verify again: a log re-chained and re-signed with a
/// key of the attacker's own fails under the host's key (which `verify` takes from the host, never
/// from the log), and the daemon neither signs over a log edited that way nor over one whose end
/// was cut off or whose head was removed; it refuses to start and says so.
#[test]
fn a_log_rechained_re_signed_or_cut_is_never_signed_over() {
    let mut daemon = Daemon::start(&policy(""));
    let token = daemon.mint("audit-bot", BUILD_BOTS);
    for _ in 0..2 {
        assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    }
    let sessions = wait_ended(&daemon, 2);
    let last = sessions.iter().max_by_key(|s| s["started_at"].as_str().map(str::to_owned)).expect("a session");
    let last = last["id"].as_str().expect("id").to_owned();
    daemon.halt();
    let db = daemon.state_dir().join("sessions.db");
    let pristine = daemon.dir().join("pristine.db");
    copy_log(&db, &pristine);

    // The forger: an edited copy of the log with its chain removed, adopted by a daemon whose key
    // was made for it, so the whole log is chained again and signed.
    let mut forger = Daemon::start(&policy(""));
    forger.halt();
    let forged = forger.state_dir().join("sessions.db");
    copy_log(&pristine, &forged);
    forge(&mut forger, &last);
    let out = local(&forger, &["verify"]);
    assert_eq!(out.code(), Some(0), "the forgery holds under the forger's key: {out}");
    copy_log(&forged, &db);
    let out = local(&daemon, &["verify"]);
    assert_eq!(out.code(), Some(1), "a log re-signed by another key verified: {out}");
    assert!(out.stdout.contains("not signed by the host's key"), "{out}");
    refuses_to_start(&daemon, "not signed by this host's ledger key");

    // The last session cut off, rows and chain places alike, head kept or removed.
    let cut = format!(
        "PRAGMA foreign_keys = OFF; DELETE FROM ledger WHERE session_id = '{last}';
         DELETE FROM events WHERE session_id = '{last}'; DELETE FROM sessions WHERE id = '{last}'"
    );
    for (edit, why) in
        [(cut.clone(), "records cut off or added"), (format!("{cut}; DELETE FROM chain_head"), "no signed head")]
    {
        copy_log(&pristine, &db);
        sqlite(&db, &edit);
        refuses_to_start(&daemon, why);
        let out = local(&daemon, &["verify"]);
        assert_eq!(out.code(), Some(1), "a cut end verified: {out}");
        let rows = Command::new("sqlite3")
            .arg(&db)
            .arg("SELECT COUNT(*) FROM ledger")
            .output()
            .expect("sqlite3 counts the chain");
        let pristine_rows =
            Command::new("sqlite3").arg(&pristine).arg("SELECT COUNT(*) FROM ledger").output().expect("sqlite3");
        assert_ne!(rows.stdout, pristine_rows.stdout, "the edit removed chain places");
    }

    // The untouched log: the daemon starts on it and it verifies.
    copy_log(&pristine, &db);
    daemon.restart();
    let out = daemon.tollgate(&["verify"]);
    assert!(out.success() && out.stdout.contains("in 2 session(s)"), "{out}");

    // The way around: replace the host's key too, so a new key adopts the edited log. A reviewer
    // who pinned the host's key (from `status` or a report) sees it.
    let pinned = daemon.dir().join("pinned.pub");
    fs::write(&pinned, daemon.status()["ledger_public_key"].as_str().expect("the host's key")).expect("pin");
    daemon.halt();
    forge(&mut daemon, &last);
    let out = local(&daemon, &["verify", "--key", path_str(&pinned)]);
    assert_eq!(out.code(), Some(1), "a log adopted under a replaced key verified under the pinned one: {out}");
    assert!(out.stdout.contains("not signed by the host's key"), "{out}");
}

/// `replay --format json` gives back, event by event, what a session and its child did: the
/// commands with their arguments, a connect with its rule, a held request asked and approved, the
/// exchange, each child record marked by depth, in time order.
#[test]
fn replay_gives_back_the_session_and_its_child() {
    let upstream = Upstream::start("127.0.0.1", 200, r#"{"ok":true}"#);
    let routes = format!(
        "      proxy:\n        - to: \"127.0.0.1/32:{}\"\n          protocol: http\n          approve: [{{ method: POST }}]\n",
        upstream.port()
    );
    let daemon =
        Daemon::builder().policy(&policy(&routes)).config_line(REVIEWERS).config_line(LONG_APPROVAL_TIMEOUT).start();
    let token = daemon.mint("replay-bot", BUILD_BOTS);
    let listener = Listener::bind("127.0.0.5");
    let marker = format!("top-{}", unique_tag());
    let url = format!("{}/deploy", upstream.base_url());
    let mut child: Vec<String> =
        vec![tollgate_bin().display().to_string(), "--socket".into(), daemon.socket().display().to_string()];
    child.extend(["run", "--grant", "net", "--reason", "deploy", "--"].map(str::to_owned));
    child.extend(curl_argv(&["-X", "POST", &url]));
    let script = format!(
        "/bin/echo {marker}; /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.5/{port}'; exec \"$@\"",
        port = listener.port()
    );
    let mut argv = vec!["/bin/sh".to_owned(), "-c".into(), script, "sh".into()];
    argv.extend(child);
    let top = thread::scope(|scope| {
        let running = scope.spawn(|| daemon.run(&token, &argv));
        let held = wait_for_approvals(&daemon, 1);
        assert!(daemon.tollgate(&["approve", &approval_id(&held[0])]).success());
        let out = running.join().expect("the session");
        assert!(out.stdout.contains(&marker) && out.stdout.trim_end().ends_with("200"), "{out}");
        out
    });
    let sessions = wait_ended(&daemon, 2);
    let top_id = top.first_line().to_owned();
    let top_id = if top_id.starts_with("s-") {
        top_id
    } else {
        sessions.iter().find(|s| s["depth"] == 0).and_then(|s| s["id"].as_str()).expect("top").to_owned()
    };
    let child_id = sessions.iter().find(|s| s["depth"] == 1).and_then(|s| s["id"].as_str()).expect("child").to_owned();

    let out = daemon.tollgate(&["replay", &top_id, "--format", "json"]);
    assert!(out.success(), "{out}");
    let lines: Vec<Value> =
        out.stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    let offsets: Vec<f64> = lines.iter().map(|l| l["offset_secs"].as_f64().expect("offset")).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "in time order: {offsets:?}");
    let find = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        lines.iter().find(|l| pred(l)).cloned().unwrap_or_else(|| panic!("no {what} in the replay:\n{}", out.stdout))
    };
    let echo = find("the echo", &|l| l["kind"] == "exec" && l["argv"][1] == marker.as_str());
    assert_eq!((echo["session"].as_str(), echo["depth"].as_u64()), (Some(top_id.as_str()), Some(0)));
    let connect = find("the connect", &|l| l["kind"] == "connect" && l["port"] == listener.port());
    assert_eq!(
        (connect["verdict"].as_str(), connect["rule"].as_str()),
        (Some("allow"), Some("net: network.allow 127.0.0.0/8"))
    );
    let curl = find("the child's curl", &|l| {
        l["kind"] == "exec" && l["filename"].as_str().is_some_and(|f| f.ends_with("/curl"))
    });
    assert_eq!((curl["session"].as_str(), curl["depth"].as_u64()), (Some(child_id.as_str()), Some(1)));
    let asked = find("the held request", &|l| l["kind"] == "approval" && l["verdict"] == "pending");
    let approved = find("the approval", &|l| l["kind"] == "approval" && l["verdict"] == "approved");
    let exchange = find("the exchange", &|l| l["kind"] == "http" && l["method"] == "POST");
    assert_eq!((approved["by"].as_str(), exchange["status"].as_u64()), (Some("root"), Some(200)));
    assert!(
        asked["offset_secs"].as_f64() <= approved["offset_secs"].as_f64()
            && approved["offset_secs"].as_f64() <= exchange["offset_secs"].as_f64()
    );
    assert_eq!(asked["depth"], 1, "the child's records are marked by depth");
    // Event by event, in the order the test made them happen.
    let position = |event: &Value| lines.iter().position(|l| l == event).expect("a line of the replay");
    let order: Vec<usize> = [&echo, &connect, &curl, &asked, &approved, &exchange].into_iter().map(position).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "out of order {order:?}:\n{}", out.stdout);
    assert!(
        exchange["rules"].as_array().is_some_and(|r| r.iter().any(|r| r == "approve[0]: method POST")),
        "the exchange names the rule it hit: {}",
        pretty(&exchange)
    );
    let curl_exit = find("the curl's exit", &|l| l["kind"] == "exit" && l["depth"] == 1 && l["pid"] == curl["pid"]);
    assert_eq!(curl_exit["exit_code"], 0, "{}", pretty(&curl_exit));
    assert!(position(&curl_exit) > position(&exchange), "curl exits after its exchange:\n{}", out.stdout);

    let only = daemon.tollgate(&["replay", &top_id, "--format", "json", "--only", "approval"]);
    let kinds: Vec<String> = only
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json")["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds, vec!["approval", "approval"], "{only}");
    let text = daemon.tollgate(&["replay", &top_id, "--instant"]);
    assert!(text.stdout.lines().any(|l| l.contains("exec") && l.contains(&marker)), "{text}");
    assert!(
        text.stdout.lines().any(|l| l.contains("  http ") && l.contains("POST")),
        "the child's lines are indented: {text}"
    );
    let out = daemon.tollgate(&["replay", &top_id, "--only", "files"]);
    assert!(!out.success() && out.stderr.contains("--only 'files'"), "{out}");

    // The report names the held request: who asked, who decided, how long it waited.
    let report = daemon.tollgate(&["report", "--since", "1h", "--format", "json"]);
    let report: Value = serde_json::from_str(&report.stdout).unwrap_or_else(|e| panic!("{e}: {report}"));
    let held = &report["held_requests"];
    assert_eq!(held.as_array().map(Vec::len), Some(1), "{}", pretty(&report));
    assert_eq!((held[0]["decision"].as_str(), held[0]["by"].as_str()), (Some("approved"), Some("root")));
    assert_eq!(
        (held[0]["session"].as_str(), held[0]["request"].as_str()),
        (Some(child_id.as_str()), Some("POST /deploy"))
    );
    assert!(held[0]["waited_secs"].as_f64().is_some_and(|w| w > 0.0), "{}", pretty(&report));
    assert_eq!(report["totals"]["held"], 1);
}

fn totals_row(md: &str) -> Vec<u64> {
    let header = md.lines().position(|l| l.starts_with("| sessions |")).expect("the totals table");
    md.lines().nth(header + 2).expect("the totals row").split('|').filter_map(|c| c.trim().parse().ok()).collect()
}

/// The report in md, json and html for one period agrees on every count; the JSON verifies
/// offline under the host's key and fails once edited; all of it also works with the daemon stopped.
#[test]
fn reports_agree_verify_offline_and_read_a_stopped_host() {
    let upstream = Upstream::start("127.0.0.1", 200, r#"{"email":"dev@example.com"}"#);
    let route = format!(
        "      proxy:\n        - to: \"127.0.0.1/32:{}\"\n          protocol: http\n          block: [{{ method: DELETE }}]\n          mask:\n            - {{ regex: \"[a-z]+@example\\\\.com\", replace: \"[email]\" }}\n",
        upstream.port()
    );
    let mut daemon = Daemon::builder().policy(&policy(&route)).config_line(REVIEWERS).start();
    let token = daemon.mint("report-bot", BUILD_BOTS);
    let (open, denied) = (Listener::bind("127.0.0.5"), Listener::bind("127.0.0.3"));
    for host in ["127.0.0.5", "127.0.0.3", "127.0.0.3"] {
        let port = if host == "127.0.0.5" { open.port() } else { denied.port() };
        daemon.run(&token, &["/bin/bash".to_owned(), "-c".into(), format!("exec 3<>/dev/tcp/{host}/{port}")]);
    }
    let url = format!("{}/people", upstream.base_url());
    let out = daemon.run(&token, &curl_argv(&["-X", "DELETE", &url]));
    assert!(out.stdout.trim_end().ends_with("403"), "{out}");
    let out = daemon.run(&token, &curl_argv(&[&url]));
    assert!(out.stdout.contains("[email]") && !out.stdout.contains("dev@example.com"), "{out}");
    wait_ended(&daemon, 5);
    let dir = daemon.dir().to_owned();
    let file = |name: &str| -> PathBuf { dir.join(name) };
    for format in ["md", "json", "html"] {
        let out = daemon.tollgate(&[
            "report",
            "--since",
            "1h",
            "--format",
            format,
            "-o",
            path_str(&file(&format!("report.{format}"))),
        ]);
        assert!(out.success(), "{out}");
    }
    let json: Value =
        serde_json::from_str(&fs::read_to_string(file("report.json")).expect("json")).expect("valid JSON");
    let md = fs::read_to_string(file("report.md")).expect("md");
    let html = fs::read_to_string(file("report.html")).expect("html");
    let t = &json["totals"];
    let from_json: Vec<u64> = ["sessions", "records", "denials", "blocked", "held", "masked", "lost_events"]
        .iter()
        .map(|k| t[*k].as_u64().expect("a count"))
        .collect();
    assert_eq!(from_json[0], 5, "{}", pretty(&json));
    assert!(from_json[2] >= 2, "two refused connects at least: {}", pretty(&json));
    assert_eq!((from_json[3], from_json[5]), (1, 1), "one blocked request, one masked value: {}", pretty(&json));
    assert_eq!(totals_row(&md), from_json, "md and json disagree:\n{md}");
    let html_totals: Vec<u64> = html
        .lines()
        .find(|l| l.starts_with("<tr><td>"))
        .expect("the HTML totals row")
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(html_totals, from_json, "html and json disagree:\n{html}");
    assert!(html.contains(&format!("<span id=\"session-count\">{}</span> sessions", from_json[0])), "{html}");
    assert!(html.contains(&format!("<span id=\"denial-count\">{}</span> denials", from_json[2])), "{html}");
    assert_eq!(html.matches("<tr class=\"session\">").count(), 5);
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("<script"),
        "self-contained, nothing fetched"
    );
    let identity = &json["identities"][0];
    assert_eq!(identity["denials"]["net: network.deny 127.0.0.3/32"], 2, "{}", pretty(&json));
    assert_eq!(identity["exercised"]["net: network.allow 127.0.0.0/8"], 1, "{}", pretty(&json));
    assert!(md.contains("`net: network.deny 127.0.0.3/32`: 2"), "{md}");

    let key = file("host.pub");
    fs::write(&key, daemon.status()["ledger_public_key"].as_str().expect("key")).expect("key file");
    let out = daemon.tollgate(&["verify", "--report", path_str(&file("report.json")), "--key", path_str(&key)]);
    assert!(out.success() && out.stdout.contains("report verified"), "{out}");
    let edited = fs::read_to_string(file("report.json")).expect("json").replacen("\"denials\": 2", "\"denials\": 0", 1);
    fs::write(file("edited.json"), edited).expect("edited copy");
    let out = daemon.tollgate(&["verify", "--report", path_str(&file("edited.json")), "--key", path_str(&key)]);
    assert_eq!(out.code(), Some(1), "an edited report verified: {out}");
    assert!(out.stderr.contains("signature does not hold"), "{out}");

    // With the daemon stopped, the same reads come from the log itself.
    let sessions_before = daemon.tollgate(&["sessions", "--format", "json"]).stdout;
    let id = json["identities"][0]["sessions"][0]["id"].as_str().expect("a session").to_owned();
    let show_before = daemon.tollgate(&["show", &id, "--format", "json"]).stdout;
    daemon.halt();
    for args in [
        vec!["sessions", "--format", "json"],
        vec!["show", &id, "--format", "json"],
        vec!["replay", &id, "--instant"],
        vec!["review", "--format", "json"],
        vec!["report", "--since", "1h", "--format", "json"],
        vec!["verify"],
    ] {
        let out = local(&daemon, &args);
        assert!(out.success(), "`{}` with the daemon stopped: {out}", args.join(" "));
        assert!(out.stderr.contains("read-only"), "{out}");
        match args[0] {
            "sessions" => assert_eq!(out.stdout, sessions_before),
            "show" => assert_eq!(out.stdout, show_before),
            "report" => {
                let stopped: Value = serde_json::from_str(&out.stdout).expect("json");
                assert_eq!(stopped["totals"], json["totals"], "the stopped host's report counts the same");
            }
            _ => {}
        }
    }
}

/// `retention` prunes ended sessions and leaves a signed checkpoint that `verify` reports; a
/// checkpoint edited afterwards no longer holds.
#[test]
fn retention_prunes_and_leaves_a_signed_checkpoint() {
    let mut daemon = Daemon::builder().policy(&policy("")).config_line("retention: 2s").start();
    let token = daemon.mint("old-bot", BUILD_BOTS);
    for _ in 0..2 {
        assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let verified = loop {
        let out = daemon.tollgate(&["verify", "--format", "json"]);
        let value: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
        if value["checkpoints"].as_array().is_some_and(|c| !c.is_empty()) {
            break value;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {out}");
        thread::sleep(Duration::from_millis(200));
    };
    assert!(verified["problem"].is_null(), "{}", pretty(&verified));
    assert_eq!(verified["checkpoints"][0]["pruned_sessions"], 2, "{}", pretty(&verified));
    assert!(daemon.sessions().is_empty(), "the pruned sessions are gone");
    let out = daemon.tollgate(&["verify"]);
    assert!(out.success() && out.stdout.contains("checkpoint: 2 session(s)"), "{out}");
    // A session after the checkpoint chains on from it.
    assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    wait_ended(&daemon, 1);
    assert!(daemon.tollgate(&["verify"]).success());

    daemon.halt();
    sqlite(&daemon.state_dir().join("sessions.db"), "UPDATE checkpoints SET pruned_sessions = 1");
    let out = local(&daemon, &["verify"]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stdout.contains("checkpoint") && out.stdout.contains("not signed"), "{out}");
}
