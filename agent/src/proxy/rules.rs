//! A route's request rules (block, approve) and response masks.

use hyper::{HeaderMap, Method};
use serde_json::Value;

use crate::policy::route::{Mask, Matcher, Route};

/// The parts of a request the rules look at.
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a Method,
    /// Path and query.
    pub path: &'a str,
    /// Headers.
    pub headers: &'a HeaderMap,
    /// Body (as read, within the proxy's limit).
    pub body: &'a [u8],
}

fn matches(matcher: &Matcher, request: &RequestView<'_>) -> bool {
    if let Some(method) = &matcher.method
        && !request.method.as_str().eq_ignore_ascii_case(method) {
            return false;
        }
    if let Some(path) = &matcher.path
        && !path.0.is_match(request.path) {
            return false;
        }
    if let Some(header) = &matcher.header {
        let found = request
            .headers
            .get_all(header.name.as_str())
            .iter()
            .any(|value| value.to_str().is_ok_and(|v| header.value.0.is_match(v)));
        if !found {
            return false;
        }
    }
    if let Some(body) = &matcher.body
        && !body.0.is_match(&String::from_utf8_lossy(request.body)) {
            return false;
        }
    true
}

/// The first block rule the request matches, named for the record.
pub fn blocked_by(route: &Route, request: &RequestView<'_>) -> Option<String> {
    route.block.iter().enumerate().find(|(_, m)| matches(m, request)).map(|(i, m)| format!("block[{i}]: {m}"))
}

/// The first approve rule the request matches, named for the record.
pub fn needs_approval(route: &Route, request: &RequestView<'_>) -> Option<String> {
    route.approve.iter().enumerate().find(|(_, m)| matches(m, request)).map(|(i, m)| format!("approve[{i}]: {m}"))
}

/// Applies every mask to a response body. Returns the new body and how many
/// values were replaced; the clear values are not kept anywhere.
pub fn mask(masks: &[Mask], body: &[u8]) -> (Vec<u8>, usize) {
    let mut count = 0;
    let mut text: Option<String> = None;
    let json_masks: Vec<_> = masks
        .iter()
        .filter_map(|m| match m {
            Mask::JsonPath { json_path, replace } => Some((json_path, replace)),
            Mask::Regex { .. } => None,
        })
        .collect();
    if !json_masks.is_empty()
        && let Ok(mut value) = serde_json::from_slice::<Value>(body) {
            for (path, replace) in json_masks {
                let pointers: Vec<String> =
                    path.0.query_located(&value).locations().map(|location| location.to_json_pointer()).collect();
                for pointer in pointers {
                    if let Some(slot) = value.pointer_mut(&pointer) {
                        *slot = Value::String(replace.clone());
                        count += 1;
                    }
                }
            }
            text = Some(value.to_string());
        }
    let mut text = text.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    for m in masks {
        if let Mask::Regex { regex, replace } = m {
            let found = regex.0.find_iter(&text).count();
            if found > 0 {
                count += found;
                text = regex.0.replace_all(&text, replace.as_str()).into_owned();
            }
        }
    }
    (text.into_bytes(), count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> Route {
        serde_yaml_ng::from_str(yaml).expect("route parses")
    }

    #[test]
    fn json_paths_and_regexes_mask_and_count() {
        let r = route(
            "to: \"127.0.0.1/32:1\"\nprotocol: http\nmask:\n  - { json_path: \"$.users[*].email\" }\n  - { regex: \"\\\\b\\\\d{4}-\\\\d{4}-\\\\d{4}-\\\\d{4}\\\\b\", replace: \"****-****-****-****\" }\n",
        );
        let body = br#"{"users":[{"name":"a","email":"a@x.io","note":"card 4111-1111-1111-1111"},{"name":"b","email":"b@x.io"}]}"#;
        let (masked, count) = mask(&r.mask, body);
        let masked = String::from_utf8(masked).expect("utf-8");
        assert_eq!(count, 3, "{masked}");
        assert!(!masked.contains("a@x.io") && !masked.contains("4111-1111"), "{masked}");
        assert!(masked.contains("****-****-****-****") && masked.contains(r#""email":"****""#), "{masked}");
    }

    #[test]
    fn every_field_of_a_matcher_must_match() {
        let r = route("to: \"127.0.0.1/32:1\"\nprotocol: http\nblock:\n  - { method: POST, path: \"^/deploy\" }\n");
        let headers = HeaderMap::new();
        let view = |method: &'static Method, path: &'static str| RequestView { method, path, headers: &headers, body: b"" };
        assert!(blocked_by(&r, &view(&Method::POST, "/deploy/x")).is_some());
        assert!(blocked_by(&r, &view(&Method::GET, "/deploy/x")).is_none());
        assert!(blocked_by(&r, &view(&Method::POST, "/other")).is_none());
    }
}
