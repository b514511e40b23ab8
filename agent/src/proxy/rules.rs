//! A route's request rules (block, approve) and response masks.

use std::borrow::Cow;

use hyper::{HeaderMap, Method};
use regex::{Captures, Regex, Replacer};
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
        && !request.method.as_str().eq_ignore_ascii_case(method)
    {
        return false;
    }
    if let Some(path) = &matcher.path
        && !path_matches(&path.0, request.path)
    {
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
        && !body.0.is_match(&String::from_utf8_lossy(request.body))
    {
        return false;
    }
    true
}

/// Does a path rule cover `path`? A rule for a directory (`^/admin/`) also
/// covers the directory itself (`/admin`, `/admin?x`), which servers answer
/// the same way.
fn path_matches(rule: &regex::Regex, path: &str) -> bool {
    if rule.is_match(path) {
        return true;
    }
    let (bare, query) = match path.split_once('?') {
        Some((bare, query)) => (bare, Some(query)),
        None => (path, None),
    };
    !bare.ends_with('/') && {
        let directory = match query {
            Some(query) => format!("{bare}/?{query}"),
            None => format!("{bare}/"),
        };
        rule.is_match(&directory)
    }
}

/// The first block rule the request matches, named for the record.
pub fn blocked_by(route: &Route, request: &RequestView<'_>) -> Option<String> {
    route.block.iter().enumerate().find(|(_, m)| matches(m, request)).map(|(i, m)| format!("block[{i}]: {m}"))
}

/// The first approve rule the request matches, named for the record.
pub fn needs_approval(route: &Route, request: &RequestView<'_>) -> Option<String> {
    route.approve.iter().enumerate().find(|(_, m)| matches(m, request)).map(|(i, m)| format!("approve[{i}]: {m}"))
}

/// Why a response could not be masked (and so is not passed on).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the response looks like JSON but does not parse, so its JSON fields cannot be masked")]
pub struct Unparsable;

/// Applies every mask to a response body. Returns the new body and how many
/// values were replaced; the clear values are not kept anywhere. A body with
/// nothing to replace is returned byte for byte. A body that looks like JSON
/// but does not parse is refused when JSON masks apply: passing it on would
/// let the fields the masks name through in the clear.
/// `json_declared`: the response says it is JSON, so failing to parse it is
/// a refusal even when it does not look like JSON.
pub fn mask(masks: &[Mask], body: &[u8], json_declared: bool) -> Result<(Vec<u8>, usize), Unparsable> {
    let mut count = 0;
    let mut text: Option<String> = None;
    let json_masks: Vec<_> = masks
        .iter()
        .filter_map(|m| match m {
            Mask::JsonPath { json_path, replace } => Some((json_path, replace)),
            Mask::Regex { .. } | Mask::Column { .. } => None,
        })
        .collect();
    if !json_masks.is_empty() {
        match serde_json::from_slice::<Value>(body) {
            Ok(mut value) => {
                let mut replaced = 0;
                for (path, replace) in json_masks {
                    let pointers: Vec<String> =
                        path.0.query_located(&value).locations().map(|location| location.to_json_pointer()).collect();
                    for pointer in pointers {
                        if let Some(slot) = value.pointer_mut(&pointer) {
                            *slot = Value::String(replace.clone());
                            replaced += 1;
                        }
                    }
                }
                if replaced > 0 {
                    count += replaced;
                    text = Some(value.to_string());
                }
            }
            Err(_) if json_declared || looks_like_json(body) => return Err(Unparsable),
            Err(_) => {}
        }
    }
    let has_regexes = masks.iter().any(|m| matches!(m, Mask::Regex { .. }));
    let current: Cow<'_, str> = match text {
        Some(masked) => masked.into(),
        // Nothing replaced and nothing more to look for: the body as it came.
        None if !has_regexes => return Ok((body.to_vec(), 0)),
        // Checked first: `from_utf8` reads valid text many times faster than
        // the lossy conversion, which was a seventh of the time of masking.
        None => match std::str::from_utf8(body) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(body),
        },
    };
    let (current, found) = mask_regexes(masks, current);
    count += found;
    if count == 0 {
        return Ok((body.to_vec(), 0));
    }
    Ok((current.into_owned().into_bytes(), count))
}

/// Applies the regex masks, in order, to `text` (a body or a header value).
/// Returns the text, borrowed when nothing matched, and how many values
/// were replaced.
pub fn mask_regexes<'t>(masks: &[Mask], mut text: Cow<'t, str>) -> (Cow<'t, str>, usize) {
    let mut count = 0;
    for m in masks {
        if let Mask::Regex { regex, replace } = m {
            let (replaced, found) = replace_counting(&regex.0, &text, replace);
            if found > 0 {
                count += found;
                text = Cow::Owned(replaced.into_owned());
            }
        }
    }
    (text, count)
}

/// `text` with every match of `regex` replaced (`$1`, `${name}` expanded
/// as [`Regex::replace_all`] does), and how many there were: one pass over
/// the text where counting first took another.
pub fn replace_counting<'t>(regex: &Regex, text: &'t str, replace: &str) -> (Cow<'t, str>, usize) {
    if replace.contains('$') {
        let mut counting = Counting { replace, count: 0 };
        // Borrowed, so the count can be read after.
        let replaced = regex.replace_all(text, counting.by_ref());
        return (replaced, counting.count);
    }
    // A literal replacement needs no capture groups: matches alone, as
    // `replace_all` itself does for one.
    let mut matches = regex.find_iter(text).peekable();
    if matches.peek().is_none() {
        return (Cow::Borrowed(text), 0);
    }
    let (mut out, mut count, mut last) = (String::with_capacity(text.len()), 0, 0);
    for found in matches {
        out.push_str(&text[last..found.start()]);
        out.push_str(replace);
        last = found.end();
        count += 1;
    }
    out.push_str(&text[last..]);
    (Cow::Owned(out), count)
}

/// Expands the replacement for each match, counting them.
struct Counting<'r> {
    replace: &'r str,
    count: usize,
}

impl Replacer for Counting<'_> {
    fn replace_append(&mut self, caps: &Captures<'_>, dst: &mut String) {
        self.count += 1;
        caps.expand(self.replace, dst);
    }
}

fn looks_like_json(body: &[u8]) -> bool {
    matches!(body.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'['))
}

/// The path as servers will read it: percent-encoded unreserved characters
/// decoded, `.` and `..` segments resolved, repeated slashes folded. Rules
/// match this form and the upstream receives it, so `/%61dmin/`,
/// `//admin/` and `/x/../admin/` cannot slip past a rule on `^/admin/`.
pub fn normalize_path(path_and_query: &str) -> String {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut normalized = format!("/{}", segments.join("/"));
    if decoded.ends_with('/') && !segments.is_empty() {
        normalized.push('/');
    }
    if let Some(query) = query {
        normalized.push('?');
        normalized.push_str(query);
    }
    normalized
}

/// Decodes `%XX` only where XX is an unreserved character (RFC 3986 2.3);
/// `%2F` and friends stay encoded, as servers keep them.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(c) = hex.filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c)) {
                out.push(char::from(c));
                i += 3;
                continue;
            }
            // Keep other escapes, with their hex digits in upper case.
            out.push('%');
            out.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
            i += 3;
            continue;
        }
        out.push(char::from(bytes[i]));
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> Route {
        serde_yaml_ng::from_str(yaml).expect("route parses")
    }

    #[test]
    fn a_directory_rule_covers_the_directory_itself() {
        let rule = regex::RegexBuilder::new("^/admin/").case_insensitive(true).build().expect("regex");
        for path in ["/admin/x", "/admin", "/ADMIN", "/admin?tab=1", "/Admin/"] {
            assert!(path_matches(&rule, path), "{path}");
        }
        for path in ["/administrator", "/public/admin", "/admin-tools/x"] {
            assert!(!path_matches(&rule, path), "{path}");
        }
    }

    #[test]
    fn json_paths_and_regexes_mask_and_count() {
        let r = route(
            "to: \"127.0.0.1/32:1\"\nprotocol: http\nmask:\n  - { json_path: \"$.users[*].email\" }\n  - { regex: \"\\\\b\\\\d{4}-\\\\d{4}-\\\\d{4}-\\\\d{4}\\\\b\", replace: \"****-****-****-****\" }\n",
        );
        let body = br#"{"users":[{"name":"a","email":"a@x.io","note":"card 4111-1111-1111-1111"},{"name":"b","email":"b@x.io"}]}"#;
        let (masked, count) = mask(&r.mask, body, true).expect("maskable");
        let masked = String::from_utf8(masked).expect("utf-8");
        assert_eq!(count, 3, "{masked}");
        assert!(!masked.contains("a@x.io") && !masked.contains("4111-1111"), "{masked}");
        assert!(masked.contains("****-****-****-****") && masked.contains(r#""email":"****""#), "{masked}");
    }

    #[test]
    fn unparseable_json_is_refused_and_untouched_bodies_stay_exact() {
        let r = route("to: \"127.0.0.1/32:1\"\nprotocol: http\nmask:\n  - { json_path: \"$.users[*].email\" }\n");
        assert_eq!(mask(&r.mask, br#"{"users":[{"email":"a@x.io"}],"#, false), Err(Unparsable));
        let exact = br#"{"z":1, "order_id":123456789012345678901234567890}"#;
        assert_eq!(mask(&r.mask, exact, true), Ok((exact.to_vec(), 0)));
        let big = br#"{"users":[{"email":"a@x.io"}],"scale":1e400,"id":123456789012345678901234567890}"#;
        let (masked, count) = mask(&r.mask, big, true).expect("maskable");
        let masked = String::from_utf8(masked).expect("utf-8");
        assert_eq!(count, 1);
        assert!(
            (masked.contains("1e400") || masked.contains("1e+400"))
                && masked.contains("123456789012345678901234567890")
                && !masked.contains("a@x.io"),
            "{masked}"
        );
        assert_eq!(mask(&r.mask, b"<html>a@x.io</html>", false), Ok((b"<html>a@x.io</html>".to_vec(), 0)));
    }

    #[test]
    fn one_pass_replaces_and_counts_as_replace_all_and_find_iter_do() {
        let texts =
            ["", "no match here", "ann@x.io, bob@y.org; ann@x.io", "aaa", "caf\u{e9} 4111-1111 \u{1f512} 4222-2222"];
        let cases = [
            (r"[a-z]+@[a-z]+\.[a-z]+", "****"),
            (r"(?P<user>[a-z]+)@[a-z.]+", "${user}@masked"),
            (r"(\d{4})-\d{4}", "$1-****"),
            (r"\d{4}-\d{4}", "$$ and $ and $9 unknown"),
            (r"a*", "-"),
            (r"\b", "|"),
            (r"\p{L}+", ""),
        ];
        for (pattern, replace) in cases {
            let regex = Regex::new(pattern).expect("regex");
            for text in texts {
                let expected = (regex.replace_all(text, replace), regex.find_iter(text).count());
                assert_eq!(replace_counting(&regex, text, replace), expected, "{pattern} -> {replace} over {text:?}");
            }
        }
        // Nothing found: the text itself, not a copy.
        let regex = Regex::new("zzz").expect("regex");
        assert!(matches!(replace_counting(&regex, "abc", "*").0, Cow::Borrowed("abc")));
    }

    #[test]
    fn a_body_that_is_not_utf8_is_masked_as_its_lossy_text() {
        let r = route("to: \"127.0.0.1/32:1\"\nprotocol: http\nmask:\n  - { regex: \"secret-[a-z]+\" }\n");
        let (masked, count) = mask(&r.mask, b"\xff secret-abc \xfe", false).expect("maskable");
        assert_eq!((masked, count), ("\u{fffd} **** \u{fffd}".as_bytes().to_vec(), 1));
    }

    #[test]
    fn paths_are_normalized_before_rules_see_them() {
        for (raw, normal) in [
            ("/%61dmin/users", "/admin/users"),
            ("//admin/users", "/admin/users"),
            ("/public/../admin/users", "/admin/users"),
            ("/./admin/users?x=%2F", "/admin/users?x=%2F"),
            ("/a%2fb/", "/a%2Fb/"),
            ("/../..", "/"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
    }

    #[test]
    fn every_field_of_a_matcher_must_match() {
        let r = route("to: \"127.0.0.1/32:1\"\nprotocol: http\nblock:\n  - { method: POST, path: \"^/deploy\" }\n");
        let headers = HeaderMap::new();
        let view =
            |method: &'static Method, path: &'static str| RequestView { method, path, headers: &headers, body: b"" };
        assert!(blocked_by(&r, &view(&Method::POST, "/deploy/x")).is_some());
        assert!(blocked_by(&r, &view(&Method::GET, "/deploy/x")).is_none());
        assert!(blocked_by(&r, &view(&Method::POST, "/other")).is_none());
    }
}
