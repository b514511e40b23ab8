//! Response masking: json_path and regex masks replace personal data before the client sees it,
//! nothing else changes, unusual JSON does not make them fail open, and records keep only the
//! masked body, cut at record_body_bytes.

use harness::proxy::{Fixture, assert_http_event, contains, database_bytes, has_http_event, http_event};
use harness::session_log::pretty;
use harness::unique_tag;

/// An upstream answer with two emails and a card number, unique to this test process.
fn personal_data(tag: &str) -> (String, [String; 3]) {
    let clear = [format!("ann.{tag}@example.com"), format!("bob.{tag}@example.com"), "4111-2222-3333-4444".to_owned()];
    let body = format!(
        r#"{{"users":[{{"name":"ann","email":"{}","note":"card {}"}},{{"name":"bob","email":"{}"}}],"total":2}}"#,
        clear[0], clear[2], clear[1]
    );
    (body, clear)
}

#[test]
fn responses_are_masked_and_the_clear_values_are_not_stored() {
    let fx = Fixture::start(&["record_body_bytes: 4096"]);
    let (body, clear) = personal_data(&unique_tag());
    fx.upstream.set_reply(200, &body);

    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a masked response");
    for value in &clear {
        assert!(!exchange.body.contains(value.as_str()), "the client saw the clear value {value:?}: {exchange}");
    }
    let json = exchange.json();
    assert_eq!(json["users"][0]["email"], "****", "{exchange}");
    assert_eq!(json["users"][1]["email"], "****", "{exchange}");
    assert_eq!(json["users"][0]["note"], "card ****-****-****-****", "{exchange}");
    assert_eq!(
        (json["users"][0]["name"].as_str(), json["users"][1]["name"].as_str()),
        (Some("ann"), Some("bob")),
        "{exchange}"
    );
    assert_eq!(json["total"], 2, "unmasked values are kept: {exchange}");
    assert_eq!(fx.upstream.request_lines(), vec!["GET /users".to_owned()], "{}", fx.upstream.describe());

    let show =
        fx.daemon.show_until(&exchange.session, "the masked exchange", |show| has_http_event(show, "GET", "/users"));
    let event = http_event(&show, "GET", "/users");
    let destination = format!("127.0.0.1:{}", fx.upstream.port());
    assert_http_event(event, &show, ("allow", "forwarded", 200), &destination, &fx.route());
    assert_eq!(event["masked"], 3, "two emails and one card number were replaced:\n{}", pretty(&show));
    assert_eq!(event["response_body"], exchange.body.as_str(), "the record keeps the masked body:\n{}", pretty(&show));
    assert_eq!(event["response_bytes"], exchange.body.len(), "{}", pretty(&show));

    let stored = database_bytes(&fx.daemon);
    assert!(
        contains(&stored, &exchange.session) && contains(&stored, "****-****-****-****"),
        "the database files should hold this session's masked record, or this check proves nothing"
    );
    for value in &clear {
        assert!(!contains(&stored, value), "the session database stores the clear value {value:?}");
    }
}

/// Masking replaces the matched values and nothing else: a number the upstream sent reaches the
/// client with its value, even one beyond 64 bits.
#[test]
fn masking_keeps_other_values_exact() {
    let fx = Fixture::start(&[]);
    let big = "123456789012345678901234567890";
    fx.upstream
        .set_reply(200, &format!(r#"{{"users":[{{"name":"ann","email":"ann@example.com"}}],"order_id":{big}}}"#));
    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a masked response");
    assert!(!exchange.body.contains("ann@example.com"), "the email was not masked: {exchange}");
    assert!(exchange.body.contains(&format!(r#""order_id":{big}"#)), "an unmasked number was changed: {exchange}");
}

/// A JSON number outside the range of a double is still valid JSON (RFC 8259): the json_path
/// masks must apply (or the response be refused), never be skipped, and the record must not keep
/// the clear value either.
#[test]
fn masking_does_not_fail_open_on_unusual_json() {
    let fx = Fixture::start(&["record_body_bytes: 4096"]);
    let email = format!("ann.{}@example.com", unique_tag());
    fx.upstream.set_reply(200, &format!(r#"{{"users":[{{"name":"ann","email":"{email}"}}],"scale":1e400}}"#));
    let exchange = fx.curl(&[&fx.url("/users")]);
    let show = fx.daemon.show_until(&exchange.session, "the exchange", |show| has_http_event(show, "GET", "/users"));
    let leaks: Vec<&str> = [
        ("the client", exchange.body.contains(&email)),
        ("the session log", show.to_string().contains(&email)),
        ("the session database", contains(&database_bytes(&fx.daemon), &email)),
    ]
    .into_iter()
    .filter_map(|(place, leaked)| leaked.then_some(place))
    .collect();
    assert!(
        leaks.is_empty(),
        "the clear email reached {leaks:?}: {exchange}\nrecord:\n{}",
        pretty(http_event(&show, "GET", "/users"))
    );
}

#[test]
fn recorded_response_bodies_are_cut_at_record_body_bytes() {
    let fx = Fixture::start(&["record_body_bytes: 16"]);
    let (body, _) = personal_data(&unique_tag());
    fx.upstream.set_reply(200, &body);

    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a masked response");
    assert!(exchange.body.len() > 16, "{exchange}");
    let show = fx.daemon.show_until(&exchange.session, "the exchange", |show| has_http_event(show, "GET", "/users"));
    let event = http_event(&show, "GET", "/users");
    assert_eq!(event["response_body"], &exchange.body[..16], "the first 16 bytes are kept:\n{}", pretty(&show));
    assert_eq!(event["response_bytes"], exchange.body.len(), "the size is the whole body's:\n{}", pretty(&show));
}

/// A large answer (masked on the blocking pool, not its proxy thread) is masked as a small one
/// is: every value, counted, with nothing else changed; and one the masks cannot read is refused.
#[test]
fn large_answers_are_masked_whole_or_refused() {
    let fx = Fixture::start(&[]);
    let tag = unique_tag();
    // About 400 KiB: past the size the proxy masks off its thread.
    let users = 4000;
    let entries: Vec<String> = (0..users)
        .map(|i| format!(r#"{{"name":"u{i}","email":"u{i}.{tag}@example.com","note":"card 4111-2222-3333-{i:04}"}}"#))
        .collect();
    let body = format!(r#"{{"users":[{}],"total":{users}}}"#, entries.join(","));
    assert!(body.len() > 256 << 10, "the body must be past the off-thread size: {} bytes", body.len());
    fx.upstream.set_reply(200, &body);

    let exchange = fx.curl(&[&fx.url("/users")]);
    exchange.assert_status(200, "a large masked response");
    assert!(!exchange.body.contains(&format!(".{tag}@example.com")), "the client saw a clear email");
    assert!(!exchange.body.contains("4111-2222-3333-"), "the client saw a clear card number");
    let json = exchange.json();
    let got = json["users"].as_array().map(Vec::len);
    assert_eq!(got, Some(users), "every user arrives");
    assert_eq!(json["users"][users - 1]["name"], format!("u{}", users - 1), "unmasked values are kept");
    assert_eq!(json["users"][users - 1]["email"], "****");
    assert_eq!(json["users"][7]["note"], "card ****-****-****-****");
    let show =
        fx.daemon.show_until(&exchange.session, "the large exchange", |show| has_http_event(show, "GET", "/users"));
    let event = http_event(&show, "GET", "/users");
    assert_eq!(event["masked"], 2 * users, "each email and card number is counted");
    assert_eq!(event["response_bytes"], exchange.body.len());

    // The same size with a key twice: which one a client reads is unknown, so it is refused.
    let twice = format!(r#"{{"users":[{}],"users":[]}}"#, entries.join(","));
    fx.upstream.set_raw_reply(200, &["Content-Type: application/json"], twice.as_bytes());
    let refused = fx.curl(&[&fx.url("/twice")]);
    refused.assert_status(502, "a large answer the masks cannot read");
    assert_eq!(refused.json()["error"], "the response could not be masked", "{refused}");
    assert!(!refused.body.contains(&format!(".{tag}@example.com")), "the client saw a clear email: {refused}");
}

/// gzip of `text`, made by Python's gzip module (a real compressed body).
fn gzip(text: &str) -> Vec<u8> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import gzip, sys; sys.stdout.buffer.write(gzip.compress(sys.argv[1].encode()))", text])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "python3 gzip failed");
    out.stdout
}

/// The same personal data in representations the route's masks cannot
/// read with certainty: each answer is refused with 502, the client never
/// sees the clear value, and the session log never stores it.
#[test]
fn answers_the_masks_cannot_read_are_refused_and_never_stored() {
    let fx = Fixture::start(&[]);
    let email = format!("carol.{}@example.com", unique_tag());
    let json = format!(r#"{{"users":[{{"email":"{email}"}}]}}"#);
    let utf16: Vec<u8> = [0xff, 0xfe].into_iter().chain(json.encode_utf16().flat_map(u16::to_le_bytes)).collect();
    let cases: Vec<(&str, Vec<&str>, Vec<u8>)> = vec![
        ("JSONP", vec!["Content-Type: application/javascript"], format!("cb({json})").into_bytes()),
        ("CSV", vec!["Content-Type: text/csv"], format!("email\n{email}\n").into_bytes()),
        ("UTF-16 JSON", vec!["Content-Type: application/json; charset=utf-16"], utf16),
        ("gzip without Content-Encoding", vec!["Content-Type: application/json"], gzip(&json)),
        (
            "two media types",
            vec!["Content-Type: application/json", "Content-Type: text/plain"],
            json.clone().into_bytes(),
        ),
        ("no media type", vec![], json.clone().into_bytes()),
        ("declared gzip", vec!["Content-Type: application/json", "Content-Encoding: gzip"], gzip(&json)),
        (
            "a key twice",
            vec!["Content-Type: application/json"],
            format!(r#"{{"users":[{{"email":"{email}"}}],"users":[]}}"#).into_bytes(),
        ),
    ];
    for (case, headers, body) in &cases {
        fx.upstream.set_raw_reply(200, headers, body);
        let exchange = fx.curl(&[&fx.url("/users")]);
        exchange.assert_status(502, case);
        assert_eq!(exchange.json()["error"], "the response could not be masked", "{case}: {exchange}");
        assert!(exchange.json()["reason"].is_string(), "{case}: the refusal says why: {exchange}");
        assert!(!exchange.body.contains(&email), "{case}: the client saw the clear value: {exchange}");
    }
    // Once a later exchange is recorded, the refusals before it are too.
    let last = fx.curl(&[&fx.url("/last")]);
    fx.daemon.show_until(&last.session, "the last exchange", |show| has_http_event(show, "GET", "/last"));
    let stored = database_bytes(&fx.daemon);
    assert!(!contains(&stored, &email), "the session log stored the clear value");
    assert_eq!(fx.upstream.requests().len(), cases.len() + 1, "{}", fx.upstream.describe());
}

/// A header value that is not text cannot be read by a regex mask: the
/// answer is refused rather than passed on with it.
#[test]
fn a_header_value_that_is_not_text_is_refused_on_a_masked_route() {
    let fx = Fixture::start(&[]);
    let owner = "X-Owner: caf\u{e9} 4111-2222-3333-4444";
    fx.upstream.set_raw_reply(200, &["Content-Type: application/json", owner], br#"{"ok":true}"#);
    let exchange = fx.curl(&[&fx.url("/owner")]);
    exchange.assert_status(502, "a header value that is not text");
    assert_eq!(exchange.json()["error"], "the response could not be masked", "{exchange}");
    assert!(!exchange.out.stdout.contains("4111-2222-3333"), "{exchange}");
}

/// A route with only regex masks reads every textual representation: the
/// pattern is replaced in a CSV body and in response header values.
#[test]
fn regex_masks_apply_to_every_text_and_to_headers() {
    let upstream = harness::upstream::Upstream::start("127.0.0.1", 200, "{}");
    let to = format!("127.0.0.1/32:{}", upstream.port());
    let route = format!(
        "        - to: \"{to}\"\n          protocol: http\n          mask:\n            - {{ regex: \"[a-z0-9.]+@example\\\\.com\", replace: \"[email]\" }}\n"
    );
    let daemon = harness::Daemon::start(&harness::proxy::policy(&route, ""));
    let token = daemon.mint("csv-bot", harness::proxy::BUILD_BOTS);
    let email = format!("dave.{}@example.com", unique_tag().replace('-', "."));
    let owner = format!("X-Owner: {email}");
    upstream.set_raw_reply(
        200,
        &["Content-Type: text/csv; charset=utf-8", owner.as_str()],
        format!("name,email\ndave,{email}\n").as_bytes(),
    );
    let argv = harness::proxy::curl_argv(&["-D", "/dev/stdout", &format!("{}/export.csv", upstream.base_url())]);
    let out = daemon.run(&token, &argv);
    assert!(!out.stdout.contains(&email), "the clear value reached the client: {out}");
    assert!(out.stdout.contains("dave,[email]"), "the body is masked: {out}");
    assert!(out.stdout.to_ascii_lowercase().contains("x-owner: [email]"), "the header is masked: {out}");
}

/// HEAD and 304 carry the upstream's status and headers, minus what masking
/// would change (length, validators) on a masked route; an endless stream
/// on a masked route is refused at once instead of being waited for.
#[test]
fn head_and_304_pass_and_streams_are_refused_at_once_on_a_masked_route() {
    let fx = Fixture::start(&[]);
    fx.upstream.set_raw_reply(200, &["Content-Type: application/json", "ETag: \"v1\""], br#"{"users":[]}"#);
    let head = fx.daemon.run(&fx.token, &["curl", "-sS", "-I", fx.url("/users").as_str()]);
    let lower = head.stdout.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 200"), "HEAD on a masked route: {head}");
    assert!(!lower.contains("content-length: 0"), "HEAD claims an empty body: {head}");
    assert!(!lower.contains("etag"), "a validator of the unmasked body reached the client: {head}");

    fx.upstream.set_raw_reply(304, &["ETag: \"v1\""], b"");
    let not_modified = fx.curl(&["-H", "If-None-Match: \"v1\"", &fx.url("/users")]);
    not_modified.assert_status(304, "a 304 on a masked route");

    fx.upstream.set_raw_reply(200, &["Content-Type: text/event-stream"], b"data: {\"email\":\"x@example.com\"}\n\n");
    let stream = fx.curl(&["--max-time", "10", &fx.url("/events")]);
    stream.assert_status(502, "server-sent events on a masked route");
    assert!(stream.json()["reason"].as_str().is_some_and(|r| r.contains("stream")), "{stream}");
    assert!(!stream.body.contains("x@example.com"), "{stream}");
}
