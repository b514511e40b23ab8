//! The kernel redirects a session's governed connect to the daemon's proxy, transparently: the
//! client sees the original peer and the upstream's answer, and the exchange is recorded. Covers
//! IPv6 and IPv4-mapped connects, what happens without a proxy, and `policy explain`.

use std::fs;
use std::process::Command;
use std::time::Duration;

use harness::net::{Listener, fds_on, tcp_sockets};
use harness::proxy::{
    BUILD_BOTS, Fixture, GRANT, Secret, UPSTREAM_REPLY, assert_http_event, has_http_event, http_event, http_events,
    json_of, policy, reported, route_name, rules_hit, standard_route,
};
use harness::session_log::{connects_to, events_of_kind, pretty};
use harness::upstream::Upstream;
use harness::{Daemon, run_with_timeout, tollgate_bin};
use serde_json::Value;

/// The system interpreter: reachable by every uid, unlike a per-user install.
const PYTHON: &str = "/usr/bin/python3";

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

#[test]
fn governed_connects_are_redirected_transparently_and_recorded() {
    let fx = Fixture::start(&[]);
    let port = fx.upstream.port();
    let url = fx.url("/hello?x=1");
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"; {PYTHON} -c "$0" 4 127.0.0.1 {port} GET /peer && curl -sS --max-time 30 -w '\ncurl_status=%{{http_code}}\n' "$1""#
    );
    let out = fx.daemon.run(&fx.token, &["/bin/sh", "-c", &script, REQUEST_SCRIPT, &url]);
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
    assert_eq!(json_of(curl_body), json_of(UPSTREAM_REPLY), "curl got the upstream's body: {out}");

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
    assert_eq!(connects.len(), 2, "two connects to the upstream:\n{}", pretty(&show));
    for connect in connects {
        assert_eq!(connect["verdict"], "redirect", "a governed connect is redirected:\n{}", pretty(&show));
    }
    let destination = format!("127.0.0.1:{port}");
    let event = http_event(&show, "GET", "/hello?x=1");
    assert_http_event(event, &show, ("allow", "forwarded", 200), &destination, &fx.route());
    assert_eq!(event["host"], format!("127.0.0.1:{port}"), "the Host header is recorded:\n{}", pretty(&show));
    assert!(rules_hit(event).is_empty(), "no block/approve rule applies to a GET:\n{}", pretty(&show));
    assert_eq!(event["request_bytes"], 0, "a GET has no body:\n{}", pretty(&show));
    assert_eq!(
        event["response_bytes"],
        curl_body.len(),
        "response_bytes is the size of the body the client got:\n{}",
        pretty(&show)
    );
}

/// Python: from local port argv[1] of the loopback of argv[2]'s family
/// (SO_REUSEADDR, retrying while the port or the pair is still held from
/// before), sends `GET argv[4]` with `Connection: close` to argv[2]:argv[3]; prints `status=` and the status
/// line, or `status=none` when the connection closed without an answer.
const FROM_PORT_SCRIPT: &str = r#"
import errno, socket, sys, time
local, host, port, path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
deadline = time.time() + 10
while True:
    v6 = ":" in host
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(30)
    try:
        s.bind(("::1" if v6 else "127.0.0.1", local))
        s.connect((host, port))
        break
    except OSError as e:
        s.close()
        if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) or time.time() > deadline:
            raise
        time.sleep(0.2)
s.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (path, host, port)).encode())
data = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    data += chunk
print("status=" + (data.split(b"\r\n")[0].decode() if data else "none"))
"#;

/// The proxy serves only connections the kernel redirected, and takes each
/// one's original destination once. While a session lives, a client outside
/// it that connects to the proxy straight, even from the port a governed
/// connection of that session just used (the same address pair, so the same
/// key in the kernel's map), or over IPv6, gets no answer and reaches no
/// upstream: were the entry left behind, it would be served as that
/// session, with its route and credentials.
#[test]
fn a_connection_straight_to_the_proxy_is_not_served_even_from_a_governed_connections_port() {
    let proxy_port = harness::free_loopback_port().expect("a port for the proxy");
    let fx = Fixture::start(&[&format!("proxy_port: {proxy_port}")]);
    let upstream = fx.upstream.port().to_string();
    let client_port = harness::free_loopback_port().expect("a client port").to_string();
    let signals = tempfile::tempdir().expect("a directory for the session's signals");
    let served = signals.path().join("governed.txt");
    let done = signals.path().join("done");
    // The session makes its request, then stays alive until the test is done.
    let session_script = format!(
        r#"{PYTHON} -c "$0" "$@" > {served}; i=0; while [ ! -e {done} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"#,
        served = served.display(),
        done = done.display(),
    );

    std::thread::scope(|scope| {
        let session = scope.spawn(|| {
            fx.daemon.run(
                &fx.token,
                &[
                    "/bin/sh",
                    "-c",
                    &session_script,
                    FROM_PORT_SCRIPT,
                    &client_port,
                    "127.0.0.1",
                    &upstream,
                    "/governed",
                ],
            )
        });
        let governed = wait_for_file(&served, "the session's answer", |text| text.contains("status="));
        assert!(governed.contains("status=HTTP/1.1 200 OK"), "the governed request is served: {governed}");

        let proxy = proxy_port.to_string();
        let straight = |local: &str, host: &str, path: &str| {
            let mut python = Command::new(PYTHON);
            python.args(["-c", FROM_PORT_SCRIPT, local, host, &proxy, path]);
            run_with_timeout(&mut python, Duration::from_secs(60)).expect("python runs")
        };
        let same_port = straight(&client_port, "127.0.0.1", "/straight");
        let any_port = straight("0", "127.0.0.1", "/straight-again");
        let over_ipv6 = straight(&client_port, "::1", "/straight-v6");
        fs::write(&done, "").expect("the done marker");
        let session = session.join().expect("the session's thread");
        assert_eq!(session.code(), Some(0), "the session ran: {session}");
        assert_eq!(
            reported(&same_port, "status"),
            "none",
            "the proxy must not answer a connection it was not handed, from the governed port: {same_port}"
        );
        assert_eq!(reported(&any_port, "status"), "none", "nor from any other port: {any_port}");
        assert_eq!(reported(&over_ipv6, "status"), "none", "nor over IPv6 (the ::1 listener): {over_ipv6}");
    });

    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /governed".to_owned()],
        "only the governed request reached the upstream: {}",
        fx.upstream.describe()
    );
    let log = fx.daemon.log();
    assert_eq!(
        log.matches("the kernel did not redirect").count(),
        3,
        "the daemon says why it closed each straight connection:\n{log}"
    );
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
    assert_eq!(blocked.json()["rule"], "block[0]: method DELETE", "{blocked}");

    let peer =
        fx.daemon.run(&fx.token, &[PYTHON, "-c", REQUEST_SCRIPT, "6", "::1", &port.to_string(), "GET", "/v6/peer"]);
    assert_eq!(peer.code(), Some(0), "{peer}");
    assert_eq!(reported(&peer, "peer"), format!("::1 {port}"), "getpeername() shows the original peer: {peer}");
    assert_eq!(reported(&peer, "status"), "HTTP/1.1 200 OK", "{peer}");

    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /v6/hello".to_owned(), "GET /v6/peer".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    assert_eq!(fx.upstream.requests()[0].header_values("authorization"), vec![fx.secret.value.as_str()]);

    let show =
        fx.daemon.show_until(&forwarded.session, "the IPv6 exchange", |show| has_http_event(show, "GET", "/v6/hello"));
    let connects = connects_to(&show, "::1", port);
    assert!(
        !connects.is_empty() && connects.iter().all(|connect| connect["verdict"] == "redirect"),
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
    assert_eq!(reported(&blocked, "peer"), format!("::ffff:127.0.0.1 {port}"), "{blocked}");
    assert_eq!(reported(&blocked, "status"), "HTTP/1.1 403 Forbidden", "a mapped DELETE is blocked: {blocked}");
    let body: Value = serde_json::from_str(reported(&blocked, "body"))
        .unwrap_or_else(|err| panic!("the 403 body is not JSON ({err}): {blocked}"));
    assert_eq!(body["error"], "blocked by policy", "{blocked}");
    assert_eq!(body["rule"], "block[0]: method DELETE", "{blocked}");
    assert_eq!(body["route"], fx.route(), "the IPv4 route governs the mapped connect: {blocked}");
    assert!(fx.upstream.requests().is_empty(), "a mapped DELETE reached the upstream: {}", fx.upstream.describe());

    let forwarded = raw("GET", "/mapped-get");
    assert_eq!(reported(&forwarded, "status"), "HTTP/1.1 200 OK", "a mapped GET is forwarded: {forwarded}");
    assert_eq!(fx.upstream.request_lines(), vec!["GET /mapped-get".to_owned()], "{}", fx.upstream.describe());
    assert_eq!(fx.upstream.requests()[0].header_values("authorization"), vec![fx.secret.value.as_str()]);

    let session = blocked.first_line();
    let show =
        fx.daemon.show_until(session, "the blocked mapped request", |show| has_http_event(show, "DELETE", "/mapped"));
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
    assert_eq!(reported(&out, "governed"), "errno 1", "a governed connect without a proxy fails with EPERM: {out}");
    assert_eq!(reported(&out, "plain"), "connected", "an allowed, ungoverned destination still works: {out}");
    assert_eq!(reported(&out, "curl"), "7", "curl cannot connect: {out}");
    assert_eq!(other.take_connections(), 1, "the plain connect reached its listener");
    assert_eq!(
        fx.upstream.connections(),
        0,
        "nothing may reach the upstream without the proxy: {}",
        fx.upstream.describe()
    );
    assert!(fx.upstream.requests().is_empty(), "{}", fx.upstream.describe());

    let session = out.first_line();
    let show = fx.daemon.show_until(session, "the refused connects", |show| {
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
    assert!(http_events(&show).is_empty(), "no exchange can happen without a proxy:\n{}", pretty(&show));
}

#[test]
fn policy_explain_names_the_entry_and_matches_the_kernel() {
    let upstream = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let secret = Secret::private();
    let port = upstream.port();
    let to = format!("127.0.0.1/32:{port}");
    let policy_text = policy(&standard_route(&to, &secret.path), "      deny: [\"127.0.0.9/32\"]\n");
    let dir = tempfile::tempdir().expect("creating a temp dir");
    let policy_file = dir.path().join("policy.yaml");
    fs::write(&policy_file, &policy_text).expect("writing the policy");

    let explain = |identity: &str, dest: &str| {
        let mut cmd = Command::new(tollgate_bin());
        cmd.args(["policy", "explain", "--policy"]).arg(&policy_file).args(["--identity", identity, "--to", dest]);
        run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("running tollgate policy explain")
    };
    let allowed = Listener::bind("127.0.0.1");
    let cases = [
        (format!("127.0.0.1:{port}"), format!("proxy ({})", route_name(&to))),
        (format!("[::ffff:127.0.0.1]:{port}"), format!("proxy ({})", route_name(&to))),
        (format!("127.0.0.9:{port}"), format!("deny ({GRANT}: network.deny 127.0.0.9/32)")),
        (format!("127.0.0.1:{}", allowed.port()), format!("allow ({GRANT}: network.allow 127.0.0.0/8)")),
        ("10.1.2.3:443".to_owned(), "deny (no entry matches: the default)".to_owned()),
    ];
    for (dest, expected) in &cases {
        let out = explain("build-bots", dest);
        assert_eq!(out.code(), Some(0), "explain {dest}: {out}");
        assert_eq!(out.stdout.trim(), expected, "explain {dest}: {out}");
    }
    let unknown = explain("ghost-bots", "127.0.0.1:80");
    assert_eq!(unknown.code(), Some(1), "an unknown identity is an error: {unknown}");
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
    assert_eq!(reported(&out, &format!("127.0.0.1:{port}")), "connected", "the proxied destination: {out}");
    assert_eq!(reported(&out, &format!("127.0.0.9:{port}")), "errno 1", "the denied destination: {out}");
    assert_eq!(reported(&out, &format!("127.0.0.1:{}", allowed.port())), "connected", "the allowed destination: {out}");
    let show = daemon.show_until(out.first_line(), "three connects", |show| events_of_kind(show, "connect").len() >= 3);
    let verdict = |addr: &str, port: u16| {
        connects_to(&show, addr, port)
            .first()
            .map(|event| event["verdict"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no connect to {addr}:{port}:\n{}", pretty(&show)))
    };
    assert_eq!(verdict("127.0.0.1", port), "redirect", "{}", pretty(&show));
    assert_eq!(verdict("127.0.0.9", port), "deny", "{}", pretty(&show));
    assert_eq!(verdict("127.0.0.1", allowed.port()), "allow", "{}", pretty(&show));
    assert_eq!(allowed.take_connections(), 1, "the allowed connect reached its listener");
}

/// Every connection the proxy accepts has TCP_NODELAY, so a small answer
/// never waits on Nagle and the client's delayed ACK. Read off the daemon's
/// own socket for a live governed connection (a duplicate of its
/// descriptor, `pidfd_getfd`), for an IPv4 and an IPv6 route.
#[test]
fn connections_the_proxy_accepts_have_no_nagle_delay() {
    for ip in ["127.0.0.1", "::1"] {
        let fx = Fixture::start_on(ip, &[]);
        let dir = tempfile::tempdir().expect("temp dir");
        let (port_file, done_file) = (dir.path().join("port"), dir.path().join("done"));
        // The client keeps its connection open until the test has looked.
        let script = format!(
            "import socket, os, time\n\
             s = socket.create_connection(('{ip}', {port}))\n\
             s.sendall(b'GET /ok HTTP/1.1\\r\\nHost: api.internal.test\\r\\n\\r\\n')\n\
             print(s.recv(65536).split(b'\\r\\n')[0].decode())\n\
             open('{port_file}', 'w').write(str(s.getsockname()[1]))\n\
             deadline = time.time() + 30\n\
             while not os.path.exists('{done_file}') and time.time() < deadline:\n\
             \x20   time.sleep(0.02)\n",
            port = fx.upstream.port(),
            port_file = port_file.display(),
            done_file = done_file.display(),
        );
        std::thread::scope(|scope| {
            let client = scope.spawn(|| fx.daemon.run(&fx.token, &[PYTHON, "-c", script.as_str()]));
            let written = wait_for_file(&port_file, "the client's port", |text| text.trim().parse::<u16>().is_ok());
            let client_port: u16 = written.trim().parse().expect("checked by the wait");
            let nodelay = accepted_socket_nodelay(fx.daemon.pid(), client_port);
            fs::write(&done_file, "").expect("done marker");
            let out = client.join().expect("the client thread");
            assert!(out.stdout.contains(" 200 "), "the governed request was answered: {out}");
            assert_eq!(
                nodelay,
                Some(true),
                "TCP_NODELAY on the proxy's socket for the {ip} client on port {client_port}"
            );
        });
    }
}

/// Waits (30 s at most) until the file at `path` holds text that `done` accepts; returns it.
fn wait_for_file(path: &std::path::Path, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(std::time::Instant::now() < deadline, "{what} never came ({}: {text:?})", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TCP_NODELAY of the socket `pid` holds whose peer is the local port
/// `client_port` (None if it holds none).
fn accepted_socket_nodelay(pid: u32, client_port: u16) -> Option<bool> {
    // The established socket whose remote end is the client.
    let suffix = format!(":{client_port:04X}");
    let sockets = tcp_sockets(|_, remote, state| remote.ends_with(&suffix) && state == "01");
    let fd = *fds_on(pid, &sockets).first()?;
    // SAFETY: plain system calls on descriptors this function owns and closes.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) as i32;
        assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        let ours = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(ours >= 0, "pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let got = libc::getsockopt(
            ours,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        );
        let error = std::io::Error::last_os_error();
        libc::close(ours);
        libc::close(pidfd);
        assert_eq!(got, 0, "getsockopt(TCP_NODELAY): {error}");
        Some(value != 0)
    }
}
