//! Reports reviewers pull from each host: the HTTPS report listener (401 without a token, 403 for
//! one reviewers.jwt does not admit or from inside a session, 200 otherwise), /metrics as
//! Prometheus text, fleet reports merged from several hosts with each signature checked, the
//! HTML report in a real browser, JSON-lines export, and OTLP export that loses nothing across a
//! collector restart. Terminal output recording and its asciicast replay are here too.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::jwt::SigningKey;
use harness::pki::Pki;
use harness::proxy::path_str;
use harness::session_log::pretty;
use harness::{Daemon, Issuer, Jwks, RunOutput, free_loopback_port, run_with_timeout, tollgate_bin, unique_tag};
use serde_json::{Value, json};
use tempfile::TempDir;

const BUILD_BOTS: &[(&str, &str)] = &[("repository_owner", "acme")];
/// The identity provider reviewers' tokens come from.
const IDP: &str = "https://idp.reviews.example";

const POLICY: &str = r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
    claims: { repository_owner: acme }
  - name: recorded-bots
    issuer: tollgate-dev
    allow_root: true
    record_output: true
    claims: { repository_owner: recorded }
grants:
  - name: net
    identity: build-bots
    network: { allow: ["127.0.0.0/8"] }
  - name: recorded-net
    identity: recorded-bots
    network:
      allow: ["127.0.0.0/8"]
      proxy:
        - to: "127.0.0.1/32:9"
          protocol: http
          mask: [{ regex: "\\b\\d{4}-\\d{4}-\\d{4}-\\d{4}\\b", replace: "****" }]
"#;

/// A daemon with a report listener, trusting the reviewers' identity provider.
struct Host {
    daemon: Daemon,
    port: u16,
}

/// Certificates and the reviewers' signing key, shared by the hosts of a test.
struct Fleet {
    dir: TempDir,
    pki: Pki,
    idp: SigningKey,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::Builder::new().prefix("tollgate-fleet-").tempdir().expect("temp dir");
        let pki = Pki::new(dir.path(), "IP:127.0.0.1,DNS:localhost");
        Fleet { dir, pki, idp: SigningKey::generate() }
    }

    fn host(&self, extra: &[&str]) -> Host {
        let port = free_loopback_port().expect("a free port");
        let mut builder = Daemon::builder()
            .policy(POLICY)
            .issuer(Issuer {
                issuer: IDP.to_owned(),
                audience: "tollgate".to_owned(),
                jwks: Jwks::Json(self.idp.jwks()),
            })
            .config_line(&format!("report_listen: 127.0.0.1:{port}"))
            .config_line(&format!(
                "report_tls: {{ cert_file: {}, key_file: {} }}",
                self.pki.cert.display(),
                self.pki.key.display()
            ))
            .config_line(&format!(
                "reviewers: {{ unix_users: [root], jwt: [{{ issuer: \"{IDP}\", claims: {{ groups: auditors }} }}] }}"
            ));
        for line in extra {
            builder = builder.config_line(line);
        }
        Host { daemon: builder.start(), port }
    }

    /// A reviewer token file with `groups`.
    fn token(&self, groups: &[&str]) -> PathBuf {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let jwt = self.idp.sign(&json!({
            "iss": IDP, "aud": "tollgate", "sub": "reviewer", "iat": now, "exp": now + 600, "groups": groups,
        }));
        let path = self.dir.path().join(format!("token-{}.jwt", unique_tag()));
        fs::write(&path, jwt).expect("token file");
        path
    }
}

impl Host {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }
}

/// (status, body) of a GET with curl, trusting the test CA.
fn get(fleet: &Fleet, url: &str, token: Option<&Path>) -> (u16, String) {
    let body = fleet.dir.path().join(format!("body-{}", unique_tag()));
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert", path_str(&fleet.pki.ca), "-o", path_str(&body), "-w", "%{http_code}"]);
    if let Some(token) = token {
        let jwt = fs::read_to_string(token).expect("token");
        cmd.args(["-H", &format!("Authorization: Bearer {}", jwt.trim())]);
    }
    cmd.arg(url);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("curl runs");
    let status = out.stdout.trim().parse().unwrap_or_else(|_| panic!("curl printed no status: {out}"));
    (status, fs::read_to_string(&body).unwrap_or_default())
}

fn wait_ended(daemon: &Daemon, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sessions = daemon.sessions();
        if sessions.len() >= count && sessions.iter().all(|s| !s["ended_at"].is_null()) {
            return;
        }
        assert!(Instant::now() < deadline, "sessions did not end: {}", pretty(&Value::Array(sessions)));
        thread::sleep(Duration::from_millis(100));
    }
}

/// 401 without a token, 403 for a token reviewers.jwt does not admit and from inside a session
/// whatever the token, 200 for an admitted one on every endpoint; /metrics parses as Prometheus text.
#[test]
fn reviewers_pull_over_https_with_an_admitted_token() {
    let fleet = Fleet::new();
    let host = fleet.host(&[]);
    let token = host.daemon.mint("pulled-bot", BUILD_BOTS);
    assert!(host.daemon.run(&token, &["/usr/bin/true"]).success());
    wait_ended(&host.daemon, 1);
    let id = host.daemon.last_session_id();
    let (auditor, developer) = (fleet.token(&["auditors"]), fleet.token(&["developers"]));

    let (status, body) = get(&fleet, &host.url("/v1/sessions"), None);
    assert_eq!(status, 401, "{body}");
    let (status, body) = get(&fleet, &host.url("/v1/sessions"), Some(&developer));
    assert_eq!(status, 403, "{body}");
    let (status, body) = get(&fleet, &host.url("/v1/sessions"), Some(&token));
    assert_eq!(status, 403, "a session token is no reviewer token: {body}");
    for path in [
        "/v1/sessions".to_owned(),
        format!("/v1/sessions/{id}"),
        format!("/v1/sessions/{id}/replay"),
        "/v1/review?since=1h".to_owned(),
        "/v1/report?since=1h&format=json".to_owned(),
        "/v1/report?since=1h&format=md".to_owned(),
        "/v1/report?since=1h&format=html".to_owned(),
    ] {
        let (status, body) = get(&fleet, &host.url(&path), Some(&auditor));
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains(&id) || path.contains("review"), "{path} does not name the session: {body}");
    }
    let (status, body) = get(&fleet, &host.url("/v1/report?since=last+week"), Some(&auditor));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("last week"), "{body}");
    let (status, _) = get(&fleet, &host.url("/v1/sessions/s-0000000000000000"), Some(&auditor));
    assert_eq!(status, 404);

    // From inside a session, even with the auditor's token: refused.
    let jwt = fs::read_to_string(&auditor).expect("token");
    let header = format!("Authorization: Bearer {}", jwt.trim());
    let url = host.url("/v1/sessions");
    let argv = ["curl", "-sS", "--cacert", path_str(&fleet.pki.ca), "-w", "\n%{http_code}", "-H", &header, &url];
    let out = host.daemon.run(&token, &argv);
    assert!(out.stdout.trim_end().ends_with("403") && out.stdout.contains("inside a session"), "{out}");

    // /metrics needs no token and parses as Prometheus text.
    wait_ended(&host.daemon, 2);
    let (status, metrics) = get(&fleet, &host.url("/metrics"), None);
    assert_eq!(status, 200);
    let parser = "import sys, json\nfrom prometheus_client.parser import text_string_to_metric_families as parse\nprint(json.dumps([[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) for s in f.samples]))";
    let file = fleet.dir.path().join("metrics.txt");
    fs::write(&file, &metrics).expect("metrics");
    let mut python = Command::new("/usr/bin/python3");
    python.args(["-c", &format!("import sys; sys.stdin = open({:?}); exec({parser:?})", path_str(&file))]);
    let out = run_with_timeout(&mut python, Duration::from_secs(30)).expect("python3 runs");
    assert!(out.success(), "/metrics does not parse as Prometheus text: {out}\n{metrics}");
    let samples: Vec<Value> = serde_json::from_str(&out.stdout).expect("parser output");
    let sample = |name: &str, labels: Value| -> Option<f64> {
        samples.iter().find(|s| s[0] == name && (labels.is_null() || s[1] == labels)).and_then(|s| s[2].as_f64())
    };
    assert_eq!(sample("tollgate_sessions_active", Value::Null), Some(0.0), "{metrics}");
    assert!(
        sample("tollgate_decisions_total", json!({"kind": "exec", "verdict": "allow"})).is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    assert!(sample("tollgate_approvals_waiting", Value::Null).is_some(), "{metrics}");
    assert!(sample("tollgate_proxy_request_duration_seconds_count", Value::Null).is_some(), "{metrics}");
}

/// `report --from` pulls two hosts' reports, checks each signature, and merges them by host; a host
/// whose key is not among the keys given is refused.
#[test]
fn fleet_reports_merge_hosts_and_check_their_signatures() {
    let fleet = Fleet::new();
    let (a, b) = (fleet.host(&[]), fleet.host(&[]));
    for (host, sessions) in [(&a, 1), (&b, 2)] {
        let token = host.daemon.mint("fleet-bot", BUILD_BOTS);
        for _ in 0..sessions {
            assert!(host.daemon.run(&token, &["/usr/bin/true"]).success());
        }
        wait_ended(&host.daemon, sessions);
    }
    let auditor = fleet.token(&["auditors"]);
    let pull = |format: &str, keys: &[&Path]| -> RunOutput {
        let mut args = vec!["report".to_owned(), "--since".into(), "1h".into(), "--format".into(), format.into()];
        for host in [&a, &b] {
            args.extend(["--from".to_owned(), format!("https://127.0.0.1:{}", host.port)]);
        }
        args.extend([
            "--token-file".to_owned(),
            path_str(&auditor).into(),
            "--ca".into(),
            path_str(&fleet.pki.ca).into(),
        ]);
        for key in keys {
            args.extend(["--key".to_owned(), path_str(key).into()]);
        }
        a.daemon.tollgate(&args)
    };
    let out = pull("json", &[]);
    assert!(out.success(), "{out}");
    let merged: Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(merged["hosts"].as_array().map(Vec::len), Some(2), "{}", pretty(&merged));
    assert_eq!(merged["totals"]["sessions"], 3, "{}", pretty(&merged));
    assert_eq!(merged["hosts"][0]["report"]["totals"]["sessions"], 1);
    assert_eq!(merged["hosts"][1]["report"]["totals"]["sessions"], 2);
    assert_eq!(merged["hosts"][0]["from"], format!("https://127.0.0.1:{}", a.port));
    let md = pull("md", &[]);
    assert!(md.success() && md.stdout.matches("\n# Host ").count() == 2, "{md}");

    let key_a = fleet.dir.path().join("a.pub");
    fs::write(&key_a, a.daemon.status()["ledger_public_key"].as_str().expect("key")).expect("key");
    let out = pull("json", &[&key_a]);
    assert_eq!(out.code(), Some(1), "{out}");
    assert!(out.stderr.contains("not among the keys given") && out.stderr.contains(&b.port.to_string()), "{out}");
    let key_b = fleet.dir.path().join("b.pub");
    fs::write(&key_b, b.daemon.status()["ledger_public_key"].as_str().expect("key")).expect("key");
    assert!(pull("json", &[&key_a, &key_b]).success());
}

/// The HTML report opens in headless Chromium with no console errors, and the session count can be
/// read off a screenshot (OCR).
#[test]
fn the_html_report_renders_in_a_browser() {
    let daemon = Daemon::builder().policy(POLICY).config_line("reviewers: { unix_users: [root] }").start();
    let token = daemon.mint("html-bot", BUILD_BOTS);
    for _ in 0..3 {
        assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    }
    wait_ended(&daemon, 3);
    let dir = daemon.dir().to_owned();
    let page = dir.join("report.html");
    assert!(daemon.tollgate(&["report", "--since", "1h", "--format", "html", "-o", path_str(&page)]).success());
    let home = dir.join("chromium-home");
    fs::create_dir_all(&home).expect("home");
    let shot = dir.join("report.png");
    let mut chromium = Command::new("chromium");
    chromium
        .env("HOME", &home)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900"])
        .args(["--enable-logging=stderr", "--v=0"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()));
    let out = run_with_timeout(&mut chromium, Duration::from_secs(90)).expect("chromium runs");
    assert!(out.success() && shot.exists(), "chromium took no screenshot: {out}");
    let console: Vec<&str> = out.stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let mut ocr = Command::new("tesseract");
    ocr.arg(&shot).arg("stdout");
    let out = run_with_timeout(&mut ocr, Duration::from_secs(60)).expect("tesseract runs");
    assert!(out.stdout.contains("3 sessions"), "the session count is not visible in the screenshot: {out}");
}

/// `export` prints the ledger in order as JSON lines and, with --follow, records as they are written.
#[test]
fn export_prints_the_log_and_follows_it() {
    let daemon = Daemon::start(POLICY);
    let token = daemon.mint("export-bot", BUILD_BOTS);
    assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    wait_ended(&daemon, 1);
    let mut cmd = Command::new(tollgate_bin());
    cmd.args(["export", "--config", path_str(daemon.config_path())]);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("export runs");
    let lines: Vec<Value> = out.stdout.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let numbers: Vec<i64> = lines.iter().map(|l| l["n"].as_i64().expect("n")).collect();
    assert_eq!(numbers, (1..=numbers.len() as i64).collect::<Vec<_>>(), "{out}");
    assert_eq!(lines[0]["entry"], "session");
    assert!(
        lines.iter().any(|l| l["record"]["kind"] == "exec" && l["record"]["detail"]["filename"] == "/usr/bin/true"),
        "{out}"
    );

    let mut follow = Command::new(tollgate_bin())
        .args(["export", "--follow", "--config", path_str(daemon.config_path())])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("export --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let marker = format!("followed-{}", unique_tag());
    assert!(daemon.run(&token, &["/bin/echo", &marker]).success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = false;
    while !seen && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen = line.contains(&marker);
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "export --follow did not print the new session's exec");
}

/// A test OTLP collector: a Python HTTP server that keeps every request body as a file.
struct Collector {
    child: Child,
}

impl Collector {
    const SCRIPT: &str = r#"
import http.server, os, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        with open(os.path.join(out, '%d.json' % time.time_ns()), 'wb') as f:
            f.write(body)
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.end_headers()
        self.wfile.write(b'{}')
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(('127.0.0.1', port), Handler).serve_forever()
"#;

    fn start(port: u16, out: &Path) -> Collector {
        let child = Command::new("/usr/bin/python3")
            .args(["-c", Self::SCRIPT, &port.to_string(), path_str(out)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the collector starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the collector did not listen");
            thread::sleep(Duration::from_millis(50));
        }
        Collector { child }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `tollgate.n` the collector received.
fn received(out: &Path) -> BTreeSet<i64> {
    let mut numbers = BTreeSet::new();
    for entry in fs::read_dir(out).into_iter().flatten().flatten() {
        let Ok(body) = fs::read_to_string(entry.path()) else { continue };
        let Ok(request) = serde_json::from_str::<Value>(&body) else { continue };
        for record in request["resourceLogs"][0]["scopeLogs"][0]["logRecords"].as_array().into_iter().flatten() {
            for attribute in record["attributes"].as_array().into_iter().flatten() {
                if attribute["key"] == "tollgate.n"
                    && let Some(n) = attribute["value"]["intValue"].as_str().and_then(|n| n.parse().ok())
                {
                    numbers.insert(n);
                }
            }
        }
    }
    numbers
}

fn head(daemon: &Daemon) -> i64 {
    let out = daemon.tollgate(&["verify", "--format", "json"]);
    serde_json::from_str::<Value>(&out.stdout).ok().and_then(|v| v["head"]["n"].as_i64()).unwrap_or(0)
}

fn wait_received_all(daemon: &Daemon, out: &Path) -> BTreeSet<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (got, head) = (received(out), head(daemon));
        if head > 0 && (1..=head).all(|n| got.contains(&n)) {
            return got;
        }
        assert!(Instant::now() < deadline, "the collector got {got:?}, the chain ends at {head}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// Every record reaches the OTLP collector; while it is down they wait (the backlog shows in
/// `status`), and after it returns nothing is missing.
#[test]
fn otlp_export_loses_nothing_across_a_collector_restart() {
    let out = tempfile::Builder::new().prefix("tollgate-otlp-").tempdir().expect("temp dir");
    let port = free_loopback_port().expect("port");
    let collector = Collector::start(port, out.path());
    let daemon =
        Daemon::builder().policy(POLICY).config_line(&format!("otlp_endpoint: http://127.0.0.1:{port}")).start();
    let token = daemon.mint("otlp-bot", BUILD_BOTS);
    assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    wait_ended(&daemon, 1);
    wait_received_all(&daemon, out.path());

    collector.stop();
    for _ in 0..2 {
        assert!(daemon.run(&token, &["/usr/bin/true"]).success());
    }
    wait_ended(&daemon, 3);
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.status()["otlp"]["backlog"].as_i64().unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no backlog while the collector is down: {}", pretty(&daemon.status()));
        thread::sleep(Duration::from_millis(200));
    }
    let _collector = Collector::start(port, out.path());
    let got = wait_received_all(&daemon, out.path());
    let head = head(&daemon);
    assert_eq!(got.iter().copied().max(), Some(head), "{got:?}");
    let status = daemon.status();
    assert_eq!(status["otlp"]["skipped"], 0, "{}", pretty(&status));
}

/// An identity with `record_output` gets a terminal the daemon holds: the caller sees the output as
/// printed; the record has it masked with timing; `replay --format asciicast` plays it; the cap
/// stops the record, not the output.
#[test]
fn terminal_output_is_recorded_masked_and_replays_as_asciicast() {
    let daemon = Daemon::builder().policy(POLICY).config_line("output_cap_bytes: 200").start();
    let token = daemon.mint("recorded-bot", &[("repository_owner", "recorded")]);
    let script = "echo hello-terminal; echo card 4111-1111-1111-1111 >&2; read line; echo got:$line; tty; i=0; while [ $i -lt 20 ]; do echo filler-line-$i; i=$((i+1)); done; exit 7";
    let mut cmd = Command::new(tollgate_bin());
    cmd.args([
        "--socket",
        path_str(daemon.socket()),
        "run",
        "--token-file",
        path_str(&token),
        "--",
        "/bin/sh",
        "-c",
        script,
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("tollgate run");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"typed-input\n").expect("input");
    }
    let output = child.wait_with_output().expect("tollgate run ends");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(7), "the command's exit code: {printed}");
    assert!(printed.contains("hello-terminal\r\n"), "the caller sees the output: {printed:?}");
    assert!(printed.contains("card 4111-1111-1111-1111"), "the caller's own terminal is not masked: {printed:?}");
    assert!(printed.contains("got:typed-input"), "the caller's input reached the command: {printed:?}");
    assert!(printed.contains("/dev/pts/"), "the command runs on a terminal: {printed:?}");
    assert!(printed.contains("filler-line-19"), "the cap does not cut the output: {printed:?}");

    let id = daemon.last_session_id();
    let show = daemon.show_until(&id, "the output records", |s| !s["session"]["ended_at"].is_null());
    let records: Vec<&Value> =
        show["events"].as_array().into_iter().flatten().filter(|e| e["kind"] == "output").collect();
    let recorded: String = records.iter().filter_map(|r| r["data"].as_str()).collect();
    assert!(recorded.contains("hello-terminal") && recorded.contains("card ****"), "{recorded:?}");
    assert!(!recorded.contains("4111"), "the card number was stored: {recorded:?}");
    assert!(recorded.len() <= 200, "the cap holds: {} bytes", recorded.len());
    assert!(records.last().is_some_and(|r| r["truncated"] == true), "the record says it was cut: {}", pretty(&show));

    let cast = daemon.tollgate(&["replay", &id, "--format", "asciicast"]);
    assert!(cast.success(), "{cast}");
    let mut lines = cast.stdout.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header")).expect("JSON header");
    assert_eq!((header["version"].as_u64(), header["width"].as_u64()), (Some(2), Some(80)));
    let frames: Vec<Value> = lines.map(|l| serde_json::from_str(l).expect("a JSON frame")).collect();
    let times: Vec<f64> = frames.iter().map(|f| f[0].as_f64().expect("time")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(frames.iter().all(|f| f[1] == "o"));
    let played: String = frames.iter().filter_map(|f| f[2].as_str()).collect();
    assert_eq!(played, recorded, "the asciicast plays what was recorded");
    // Line by line, the cast holds what the caller was shown (masked), up to the cap.
    let shown = printed.replace("4111-1111-1111-1111", "****");
    let whole_lines: Vec<&str> = played.split("\r\n").collect();
    for line in &whole_lines[..whole_lines.len() - 1] {
        assert!(shown.contains(&format!("{line}\r\n")), "{line:?} was not printed:\n{shown:?}");
    }
}
