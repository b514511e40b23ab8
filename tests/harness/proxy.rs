//! The proxy tests' shared world: a policy with the reference route (credential, block, approve
//! and mask rules) in front of a recording upstream ([`Fixture`]), curl requests from sessions
//! ([`Exchange`]), readers for the http and approval records they leave, and the reviewer side of
//! held requests. Each proxy test checks both sides: what the client in the session saw and what
//! the upstream (a recording HTTP server on loopback) received.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::session_log::{events_of_kind, pretty, str_field};
use crate::upstream::Upstream;
use crate::{Daemon, RunOutput, unique_tag};

/// Claims that match the `build-bots` identity.
pub const BUILD_BOTS: &[(&str, &str)] = &[("repository_owner", "acme")];
pub const GRANT: &str = "agents-internal-api";
pub const NOBODY: u32 = 65534;
/// What the upstream answers unless a test says otherwise.
pub const UPSTREAM_REPLY: &str = r#"{"served_by":"upstream","ok":true}"#;
/// Config that makes root a reviewer.
pub const REVIEWERS: &str = "reviewers:\n  unix_users: [root]";
/// Long enough that a held request never times out while a test decides it.
pub const LONG_APPROVAL_TIMEOUT: &str = "approval_timeout: 30s";
/// How long to wait for something the daemon does asynchronously (a pending approval, a webhook).
pub const ASYNC_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Policy and secrets
// ---------------------------------------------------------------------------------------------

/// A policy with the `build-bots` identity and one grant whose network section allows both
/// loopbacks, has `extra_network` (more `network:` keys) and the proxy routes in `routes`.
pub fn policy(routes: &str, extra_network: &str) -> String {
    format!(
        r#"identities:
  - name: build-bots
    issuer: tollgate-dev
    allow_root: true
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
pub fn standard_route(to: &str, secret: &Path) -> String {
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
pub fn route_name(to: &str) -> String {
    format!("{GRANT}: network.proxy {to}")
}

/// A JSON string literal, which is also a valid YAML double-quoted scalar.
fn yaml_str(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A secret file in its own world-readable directory, so that only the file's own owner and mode
/// decide who can read it.
pub struct Secret {
    _dir: TempDir,
    pub path: PathBuf,
    pub value: String,
}

impl Secret {
    /// A secret owned by `uid` (gid 0) with permission bits `mode`.
    pub fn new(mode: u32, uid: u32) -> Secret {
        let dir =
            tempfile::Builder::new().prefix("tollgate-secret-").tempdir().expect("creating the secret's temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod 755 on the secret's dir");
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
        chown(&path, Some(uid), Some(0)).unwrap_or_else(|err| panic!("chown {uid}:0 {}: {err}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|err| panic!("chmod {mode:o} {}: {err}", path.display()));
        Secret { _dir: dir, path, value }
    }

    /// Root-owned and private: what the proxy requires.
    pub fn private() -> Secret {
        Secret::new(0o600, 0)
    }
}

// ---------------------------------------------------------------------------------------------
// A daemon with the reference route in front of a recording upstream
// ---------------------------------------------------------------------------------------------

/// One test's world: a recording upstream, the reference route to it, a daemon and a token.
pub struct Fixture {
    // The daemon goes first so that it is stopped (and its log printed on failure) first.
    pub daemon: Daemon,
    pub upstream: Upstream,
    pub secret: Secret,
    pub token: PathBuf,
    /// The route's `to`.
    pub to: String,
}

impl Fixture {
    /// An IPv4 upstream and the reference route, with `config` lines added to the daemon's
    /// configuration.
    pub fn start(config: &[&str]) -> Fixture {
        Fixture::start_on("127.0.0.1", config)
    }

    /// Like [`Fixture::start`], with the upstream on `ip` ("127.0.0.1" or "::1").
    pub fn start_on(ip: &str, config: &[&str]) -> Fixture {
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
        Fixture { daemon, upstream, secret, token, to }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.upstream.base_url())
    }

    /// One curl request from a new root session.
    pub fn curl(&self, args: &[&str]) -> Exchange {
        Exchange::parse(self.daemon.run(&self.token, &curl_argv(args)))
    }

    /// The route's name in records and refusals (destinations are named ADDRESS/PREFIX:PORT,
    /// IPv6 ones without the brackets the policy needs).
    pub fn route(&self) -> String {
        route_name(&self.to.replace(['[', ']'], ""))
    }
}

/// What a client in a session got for one curl request.
pub struct Exchange {
    /// The session the request was made from.
    pub session: String,
    /// The HTTP status, 0 when curl got no response.
    pub status: u16,
    pub body: String,
    pub out: RunOutput,
}

impl Exchange {
    /// Parses the output of [`curl_argv`]: the session id, the body, then the status code.
    pub fn parse(out: RunOutput) -> Exchange {
        let (session, rest) = out.stdout.split_once('\n').unwrap_or((out.stdout.as_str(), ""));
        let (body, code) = rest.rsplit_once('\n').unwrap_or(("", rest));
        let status = code.trim().parse().unwrap_or_else(|_| panic!("curl printed no status code: {out}"));
        Exchange { session: session.to_owned(), status, body: body.to_owned(), out }
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|err| panic!("the response body is not JSON ({err}):\n{self}"))
    }

    /// Asserts the status, with the whole exchange in the message.
    pub fn assert_status(&self, status: u16, what: &str) {
        assert_eq!(self.status, status, "{what}: unexpected HTTP status\n{self}");
    }
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "session {} got HTTP {} with body {:?}\n{}", self.session, self.status, self.body, self.out)
    }
}

/// argv for a governed command that prints its session id, then runs `curl ARGS...` printing
/// the response body and, on a line of its own, the status code.
pub fn curl_argv(args: &[&str]) -> Vec<String> {
    let mut argv: Vec<String> =
        ["/bin/sh", "-c", r#"echo "$TOLLGATE_SESSION"; exec curl -sS --max-time 45 -w '\n%{http_code}' "$@""#, "sh"]
            .map(str::to_owned)
            .to_vec();
    argv.extend(args.iter().map(|arg| (*arg).to_owned()));
    argv
}

// ---------------------------------------------------------------------------------------------
// Records and approvals
// ---------------------------------------------------------------------------------------------

/// The http events of a `show` answer.
pub fn http_events(show: &Value) -> Vec<&Value> {
    events_of_kind(show, "http")
}

/// The http event for `method path`, panicking with the log if there is none.
pub fn http_event<'a>(show: &'a Value, method: &str, path: &str) -> &'a Value {
    http_events(show)
        .into_iter()
        .find(|event| event["method"] == method && event["path"] == path)
        .unwrap_or_else(|| panic!("no http event for {method} {path} in:\n{}", pretty(show)))
}

/// Whether the log has an http event for `method path`.
pub fn has_http_event(show: &Value, method: &str, path: &str) -> bool {
    http_events(show).iter().any(|event| event["method"] == method && event["path"] == path)
}

/// The approval events with `verdict`.
pub fn approval_events<'a>(show: &'a Value, verdict: &str) -> Vec<&'a Value> {
    events_of_kind(show, "approval").into_iter().filter(|event| event["verdict"] == verdict).collect()
}

/// Checks the fields every http event has, and that they name this route and destination.
pub fn assert_http_event(
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
    assert_eq!(event["destination"], destination, "http event destination:\n{context}");
    assert_eq!(event["grant"], GRANT, "http event grant:\n{context}");
    assert_eq!(event["route"], route, "http event route:\n{context}");
    assert!(event["rules"].is_array(), "http event rules should be an array:\n{context}");
    assert!(event["duration_ms"].is_number(), "http event duration_ms should be a number:\n{context}");
    assert!(event["request_bytes"].is_u64(), "http event request_bytes should be a count:\n{context}");
}

/// The rule names an http event says it hit.
pub fn rules_hit(event: &Value) -> Vec<&str> {
    event["rules"].as_array().map(|rules| rules.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// `tollgate approvals --format json` as root.
pub fn approvals(daemon: &Daemon) -> Vec<Value> {
    let out = daemon.tollgate(&["approvals", "--format", "json"]);
    assert!(out.success(), "`tollgate approvals` failed for root: {out}");
    match serde_json::from_str(&out.stdout) {
        Ok(Value::Array(list)) => list,
        _ => panic!("`tollgate approvals --format json` did not print a JSON array: {out}"),
    }
}

/// Polls `approvals` until it lists `count` held requests, and returns them.
pub fn wait_for_approvals(daemon: &Daemon, count: usize) -> Vec<Value> {
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
pub fn approval_id(pending: &Value) -> String {
    let id = str_field(pending, "id");
    assert!(id.starts_with("a-"), "approval ids look like a-N:\n{}", pretty(pending));
    id.to_owned()
}

/// Files through which a test and a script inside a session take turns: the test writes `go`
/// (with a value for the script), the script does its part and creates `done`.
pub struct Handshake {
    dir: PathBuf,
}

impl Handshake {
    /// Shell for a session script: wait (at most 30s) for `go` in `$dir`, then `go_value=$(...)`.
    pub const WAIT_FOR_GO: &str = r#"i=0
while [ ! -s "$dir/go" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
go_value=$(cat "$dir/go")"#;

    pub fn new(daemon: &Daemon) -> Handshake {
        let dir = daemon.dir().join(format!("handshake-{}", unique_tag()));
        fs::create_dir(&dir).unwrap_or_else(|err| panic!("creating {}: {err}", dir.display()));
        Handshake { dir }
    }

    pub fn dir(&self) -> &str {
        path_str(&self.dir)
    }

    /// Lets the script go on, handing it `value`.
    pub fn go(&self, value: &str) {
        fs::write(self.dir.join("go"), value).expect("writing the handshake's go file");
    }

    /// Waits until the script has created `done`.
    pub fn wait_done(&self, what: &str) {
        let deadline = Instant::now() + ASYNC_TIMEOUT;
        while !self.dir.join("done").exists() {
            assert!(Instant::now() < deadline, "timed out waiting for the session to {what}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every byte of the daemon's session database and its write-ahead log.
pub fn database_bytes(daemon: &Daemon) -> Vec<u8> {
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
pub fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text:?}"))
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle.as_bytes())
}

/// The value of the first stdout line starting with `key=`.
pub fn reported<'a>(out: &'a RunOutput, key: &str) -> &'a str {
    let prefix = format!("{key}=");
    out.stdout
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("the session reported no {key}: {out}"))
}
