//! Requests built to be read one way by the proxy and another by the
//! upstream, or to get around a route: each is refused or neutralised, and
//! the upstream sees nothing it should not.

use harness::Daemon;
use harness::proxy::{BUILD_BOTS, Exchange, Fixture, REVIEWERS, Secret, UPSTREAM_REPLY, curl_argv, path_str, policy};
use harness::upstream::Upstream;

#[test]
fn the_unspecified_address_reaches_the_route_not_the_upstream_directly() {
    let fx = Fixture::start(&[]);
    // 0.0.0.0 is this host's loopback: it must meet the same route.
    let url = format!("http://0.0.0.0:{}/admin/users", fx.upstream.port());
    let exchange = fx.curl(&[url.as_str()]);
    exchange.assert_status(403, "a blocked path through 0.0.0.0");
    assert!(
        fx.upstream.request_lines().is_empty(),
        "the upstream was reached around the proxy: {:?}",
        fx.upstream.request_lines()
    );
}

#[test]
fn ambiguous_paths_and_headers_are_refused_before_the_upstream() {
    let fx = Fixture::start(&[]);
    for path in ["/admin%2Fusers", "/admin;x/users", "/admin%zz/users"] {
        let exchange = fx.curl(&["--path-as-is", fx.url(path).as_str()]);
        exchange.assert_status(400, path);
        assert_eq!(exchange.json()["error"], "ambiguous request refused", "{exchange}");
    }
    // curl sends one Host at most; a raw request sends two.
    let script = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'GET /ok HTTP/1.1\\r\\nHost: a.example\\r\\nHost: b.example\\r\\nConnection: close\\r\\n\\r\\n')\nprint(s.recv(65536).split(b'\\r\\n')[0].decode())\n",
        port = fx.upstream.port()
    );
    let out = fx.daemon.run(&fx.token, &["python3", "-c", script.as_str()]);
    assert!(out.stdout.contains(" 400 "), "two Host headers must be refused: {out}");
    let exchange = fx.curl(&["-X", "TRACE", fx.url("/ok").as_str()]);
    exchange.assert_status(400, "TRACE on a route with a credential");
    assert!(
        fx.upstream.request_lines().is_empty(),
        "refused requests reached the upstream: {:?}",
        fx.upstream.request_lines()
    );
}

#[test]
fn method_overrides_and_ranges_are_removed_on_the_way_up() {
    let fx = Fixture::start(&[]);
    let exchange = fx.curl(&[
        "-X",
        "PUT",
        "-H",
        "X-HTTP-Method-Override: DELETE",
        "-H",
        "Range: bytes=0-5",
        "--data",
        "x",
        fx.url("/items/1").as_str(),
    ]);
    exchange.assert_status(200, "a PUT with an override header");
    let requests = fx.upstream.requests();
    assert_eq!(requests.len(), 1, "{}", fx.upstream.describe());
    let request = &requests[0];
    assert_eq!(request.method, "PUT");
    assert!(request.header_values("x-http-method-override").is_empty(), "the override reached the upstream");
    assert!(request.header_values("range").is_empty(), "a masked route must get whole answers");
}

/// Every header that belongs to one hop stops at the proxy, each way, in
/// whatever case the sender spells it; so do all three method-override
/// spellings. A header of no hop passes, so the check is not vacuous.
#[test]
fn hop_by_hop_and_override_headers_stop_at_the_proxy_both_ways() {
    let fx = Fixture::start(&[]);
    fx.upstream.set_raw_reply(
        200,
        &[
            "Content-Type: application/json",
            "Keep-Alive: timeout=99",
            "PROXY-CONNECTION: keep-alive",
            "te: trailers",
            "Trailer: X-Sum",
            "Proxy-Authorization: Basic dXBzdHJlYW06c2VjcmV0",
            "X-Passes: answer",
        ],
        br#"{"ok":true}"#,
    );
    let exchange = fx.curl(&[
        "-i",
        "-H",
        "KEEP-ALIVE: timeout=5",
        "-H",
        "proxy-connection: keep-alive",
        "-H",
        "Te: trailers",
        "-H",
        "Trailer: X-Sum",
        "-H",
        "Proxy-Authorization: Basic YWdlbnQ6c2VjcmV0",
        "-H",
        "x-http-method: DELETE",
        "-H",
        "X-Method-Override: DELETE",
        "-H",
        "X-HTTP-METHOD-OVERRIDE: DELETE",
        "-H",
        "X-Passes: request",
        fx.url("/ok").as_str(),
    ]);
    exchange.assert_status(200, "a GET carrying hop-by-hop headers");
    let requests = fx.upstream.requests();
    assert_eq!(requests.len(), 1, "{}", fx.upstream.describe());
    let request = &requests[0];
    assert_eq!(request.method, "GET", "{request}");
    assert_eq!(request.header_values("x-passes"), ["request"], "an end-to-end header must pass: {request}");
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "x-http-method",
        "x-method-override",
        "x-http-method-override",
    ] {
        assert!(request.header_values(name).is_empty(), "{name} reached the upstream: {request}");
    }
    // `-i`: the answer's head is in the body curl printed.
    let head = exchange.body.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    assert!(head.contains("x-passes: answer"), "an end-to-end header must pass: {head}");
    for name in ["keep-alive:", "proxy-connection:", "\nte:", "trailer:", "proxy-authorization:"] {
        assert!(!head.contains(name), "{name} reached the agent: {head}");
    }
}

#[test]
fn an_echoed_credential_never_reaches_the_agent() {
    let fx = Fixture::start(&[]);
    // An upstream that reflects the request's Authorization header.
    fx.upstream.set_reply(200, &format!(r#"{{"you_sent":"{}"}}"#, fx.secret.value));
    let exchange = fx.curl(&[fx.url("/debug/echo").as_str()]);
    exchange.assert_status(200, "an echoing endpoint");
    assert!(!exchange.body.contains(&fx.secret.value), "the credential came back to the agent: {exchange}");
    assert!(exchange.body.contains("[credential removed]"), "{exchange}");
}

#[test]
fn a_sessions_own_user_cannot_approve_its_requests_from_outside() {
    let fx = Fixture::start(&[REVIEWERS, "  unix_groups: [nogroup]", "approval_timeout: 20s"]);
    // The session runs as nobody, who is (through nogroup) a reviewer.
    let token = &fx.token;
    let url = fx.url("/deploy/1");
    let held = std::thread::scope(|scope| {
        let request = scope.spawn(|| {
            fx.daemon.run_as(
                65534,
                65534,
                token,
                &["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", url.as_str()],
            )
        });
        let pending = harness::proxy::wait_for_approvals(&fx.daemon, 1);
        let id = harness::proxy::approval_id(&pending[0]);
        let bin = harness::tollgate_bin();
        let mut approve = std::process::Command::new("setpriv");
        approve
            .args(["--reuid", "65534", "--regid", "65534", "--init-groups"])
            .arg(&bin)
            .arg("--socket")
            .arg(fx.daemon.socket())
            .args(["approve", id.as_str()]);
        let refused =
            harness::run_with_timeout(&mut approve, std::time::Duration::from_secs(30)).expect("tollgate approve runs");
        assert_eq!(refused.code(), Some(1), "the session's own user approved its request: {refused}");
        assert!(refused.stderr.contains("cannot decide its requests"), "{refused}");
        // Root, another user, may.
        let approved = fx.daemon.tollgate(&["approve", id.as_str()]);
        assert!(approved.success(), "root could not approve: {approved}");
        request.join().expect("the request thread")
    });
    assert_eq!(held.stdout.trim(), "200", "the approved request should pass: {held}");
}

/// A route that names its hosts serves those only. Another Host, or an
/// absolute-form target naming another host, is refused before the
/// upstream, so the credential is never sent on its behalf.
#[test]
fn a_route_with_hosts_serves_only_those_hosts() {
    let upstream = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let secret = Secret::private();
    let to = format!("127.0.0.1/32:{}", upstream.port());
    let route = format!(
        "        - to: \"{to}\"\n          protocol: http\n          hosts: [api.internal.test, \"*.svc.test\"]\n          credential: {{ header: Authorization, secret_file: {} }}\n",
        path_str(&secret.path)
    );
    let daemon = Daemon::start(&policy(&route, ""));
    let token = daemon.mint("hosts-bot", BUILD_BOTS);
    let url = format!("{}/ok", upstream.base_url());
    let curl = |host: &str| Exchange::parse(daemon.run(&token, &curl_argv(&["-H", host, url.as_str()])));
    curl("Host: api.internal.test").assert_status(200, "a named host");
    curl("Host: API.Internal.Test.").assert_status(200, "a named host in another spelling");
    curl("Host: build.svc.test:8080").assert_status(200, "a wildcard host with a port");
    let other = curl("Host: evil.test");
    other.assert_status(403, "a host the route does not name");
    assert_eq!(other.json()["error"], "host is not one this route serves", "{other}");
    curl("Host: svc.test").assert_status(403, "the wildcard's own parent");
    // Servers cut this at the first ':' (attacker.com); a suffix match would not.
    curl("Host: attacker.com:443.build.svc.test").assert_status(400, "a Host servers read differently");
    // The address itself is no host the route names.
    let bare = Exchange::parse(daemon.run(&token, &curl_argv(&[url.as_str()])));
    bare.assert_status(403, "the Host curl derives from the address");
    // Absolute form: the target names another host than the Host header.
    let script = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}))\ns.sendall(b'GET http://evil.test/ok HTTP/1.1\\r\\nHost: api.internal.test\\r\\nConnection: close\\r\\n\\r\\n')\nprint(s.recv(65536).split(b'\\r\\n')[0].decode())\n",
        port = upstream.port()
    );
    let out = daemon.run(&token, &["python3", "-c", script.as_str()]);
    assert!(out.stdout.contains(" 400 "), "an absolute-form target for another host must be refused: {out}");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3, "only the named hosts reach the upstream: {}", upstream.describe());
    for request in &requests {
        assert_eq!(request.header_values("authorization"), vec![secret.value.as_str()], "{request}");
        let host = request.header_values("host").join(",").to_ascii_lowercase();
        assert!(host.contains("internal.test") || host.contains("svc.test"), "{request}");
    }
}
