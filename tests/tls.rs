//! TLS on governed routes, against a real nginx on loopback: the proxy
//! originates TLS to an upstream (the agent speaks plain HTTP), and passes
//! the agent's own TLS through when the server name (SNI) is allowed. The
//! upstream connections it opens are kept for the same session's next
//! client connection, never for another session's.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use harness::{
    Daemon,
    session_log::{events_of_kind, pretty},
};
use tempfile::TempDir;

/// A real nginx serving TLS on 127.0.0.1, with a certificate for
/// `allowed.test` and `denied.test` signed by itself.
struct Nginx {
    dir: TempDir,
    port: u16,
    child: Child,
}

impl Nginx {
    fn start() -> Nginx {
        let dir = tempfile::Builder::new().prefix("tollgate-nginx-").tempdir().expect("temp dir");
        let path = |name: &str| dir.path().join(name);
        let p = |name: &str| path(name).display().to_string();
        let pki = harness::pki::Pki::new(dir.path(), "DNS:allowed.test,DNS:denied.test");
        fs::create_dir(path("tmp")).expect("nginx temp dir");

        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port").local_addr().expect("addr").port();
        let config = format!(
            "worker_processes 1;\nerror_log {err};\npid {pid};\nevents {{ worker_connections 64; }}\nhttp {{\n  access_log {access};\n  client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    server_name allowed.test denied.test;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    location / {{ default_type application/json; return 200 '{{\"served\":\"nginx\",\"host\":\"$host\",\"connection\":\"$connection\"}}'; }}\n  }}\n}}\n",
            err = p("error.log"),
            pid = p("nginx.pid"),
            access = p("access.log"),
            tmp = p("tmp"),
            cert = pki.cert.display(),
            key = pki.key.display(),
        );
        fs::write(path("nginx.conf"), config).expect("nginx config");
        let child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(path("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts (cargo xtask setup installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                fs::read_to_string(path("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { dir, port, child }
    }

    /// The CA that signed nginx's certificate.
    fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A route on which the proxy originates TLS to this nginx, naming `server_name`.
    fn originating_route(&self, server_name: &str) -> String {
        format!(
            "        - to: \"127.0.0.1/32:{port}\"\n          protocol: http\n          upstream_tls: {{ server_name: {server_name}, ca_file: {ca} }}\n",
            port = self.port,
            ca = path_str(&self.cert()),
        )
    }

    /// Request lines nginx logged.
    fn requests(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split('"').nth(1).map(str::to_owned))
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master stops its workers too; SIGKILL would orphan them.
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn policy(route: &str) -> String {
    format!(
        "identities:\n  - name: tls-bots\n    issuer: tollgate-dev\n    allow_root: true\ngrants:\n  - name: tls-egress\n    identity: tls-bots\n    network:\n      allow: [\"127.0.0.0/8\"]\n      proxy:\n{route}"
    )
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[test]
fn the_proxy_originates_tls_so_the_agent_speaks_plain_http() {
    let nginx = Nginx::start();
    let route = nginx.originating_route("allowed.test");
    let daemon = Daemon::start(&policy(&route));
    let token = daemon.mint("tls-bot", &[]);
    let url = format!("http://127.0.0.1:{}/plain-to-tls", nginx.port);
    let out = daemon.run(&token, &["curl", "-s", "--max-time", "10", url.as_str()]);
    assert_eq!(out.code(), Some(0), "curl through the proxy failed: {out}");
    assert!(out.stdout.contains(r#""served":"nginx""#), "the agent did not get nginx's answer over plain HTTP: {out}");
    assert_eq!(
        nginx.requests(),
        vec!["GET /plain-to-tls HTTP/1.1"],
        "nginx should have served exactly the request, over TLS"
    );

    let id = daemon.last_session_id();
    let show = daemon.show_until(&id, "the http exchange", |show| !events_of_kind(show, "http").is_empty());
    let http = events_of_kind(&show, "http")[0];
    assert_eq!(
        (http["status"].as_u64(), http["outcome"].as_str()),
        (Some(200), Some("forwarded")),
        "{}",
        pretty(&show)
    );
}

/// nginx's serial number of the connection that served `answer` (from `out`).
fn nginx_connection(answer: &str, out: &harness::RunOutput) -> String {
    let answer: serde_json::Value = serde_json::from_str(answer.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    answer["connection"].as_str().unwrap_or_else(|| panic!("no connection number: {out}")).to_owned()
}

#[test]
fn a_sessions_client_connections_reuse_its_upstream_connection_and_other_sessions_never_do() {
    let nginx = Nginx::start();
    let route = nginx.originating_route("allowed.test");
    let daemon = Daemon::start(&policy(&route));
    let token = daemon.mint("tls-bot", &[]);
    let url = format!("http://127.0.0.1:{}/kept", nginx.port);
    // Three curl processes one after another: three client connections.
    let script = format!("for n in 1 2 3; do curl -s --max-time 10 {url}; echo; done");
    let first = daemon.run(&token, &["/bin/sh", "-c", script.as_str()]);
    assert_eq!(first.code(), Some(0), "{first}");
    let lines: Vec<&str> = first.stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 3, "three answers: {first}");
    let serials: Vec<String> = lines.iter().map(|line| nginx_connection(line, &first)).collect();
    assert!(
        serials.iter().all(|s| *s == serials[0]),
        "one upstream connection served the session's three client connections: {serials:?}"
    );
    // Another session, while the first one's connection would still be kept.
    let second = daemon.run(&token, &["curl", "-s", "--max-time", "10", url.as_str()]);
    assert_eq!(second.code(), Some(0), "{second}");
    assert_ne!(
        nginx_connection(&second.stdout, &second),
        serials[0],
        "another session was served on the first one's connection"
    );
    assert_eq!(nginx.requests().len(), 4, "nginx served every request: {:?}", nginx.requests());
}

#[test]
fn upstream_tls_with_the_wrong_name_fails_closed() {
    let nginx = Nginx::start();
    let route = nginx.originating_route("impostor.test");
    let daemon = Daemon::start(&policy(&route));
    let token = daemon.mint("tls-bot", &[]);
    let url = format!("http://127.0.0.1:{}/should-not-arrive", nginx.port);
    let out = daemon.run(&token, &["curl", "-s", "-w", "\\n%{http_code}", "--max-time", "10", url.as_str()]);
    assert!(out.stdout.trim_end().ends_with("502"), "a certificate for another name must not be accepted: {out}");
    assert!(out.stdout.contains("upstream unreachable"), "the client should be told why: {out}");
    assert!(nginx.requests().is_empty(), "nothing may reach the upstream: {:?}", nginx.requests());
}

#[test]
fn tls_passthrough_is_governed_by_server_name() {
    let nginx = Nginx::start();
    let route = format!(
        "        - to: \"127.0.0.1/32:{port}\"\n          protocol: tls\n          sni: {{ allow: [\"allowed.test\"], deny: [\"denied.test\"] }}\n",
        port = nginx.port,
    );
    let daemon = Daemon::start(&policy(&route));
    let token = daemon.mint("sni-bot", &[]);
    let curl = |name: &str, path: &str| {
        vec![
            "curl".to_owned(),
            "-s".to_owned(),
            "--max-time".to_owned(),
            "10".to_owned(),
            "--cacert".to_owned(),
            path_str(&nginx.cert()).to_owned(),
            "--resolve".to_owned(),
            format!("{name}:{}:127.0.0.1", nginx.port),
            format!("https://{name}:{}{path}", nginx.port),
        ]
    };
    let allowed = daemon.run(&token, &curl("allowed.test", "/through"));
    assert_eq!(allowed.code(), Some(0), "an allowed server name should pass through: {allowed}");
    assert!(allowed.stdout.contains(r#""host":"allowed.test""#), "the agent's own TLS reached nginx: {allowed}");

    let denied = daemon.run(&token, &curl("denied.test", "/blocked"));
    assert_ne!(denied.code(), Some(0), "a denied server name must not connect: {denied}");
    assert_eq!(nginx.requests(), vec!["GET /through HTTP/1.1"], "only the allowed request reached nginx");

    let id = daemon.last_session_id();
    let show = daemon.show_until(&id, "the refused TLS connection", |show| !events_of_kind(show, "tls").is_empty());
    let tls = events_of_kind(&show, "tls")[0];
    assert_eq!(
        (tls["verdict"].as_str(), tls["sni"].as_str()),
        (Some("deny"), Some("denied.test")),
        "{}",
        pretty(&show)
    );
    assert!(tls["reason"].as_str().is_some_and(|r| r.contains("denied")), "{}", pretty(&show));
}
