//! Approve rules: a matching request is held until a reviewer approves it (forwarded, optionally
//! with a window for later requests of the session), denies it or lets it time out (403). A held
//! request holds up nothing else.

use std::thread;
use std::time::{Duration, Instant};

use harness::proxy::{
    Fixture, GRANT, Handshake, LONG_APPROVAL_TIMEOUT, REVIEWERS, UPSTREAM_REPLY, approval_events, approval_id,
    approvals, assert_http_event, has_http_event, http_event, json_of, reported, rules_hit, wait_for_approvals,
};
use harness::session_log::{parse_rfc3339, pretty, str_field};

#[test]
fn an_approved_request_is_forwarded() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let url = fx.url("/deploy/1");
    let payload = r#"{"release":"v1"}"#;

    let exchange = thread::scope(|scope| {
        let held =
            scope.spawn(|| fx.curl(&["-X", "POST", "-H", "Content-Type: application/json", "--data", payload, &url]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        let pending = &pending[0];
        let context = pretty(pending);
        assert_eq!(pending["method"], "POST", "{context}");
        assert_eq!(pending["path"], "/deploy/1", "{context}");
        assert_eq!(pending["grant"], GRANT, "{context}");
        assert_eq!(pending["identity"], "build-bots", "{context}");
        assert_eq!(pending["subject"], "deploy-bot", "{context}");
        assert_eq!(pending["destination"], format!("127.0.0.1:{}", fx.upstream.port()), "{context}");
        assert!(str_field(pending, "rule").starts_with("approve[0]"), "{context}");
        assert!(str_field(pending, "session").starts_with("s-"), "{context}");
        let requested = parse_rfc3339(str_field(pending, "requested_at"));
        let expires = parse_rfc3339(str_field(pending, "expires_at"));
        match (requested, expires) {
            (Some((from, _)), Some((to, _))) => assert!(
                (29..=31).contains(&(to - from)),
                "expires_at should be approval_timeout (30s) after requested_at:\n{context}"
            ),
            _ => panic!("requested_at and expires_at should be RFC 3339:\n{context}"),
        }
        assert!(
            fx.upstream.requests().is_empty(),
            "a held request reached the upstream before approval: {}",
            fx.upstream.describe()
        );

        let id = approval_id(pending);
        let approve = fx.daemon.tollgate(&["approve", id.as_str()]);
        assert!(approve.success(), "`tollgate approve {id}` failed: {approve}");
        let exchange = held.join().expect("the held request's thread panicked");
        assert_eq!(exchange.session, str_field(pending, "session"), "the pending request names its session");
        (exchange, id)
    });
    let (exchange, id) = exchange;

    exchange.assert_status(200, "an approved request is forwarded");
    assert_eq!(exchange.json(), json_of(UPSTREAM_REPLY), "{exchange}");
    let requests = fx.upstream.requests();
    assert_eq!(fx.upstream.request_lines(), vec!["POST /deploy/1".to_owned()], "{}", fx.upstream.describe());
    assert_eq!(requests[0].body_text(), payload, "the held body is forwarded intact:\n{}", requests[0]);
    assert!(approvals(&fx.daemon).is_empty(), "a decided request is no longer listed");

    let show = fx.daemon.show_until(&exchange.session, "the approval and the exchange", |show| {
        !approval_events(show, "approved").is_empty() && has_http_event(show, "POST", "/deploy/1")
    });
    let pending_events = approval_events(&show, "pending");
    assert_eq!(pending_events.len(), 1, "one pending approval:\n{}", pretty(&show));
    assert_eq!(pending_events[0]["id"], id.as_str(), "{}", pretty(&show));
    let approved = approval_events(&show, "approved")[0];
    assert_eq!(
        (approved["id"].as_str(), approved["by"].as_str()),
        (Some(id.as_str()), Some("root")),
        "{}",
        pretty(&show)
    );
    let event = http_event(&show, "POST", "/deploy/1");
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(event, &show, ("allow", "forwarded", 200), &destination, &fx.route());
    assert_eq!(event["request_bytes"], payload.len(), "{}", pretty(&show));
    let rules = rules_hit(event);
    assert!(rules.len() == 1 && rules[0].starts_with("approve[0]"), "the approve rule is recorded:\n{}", pretty(&show));
}

#[test]
fn a_denied_request_gets_403_with_the_reviewers_reason() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let url = fx.url("/deploy/2");
    let reason = "change freeze until Monday";

    let (exchange, id) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &url]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&pending[0]);
        let deny = fx.daemon.tollgate(&["deny", id.as_str(), "--reason", reason]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (held.join().expect("the held request's thread panicked"), id)
    });

    exchange.assert_status(403, "a denied request is refused");
    let body = exchange.json();
    assert_eq!(body["error"], "denied by a reviewer", "{exchange}");
    assert_eq!(body["denied_by"], "root", "{exchange}");
    assert_eq!(body["reason"], reason, "{exchange}");
    assert_eq!(body["session"], exchange.session, "{exchange}");
    assert!(fx.upstream.requests().is_empty(), "a denied request reached the upstream: {}", fx.upstream.describe());
    assert!(approvals(&fx.daemon).is_empty(), "a decided request is no longer listed");

    let show = fx.daemon.show_until(&exchange.session, "the denial", |show| {
        !approval_events(show, "denied").is_empty() && has_http_event(show, "POST", "/deploy/2")
    });
    let denied = approval_events(&show, "denied")[0];
    assert_eq!((denied["id"].as_str(), denied["by"].as_str()), (Some(id.as_str()), Some("root")), "{}", pretty(&show));
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(
        http_event(&show, "POST", "/deploy/2"),
        &show,
        ("deny", "denied", 403),
        &destination,
        &fx.route(),
    );
}

#[test]
fn an_undecided_request_is_denied_when_the_approval_times_out() {
    let fx = Fixture::start(&[REVIEWERS, "approval_timeout: 2s"]);
    let started = Instant::now();
    let exchange = fx.curl(&["-X", "POST", "--data", "go", &fx.url("/deploy/late")]);
    let waited = started.elapsed();

    exchange.assert_status(403, "nobody decided in time");
    let body = exchange.json();
    assert_eq!(body["error"], "approval timed out", "{exchange}");
    assert_eq!(body["denied_by"], "timeout", "{exchange}");
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(20),
        "the request should be held for about the 2s timeout, was {waited:?}: {exchange}"
    );
    assert!(fx.upstream.requests().is_empty(), "a timed-out request reached the upstream: {}", fx.upstream.describe());
    assert!(approvals(&fx.daemon).is_empty(), "a timed-out request is no longer listed");

    let show = fx.daemon.show_until(&exchange.session, "the timeout", |show| {
        !approval_events(show, "timed-out").is_empty() && has_http_event(show, "POST", "/deploy/late")
    });
    let pending = approval_events(&show, "pending");
    assert_eq!(pending.len(), 1, "one pending approval:\n{}", pretty(&show));
    let id = str_field(pending[0], "id").to_owned();
    let timed_out = approval_events(&show, "timed-out")[0];
    assert_eq!(
        (timed_out["id"].as_str(), timed_out["by"].as_str()),
        (Some(id.as_str()), Some("timeout")),
        "{}",
        pretty(&show)
    );
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(
        http_event(&show, "POST", "/deploy/late"),
        &show,
        ("deny", "denied", 403),
        &destination,
        &fx.route(),
    );

    // A late approval releases nothing.
    let late = fx.daemon.tollgate(&["approve", id.as_str()]);
    assert_eq!(late.code(), Some(1), "approving a timed-out request should fail: {late}");
    thread::sleep(Duration::from_millis(300));
    assert!(fx.upstream.requests().is_empty(), "a late approval released the request: {}", fx.upstream.describe());
}

#[test]
fn an_approval_with_a_window_lets_later_requests_of_that_session_through() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let script = r#"echo "$TOLLGATE_SESSION"
for path in /deploy/1 /deploy/2; do
  curl -sS --max-time 45 -o /dev/null -w "status $path=%{http_code}\n" -X POST --data go "$0$path"
done"#;
    let base = fx.upstream.base_url();

    let out = thread::scope(|scope| {
        let session = scope.spawn(|| fx.daemon.run(&fx.token, &["/bin/sh", "-c", script, &base]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        assert_eq!(pending[0]["path"], "/deploy/1", "{}", pretty(&pending[0]));
        let id = approval_id(&pending[0]);
        let approve = fx.daemon.tollgate(&["approve", id.as_str(), "--for", "1m"]);
        assert!(approve.success(), "`tollgate approve {id} --for 1m` failed: {approve}");
        session.join().expect("the session's thread panicked")
    });
    assert_eq!(out.code(), Some(0), "the session failed: {out}");
    assert_eq!(reported(&out, "status /deploy/1"), "200", "the approved request: {out}");
    assert_eq!(reported(&out, "status /deploy/2"), "200", "the request inside the window: {out}");
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["POST /deploy/1".to_owned(), "POST /deploy/2".to_owned()],
        "{}",
        fx.upstream.describe()
    );
    assert!(approvals(&fx.daemon).is_empty(), "nothing is held after the window let /deploy/2 through");

    let session = out.first_line().to_owned();
    let show = fx.daemon.show_until(&session, "both exchanges", |show| {
        has_http_event(show, "POST", "/deploy/1") && has_http_event(show, "POST", "/deploy/2")
    });
    assert_eq!(
        approval_events(&show, "pending").len(),
        1,
        "only the first request should have been held:\n{}",
        pretty(&show)
    );
    assert_eq!(http_event(&show, "POST", "/deploy/2")["outcome"], "forwarded", "{}", pretty(&show));

    // The window is that session's only: a new session's request is held again.
    let (other, other_pending) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &fx.url("/deploy/3")]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&pending[0]);
        let deny = fx.daemon.tollgate(&["deny", id.as_str(), "--reason", "other session"]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (held.join().expect("the held request's thread panicked"), pending[0].clone())
    });
    assert_ne!(other_pending["session"], session.as_str(), "{}", pretty(&other_pending));
    assert_eq!(other_pending["path"], "/deploy/3", "{}", pretty(&other_pending));
    other.assert_status(403, "another session is not covered by the window");
    assert_eq!(fx.upstream.requests().len(), 2, "{}", fx.upstream.describe());
}

#[test]
fn a_held_request_does_not_hold_up_other_sessions_or_connections() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let handshake = Handshake::new(&fx.daemon);
    // Session A: a POST that is held, then (once the test says so) a GET on a new connection.
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"
dir=$0 base=$1
curl -sS --max-time 45 -o /dev/null -w '%{{http_code}}' -X POST --data go "$base/deploy/slow" > "$dir/held.code" &
{wait}
curl -sS --max-time 10 -o /dev/null -w 'same_session_status=%{{http_code}}\n' "$base/same-session"
: > "$dir/done"
wait
echo "held_status=$(cat "$dir/held.code")""#,
        wait = Handshake::WAIT_FOR_GO
    );
    let base = fx.upstream.base_url();

    let (session_a, session_b) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.daemon.run(&fx.token, &["/bin/sh", "-c", &script, handshake.dir(), &base]));
        let pending = wait_for_approvals(&fx.daemon, 1);
        assert_eq!(pending[0]["path"], "/deploy/slow", "{}", pretty(&pending[0]));

        // Session B's GET flows while A's POST is held.
        let started = Instant::now();
        let session_b = fx.curl(&[&fx.url("/status")]);
        let took = started.elapsed();
        session_b.assert_status(200, "another session's GET while a request is held");
        assert!(took < Duration::from_secs(10), "the GET took {took:?} while a request was held: {session_b}");

        // So does a GET on another connection of the session whose request is held.
        handshake.go("now");
        handshake.wait_done("make its second request");
        assert_eq!(
            fx.upstream.request_lines(),
            vec!["GET /status".to_owned(), "GET /same-session".to_owned()],
            "the free requests reached the upstream, the held one did not: {}",
            fx.upstream.describe()
        );
        assert_eq!(approvals(&fx.daemon).len(), 1, "the POST is still held");

        let id = approval_id(&pending[0]);
        let approve = fx.daemon.tollgate(&["approve", id.as_str()]);
        assert!(approve.success(), "`tollgate approve {id}` failed: {approve}");
        (held.join().expect("session A's thread panicked"), session_b)
    });
    assert_eq!(session_a.code(), Some(0), "session A failed: {session_a}");
    assert_eq!(reported(&session_a, "same_session_status"), "200", "{session_a}");
    assert_eq!(reported(&session_a, "held_status"), "200", "the held request, once approved: {session_a}");
    assert_ne!(session_a.first_line(), session_b.session, "the requests came from two sessions");
    assert_eq!(
        fx.upstream.request_lines(),
        vec!["GET /status".to_owned(), "GET /same-session".to_owned(), "POST /deploy/slow".to_owned()],
        "{}",
        fx.upstream.describe()
    );
}

/// Reviewers see what is asked (the start of the body), ids look random (they stay unique across
/// restarts), a window longer than the cap is refused with the cap named, and open windows are
/// listed and can be closed: then matching requests are held again.
#[test]
fn windows_are_capped_listed_and_revocable() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let url = fx.url("/deploy/1");
    let payload = r#"{"release":"v2","note":"reviewers see this"}"#;
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"
s() {{ curl -sS --max-time 45 -o /dev/null -w '%{{http_code}}' -X POST --data '{payload}' "$1"; }}
echo "first=$(s {url})"
i=0; while [ ! -e "$0/go" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "second=$(s {url})"
i=0; while [ ! -e "$0/go2" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
echo "third=$(s {url})""#
    );
    let dir = fx.daemon.dir().join("windows");
    std::fs::create_dir(&dir).expect("dir");
    let out = thread::scope(|scope| {
        let running =
            scope.spawn(|| fx.daemon.run(&fx.token, &["/bin/sh", "-c", &script, dir.to_str().expect("path")]));
        let held = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&held[0]);
        assert!(id.len() == 10 && id.starts_with("a-") && id[2..].chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!(held[0]["body_start"], payload, "{}", pretty(&held[0]));
        let text = fx.daemon.tollgate(&["approvals"]);
        assert!(text.stdout.contains("reviewers see this"), "{text}");
        // The text carries what the JSON does (subject, destination, grant and rule), in aligned columns.
        let mut lines = text.stdout.lines();
        let (header, row) = (lines.next().expect("a header"), lines.next().expect("a row"));
        for (column, value) in [
            ("SESSION", str_field(&held[0], "session")),
            ("TO", str_field(&held[0], "destination")),
            ("METHOD", "POST"),
        ] {
            let at = header.find(&format!("  {column} ")).map(|i| i + 2).expect("the column");
            assert_eq!(row.get(at..at + value.len()), Some(value), "{column} is out of line:\n{text}");
        }
        for fact in [str_field(&held[0], "subject"), str_field(&held[0], "grant"), str_field(&held[0], "rule")] {
            assert!(text.stdout.contains(fact), "{fact} is missing from the text:\n{text}");
        }

        let too_long = fx.daemon.tollgate(&["approve", &id, "--for", "8days"]);
        assert!(!too_long.success() && too_long.stderr.contains("at most 7days"), "{too_long}");
        assert_eq!(approvals(&fx.daemon).len(), 1, "a refused approval decided nothing");
        assert!(fx.daemon.tollgate(&["approve", &id, "--for", "10m"]).success());

        let windows: serde_json::Value =
            serde_json::from_str(&fx.daemon.tollgate(&["windows", "--format", "json"]).stdout).expect("json");
        assert_eq!(windows.as_array().map(Vec::len), Some(1), "{}", pretty(&windows));
        let window = windows[0]["id"].as_str().expect("window id").to_owned();
        assert_eq!(windows[0]["by"], "root");
        // Inside the window the second request passes without being held.
        std::fs::write(dir.join("go"), "").expect("go");
        let deadline = Instant::now() + Duration::from_secs(20);
        while fx.upstream.requests().len() < 2 {
            assert!(Instant::now() < deadline, "the second request did not pass: {}", fx.upstream.describe());
            thread::sleep(Duration::from_millis(50));
        }
        assert!(fx.daemon.tollgate(&["windows", "revoke", &window]).success());
        assert!(fx.daemon.tollgate(&["windows", "--format", "json"]).stdout.trim() == "[]");
        // Closed: the third request is held again.
        std::fs::write(dir.join("go2"), "").expect("go2");
        let held = wait_for_approvals(&fx.daemon, 1);
        assert!(fx.daemon.tollgate(&["deny", &approval_id(&held[0])]).success());
        running.join().expect("session")
    });
    assert!(
        out.has_stdout_line("first=200") && out.has_stdout_line("second=200") && out.has_stdout_line("third=403"),
        "{out}"
    );
    let again = fx.daemon.tollgate(&["windows", "revoke", "w-00000000"]);
    assert!(!again.success() && again.stderr.contains("no open window"), "{again}");
}

/// `approvals --watch` follows new held requests: each appears once, as it comes, while the watch
/// keeps running; a request decided meanwhile does not come back.
#[test]
fn approvals_watch_prints_each_new_held_request_once() {
    use std::io::{BufRead, BufReader};
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let mut watch = std::process::Command::new(harness::tollgate_bin())
        .env("TOLLGATE_SOCKET", fx.daemon.socket())
        .args(["approvals", "--watch", "--format", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the watch starts");
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().expect("stdout");
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let watched_until = |id: &str| {
        let mut text = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !text.contains(id) {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) => text.push_str(&(line + "\n")),
                Err(_) => panic!("the watch did not print {id}:\n{text}"),
            }
        }
        text
    };
    let ids: Vec<String> = (1..=2)
        .map(|n| {
            let url = fx.url(&format!("/deploy/{n}"));
            thread::scope(|scope| {
                let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &url]));
                let pending = wait_for_approvals(&fx.daemon, 1);
                let id = approval_id(&pending[0]);
                let printed = watched_until(&id);
                assert_eq!(printed.matches(&id).count(), 1, "printed more than once:\n{printed}");
                assert!(fx.daemon.tollgate(&["approve", &id]).success());
                held.join().expect("the held request").assert_status(200, "approved");
                id
            })
        })
        .collect();
    // More than two polls later, neither decided request has come back.
    thread::sleep(Duration::from_millis(1200));
    let mut rest = String::new();
    while let Ok(line) = seen.try_recv() {
        rest.push_str(&line);
    }
    assert!(!ids.iter().any(|id| rest.contains(id.as_str())), "a decided request came back: {rest}");
    assert!(watch.try_wait().expect("the watch").is_none(), "the watch stopped by itself");
    let _ = watch.kill();
    let _ = watch.wait();
}
