//! Routes named by host: connect sees only addresses, so the name is
//! resolved when the session opens and its requests are matched on the
//! HTTP Host header.

use harness::{Daemon, upstream::Upstream};

#[test]
fn a_host_route_governs_its_name_and_refuses_other_hosts() {
    let upstream = Upstream::start("127.0.0.1", 200, r#"{"served":"upstream"}"#);
    let port = upstream.port();
    let policy = format!(
        "identities:\n  - name: host-bots\n    issuer: tollgate-dev\n    allow_root: true\ngrants:\n  - name: host-api\n    identity: host-bots\n    network:\n      allow: [\"127.0.0.0/8\"]\n      proxy:\n        - to: \"localhost:{port}\"\n          protocol: http\n          block:\n            - {{ path: \"^/admin/\" }}\n"
    );
    let daemon = Daemon::start(&policy);
    let token = daemon.mint("host-bot", &[]);
    let url = format!("http://127.0.0.1:{port}");
    let script = format!(
        "curl -s -4 -o /dev/null -w 'named=%{{http_code}}\\n' -H 'Host: localhost:{port}' {url}/ok; \
         curl -s -4 -o /dev/null -w 'admin=%{{http_code}}\\n' -H 'Host: localhost:{port}' {url}/admin/x; \
         curl -s -4 -o /dev/null -w 'other=%{{http_code}}\\n' -H 'Host: other.example' {url}/ok"
    );
    let out = daemon.run(&token, &["/bin/sh", "-c", script.as_str()]);
    assert!(out.has_stdout_line("named=200"), "the governed name should pass through the proxy: {out}");
    assert!(out.has_stdout_line("admin=403"), "the route's rules apply to its name: {out}");
    assert!(out.has_stdout_line("other=403"), "another Host on the governed address is refused: {out}");
    let lines = upstream.request_lines();
    assert_eq!(lines.len(), 1, "only the allowed request reaches the upstream: {lines:?}");
    assert!(lines[0].starts_with("GET /ok"), "{lines:?}");
}
