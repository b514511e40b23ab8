//! Block rules on governed routes: a matching request gets 403 and never reaches the upstream.
//! Rules match methods, paths (however the path is spelled), headers and bodies.

use harness::Daemon;
use harness::proxy::{
    BUILD_BOTS, Exchange, Fixture, GRANT, UPSTREAM_REPLY, assert_http_event, curl_argv, has_http_event, http_event,
    policy, rules_hit,
};
use harness::session_log::pretty;
use harness::upstream::Upstream;

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

    assert!(fx.upstream.requests().is_empty(), "blocked requests reached the upstream: {}", fx.upstream.describe());
    assert_eq!(fx.upstream.connections(), 0, "the proxy should not even connect for a blocked request");

    // The route itself works: an allowed request on it gets through.
    let allowed = fx.curl(&[&fx.url("/administrator")]);
    allowed.assert_status(200, "/administrator is not under /admin/");
    assert_eq!(fx.upstream.request_lines(), vec!["GET /administrator".to_owned()], "{}", fx.upstream.describe());

    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    let show = fx
        .daemon
        .show_until(&by_method.session, "the blocked DELETE", |show| has_http_event(show, "DELETE", "/items/1"));
    let event = http_event(&show, "DELETE", "/items/1");
    assert_http_event(event, &show, ("block", "blocked", 403), &destination, &fx.route());
    assert_eq!(rules_hit(event), vec!["block[0]: method DELETE"], "{}", pretty(&show));

    let show =
        fx.daemon.show_until(&by_path.session, "the blocked GET", |show| has_http_event(show, "GET", "/admin/users"));
    let event = http_event(&show, "GET", "/admin/users");
    assert_http_event(event, &show, ("block", "blocked", 403), &destination, &fx.route());
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
        let hex = rest.get(at + 1..at + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok());
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
    let spellings = ["/%61dmin/users", "//admin/users", "/public/../admin/users", "/./admin/users"];
    let mut answers = Vec::new();
    for path in spellings {
        assert!(normalized_path(path).starts_with("/admin/"), "test bug: {path} is not an /admin/ path");
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

/// Path rules compare without case (servers such as IIS, or any on a
/// case-insensitive filesystem, read `/ADMIN/` as `/admin/`) unless a rule
/// asks for exact case, and a rule for a directory covers the directory itself.
#[test]
fn path_rules_ignore_case_and_cover_the_directory_itself() {
    let upstream = Upstream::start("127.0.0.1", 200, UPSTREAM_REPLY);
    let to = format!("127.0.0.1/32:{}", upstream.port());
    let route = format!(
        r#"        - to: "{to}"
          protocol: http
          block:
            - {{ path: "^/admin/" }}
            - {{ path: "^/Secret/", exact_case: true }}
"#
    );
    let daemon = Daemon::start(&policy(&route, ""));
    let token = daemon.mint("case-bot", BUILD_BOTS);
    let url = |path: &str| format!("{}{path}", upstream.base_url());
    let curl = |args: &[&str]| Exchange::parse(daemon.run(&token, &curl_argv(args)));
    for path in ["/ADMIN/users", "/Admin/users", "/admin", "/ADMIN", "/admin?tab=users"] {
        let exchange = curl(&[&url(path)]);
        exchange.assert_status(403, path);
        assert!(exchange.json()["rule"].as_str().is_some_and(|rule| rule.starts_with("block[0]")), "{exchange}");
    }
    curl(&[&url("/Secret/plans")]).assert_status(403, "the exact-case rule on its own spelling");
    for path in ["/administrator", "/secret/plans"] {
        curl(&[&url(path)]).assert_status(200, path);
    }
    assert_eq!(
        upstream.request_lines(),
        vec!["GET /administrator".to_owned(), "GET /secret/plans".to_owned()],
        "only the requests no rule covers reach the upstream: {}",
        upstream.describe()
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
        header.json()["rule"].as_str().is_some_and(|rule| rule.starts_with("block[0]") && rule.contains("X-Danger")),
        "{header}"
    );
    let body = curl(&["-X", "POST", "--data", "x; DROP TABLE users", &url("/by-body")]);
    body.assert_status(403, "a matching body is blocked");
    assert!(body.json()["rule"].as_str().is_some_and(|rule| rule.starts_with("block[1]")), "{body}");

    // Near misses pass: another header value, the body rule's text under another method.
    let other_header = curl(&["-H", "X-Danger: no", &url("/other-header")]);
    other_header.assert_status(200, "a non-matching header value passes");
    let other_body = curl(&["-X", "POST", "--data", "SELECT 1", &url("/other-body")]);
    other_body.assert_status(200, "a non-matching body passes");
    let other_method = curl(&["-X", "PUT", "--data", "DROP TABLE users", &url("/other-method")]);
    other_method.assert_status(200, "all fields of a matcher must match");

    assert_eq!(
        upstream.request_lines(),
        vec!["GET /other-header".to_owned(), "POST /other-body".to_owned(), "PUT /other-method".to_owned()],
        "{}",
        upstream.describe()
    );
    let forwarded = &upstream.requests()[1];
    assert_eq!(forwarded.body_text(), "SELECT 1", "the request body reaches the upstream intact:\n{forwarded}");
}

/// A proxy record names the process that made the request: the pid the kernel saw at connect,
/// the same as the client's exec event.
#[test]
fn proxy_records_carry_the_clients_pid() {
    let fx = harness::proxy::Fixture::start(&[]);
    let exchange = fx.curl(&[&fx.url("/items")]);
    exchange.assert_status(200, "a plain GET");
    let show = fx.daemon.show_until(&exchange.session, "the exchange", |s| !harness::proxy::http_events(s).is_empty());
    let http = harness::proxy::http_events(&show)[0];
    let curl = harness::session_log::events_of_kind(&show, "exec")
        .into_iter()
        .find(|e| e["filename"].as_str().is_some_and(|f| f.ends_with("/curl")) || e["argv"][0] == "curl")
        .unwrap_or_else(|| panic!("no curl exec: {}", harness::session_log::pretty(&show)));
    assert_eq!(http["client_pid"], curl["pid"], "{}", harness::session_log::pretty(&show));
    assert_eq!(http["pid"], curl["pid"], "the record's pid is the client's");
}
