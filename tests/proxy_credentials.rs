//! Credential injection: the proxy adds the route's secret to each request and drops the
//! client's own, sessions cannot read the secret, records never hold it, and a secret file
//! others could read or own fails closed.

use harness::Daemon;
use harness::proxy::{
    BUILD_BOTS, Exchange, Fixture, NOBODY, Secret, UPSTREAM_REPLY, assert_http_event, contains, curl_argv,
    database_bytes, has_http_event, http_event, http_events, path_str, policy, reported, route_name, standard_route,
};
use harness::session_log::pretty;
use harness::upstream::Upstream;

#[test]
fn the_credential_is_injected_and_the_clients_own_is_dropped() {
    let fx = Fixture::start(&[]);

    let root = fx.curl(&["-H", "Authorization: Bearer forged-by-root-client", &fx.url("/as-root")]);
    root.assert_status(200, "a request with a client Authorization header");

    // An unprivileged session cannot read the secret, yet its requests carry it.
    let script = r#"echo "$TOLLGATE_SESSION"
if cat "$0"; then echo "secret=read"; else echo "secret=unreadable"; fi
curl -sS --max-time 30 -o /dev/null -w 'curl_status=%{http_code}\n' -H 'authorization: forged-by-nobody' "$1""#;
    let url = fx.url("/as-nobody");
    let nobody =
        fx.daemon.run_as(NOBODY, NOBODY, &fx.token, &["/bin/sh", "-c", script, path_str(&fx.secret.path), &url]);
    assert_eq!(nobody.code(), Some(0), "the unprivileged session failed: {nobody}");
    assert_eq!(reported(&nobody, "secret"), "unreadable", "uid {NOBODY} read the secret file: {nobody}");
    assert!(!nobody.stdout.contains(&fx.secret.value), "the secret leaked to the session: {nobody}");
    assert!(nobody.stderr.contains("Permission denied"), "cat should fail with EACCES: {nobody}");
    assert_eq!(reported(&nobody, "curl_status"), "200", "{nobody}");
    let nobody_session = nobody.first_line().to_owned();
    assert_eq!(fx.daemon.session(&nobody_session)["uid"], NOBODY, "the session runs as nobody");

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
    assert!(!described.contains("forged-by"), "a client's own Authorization reached the upstream: {described}");

    // The record names the credential's header but never holds the secret.
    for session in [&root.session, &nobody_session] {
        let show = fx.daemon.show_until(session, "the exchange", |show| !http_events(show).is_empty());
        assert_eq!(http_events(&show)[0]["outcome"], "forwarded", "{}", pretty(&show));
        assert!(!show.to_string().contains(&fx.secret.value), "the session log holds the secret:\n{}", pretty(&show));
    }
    assert!(!contains(&database_bytes(&fx.daemon), &fx.secret.value), "the session database holds the secret");
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
    let routes = standard_route(&to_readable, &readable.path) + &standard_route(&to_foreign, &foreign.path);
    let daemon = Daemon::start(&policy(&routes, ""));
    let token = daemon.mint("deploy-bot", BUILD_BOTS);

    for (upstream, to, what) in [
        (&upstream_readable, &to_readable, "a world-readable secret file"),
        (&upstream_foreign, &to_foreign, "a secret file owned by another user"),
    ] {
        let url = format!("{}/with-bad-secret", upstream.base_url());
        let exchange = Exchange::parse(daemon.run(&token, &curl_argv(&[&url])));
        exchange.assert_status(502, what);
        let body = exchange.json();
        assert_eq!(body["error"], "the credential for this destination is unavailable", "{what}: {exchange}");
        assert_eq!(body["route"], route_name(to), "{what}: {exchange}");
        assert_eq!(upstream.connections(), 0, "{what}: the upstream was contacted: {}", upstream.describe());

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

/// A route that injects a credential and masks nothing streams its answers
/// (server-sent events from an API whose key is injected): the stream
/// arrives, with the credential scrubbed wherever the upstream echoes it.
#[test]
fn a_credential_route_streams_answers_with_the_credential_scrubbed() {
    let upstream = Upstream::start("127.0.0.1", 200, "{}");
    let secret = Secret::private();
    let to = format!("127.0.0.1/32:{}", upstream.port());
    let route = format!(
        "        - to: \"{to}\"\n          protocol: http\n          credential: {{ header: Authorization, secret_file: {} }}\n",
        path_str(&secret.path)
    );
    let events = format!("data: one\n\ndata: you sent {}\n\ndata: three\n\n", secret.value);
    upstream.set_raw_reply(200, &["Content-Type: text/event-stream"], events.as_bytes());
    let daemon = Daemon::start(&policy(&route, ""));
    let token = daemon.mint("stream-bot", BUILD_BOTS);
    let exchange = Exchange::parse(daemon.run(&token, &curl_argv(&[&format!("{}/events", upstream.base_url())])));
    exchange.assert_status(200, "a stream on a credential route");
    assert!(exchange.body.contains("data: one") && exchange.body.contains("data: three"), "{exchange}");
    assert!(!exchange.body.contains(&secret.value), "the credential came back to the agent: {exchange}");
    assert!(exchange.body.contains("[credential removed]"), "{exchange}");
}
