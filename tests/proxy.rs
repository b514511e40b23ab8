//! The L7 proxy on governed routes: the kernel redirects a session's connect to the daemon's
//! proxy, which blocks, holds for approval, injects a credential, masks responses and records
//! every exchange. Each test checks both sides: what the client in the session saw and what the
//! upstream (a recording HTTP server on loopback) received.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use harness::net::Listener;
use harness::session_log::{connects_to, events_of_kind, parse_rfc3339, pretty, str_field};
use harness::upstream::Upstream;
use harness::{Daemon, RunOutput, run_with_timeout, tollgate_bin, unique_tag};
use serde_json::Value;
use tempfile::TempDir;

/// Claims that match the `build-bots` identity.
const BUILD_BOTS: &[(&str, &str)] = &[("repository_owner", "acme")];
const GRANT: &str = "agents-internal-api";
/// The system interpreter: reachable by every uid, unlike a per-user install.
const PYTHON: &str = "/usr/bin/python3";
const NOBODY: u32 = 65534;
/// What the upstream answers unless a test says otherwise.
const UPSTREAM_REPLY: &str = r#"{"served_by":"upstream","ok":true}"#;
/// Config that makes root a reviewer.
const REVIEWERS: &str = "reviewers:\n  unix_users: [root]";
/// Long enough that a held request never times out while a test decides it.
const LONG_APPROVAL_TIMEOUT: &str = "approval_timeout: 30s";
/// How long to wait for something the daemon does asynchronously (a pending approval, a webhook).
const ASYNC_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Policy and secrets
// ---------------------------------------------------------------------------------------------

/// A policy with the `build-bots` identity and one grant whose network section allows both
/// loopbacks, has `extra_network` (more `network:` keys) and the proxy routes in `routes`.
fn policy(routes: &str, extra_network: &str) -> String {
    format!(
        r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    claims: {{ repository_owner: acme }}
grants:
  - name: {GRANT}
    identity: build-bots
    network:
      allow: ["127.0.0.0/8", "::1/128"]
{extra_network}      proxy:
{routes}"#
    )
}

/// The reference route: credential, block, approve and mask rules, to `to` (e.g.
/// `127.0.0.1/32:PORT`), with the credential in `secret`.
fn standard_route(to: &str, secret: &Path) -> String {
    format!(
        r#"        - to: "{to}"
          protocol: http
          credential: {{ header: Authorization, secret_file: {secret} }}
          block:
            - {{ method: DELETE }}
            - {{ path: "^/admin/" }}
          approve:
            - {{ method: POST, path: "^/deploy" }}
          mask:
            - {{ json_path: "$.users[*].email" }}
            - {{ regex: "\\b\\d{{4}}-\\d{{4}}-\\d{{4}}-\\d{{4}}\\b", replace: "****-****-****-****" }}
"#,
        secret = yaml_str(path_str(secret)),
    )
}

/// The name the daemon gives the route to `to` (in records, refusals and `policy explain`).
fn route_name(to: &str) -> String {
    format!("{GRANT}: network.proxy {to}")
}

/// A JSON string literal, which is also a valid YAML double-quoted scalar.
fn yaml_str(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A secret file in its own world-readable directory, so that only the file's own owner and mode
/// decide who can read it.
struct Secret {
    _dir: TempDir,
    path: PathBuf,
    value: String,
}

impl Secret {
    /// A secret owned by `uid` (gid 0) with permission bits `mode`.
    fn new(mode: u32, uid: u32) -> Secret {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-secret-")
            .tempdir()
            .expect("creating the secret's temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .expect("chmod 755 on the secret's dir");
        let path = dir.path().join("api-token");
        let value = format!("Bearer tollgate-secret-{}", unique_tag());
        // Created private, so the secret is never readable by others before the chmod below.
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| writeln!(file, "{value}"))
            .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
        chown(&path, Some(uid), Some(0))
            .unwrap_or_else(|err| panic!("chown {uid}:0 {}: {err}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|err| panic!("chmod {mode:o} {}: {err}", path.display()));
        Secret {
            _dir: dir,
            path,
            value,
        }
    }

    /// Root-owned and private: what the proxy requires.
    fn private() -> Secret {
        Secret::new(0o600, 0)
    }
}

// ---------------------------------------------------------------------------------------------
// A daemon with the reference route in front of a recording upstream
// ---------------------------------------------------------------------------------------------

/// One test's world: a recording upstream, the reference route to it, a daemon and a token.
struct Fixture {
    // The daemon goes first so that it is stopped (and its log printed on failure) first.
    daemon: Daemon,
    upstream: Upstream,
    secret: Secret,
    token: PathBuf,
    /// The route's `to`.
    to: String,
}

impl Fixture {
    /// An IPv4 upstream and the reference route, with `config` lines added to the daemon's
    /// configuration.
    fn start(config: &[&str]) -> Fixture {
        Fixture::start_on("127.0.0.1", config)
    }

    /// Like [`Fixture::start`], with the upstream on `ip` ("127.0.0.1" or "::1").
    fn start_on(ip: &str, config: &[&str]) -> Fixture {
        let upstream = Upstream::start(ip, 200, UPSTREAM_REPLY);
        let to = if ip.contains(':') {
            format!("[{ip}]/128:{}", upstream.port())
        } else {
            format!("{ip}/32:{}", upstream.port())
        };
        let secret = Secret::private();
        let mut builder = Daemon::builder().policy(&policy(&standard_route(&to, &secret.path), ""));
        for line in config {
            builder = builder.config_line(line);
        }
        let daemon = builder.start();
        let token = daemon.mint("deploy-bot", BUILD_BOTS);
        Fixture {
            daemon,
            upstream,
            secret,
            token,
            to,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.upstream.base_url())
    }

    /// One curl request from a new root session.
    fn curl(&self, args: &[&str]) -> Exchange {
        Exchange::parse(self.daemon.run(&self.token, &curl_argv(args)))
    }

    /// The route's name in records and refusals (destinations are named ADDRESS/PREFIX:PORT,
    /// IPv6 ones without the brackets the policy needs).
    fn route(&self) -> String {
        route_name(&self.to.replace(['[', ']'], ""))
    }
}

/// What a client in a session got for one curl request.
struct Exchange {
    /// The session the request was made from.
    session: String,
    /// The HTTP status, 0 when curl got no response.
    status: u16,
    body: String,
    out: RunOutput,
}

impl Exchange {
    /// Parses the output of [`curl_argv`]: the session id, the body, then the status code.
    fn parse(out: RunOutput) -> Exchange {
        let (session, rest) = out
            .stdout
            .split_once('\n')
            .unwrap_or((out.stdout.as_str(), ""));
        let (body, code) = rest.rsplit_once('\n').unwrap_or(("", rest));
        let status = code
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("curl printed no status code: {out}"));
        Exchange {
            session: session.to_owned(),
            status,
            body: body.to_owned(),
            out,
        }
    }

    /// The body as JSON.
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|err| panic!("the response body is not JSON ({err}):\n{self}"))
    }

    /// Asserts the status, with the whole exchange in the message.
    fn assert_status(&self, status: u16, what: &str) {
        assert_eq!(
            self.status, status,
            "{what}: unexpected HTTP status\n{self}"
        );
    }
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "session {} got HTTP {} with body {:?}\n{}",
            self.session, self.status, self.body, self.out
        )
    }
}

/// argv for a governed command that prints its session id, then runs `curl ARGS...` printing
/// the response body and, on a line of its own, the status code.
fn curl_argv(args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> = [
        "/bin/sh",
        "-c",
        r#"echo "$TOLLGATE_SESSION"; exec curl -sS --max-time 45 -w '\n%{http_code}' "$@""#,
        "sh",
    ]
    .map(str::to_owned)
    .to_vec();
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    argv
}

// ---------------------------------------------------------------------------------------------
// Records and approvals
// ---------------------------------------------------------------------------------------------

/// The http events of a `show` answer.
fn http_events(show: &Value) -> Vec<&Value> {
    events_of_kind(show, "http")
}

/// The http event for `method path`, panicking with the log if there is none.
fn http_event<'a>(show: &'a Value, method: &str, path: &str) -> &'a Value {
    http_events(show)
        .into_iter()
        .find(|event| event["method"] == method && event["path"] == path)
        .unwrap_or_else(|| panic!("no http event for {method} {path} in:\n{}", pretty(show)))
}

/// Whether the log has an http event for `method path`.
fn has_http_event(show: &Value, method: &str, path: &str) -> bool {
    http_events(show)
        .iter()
        .any(|event| event["method"] == method && event["path"] == path)
}

/// The approval events with `verdict`.
fn approval_events<'a>(show: &'a Value, verdict: &str) -> Vec<&'a Value> {
    events_of_kind(show, "approval")
        .into_iter()
        .filter(|event| event["verdict"] == verdict)
        .collect()
}

/// Checks the fields every http event has, and that they name this route and destination.
fn assert_http_event(
    event: &Value,
    show: &Value,
    (verdict, outcome, status): (&str, &str, u16),
    destination: &str,
    route: &str,
) {
    let context = pretty(show);
    assert_eq!(event["verdict"], verdict, "http event verdict:\n{context}");
    assert_eq!(event["outcome"], outcome, "http event outcome:\n{context}");
    assert_eq!(event["status"], status, "http event status:\n{context}");
    assert_eq!(
        event["destination"], destination,
        "http event destination:\n{context}"
    );
    assert_eq!(event["grant"], GRANT, "http event grant:\n{context}");
    assert_eq!(event["route"], route, "http event route:\n{context}");
    assert!(
        event["rules"].is_array(),
        "http event rules should be an array:\n{context}"
    );
    assert!(
        event["duration_ms"].is_number(),
        "http event duration_ms should be a number:\n{context}"
    );
    assert!(
        event["request_bytes"].is_u64(),
        "http event request_bytes should be a count:\n{context}"
    );
}

/// The rule names an http event says it hit.
fn rules_hit(event: &Value) -> Vec<&str> {
    event["rules"]
        .as_array()
        .map(|rules| rules.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// `tollgate approvals --format json` as root.
fn approvals(daemon: &Daemon) -> Vec<Value> {
    let out = daemon.tollgate(&["approvals", "--format", "json"]);
    assert!(out.success(), "`tollgate approvals` failed for root: {out}");
    match serde_json::from_str(&out.stdout) {
        Ok(Value::Array(list)) => list,
        _ => panic!("`tollgate approvals --format json` did not print a JSON array: {out}"),
    }
}

/// Polls `approvals` until it lists `count` held requests, and returns them.
fn wait_for_approvals(daemon: &Daemon, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + ASYNC_TIMEOUT;
    loop {
        let list = approvals(daemon);
        if list.len() >= count {
            assert_eq!(
                list.len(),
                count,
                "more requests are held than expected:\n{}",
                pretty(&Value::Array(list.clone()))
            );
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {ASYNC_TIMEOUT:?} waiting for {count} held request(s); held now:\n{}",
            pretty(&Value::Array(list))
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A pending approval's id.
fn approval_id(pending: &Value) -> String {
    let id = str_field(pending, "id");
    assert!(
        id.starts_with("a-"),
        "approval ids look like a-N:\n{}",
        pretty(pending)
    );
    id.to_owned()
}

/// Runs `tollgate --socket S ARGS...` as `uid`, outside any session.
fn tollgate_as(daemon: &Daemon, uid: u32, args: &[&str]) -> RunOutput {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid",
        &uid.to_string(),
        "--regid",
        &uid.to_string(),
        "--clear-groups",
    ])
    .arg(tollgate_bin())
    .arg("--socket")
    .arg(daemon.socket())
    .args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("running tollgate as uid {uid}: {err:#}"))
}

/// Files through which a test and a script inside a session take turns: the test writes `go`
/// (with a value for the script), the script does its part and creates `done`.
struct Handshake {
    dir: PathBuf,
}

impl Handshake {
    /// Shell for a session script: wait (at most 30s) for `go` in `$dir`, then `go_value=$(...)`.
    const WAIT_FOR_GO: &str = r#"i=0
while [ ! -s "$dir/go" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
go_value=$(cat "$dir/go")"#;

    fn new(daemon: &Daemon) -> Handshake {
        let dir = daemon.dir().join(format!("handshake-{}", unique_tag()));
        fs::create_dir(&dir).unwrap_or_else(|err| panic!("creating {}: {err}", dir.display()));
        Handshake { dir }
    }

    fn dir(&self) -> &str {
        path_str(&self.dir)
    }

    /// Lets the script go on, handing it `value`.
    fn go(&self, value: &str) {
        fs::write(self.dir.join("go"), value).expect("writing the handshake's go file");
    }

    /// Waits until the script has created `done`.
    fn wait_done(&self, what: &str) {
        let deadline = Instant::now() + ASYNC_TIMEOUT;
        while !self.dir.join("done").exists() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the session to {what}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every byte of the daemon's session database and its write-ahead log.
fn database_bytes(daemon: &Daemon) -> Vec<u8> {
    let state = daemon.dir().join("state");
    let mut bytes = Vec::new();
    for name in ["sessions.db", "sessions.db-wal"] {
        let path = state.join(name);
        match fs::read(&path) {
            Ok(content) => bytes.extend(content),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && name.ends_with("-wal") => {}
            Err(err) => panic!("reading {}: {err}", path.display()),
        }
    }
    bytes
}

/// Parses JSON text, panicking with the text if it is not JSON.
fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text:?}"))
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Inside sessions
// ---------------------------------------------------------------------------------------------

/// Python for a session: sends `METHOD PATH` over a raw socket of family argv[1] ("4" or "6") to
/// argv[2]:argv[3] and prints `peer=HOST PORT` (from getpeername), `status=STATUS LINE` and
/// `body=BODY`.
const REQUEST_SCRIPT: &str = r#"
import socket, sys
family, host, port, method, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(30)
s.connect((host, port))
print("peer=%s %d" % s.getpeername()[:2])
authority = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
s.sendall(("%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (method, path, authority)).encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
print("status=" + head.split(b"\r\n")[0].decode())
print("body=" + body.decode())
"#;

/// The value of the first stdout line starting with `key=`.
fn reported<'a>(out: &'a RunOutput, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    out.stdout
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("the session reported no {key}: {out}"))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn governed_connects_are_redirected_transparently_and_recorded() {
    let fx = Fixture::start(&[]);
    let port = fx.upstream.port();
    let url = fx.url("/hello?x=1");
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"; {PYTHON} -c "$0" 4 127.0.0.1 {port} GET /peer && curl -sS --max-time 30 -w '\ncurl_status=%{{http_code}}\n' "$1""#
    );
    let out = fx
        .daemon
        .run(&fx.token, &["/bin/sh", "-c", &script, REQUEST_SCRIPT, &url]);
    assert_eq!(out.code(), Some(0), "the session's requests failed: {out}");
    let session = out.first_line().to_owned();

    // The client believes it talks to the upstream itself, and gets the upstream's answer.
    assert_eq!(
        reported(&out, "peer"),
        format!("127.0.0.1 {port}"),
        "getpeername() must show the original destination: {out}"
    );
    assert_eq!(reported(&out, "status"), "HTTP/1.1 200 OK", "{out}");
    assert_eq!(
        json_of(reported(&out, "body")),
        json_of(UPSTREAM_REPLY),
        "the raw client got the upstream's body: {out}"
    );
    assert_eq!(reported(&out, "curl_status"), "200", "{out}");
    let curl_body = out.stdout.lines().rev().nth(1).unwrap_or_default();
    assert_eq!(
        json_of(curl_body),
        json_of(UPSTREAM_REPLY),
        "curl got the upstream's body: {out}"
    );

    // The upstream received both requests, through the proxy.
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /peer".to_owned(), "GET /hello?x=1".to_owned()],
        "{}",
        fx.upstream.describe()
    );

    let show = fx.daemon.show_until(&session, "both http events", |show| {
        has_http_event(show, "GET", "/peer") && has_http_event(show, "GET", "/hello?x=1")
    });
    let connects = connects_to(&show, "127.0.0.1", port);
    assert_eq!(
        connects.len(),
        2,
        "two connects to the upstream:\n{}",
        pretty(&show)
    );
    for connect in connects {
        assert_eq!(
            connect["verdict"],
            "redirect",
            "a governed connect is redirected:\n{}",
            pretty(&show)
        );
    }
    let destination = format!("127.0.0.1:{port}");
    let event = http_event(&show, "GET", "/hello?x=1");
    assert_http_event(
        event,
        &show,
        ("allow", "forwarded", 200),
        &destination,
        &fx.route(),
    );
    assert_eq!(
        event["host"],
        format!("127.0.0.1:{port}"),
        "the Host header is recorded:\n{}",
        pretty(&show)
    );
    assert!(
        rules_hit(event).is_empty(),
        "no block/approve rule applies to a GET:\n{}",
        pretty(&show)
    );
    assert_eq!(
        event["request_bytes"],
        0,
        "a GET has no body:\n{}",
        pretty(&show)
    );
    assert_eq!(
        event["response_bytes"],
        curl_body.len(),
        "response_bytes is the size of the body the client got:\n{}",
        pretty(&show)
    );
}

#[test]
fn blocked_requests_get_403_and_never_reach_the_upstream() {
    let fx = Fixture::start(&[]);

    let by_method = fx.curl(&["-X", "DELETE", &fx.url("/items/1")]);
    by_method.assert_status(403, "DELETE is blocked");
    let body = by_method.json();
    assert_eq!(body["error"], "blocked by policy", "{by_method}");
    assert_eq!(body["rule"], "block[0]: method DELETE", "{by_method}");
    assert_eq!(body["grant"], GRANT, "{by_method}");
    assert_eq!(body["route"], fx.route(), "{by_method}");
    assert_eq!(body["session"], by_method.session, "{by_method}");

    let by_path = fx.curl(&[&fx.url("/admin/users")]);
    by_path.assert_status(403, "GET /admin/ is blocked");
    let body = by_path.json();
    assert_eq!(body["error"], "blocked by policy", "{by_path}");
    let rule = body["rule"].as_str().unwrap_or_default();
    assert!(
        rule.starts_with("block[1]") && rule.contains("^/admin/"),
        "the refusal should name the path rule: {by_path}"
    );

    assert!(
        fx.upstream.requests().is_empty(),
        "blocked requests reached the upstream: {}",
        fx.upstream.describe()
    );
    assert_eq!(
        fx.upstream.connections(),
        0,
        "the proxy should not even connect for a blocked request"
    );

    // The route itself works: an allowed request on it gets through.
    let allowed = fx.curl(&[&fx.url("/admin")]);
    allowed.assert_status(200, "/admin (no trailing slash) is not blocked");
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /admin".to_owned()],
        "{}",
        fx.upstream.describe()
    );

    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    let show = fx
        .daemon
        .show_until(&by_method.session, "the blocked DELETE", |show| {
            has_http_event(show, "DELETE", "/items/1")
        });
    let event = http_event(&show, "DELETE", "/items/1");
    assert_http_event(
        event,
        &show,
        ("block", "blocked", 403),
        &destination,
        &fx.route(),
    );
    assert_eq!(
        rules_hit(event),
        vec!["block[0]: method DELETE"],
        "{}",
        pretty(&show)
    );

    let show = fx
        .daemon
        .show_until(&by_path.session, "the blocked GET", |show| {
            has_http_event(show, "GET", "/admin/users")
        });
    let event = http_event(&show, "GET", "/admin/users");
    assert_http_event(
        event,
        &show,
        ("block", "blocked", 403),
        &destination,
        &fx.route(),
    );
    assert_eq!(rules_hit(event), vec![rule], "{}", pretty(&show));
}

/// What an HTTP server commonly takes a request path to mean: percent-encoded unreserved
/// characters decoded, runs of slashes merged, dot segments removed (nginx's defaults).
fn normalized_path(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let mut decoded = String::new();
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        decoded.push_str(&rest[..at]);
        let hex = rest
            .get(at + 1..at + 3)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match hex.map(char::from) {
            Some(c) if c.is_ascii_alphanumeric() || "-._~".contains(c) => {
                decoded.push(c);
                rest = &rest[at + 3..];
            }
            _ => {
                decoded.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    decoded.push_str(rest);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').filter(|segment| !segment.is_empty()) {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let trailing = if decoded.ends_with('/') { "/" } else { "" };
    format!("/{}{trailing}", segments.join("/"))
}

/// A block rule on a path holds for the path the upstream acts on: other spellings of a blocked
/// path are blocked or refused, never forwarded.
#[test]
fn blocked_paths_cannot_be_reached_by_another_spelling() {
    let fx = Fixture::start(&[]);
    let spellings = [
        "/%61dmin/users",
        "//admin/users",
        "/public/../admin/users",
        "/./admin/users",
    ];
    let mut answers = Vec::new();
    for path in spellings {
        assert!(
            normalized_path(path).starts_with("/admin/"),
            "test bug: {path} is not an /admin/ path"
        );
        let exchange = fx.curl(&["--path-as-is", &fx.url(path)]);
        answers.push(format!("{path} -> HTTP {}", exchange.status));
    }
    let reached: Vec<String> = fx
        .upstream
        .requests()
        .iter()
        .filter(|request| normalized_path(&request.path).starts_with("/admin/"))
        .map(|request| request.path.clone())
        .collect();
    assert!(
        reached.is_empty(),
        "requests for a blocked path reached the upstream as {reached:?}\nthe client got: {answers:#?}\n{}",
        fx.upstream.describe()
    );
}

#[test]
fn block_rules_match_headers_and_bodies() {
    let upstream = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let to = format!("127.0.0.1/32:{}", upstream.port());
    let route = format!(
        r#"        - to: "{to}"
          protocol: http
          block:
            - {{ header: {{ name: X-Danger, value: "^yes$" }} }}
            - {{ method: POST, body: "DROP TABLE" }}
"#
    );
    let daemon = Daemon::start(&policy(&route, ""));
    let token = daemon.mint("matcher-bot", BUILD_BOTS);
    let url = |path: &str| format!("{}{path}", upstream.base_url());
    let curl = |args: &[&str]| Exchange::parse(daemon.run(&token, &curl_argv(args)));

    let header = curl(&["-H", "X-Danger: yes", &url("/by-header")]);
    header.assert_status(403, "a matching header is blocked");
    assert!(
        header.json()["rule"]
            .as_str()
            .is_some_and(|rule| rule.starts_with("block[0]") && rule.contains("X-Danger")),
        "{header}"
    );
    let body = curl(&[
        "-X",
        "POST",
        "--data",
        "x; DROP TABLE users",
        &url("/by-body"),
    ]);
    body.assert_status(403, "a matching body is blocked");
    assert!(
        body.json()["rule"]
            .as_str()
            .is_some_and(|rule| rule.starts_with("block[1]")),
        "{body}"
    );

    // Near misses pass: another header value, the body rule's text under another method.
    let other_header = curl(&["-H", "X-Danger: no", &url("/other-header")]);
    other_header.assert_status(200, "a non-matching header value passes");
    let other_body = curl(&["-X", "POST", "--data", "SELECT 1", &url("/other-body")]);
    other_body.assert_status(200, "a non-matching body passes");
    let other_method = curl(&[
        "-X",
        "PUT",
        "--data",
        "DROP TABLE users",
        &url("/other-method"),
    ]);
    other_method.assert_status(200, "all fields of a matcher must match");

    assert_eq!(
        upstream.request_lines(),
        vec![
            "GET /other-header".to_owned(),
            "POST /other-body".to_owned(),
            "PUT /other-method".to_owned()
        ],
        "{}",
        upstream.describe()
    );
    let forwarded = &upstream.requests()[1];
    assert_eq!(
        forwarded.body_text(),
        "SELECT 1",
        "the request body reaches the upstream intact:\n{forwarded}"
    );
}

#[test]
fn an_approved_request_is_forwarded() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let url = fx.url("/deploy/1");
    let payload = r#"{"release":"v1"}"#;

    let exchange = thread::scope(|scope| {
        let held = scope.spawn(|| {
            fx.curl(&[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data",
                payload,
                &url,
            ])
        });
        let pending = wait_for_approvals(&fx.daemon, 1);
        let pending = &pending[0];
        let context = pretty(pending);
        assert_eq!(pending["method"], "POST", "{context}");
        assert_eq!(pending["path"], "/deploy/1", "{context}");
        assert_eq!(pending["grant"], GRANT, "{context}");
        assert_eq!(pending["identity"], "build-bots", "{context}");
        assert_eq!(pending["subject"], "deploy-bot", "{context}");
        assert_eq!(
            pending["destination"],
            format!("127.0.0.1:{}", fx.upstream.port()),
            "{context}"
        );
        assert!(
            str_field(pending, "rule").starts_with("approve[0]"),
            "{context}"
        );
        assert!(str_field(pending, "session").starts_with("s-"), "{context}");
        let requested = parse_rfc3339(str_field(pending, "requested_at"));
        let expires = parse_rfc3339(str_field(pending, "expires_at"));
        match (requested, expires) {
            (Some((from, _)), Some((to, _))) => assert!(
                (29..=31).contains(&(to - from)),
                "expires_at should be approval_timeout (30s) after requested_at:\n{context}"
            ),
            _ => panic!("requested_at and expires_at should be RFC 3339:\n{context}"),
        }
        assert!(
            fx.upstream.requests().is_empty(),
            "a held request reached the upstream before approval: {}",
            fx.upstream.describe()
        );

        let id = approval_id(pending);
        let approve = fx.daemon.tollgate(&["approve", id.as_str()]);
        assert!(
            approve.success(),
            "`tollgate approve {id}` failed: {approve}"
        );
        let exchange = held.join().expect("the held request's thread panicked");
        assert_eq!(
            exchange.session,
            str_field(pending, "session"),
            "the pending request names its session"
        );
        (exchange, id)
    });
    let (exchange, id) = exchange;

    exchange.assert_status(200, "an approved request is forwarded");
    assert_eq!(exchange.json(), json_of(UPSTREAM_REPLY), "{exchange}");
    let requests = fx.upstream.requests();
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["POST /deploy/1".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    assert_eq!(
        requests[0].body_text(),
        payload,
        "the held body is forwarded intact:\n{}",
        requests[0]
    );
    assert!(
        approvals(&fx.daemon).is_empty(),
        "a decided request is no longer listed"
    );

    let show = fx
        .daemon
        .show_until(&exchange.session, "the approval and the exchange", |show| {
            !approval_events(show, "approved").is_empty()
                && has_http_event(show, "POST", "/deploy/1")
        });
    let pending_events = approval_events(&show, "pending");
    assert_eq!(
        pending_events.len(),
        1,
        "one pending approval:\n{}",
        pretty(&show)
    );
    assert_eq!(pending_events[0]["id"], id.as_str(), "{}", pretty(&show));
    let approved = approval_events(&show, "approved")[0];
    assert_eq!(
        (approved["id"].as_str(), approved["by"].as_str()),
        (Some(id.as_str()), Some("root")),
        "{}",
        pretty(&show)
    );
    let event = http_event(&show, "POST", "/deploy/1");
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(
        event,
        &show,
        ("allow", "forwarded", 200),
        &destination,
        &fx.route(),
    );
    assert_eq!(event["request_bytes"], payload.len(), "{}", pretty(&show));
    let rules = rules_hit(event);
    assert!(
        rules.len() == 1 && rules[0].starts_with("approve[0]"),
        "the approve rule is recorded:\n{}",
        pretty(&show)
    );
}

#[test]
fn a_denied_request_gets_403_with_the_reviewers_reason() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let url = fx.url("/deploy/2");
    let reason = "change freeze until Monday";

    let (exchange, id) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &url]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&pending[0]);
        let deny = fx
            .daemon
            .tollgate(&["deny", id.as_str(), "--reason", reason]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (held.join().expect("the held request's thread panicked"), id)
    });

    exchange.assert_status(403, "a denied request is refused");
    let body = exchange.json();
    assert_eq!(body["error"], "denied by a reviewer", "{exchange}");
    assert_eq!(body["denied_by"], "root", "{exchange}");
    assert_eq!(body["reason"], reason, "{exchange}");
    assert_eq!(body["session"], exchange.session, "{exchange}");
    assert!(
        fx.upstream.requests().is_empty(),
        "a denied request reached the upstream: {}",
        fx.upstream.describe()
    );
    assert!(
        approvals(&fx.daemon).is_empty(),
        "a decided request is no longer listed"
    );

    let show = fx
        .daemon
        .show_until(&exchange.session, "the denial", |show| {
            !approval_events(show, "denied").is_empty() && has_http_event(show, "POST", "/deploy/2")
        });
    let denied = approval_events(&show, "denied")[0];
    assert_eq!(
        (denied["id"].as_str(), denied["by"].as_str()),
        (Some(id.as_str()), Some("root")),
        "{}",
        pretty(&show)
    );
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(
        http_event(&show, "POST", "/deploy/2"),
        &show,
        ("deny", "denied", 403),
        &destination,
        &fx.route(),
    );
}

#[test]
fn an_undecided_request_is_denied_when_the_approval_times_out() {
    let fx = Fixture::start(&[REVIEWERS, "approval_timeout: 2s"]);
    let started = Instant::now();
    let exchange = fx.curl(&["-X", "POST", "--data", "go", &fx.url("/deploy/late")]);
    let waited = started.elapsed();

    exchange.assert_status(403, "nobody decided in time");
    let body = exchange.json();
    assert_eq!(body["error"], "approval timed out", "{exchange}");
    assert_eq!(body["denied_by"], "timeout", "{exchange}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "the request should be held for about the 2s timeout, was {waited:?}: {exchange}"
    );
    assert!(
        fx.upstream.requests().is_empty(),
        "a timed-out request reached the upstream: {}",
        fx.upstream.describe()
    );
    assert!(
        approvals(&fx.daemon).is_empty(),
        "a timed-out request is no longer listed"
    );

    let show = fx
        .daemon
        .show_until(&exchange.session, "the timeout", |show| {
            !approval_events(show, "timed-out").is_empty()
                && has_http_event(show, "POST", "/deploy/late")
        });
    let pending = approval_events(&show, "pending");
    assert_eq!(pending.len(), 1, "one pending approval:\n{}", pretty(&show));
    let id = str_field(pending[0], "id").to_owned();
    let timed_out = approval_events(&show, "timed-out")[0];
    assert_eq!(
        (timed_out["id"].as_str(), timed_out["by"].as_str()),
        (Some(id.as_str()), Some("timeout")),
        "{}",
        pretty(&show)
    );
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(
        http_event(&show, "POST", "/deploy/late"),
        &show,
        ("deny", "denied", 403),
        &destination,
        &fx.route(),
    );

    // A late approval releases nothing.
    let late = fx.daemon.tollgate(&["approve", id.as_str()]);
    assert_eq!(
        late.code(),
        Some(1),
        "approving a timed-out request should fail: {late}"
    );
    thread::sleep(Duration::from_millis(300));
    assert!(
        fx.upstream.requests().is_empty(),
        "a late approval released the request: {}",
        fx.upstream.describe()
    );
}

#[test]
fn an_approval_with_a_window_lets_later_requests_of_that_session_through() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let script = r#"echo "$TOLLGATE_SESSION"
for path in /deploy/1 /deploy/2; do
  curl -sS --max-time 45 -o /dev/null -w "status $path=%{http_code}\n" -X POST --data go "$0$path"
done"#;
    let base = fx.upstream.base_url();

    let out = thread::scope(|scope| {
        let session = scope.spawn(|| fx.daemon.run(&fx.token, &["/bin/sh", "-c", script, &base]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        assert_eq!(pending[0]["path"], "/deploy/1", "{}", pretty(&pending[0]));
        let id = approval_id(&pending[0]);
        let approve = fx.daemon.tollgate(&["approve", id.as_str(), "--for", "1m"]);
        assert!(
            approve.success(),
            "`tollgate approve {id} --for 1m` failed: {approve}"
        );
        session.join().expect("the session's thread panicked")
    });
    assert_eq!(out.code(), Some(0), "the session failed: {out}");
    assert_eq!(
        reported(&out, "status /deploy/1"),
        "200",
        "the approved request: {out}"
    );
    assert_eq!(
        reported(&out, "status /deploy/2"),
        "200",
        "the request inside the window: {out}"
    );
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["POST /deploy/1".to_owned(), "POST /deploy/2".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    assert!(
        approvals(&fx.daemon).is_empty(),
        "nothing is held after the window let /deploy/2 through"
    );

    let session = out.first_line().to_owned();
    let show = fx.daemon.show_until(&session, "both exchanges", |show| {
        has_http_event(show, "POST", "/deploy/1") && has_http_event(show, "POST", "/deploy/2")
    });
    assert_eq!(
        approval_events(&show, "pending").len(),
        1,
        "only the first request should have been held:\n{}",
        pretty(&show)
    );
    assert_eq!(
        http_event(&show, "POST", "/deploy/2")["outcome"],
        "forwarded",
        "{}",
        pretty(&show)
    );

    // The window is that session's only: a new session's request is held again.
    let (other, other_pending) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &fx.url("/deploy/3")]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&pending[0]);
        let deny = fx
            .daemon
            .tollgate(&["deny", id.as_str(), "--reason", "other session"]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (
            held.join().expect("the held request's thread panicked"),
            pending[0].clone(),
        )
    });
    assert_ne!(
        other_pending["session"],
        session.as_str(),
        "{}",
        pretty(&other_pending)
    );
    assert_eq!(
        other_pending["path"],
        "/deploy/3",
        "{}",
        pretty(&other_pending)
    );
    other.assert_status(403, "another session is not covered by the window");
    assert_eq!(
        fx.upstream.requests().len(),
        2,
        "{}",
        fx.upstream.describe()
    );
}

#[test]
fn a_held_request_does_not_hold_up_other_sessions_or_connections() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let handshake = Handshake::new(&fx.daemon);
    // Session A: a POST that is held, then (once the test says so) a GET on a new connection.
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"
dir=$0 base=$1
curl -sS --max-time 45 -o /dev/null -w '%{{http_code}}' -X POST --data go "$base/deploy/slow" > "$dir/held.code" &
{wait}
curl -sS --max-time 10 -o /dev/null -w 'same_session_status=%{{http_code}}\n' "$base/same-session"
: > "$dir/done"
wait
echo "held_status=$(cat "$dir/held.code")""#,
        wait = Handshake::WAIT_FOR_GO
    );
    let base = fx.upstream.base_url();

    let (session_a, session_b) = thread::scope(|scope| {
        let held = scope.spawn(|| {
            fx.daemon.run(
                &fx.token,
                &["/bin/sh", "-c", &script, handshake.dir(), &base],
            )
        });
        let pending = wait_for_approvals(&fx.daemon, 1);
        assert_eq!(
            pending[0]["path"],
            "/deploy/slow",
            "{}",
            pretty(&pending[0])
        );

        // Session B's GET flows while A's POST is held.
        let started = Instant::now();
        let session_b = fx.curl(&[&fx.url("/status")]);
        let took = started.elapsed();
        session_b.assert_status(200, "another session's GET while a request is held");
        assert!(
            took < Duration::from_secs(10),
            "the GET took {took:?} while a request was held: {session_b}"
        );

        // So does a GET on another connection of the session whose request is held.
        handshake.go("now");
        handshake.wait_done("make its second request");
        assert_eq!(
            fx.upstream.request_lines(),
            vec!["GET /status".to_owned(), "GET /same-session".to_owned()],
            "the free requests reached the upstream, the held one did not: {}",
            fx.upstream.describe()
        );
        assert_eq!(approvals(&fx.daemon).len(), 1, "the POST is still held");

        let id = approval_id(&pending[0]);
        let approve = fx.daemon.tollgate(&["approve", id.as_str()]);
        assert!(
            approve.success(),
            "`tollgate approve {id}` failed: {approve}"
        );
        (held.join().expect("session A's thread panicked"), session_b)
    });
    assert_eq!(session_a.code(), Some(0), "session A failed: {session_a}");
    assert_eq!(
        reported(&session_a, "same_session_status"),
        "200",
        "{session_a}"
    );
    assert_eq!(
        reported(&session_a, "held_status"),
        "200",
        "the held request, once approved: {session_a}"
    );
    assert_ne!(
        session_a.first_line(),
        session_b.session,
        "the requests came from two sessions"
    );
    assert_eq!(
        fx.upstream.request_lines(),
        vec![
            "GET /status".to_owned(),
            "GET /same-session".to_owned(),
            "POST /deploy/slow".to_owned()
        ],
        "{}",
        fx.upstream.describe()
    );
}

/// An upstream answer with two emails and a card number, unique to this test process.
fn personal_data(tag: &str) -> (String, [String; 3]) {
    let clear = [
        format!("ann.{tag}@example.com"),
        format!("bob.{tag}@example.com"),
        "4111-2222-3333-4444".to_owned(),
    ];
    let body = format!(
        r#"{{"users":[{{"name":"ann","email":"{}","note":"card {}"}},{{"name":"bob","email":"{}"}}],"total":2}}"#,
        clear[0], clear[2], clear[1]
    );
    (body, clear)
}

#[test]
fn responses_are_masked_and_the_clear_values_are_not_stored() {
    let fx = Fixture::start(&["record_body_bytes: 4096"]);
    let (body, clear) = personal_data(&unique_tag());
    fx.upstream.set_reply(200, &body);

    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a masked response");
    for value in &clear {
        assert!(
            !exchange.body.contains(value.as_str()),
            "the client saw the clear value {value:?}: {exchange}"
        );
    }
    let json = exchange.json();
    assert_eq!(json["users"][0]["email"], "****", "{exchange}");
    assert_eq!(json["users"][1]["email"], "****", "{exchange}");
    assert_eq!(
        json["users"][0]["note"], "card ****-****-****-****",
        "{exchange}"
    );
    assert_eq!(
        (
            json["users"][0]["name"].as_str(),
            json["users"][1]["name"].as_str()
        ),
        (Some("ann"), Some("bob")),
        "{exchange}"
    );
    assert_eq!(json["total"], 2, "unmasked values are kept: {exchange}");
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /users".to_owned()],
        "{}",
        fx.upstream.describe()
    );

    let show = fx
        .daemon
        .show_until(&exchange.session, "the masked exchange", |show| {
            has_http_event(show, "GET", "/users")
        });
    let event = http_event(&show, "GET", "/users");
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(
        event,
        &show,
        ("allow", "forwarded", 200),
        &destination,
        &fx.route(),
    );
    assert_eq!(
        event["masked"],
        3,
        "two emails and one card number were replaced:\n{}",
        pretty(&show)
    );
    assert_eq!(
        event["response_body"],
        exchange.body.as_str(),
        "the record keeps the masked body:\n{}",
        pretty(&show)
    );
    assert_eq!(
        event["response_bytes"],
        exchange.body.len(),
        "{}",
        pretty(&show)
    );

    let stored = database_bytes(&fx.daemon);
    assert!(
        contains(&stored, &exchange.session) && contains(&stored, "****-****-****-****"),
        "the database files should hold this session's masked record, or this check proves nothing"
    );
    for value in &clear {
        assert!(
            !contains(&stored, value),
            "the session database stores the clear value {value:?}"
        );
    }
}

/// Masking replaces the matched values and nothing else: a number the upstream sent reaches the
/// client with its value, even one beyond 64 bits.
#[test]
fn masking_keeps_other_values_exact() {
    let fx = Fixture::start(&[]);
    let big = "123456789012345678901234567890";
    fx.upstream.set_reply(
        200,
        &format!(r#"{{"users":[{{"name":"ann","email":"ann@example.com"}}],"order_id":{big}}}"#),
    );
    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a masked response");
    assert!(
        !exchange.body.contains("ann@example.com"),
        "the email was not masked: {exchange}"
    );
    assert!(
        exchange.body.contains(&format!(r#""order_id":{big}"#)),
        "an unmasked number was changed: {exchange}"
    );
}

/// A JSON number outside the range of a double is still valid JSON (RFC 8259): the json_path
/// masks must apply (or the response be refused), never be skipped, and the record must not keep
/// the clear value either.
#[test]
fn masking_does_not_fail_open_on_unusual_json() {
    let fx = Fixture::start(&["record_body_bytes: 4096"]);
    let email = format!("ann.{}@example.com", unique_tag());
    fx.upstream.set_reply(
        200,
        &format!(r#"{{"users":[{{"name":"ann","email":"{email}"}}],"scale":1e400}}"#),
    );
    let exchange = fx.curl(&[&fx.url("/users")]);
    let show = fx
        .daemon
        .show_until(&exchange.session, "the exchange", |show| {
            has_http_event(show, "GET", "/users")
        });
    let leaks: Vec<&str> = [
        ("the client", exchange.body.contains(&email)),
        ("the session log", show.to_string().contains(&email)),
        (
            "the session database",
            contains(&database_bytes(&fx.daemon), &email),
        ),
    ]
    .into_iter()
    .filter_map(|(place, leaked)| leaked.then_some(place))
    .collect();
    assert!(
        leaks.is_empty(),
        "the clear email reached {leaks:?}: {exchange}\nrecord:\n{}",
        pretty(http_event(&show, "GET", "/users"))
    );
}

#[test]
fn recorded_response_bodies_are_cut_at_record_body_bytes() {
    let fx = Fixture::start(&["record_body_bytes: 16"]);
    let (body, _) = personal_data(&unique_tag());
    fx.upstream.set_reply(200, &body);

    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a masked response");
    assert!(exchange.body.len() > 16, "{exchange}");
    let show = fx
        .daemon
        .show_until(&exchange.session, "the exchange", |show| {
            has_http_event(show, "GET", "/users")
        });
    let event = http_event(&show, "GET", "/users");
    assert_eq!(
        event["response_body"],
        &exchange.body[..16],
        "the first 16 bytes are kept:\n{}",
        pretty(&show)
    );
    assert_eq!(
        event["response_bytes"],
        exchange.body.len(),
        "the size is the whole body's:\n{}",
        pretty(&show)
    );
}

#[test]
fn the_credential_is_injected_and_the_clients_own_is_dropped() {
    let fx = Fixture::start(&[]);

    let root = fx.curl(&[
        "-H",
        "Authorization: Bearer forged-by-root-client",
        &fx.url("/as-root"),
    ]);
    root.assert_status(200, "a request with a client Authorization header");

    // An unprivileged session cannot read the secret, yet its requests carry it.
    let script = r#"echo "$TOLLGATE_SESSION"
if cat "$0"; then echo "secret=read"; else echo "secret=unreadable"; fi
curl -sS --max-time 30 -o /dev/null -w 'curl_status=%{http_code}\n' -H 'authorization: forged-by-nobody' "$1""#;
    let url = fx.url("/as-nobody");
    let nobody = fx.daemon.run_as(
        NOBODY,
        NOBODY,
        &fx.token,
        &["/bin/sh", "-c", script, path_str(&fx.secret.path), &url],
    );
    assert_eq!(
        nobody.code(),
        Some(0),
        "the unprivileged session failed: {nobody}"
    );
    assert_eq!(
        reported(&nobody, "secret"),
        "unreadable",
        "uid {NOBODY} read the secret file: {nobody}"
    );
    assert!(
        !nobody.stdout.contains(&fx.secret.value),
        "the secret leaked to the session: {nobody}"
    );
    assert!(
        nobody.stderr.contains("Permission denied"),
        "cat should fail with EACCES: {nobody}"
    );
    assert_eq!(reported(&nobody, "curl_status"), "200", "{nobody}");
    let nobody_session = nobody.first_line().to_owned();
    assert_eq!(
        fx.daemon.session(&nobody_session)["uid"],
        NOBODY,
        "the session runs as nobody"
    );

    let requests = fx.upstream.requests();
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /as-root".to_owned(), "GET /as-nobody".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    for request in &requests {
        assert_eq!(
            request.header_values("authorization"),
            vec![fx.secret.value.as_str()],
            "the upstream should see exactly the secret, once:\n{request}"
        );
    }
    let described = fx.upstream.describe();
    assert!(
        !described.contains("forged-by"),
        "a client's own Authorization reached the upstream: {described}"
    );

    // The record names the credential's header but never holds the secret.
    for session in [&root.session, &nobody_session] {
        let show = fx.daemon.show_until(session, "the exchange", |show| {
            !http_events(show).is_empty()
        });
        assert_eq!(
            http_events(&show)[0]["outcome"],
            "forwarded",
            "{}",
            pretty(&show)
        );
        assert!(
            !show.to_string().contains(&fx.secret.value),
            "the session log holds the secret:\n{}",
            pretty(&show)
        );
    }
    assert!(
        !contains(&database_bytes(&fx.daemon), &fx.secret.value),
        "the session database holds the secret"
    );
}

#[test]
fn a_secret_file_others_could_read_or_own_fails_closed() {
    // One route whose secret is world-readable, one whose secret belongs to another user.
    let readable = Secret::new(0o644, 0);
    let foreign = Secret::new(0o600, NOBODY);
    let upstream_readable = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let upstream_foreign = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let to_readable = format!("127.0.0.1/32:{}", upstream_readable.port());
    let to_foreign = format!("127.0.0.1/32:{}", upstream_foreign.port());
    let routes =
        standard_route(&to_readable, &readable.path) + &standard_route(&to_foreign, &foreign.path);
    let daemon = Daemon::start(&policy(&routes, ""));
    let token = daemon.mint("deploy-bot", BUILD_BOTS);

    for (upstream, to, what) in [
        (
            &upstream_readable,
            &to_readable,
            "a world-readable secret file",
        ),
        (
            &upstream_foreign,
            &to_foreign,
            "a secret file owned by another user",
        ),
    ] {
        let url = format!("{}/with-bad-secret", upstream.base_url());
        let exchange = Exchange::parse(daemon.run(&token, &curl_argv(&[&url])));
        exchange.assert_status(502, what);
        let body = exchange.json();
        assert_eq!(
            body["error"], "the credential for this destination is unavailable",
            "{what}: {exchange}"
        );
        assert_eq!(body["route"], route_name(to), "{what}: {exchange}");
        assert_eq!(
            upstream.connections(),
            0,
            "{what}: the upstream was contacted: {}",
            upstream.describe()
        );

        let show = daemon.show_until(&exchange.session, "the failed exchange", |show| {
            has_http_event(show, "GET", "/with-bad-secret")
        });
        let destination = format!("127.0.0.1:{}", upstream.port());
        assert_http_event(
            http_event(&show, "GET", "/with-bad-secret"),
            &show,
            ("deny", "error", 502),
            &destination,
            &route_name(to),
        );
    }
}

#[test]
fn ipv6_routes_are_governed_like_ipv4() {
    let fx = Fixture::start_on("::1", &[]);
    let port = fx.upstream.port();
    assert_eq!(fx.to, format!("[::1]/128:{port}"));

    let forwarded = fx.curl(&["-g", &fx.url("/v6/hello")]);
    forwarded.assert_status(200, "GET over IPv6");
    assert_eq!(forwarded.json(), json_of(UPSTREAM_REPLY), "{forwarded}");
    let blocked = fx.curl(&["-g", "-X", "DELETE", &fx.url("/v6/item")]);
    blocked.assert_status(403, "DELETE over IPv6");
    assert_eq!(
        blocked.json()["rule"],
        "block[0]: method DELETE",
        "{blocked}"
    );

    let peer = fx.daemon.run(
        &fx.token,
        &[
            PYTHON,
            "-c",
            REQUEST_SCRIPT,
            "6",
            "::1",
            &port.to_string(),
            "GET",
            "/v6/peer",
        ],
    );
    assert_eq!(peer.code(), Some(0), "{peer}");
    assert_eq!(
        reported(&peer, "peer"),
        format!("::1 {port}"),
        "getpeername() shows the original peer: {peer}"
    );
    assert_eq!(reported(&peer, "status"), "HTTP/1.1 200 OK", "{peer}");

    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /v6/hello".to_owned(), "GET /v6/peer".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    assert_eq!(
        fx.upstream.requests()[0].header_values("authorization"),
        vec![fx.secret.value.as_str()]
    );

    let show = fx
        .daemon
        .show_until(&forwarded.session, "the IPv6 exchange", |show| {
            has_http_event(show, "GET", "/v6/hello")
        });
    let connects = connects_to(&show, "::1", port);
    assert!(
        !connects.is_empty()
            && connects
                .iter()
                .all(|connect| connect["verdict"] == "redirect"),
        "the IPv6 connect is redirected:\n{}",
        pretty(&show)
    );
    let destination = format!("[::1]:{port}");
    assert_http_event(
        http_event(&show, "GET", "/v6/hello"),
        &show,
        ("allow", "forwarded", 200),
        &destination,
        &fx.route(),
    );
}

#[test]
fn ipv4_mapped_connects_are_governed_as_ipv4() {
    let fx = Fixture::start(&[]);
    let port = fx.upstream.port().to_string();
    let raw = |method: &str, path: &str| {
        let argv = [
            "/bin/sh",
            "-c",
            r#"echo "$TOLLGATE_SESSION"; exec "$0" "$@""#,
            PYTHON,
            "-c",
            REQUEST_SCRIPT,
            "6",
            "::ffff:127.0.0.1",
            port.as_str(),
            method,
            path,
        ];
        let out = fx.daemon.run(&fx.token, &argv);
        assert_eq!(out.code(), Some(0), "the mapped {method} failed: {out}");
        out
    };

    let blocked = raw("DELETE", "/mapped");
    assert_eq!(
        reported(&blocked, "peer"),
        format!("::ffff:127.0.0.1 {port}"),
        "{blocked}"
    );
    assert_eq!(
        reported(&blocked, "status"),
        "HTTP/1.1 403 Forbidden",
        "a mapped DELETE is blocked: {blocked}"
    );
    let body: Value = serde_json::from_str(reported(&blocked, "body"))
        .unwrap_or_else(|err| panic!("the 403 body is not JSON ({err}): {blocked}"));
    assert_eq!(body["error"], "blocked by policy", "{blocked}");
    assert_eq!(body["rule"], "block[0]: method DELETE", "{blocked}");
    assert_eq!(
        body["route"],
        fx.route(),
        "the IPv4 route governs the mapped connect: {blocked}"
    );
    assert!(
        fx.upstream.requests().is_empty(),
        "a mapped DELETE reached the upstream: {}",
        fx.upstream.describe()
    );

    let forwarded = raw("GET", "/mapped-get");
    assert_eq!(
        reported(&forwarded, "status"),
        "HTTP/1.1 200 OK",
        "a mapped GET is forwarded: {forwarded}"
    );
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /mapped-get".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    assert_eq!(
        fx.upstream.requests()[0].header_values("authorization"),
        vec![fx.secret.value.as_str()]
    );

    let session = blocked.first_line();
    let show = fx
        .daemon
        .show_until(session, "the blocked mapped request", |show| {
            has_http_event(show, "DELETE", "/mapped")
        });
    let connects = connects_to(&show, "127.0.0.1", fx.upstream.port());
    assert!(
        connects.len() == 1 && connects[0]["verdict"] == "redirect",
        "the mapped connect is logged as IPv4 and redirected:\n{}",
        pretty(&show)
    );
    let destination = format!("127.0.0.1:{port}");
    assert_http_event(
        http_event(&show, "DELETE", "/mapped"),
        &show,
        ("block", "blocked", 403),
        &destination,
        &fx.route(),
    );
}

#[test]
fn without_a_proxy_governed_connects_fail_closed() {
    let fx = Fixture::start(&["proxy_port: 0"]);
    let other = Listener::bind("127.0.0.1");
    let script = r#"
import socket, sys
for name, port in (("governed", int(sys.argv[1])), ("plain", int(sys.argv[2]))):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(("127.0.0.1", port))
        print("%s=connected" % name)
    except OSError as e:
        print("%s=errno %d" % (name, e.errno))
    s.close()
"#;
    let url = fx.url("/proxy-down");
    let argv = [
        "/bin/sh",
        "-c",
        r#"echo "$TOLLGATE_SESSION"; "$0" -c "$1" "$2" "$3"; curl -sS --max-time 10 "$4"; echo "curl=$?""#,
        PYTHON,
        script,
        &fx.upstream.port().to_string(),
        &other.port().to_string(),
        &url,
    ];
    let out = fx.daemon.run(&fx.token, &argv);
    assert_eq!(
        reported(&out, "governed"),
        "errno 1",
        "a governed connect without a proxy fails with EPERM: {out}"
    );
    assert_eq!(
        reported(&out, "plain"),
        "connected",
        "an allowed, ungoverned destination still works: {out}"
    );
    assert_eq!(reported(&out, "curl"), "7", "curl cannot connect: {out}");
    assert_eq!(
        other.take_connections(),
        1,
        "the plain connect reached its listener"
    );
    assert_eq!(
        fx.upstream.connections(),
        0,
        "nothing may reach the upstream without the proxy: {}",
        fx.upstream.describe()
    );
    assert!(
        fx.upstream.requests().is_empty(),
        "{}",
        fx.upstream.describe()
    );

    let session = out.first_line();
    let show = fx
        .daemon
        .show_until(session, "the refused connects", |show| {
            connects_to(show, "127.0.0.1", fx.upstream.port()).len() == 2
        });
    for connect in connects_to(&show, "127.0.0.1", fx.upstream.port()) {
        assert_eq!(
            connect["verdict"],
            "deny",
            "a governed connect without a proxy is denied, not redirected:\n{}",
            pretty(&show)
        );
    }
    assert!(
        http_events(&show).is_empty(),
        "no exchange can happen without a proxy:\n{}",
        pretty(&show)
    );
}

#[test]
fn the_webhook_receives_each_pending_approval() {
    let webhook = Upstream::start("127.0.0.1", 200, "{}");
    let hook_url = format!("approval_webhook: {}/hook", webhook.base_url());
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT, &hook_url]);
    let url = fx.url("/deploy/hooked");

    let (exchange, listed, notice) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &url]));
        let listed = wait_for_approvals(&fx.daemon, 1).remove(0);
        let notice = webhook.wait_for("the webhook call", ASYNC_TIMEOUT, |request| {
            request.path == "/hook"
        });
        let id = approval_id(&listed);
        let deny = fx
            .daemon
            .tollgate(&["deny", id.as_str(), "--reason", "seen on the webhook"]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (
            held.join().expect("the held request's thread panicked"),
            listed,
            notice,
        )
    });

    assert_eq!(notice.method, "POST", "the webhook is POSTed:\n{notice}");
    assert!(
        notice
            .header_values("content-type")
            .iter()
            .any(|value| value.starts_with("application/json")),
        "the webhook body is JSON:\n{notice}"
    );
    let body: Value = serde_json::from_slice(&notice.body)
        .unwrap_or_else(|err| panic!("the webhook body is not JSON ({err}):\n{notice}"));
    for field in [
        "id",
        "session",
        "identity",
        "subject",
        "grant",
        "rule",
        "destination",
        "method",
        "path",
        "requested_at",
        "expires_at",
    ] {
        assert!(
            body[field].is_string(),
            "the webhook body lacks {field:?}:\n{}",
            pretty(&body)
        );
        assert_eq!(
            body[field],
            listed[field],
            "the webhook and `approvals` disagree on {field:?}:\n{}",
            pretty(&body)
        );
    }
    assert_eq!(body["session"], exchange.session, "{}", pretty(&body));
    assert_eq!(body["path"], "/deploy/hooked", "{}", pretty(&body));
    assert_eq!(
        webhook.request_lines(),
        vec!["POST /hook".to_owned()],
        "one call per held request: {}",
        webhook.describe()
    );
    exchange.assert_status(403, "denied after the webhook call");
    assert!(
        fx.upstream.requests().is_empty(),
        "{}",
        fx.upstream.describe()
    );
}

#[test]
fn only_reviewers_outside_sessions_can_see_or_decide_approvals() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let handshake = Handshake::new(&fx.daemon);
    // The session holds a request of its own, waits for the test to hand it the approval id, then
    // tries to list and approve it from inside.
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"
bin=$0 socket=$1 dir=$2 url=$3
curl -sS --max-time 45 -o /dev/null -w '%{{http_code}}' -X POST --data go "$url" > "$dir/held.code" &
{wait}
"$bin" --socket "$socket" approvals --format json; echo "approvals_status=$?"
"$bin" --socket "$socket" approve "$go_value"; echo "approve_status=$?"
: > "$dir/done"
wait
echo "held_code=$(cat "$dir/held.code")"
"#,
        wait = Handshake::WAIT_FOR_GO
    );
    let bin = tollgate_bin();
    let url = fx.url("/deploy/self");

    let (out, id) = thread::scope(|scope| {
        let session = scope.spawn(|| {
            fx.daemon.run(
                &fx.token,
                &[
                    "/bin/sh",
                    "-c",
                    &script,
                    path_str(&bin),
                    path_str(fx.daemon.socket()),
                    handshake.dir(),
                    url.as_str(),
                ],
            )
        });
        let pending = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&pending[0]);
        handshake.go(&id);
        handshake.wait_done("try to review its own request");
        assert_eq!(
            approvals(&fx.daemon).len(),
            1,
            "the session's own approve must not decide anything"
        );

        // A user who is not a reviewer, outside any session, is refused too.
        let list = tollgate_as(&fx.daemon, NOBODY, &["approvals", "--format", "json"]);
        assert_eq!(
            list.code(),
            Some(1),
            "a non-reviewer listed approvals: {list}"
        );
        assert!(
            list.stderr.contains("not a reviewer"),
            "the refusal should say why: {list}"
        );
        assert!(!list.stdout.contains("/deploy/self"), "{list}");
        let approve = tollgate_as(&fx.daemon, NOBODY, &["approve", id.as_str()]);
        assert_eq!(
            approve.code(),
            Some(1),
            "a non-reviewer approved: {approve}"
        );
        assert!(
            approve.stderr.contains("not a reviewer"),
            "the refusal should say why: {approve}"
        );
        assert_eq!(
            approvals(&fx.daemon).len(),
            1,
            "a non-reviewer's approve must not decide anything"
        );

        let deny = fx
            .daemon
            .tollgate(&["deny", id.as_str(), "--reason", "self-review attempt"]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (session.join().expect("the session's thread panicked"), id)
    });

    assert_eq!(
        reported(&out, "approvals_status"),
        "1",
        "`approvals` from inside a session must fail: {out}"
    );
    assert_eq!(
        reported(&out, "approve_status"),
        "1",
        "`approve` from inside a session must fail: {out}"
    );
    assert!(
        out.stderr
            .contains("processes inside a session cannot review requests"),
        "the refusal should say why: {out}"
    );
    assert!(
        !out.stdout.contains("/deploy/self"),
        "the session saw the approval list: {out}"
    );
    assert_eq!(
        reported(&out, "held_code"),
        "403",
        "the request was denied, not approved: {out}"
    );
    assert!(
        fx.upstream.requests().is_empty(),
        "{}",
        fx.upstream.describe()
    );

    let show = fx
        .daemon
        .show_until(out.first_line(), "the denial", |show| {
            !approval_events(show, "denied").is_empty()
        });
    assert!(
        approval_events(&show, "approved").is_empty(),
        "{}",
        pretty(&show)
    );
    assert_eq!(
        approval_events(&show, "denied")[0]["id"],
        id.as_str(),
        "{}",
        pretty(&show)
    );
}

#[test]
fn policy_explain_names_the_entry_and_matches_the_kernel() {
    let upstream = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let secret = Secret::private();
    let port = upstream.port();
    let to = format!("127.0.0.1/32:{port}");
    let policy_text = policy(
        &standard_route(&to, &secret.path),
        "      deny: [\"127.0.0.9/32\"]\n",
    );
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let policy_file = dir.path().join("policy.yaml");
    fs::write(&policy_file, &policy_text).expect("writing the policy");

    let explain = |identity: &str, dest: &str| {
        let mut cmd = Command::new(tollgate_bin());
        cmd.args(["policy", "explain", "--policy"])
            .arg(&policy_file)
            .args(["--identity", identity, "--to", dest]);
        run_with_timeout(&mut cmd, Duration::from_secs(30))
            .expect("running tollgate policy explain")
    };
    let allowed = Listener::bind("127.0.0.1");
    let cases = [
        (
            format!("127.0.0.1:{port}"),
            format!("proxy ({})", route_name(&to)),
        ),
        (
            format!("[::ffff:127.0.0.1]:{port}"),
            format!("proxy ({})", route_name(&to)),
        ),
        (
            format!("127.0.0.9:{port}"),
            format!("deny ({GRANT}: network.deny 127.0.0.9/32)"),
        ),
        (
            format!("127.0.0.1:{}", allowed.port()),
            format!("allow ({GRANT}: network.allow 127.0.0.0/8)"),
        ),
        (
            "10.1.2.3:443".to_owned(),
            "deny (no entry matches: the default)".to_owned(),
        ),
    ];
    for (dest, expected) in &cases {
        let out = explain("build-bots", dest);
        assert_eq!(out.code(), Some(0), "explain {dest}: {out}");
        assert_eq!(out.stdout.trim(), expected, "explain {dest}: {out}");
    }
    let unknown = explain("ghost-bots", "127.0.0.1:80");
    assert_eq!(
        unknown.code(),
        Some(1),
        "an unknown identity is an error: {unknown}"
    );
    assert!(unknown.stderr.contains("ghost-bots"), "{unknown}");

    // The kernel decides the same: redirect, deny, allow.
    let daemon = Daemon::start(&policy_text);
    let token = daemon.mint("explain-bot", BUILD_BOTS);
    let script = r#"
import socket, sys
for host, port in (("127.0.0.1", int(sys.argv[1])), ("127.0.0.9", int(sys.argv[1])), ("127.0.0.1", int(sys.argv[2]))):
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect((host, port))
        print("%s:%d=connected" % (host, port))
    except OSError as e:
        print("%s:%d=errno %d" % (host, port, e.errno))
    s.close()
"#;
    let argv = [
        "/bin/sh",
        "-c",
        r#"echo "$TOLLGATE_SESSION"; exec "$0" "$@""#,
        PYTHON,
        "-c",
        script,
        &port.to_string(),
        &allowed.port().to_string(),
    ];
    let out = daemon.run(&token, &argv);
    assert_eq!(out.code(), Some(0), "{out}");
    assert_eq!(
        reported(&out, &format!("127.0.0.1:{port}")),
        "connected",
        "the proxied destination: {out}"
    );
    assert_eq!(
        reported(&out, &format!("127.0.0.9:{port}")),
        "errno 1",
        "the denied destination: {out}"
    );
    assert_eq!(
        reported(&out, &format!("127.0.0.1:{}", allowed.port())),
        "connected",
        "the allowed destination: {out}"
    );
    let show = daemon.show_until(out.first_line(), "three connects", |show| {
        events_of_kind(show, "connect").len() >= 3
    });
    let verdict = |addr: &str, port: u16| {
        connects_to(&show, addr, port)
            .first()
            .map(|event| event["verdict"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no connect to {addr}:{port}:\n{}", pretty(&show)))
    };
    assert_eq!(verdict("127.0.0.1", port), "redirect", "{}", pretty(&show));
    assert_eq!(verdict("127.0.0.9", port), "deny", "{}", pretty(&show));
    assert_eq!(
        verdict("127.0.0.1", allowed.port()),
        "allow",
        "{}",
        pretty(&show)
    );
    assert_eq!(
        allowed.take_connections(),
        1,
        "the allowed connect reached its listener"
    );
}
