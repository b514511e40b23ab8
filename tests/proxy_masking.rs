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
