//! Bodies no rule reads whole stream through the proxy with no size limit
//! and bounded memory, both ways; where a rule must read a body whole, one
//! declared larger than the bound is refused before the upstream is contacted.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use harness::{Daemon, session_log::pretty, upstream::Upstream};

fn policy(port: u16) -> String {
    policy_with(port, "            - {{ method: DELETE }}\n")
}

/// The bulk route to `port` with these block rules (YAML list items).
fn policy_with(port: u16, block: &str) -> String {
    format!(
        "identities:\n  - name: bulk-bots\n    issuer: tollgate-dev\n    allow_root: true\ngrants:\n  - name: bulk-api\n    identity: bulk-bots\n    network:\n      allow: [\"127.0.0.0/8\"]\n      proxy:\n        - to: \"127.0.0.1/32:{port}\"\n          protocol: http\n          block:\n{block}"
    )
    .replace("{{", "{")
    .replace("}}", "}")
}

/// 200 MiB: far past anything the proxy would hold in memory.
const BIG: usize = 200 << 20;
/// One MiB of the pattern the big bodies repeat.
fn pattern() -> Vec<u8> {
    (0..(1 << 20)).map(|i| (i % 251) as u8).collect()
}

/// Starts a Python server `script` (with `args`) that prints its port first.
fn python_server(script: &str, args: &[&std::ffi::OsStr]) -> (Child, u16) {
    let mut child =
        Command::new("python3").arg("-c").arg(script).args(args).stdout(Stdio::piped()).spawn().expect("python3");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port");
    let port = line.trim().parse().unwrap_or_else(|_| panic!("the server said no port: {line:?}"));
    (child, port)
}

/// A real HTTP/1.1 server (Python's) that sends `BIG` bytes of the pattern
/// for GET and answers a PUT (declared or chunked) with the sha256 and
/// length of what it received.
struct BulkServer {
    child: Child,
    port: u16,
}

impl BulkServer {
    fn start() -> BulkServer {
        let script = format!(
            r#"
import hashlib, http.server, sys
SIZE = {BIG}
CHUNK = bytes(i % 251 for i in range(1 << 20))
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(SIZE))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        for _ in range(SIZE // len(CHUNK)):
            self.wfile.write(CHUNK)
    def do_PUT(self):
        h, n = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(size)
                h.update(data); n += len(data)
                self.rfile.readline()
        else:
            left = int(self.headers["Content-Length"])
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                h.update(data); n += len(data); left -= len(data)
        body = ("%s %d" % (h.hexdigest(), n)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"#
        );
        let (child, port) = python_server(&script, &[]);
        BulkServer { child, port }
    }
}

impl Drop for BulkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(chunks: impl Iterator<Item = Vec<u8>>) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for chunk in chunks {
        context.update(&chunk);
    }
    context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The highest resident memory the process has had, in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[test]
fn bodies_of_any_size_stream_both_ways_whole_and_in_bounded_memory() {
    let server = BulkServer::start();
    let daemon = Daemon::start(&policy(server.port));
    let token = daemon.mint("bulk-bot", &[]);
    let expected = sha256_hex((0..BIG >> 20).map(|_| pattern()));
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("upload.bin");
    let mut out = std::fs::File::create(&file).expect("upload file");
    for _ in 0..BIG >> 20 {
        out.write_all(&pattern()).expect("write");
    }
    drop(out);
    let base = format!("http://127.0.0.1:{}", server.port);
    let script = format!(
        "set -e; curl -sS {base}/big | sha256sum;          curl -sS -H 'Expect:' -T {file} {base}/declared; echo;          curl -sS -H 'Expect:' -H 'Transfer-Encoding: chunked' -T {file} {base}/chunked; echo",
        file = file.display()
    );
    let run = daemon.run(&token, &["/bin/bash", "-c", script.as_str()]);
    assert_eq!(run.code(), Some(0), "{run}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.first().map(|l| l.split_whitespace().next()),
        Some(Some(expected.as_str())),
        "the download: {run}"
    );
    let received = format!("{expected} {BIG}");
    assert_eq!(lines.get(1), Some(&received.as_str()), "the declared upload as the server got it: {run}");
    assert_eq!(lines.get(2), Some(&received.as_str()), "the chunked upload as the server got it: {run}");
    let peak = peak_memory(daemon.pid());
    assert!(peak < 150 << 20, "the daemon held {} MiB at its peak for 3 x 200 MiB streamed", peak >> 20);
}

#[test]
fn a_large_response_streams_through_and_is_counted() {
    // 40 MiB: larger than anything worth buffering, within the bound.
    let size = 40 << 20;
    let body = format!("\"{}\"", "x".repeat(size - 2));
    let upstream = Upstream::start("127.0.0.1", 200, &body);
    let daemon = Daemon::start(&policy(upstream.port()));
    let token = daemon.mint("bulk-bot", &[]);
    let url = format!("http://127.0.0.1:{}/bulk", upstream.port());
    let out =
        daemon.run(&token, &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url.as_str()]);
    assert_eq!(out.stdout.trim(), format!("200 {size}"), "the whole body should arrive: {out}");

    let id = daemon.last_session_id();
    let show = daemon.show_until(&id, "the streamed exchange's record", |show| {
        show["events"]
            .as_array()
            .is_some_and(|events| events.iter().any(|e| e["kind"] == "http" && e["response_bytes"].is_u64()))
    });
    let http = show["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["kind"] == "http"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(http["response_bytes"].as_u64(), Some(size as u64), "{}", pretty(&show));
    assert_eq!(http["outcome"], "forwarded", "{}", pretty(&show));
}

#[test]
fn a_request_declared_over_the_bound_is_refused_before_the_upstream_where_a_rule_reads_bodies() {
    let upstream = Upstream::start("127.0.0.1", 200, "{}");
    let daemon = Daemon::start(&policy_with(upstream.port(), "            - {{ body: \"DROP TABLE\" }}\n"));
    let token = daemon.mint("bulk-bot", &[]);
    let url = format!("http://127.0.0.1:{}/upload", upstream.port());
    // Declares 100 MiB and sends nothing: the proxy must answer from the header alone.
    let out = daemon.run(
        &token,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "-H",
            "Content-Length: 104857600",
            "-H",
            "Expect:",
            "--max-time",
            "10",
            url.as_str(),
        ],
    );
    assert_eq!(out.stdout.trim(), "413", "an oversized request must be refused: {out}");
    assert!(upstream.request_lines().is_empty(), "nothing may reach the upstream: {:?}", upstream.request_lines());
}

/// 150 headers each way pass, and HEAD on a plain route keeps the upstream's length.
#[test]
fn many_headers_pass_both_ways_and_head_keeps_its_length() {
    let upstream = Upstream::start("127.0.0.1", 200, "{}");
    let lines: Vec<String> = (0..150).map(|i| format!("X-Answer-{i}: a{i}")).collect();
    let mut reply: Vec<&str> = lines.iter().map(String::as_str).collect();
    reply.push("Content-Type: application/json");
    upstream.set_raw_reply(200, &reply, b"{\"ok\":true}");
    let daemon = Daemon::start(&policy(upstream.port()));
    let token = daemon.mint("bulk-bot", &[]);
    let url = format!("http://127.0.0.1:{}/many", upstream.port());
    let mut argv: Vec<String> =
        vec!["curl".into(), "-sS".into(), "-D".into(), "-".into(), "-o".into(), "/dev/null".into()];
    for i in 0..150 {
        argv.push("-H".into());
        argv.push(format!("X-Ask-{i}: q{i}"));
    }
    argv.push(url.clone());
    let out = daemon.run(&token, &argv);
    assert!(out.stdout.starts_with("HTTP/1.1 200"), "{out}");
    let answered = out.stdout.lines().filter(|l| l.to_ascii_lowercase().starts_with("x-answer-")).count();
    assert_eq!(answered, 150, "the client got every header of the answer: {out}");
    let requests = upstream.requests();
    let asked = requests[0].headers.iter().filter(|(name, _)| name.to_ascii_lowercase().starts_with("x-ask-")).count();
    assert_eq!(asked, 150, "the upstream got every header of the request");

    let head = daemon.run(&token, &["curl", "-sS", "-I", url.as_str()]);
    assert!(head.stdout.to_ascii_lowercase().contains("content-length: 11"), "HEAD keeps the length: {head}");

    // Past the limit: 431 with a body that names it, and nothing upstream.
    let before = upstream.requests().len();
    // curl asking with `count` headers of its own (and its Host, User-Agent and Accept).
    let asking_with = |count: usize| {
        let mut argv: Vec<String> = vec!["curl".into(), "-sS".into(), "-w".into(), "\n%{http_code}".into()];
        for i in 0..count {
            argv.push("-H".into());
            argv.push(format!("X-Ask-{i}: q"));
        }
        argv.push(url.clone());
        argv
    };
    let over = daemon.run(&token, &asking_with(1001));
    assert!(over.stdout.trim_end().ends_with("431"), "{over}");
    assert!(over.stdout.contains("\"limit\":1000"), "the refusal names the limit: {over}");
    assert_eq!(upstream.requests().len(), before, "an over-limit request reached the upstream");
    // Far past it, the parser refuses the request itself: still 431, still nothing upstream.
    let far_over = daemon.run(&token, &asking_with(1500));
    assert!(far_over.stdout.trim_end().ends_with("431"), "{far_over}");
    assert_eq!(upstream.requests().len(), before, "a request far over the limit reached the upstream");

    upstream.set_raw_reply(304, &["ETag: \"v1\""], b"");
    let not_modified = daemon.run(&token, &["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url.as_str()]);
    assert_eq!(not_modified.stdout.trim(), "304", "a 304 on a plain route: {not_modified}");
}

/// An upstream that answers one request per connection and closes the
/// connection when a second one arrives on it (a server's idle timeout
/// meeting a request on the way): the request is sent again on a new
/// connection instead of becoming a 502.
#[test]
fn a_stale_upstream_connection_is_replaced_and_the_request_sent_again() {
    let script = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served = 0
    def do_GET(self):
        if self.served:
            # Closed without an answer, as the request arrives.
            self.close_connection = True
            return
        self.served = 1
        body = b"fresh"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
    let (mut child, port) = python_server(script, &[]);
    let daemon = Daemon::start(&policy(port));
    let token = daemon.mint("bulk-bot", &[]);
    let client = format!(
        "import http.client\nc = http.client.HTTPConnection('127.0.0.1', {port})\nfor i in range(3):\n    c.request('GET', '/again/%d' % i)\n    r = c.getresponse()\n    print(r.status, r.read().decode())\n"
    );
    let out = daemon.run(&token, &["python3", "-c", client.as_str()]);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["200 fresh"; 3], "{out}\n{}", daemon.log());
}

/// `Expect: 100-continue` is the upstream's to answer: one that refuses at
/// once (413) receives none of the body and the client gets its 413; one
/// that asks for the body gets all of it.
#[test]
fn expect_continue_is_decided_by_the_upstream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let received = dir.path().join("received");
    let script = r#"
import http.server, socket, sys
RECEIVED = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def handle_expect_100(self):
        if self.path.startswith("/refuse"):
            self.send_response(413)
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            # Whatever arrives now is body the client sent before the decision.
            self.connection.settimeout(1.0)
            got = 0
            try:
                while True:
                    data = self.connection.recv(65536)
                    if not data:
                        break
                    got += len(data)
            except socket.timeout:
                pass
            open(RECEIVED, "a").write("refuse %d\n" % got)
            self.close_connection = True
            return False
        return super().handle_expect_100()
    def do_PUT(self):
        n = int(self.headers["Content-Length"])
        data = self.rfile.read(n)
        open(RECEIVED, "a").write("accept %d\n" % len(data))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;
    let (mut child, port) = python_server(script, &[received.as_os_str()]);
    let daemon = Daemon::start(&policy(port));
    let token = daemon.mint("bulk-bot", &[]);
    let file = dir.path().join("body.bin");
    std::fs::write(&file, vec![b'x'; 1 << 20]).expect("body");
    let curl = |path: &str| {
        let url = format!("http://127.0.0.1:{port}{path}");
        let out = daemon.run(
            &token,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Expect: 100-continue",
                "--expect100-timeout",
                "5",
                "-T",
                file.to_str().expect("UTF-8"),
                url.as_str(),
            ],
        );
        out.stdout.trim().to_owned()
    };
    assert_eq!(curl("/refuse"), "413", "the upstream's refusal reaches the client");
    assert_eq!(curl("/accept"), "200");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&received).expect("the server's log");
    assert_eq!(log.lines().collect::<Vec<_>>(), ["refuse 0", &format!("accept {}", 1 << 20)], "{log}");
}
