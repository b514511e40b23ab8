//! Upgrades through the proxy: a WebSocket handshake is judged by the
//! route's rules, then frames flow both ways through the tunnel (checked by
//! a real echo server) and the record holds the handshake and the bytes. A
//! route that forbids upgrades, and a masked route, refuse them before the
//! upstream sees anything.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use harness::Daemon;
use harness::proxy::{BUILD_BOTS, policy};
use harness::session_log::{events_of_kind, pretty};

/// A WebSocket echo server (Python, standard library only) that prints its
/// port and counts the handshakes it completed in `count_file`.
struct EchoServer {
    child: Child,
    port: u16,
}

const SERVER: &str = r#"
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def serve(conn):
    try:
        talk(conn)
    finally:
        # The main loop still holds the socket: close it so the peer sees the end.
        conn.close()
def talk(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    head = data.split(b"\r\n\r\n")[0].decode()
    key = [l.split(":", 1)[1].strip() for l in head.split("\r\n") if l.lower().startswith("sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
    open(sys.argv[1], "a").write("handshake\n")
    f = conn.makefile("rb")
    while True:
        h = f.read(2)
        if len(h) < 2:
            return
        opcode, length = h[0] & 0x0f, h[1] & 0x7f
        if length == 126:
            length = struct.unpack(">H", f.read(2))[0]
        mask = f.read(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(length)))
        if opcode == 8:
            conn.sendall(b"\x88\x00")
            return
        reply = b"echo:" + payload
        conn.sendall(bytes([0x81, len(reply)]) + reply)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
print(server.getsockname()[1], flush=True)
while True:
    c, _ = server.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// A client in the session: handshake, three frames, their echoes, close.
const CLIENT: &str = r#"
import base64, os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
f = s.makefile("rb")
status = f.readline().decode().strip()
print("status=" + status)
headers = []
while True:
    line = f.readline().decode().strip()
    if not line:
        break
    headers.append(line)
print("accept=" + ",".join(h for h in headers if h.lower().startswith("sec-websocket-accept")))
if " 101 " not in status + " ":
    length = [int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length")]
    print(f.read(length[0] if length else 0).decode(errors="replace"))
    sys.exit(0)
for i in range(3):
    payload = ("frame-%d" % i).encode()
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[j % 4] for j, b in enumerate(payload)))
    h = f.read(2)
    print("got=" + f.read(h[1] & 0x7f).decode())
mask = os.urandom(4)
s.sendall(bytes([0x88, 0x80]) + mask)
f.read(2)
"#;

impl EchoServer {
    fn start(count_file: &std::path::Path) -> EchoServer {
        let mut child = Command::new("python3")
            .args(["-c", SERVER])
            .arg(count_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port");
        EchoServer { child, port: line.trim().parse().expect("port") }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn handshakes(count_file: &std::path::Path) -> usize {
    std::fs::read_to_string(count_file).map(|text| text.lines().count()).unwrap_or(0)
}

#[test]
fn a_websocket_tunnels_frames_both_ways_and_is_recorded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let count = dir.path().join("handshakes");
    let server = EchoServer::start(&count);
    let route = format!("        - to: \"127.0.0.1/32:{}\"\n          protocol: http\n", server.port);
    let daemon = Daemon::start(&policy(&route, ""));
    let token = daemon.mint("ws-bot", BUILD_BOTS);
    let port = server.port.to_string();
    let out = daemon.run(&token, &["python3", "-c", CLIENT, port.as_str()]);
    assert!(out.stdout.contains("status=HTTP/1.1 101"), "the handshake did not succeed: {out}");
    assert!(
        out.stdout.contains("accept=Sec-WebSocket-Accept:")
            || out.stdout.to_ascii_lowercase().contains("sec-websocket-accept"),
        "{out}"
    );
    for i in 0..3 {
        assert!(out.has_stdout_line(&format!("got=echo:frame-{i}")), "frame {i} did not come back: {out}");
    }
    assert_eq!(handshakes(&count), 1, "the server saw one handshake");
    let id = daemon.last_session_id();
    let show = daemon.show_until(&id, "the tunnel's records", |show| {
        events_of_kind(show, "http").iter().any(|e| e["outcome"] == "tunnel-closed")
    });
    let find = |outcome: &str| {
        events_of_kind(&show, "http").into_iter().find(|e| e["outcome"] == outcome).cloned().unwrap_or_default()
    };
    let opened = find("tunnelled");
    assert_eq!(opened["status"], 101, "the handshake is recorded as the tunnel opens: {}", pretty(&show));
    assert_eq!(opened["upgrade"], "websocket", "{}", pretty(&show));
    let closed = find("tunnel-closed");
    assert!(closed["bytes_up"].as_u64().is_some_and(|n| n > 0), "{}", pretty(&show));
    assert!(closed["bytes_down"].as_u64().is_some_and(|n| n > 0), "{}", pretty(&show));
    assert!(closed["tunnel_ms"].is_number(), "{}", pretty(&show));
}

#[test]
fn routes_that_forbid_upgrades_or_mask_refuse_them_before_the_upstream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let count = dir.path().join("handshakes");
    let server = EchoServer::start(&count);
    let secret = harness::proxy::Secret::private();
    let credential = format!(
        "          credential: {{ header: Authorization, secret_file: {} }}\n",
        harness::proxy::path_str(&secret.path)
    );
    for (extra, reason) in [
        ("          upgrade: false\n", "upgrade: false"),
        ("          mask:\n            - { regex: \"secret\" }\n", "cannot be masked"),
        (credential.as_str(), "injects a credential"),
        ("          block:\n            - { body: \"DROP\" }\n", "read bodies"),
    ] {
        let route = format!("        - to: \"127.0.0.1/32:{}\"\n          protocol: http\n{extra}", server.port);
        let daemon = Daemon::start(&policy(&route, ""));
        let token = daemon.mint("ws-bot", BUILD_BOTS);
        let port = server.port.to_string();
        let out = daemon.run(&token, &["python3", "-c", CLIENT, port.as_str()]);
        assert!(out.stdout.contains("status=HTTP/1.1 403"), "{reason}: {out}");
        assert!(out.stdout.contains(reason), "the refusal should say why ({reason}): {out}");
    }
    assert_eq!(handshakes(&count), 0, "a refused upgrade reached the server");
}

/// A handshake an approve rule holds tells the reviewer it is an upgrade
/// (approving it opens a tunnel); once approved, the tunnel works.
#[test]
fn a_held_handshake_says_it_is_an_upgrade() {
    let dir = tempfile::tempdir().expect("temp dir");
    let count = dir.path().join("handshakes");
    let server = EchoServer::start(&count);
    let route = format!(
        "        - to: \"127.0.0.1/32:{}\"\n          protocol: http\n          approve:\n            - {{ path: \"^/ws\" }}\n",
        server.port
    );
    let daemon = Daemon::builder()
        .policy(&policy(&route, ""))
        .config_line(harness::proxy::REVIEWERS)
        .config_line(harness::proxy::LONG_APPROVAL_TIMEOUT)
        .start();
    let token = daemon.mint("ws-bot", BUILD_BOTS);
    let port = server.port.to_string();
    let out = std::thread::scope(|scope| {
        let client = scope.spawn(|| daemon.run(&token, &["python3", "-c", CLIENT, port.as_str()]));
        let pending = harness::proxy::wait_for_approvals(&daemon, 1);
        assert_eq!(pending[0]["upgrade"], "websocket", "the reviewer is told: {}", pretty(&pending[0]));
        let listed = daemon.tollgate(&["approvals"]);
        assert!(listed.stdout.contains("UPGRADE to websocket"), "{listed}");
        let id = harness::proxy::approval_id(&pending[0]);
        assert!(daemon.tollgate(&["approve", id.as_str()]).success());
        client.join().expect("client thread")
    });
    assert!(out.stdout.contains("status=HTTP/1.1 101"), "{out}");
    assert!(out.has_stdout_line("got=echo:frame-2"), "{out}");
}
