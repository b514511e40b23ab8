//! Large bodies stream through the proxy within its bound (64 MiB); a body
//! declared larger is refused before the upstream is contacted.

use harness::{Daemon, session_log::pretty, upstream::Upstream};

fn policy(port: u16) -> String {
    format!(
        "identities:\n  - name: bulk-bots\n    issuer: tollgate-dev\n    allow_root: true\ngrants:\n  - name: bulk-api\n    identity: bulk-bots\n    network:\n      allow: [\"127.0.0.0/8\"]\n      proxy:\n        - to: \"127.0.0.1/32:{port}\"\n          protocol: http\n          block:\n            - {{ method: DELETE }}\n"
    )
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
fn a_request_declared_over_the_bound_is_refused_before_the_upstream() {
    let upstream = Upstream::start("127.0.0.1", 200, "{}");
    let daemon = Daemon::start(&policy(upstream.port()));
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
