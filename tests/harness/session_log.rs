//! Reading `tollgate show --format json` output: finding events and processes, with panics that
//! print the whole log when something expected is missing.

use std::fs;
use std::path::Path;

use serde_json::Value;

/// Pretty-printed JSON for failure messages.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The `events` array of a `show` answer (empty if absent, so polling predicates can use it
/// before the log is complete).
pub fn events(show: &Value) -> &[Value] {
    show["events"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Events of one kind (`exec`, `fork`, `exit`, `connect`), in log order.
pub fn events_of_kind<'a>(show: &'a Value, kind: &str) -> Vec<&'a Value> {
    events(show).iter().filter(|event| event["kind"] == kind).collect()
}

/// The recorded argv of an exec event as strings.
pub fn argv(event: &Value) -> Vec<&str> {
    event["argv"].as_array().map(|args| args.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The first exec event whose argv contains `arg`.
pub fn exec_with_arg<'a>(show: &'a Value, arg: &str) -> Option<&'a Value> {
    events_of_kind(show, "exec").into_iter().find(|event| argv(event).contains(&arg))
}

/// Like [`exec_with_arg`], panicking with the whole log if there is none.
pub fn expect_exec_with_arg<'a>(show: &'a Value, arg: &str) -> &'a Value {
    exec_with_arg(show, arg).unwrap_or_else(|| panic!("no exec event with argument {arg:?} in:\n{}", pretty(show)))
}

/// Exec events whose filename is `path` (see [`same_path`]).
pub fn execs_of_file<'a>(show: &'a Value, path: &Path) -> Vec<&'a Value> {
    events_of_kind(show, "exec")
        .into_iter()
        .filter(|event| event["filename"].as_str().is_some_and(|name| same_path(name, path)))
        .collect()
}

/// The fork event that created `child_pid`, if logged.
pub fn fork_of(show: &Value, child_pid: u64) -> Option<&Value> {
    events_of_kind(show, "fork").into_iter().find(|event| event["child_pid"] == child_pid)
}

/// The exit event of `pid`, if logged.
pub fn exit_of(show: &Value, pid: u64) -> Option<&Value> {
    events_of_kind(show, "exit").into_iter().find(|event| event["pid"] == pid)
}

/// Connect events to `addr`:`port`, in log order.
pub fn connects_to<'a>(show: &'a Value, addr: &str, port: u16) -> Vec<&'a Value> {
    events_of_kind(show, "connect").into_iter().filter(|event| event["addr"] == addr && event["port"] == port).collect()
}

/// The `processes` entry for `pid`.
pub fn process(show: &Value, pid: u64) -> Option<&Value> {
    show["processes"].as_array()?.iter().find(|process| process["pid"] == pid)
}

/// A non-negative integer field, panicking with the object if it is missing or not a number.
pub fn u64_field(object: &Value, key: &str) -> u64 {
    object[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field {key:?} is not a non-negative integer in:\n{}", pretty(object)))
}

/// A string field, panicking with the object if it is missing or not a string.
pub fn str_field<'a>(object: &'a Value, key: &str) -> &'a str {
    object[key].as_str().unwrap_or_else(|| panic!("field {key:?} is not a string in:\n{}", pretty(object)))
}

/// Whether a recorded exec filename names `expected`: either literally (the path as passed to
/// execve) or after resolving symlinks, since `/bin/sh` may be logged as `/usr/bin/dash`.
pub fn same_path(recorded: &str, expected: &Path) -> bool {
    if Path::new(recorded) == expected {
        return true;
    }
    match (fs::canonicalize(recorded), fs::canonicalize(expected)) {
        (Ok(recorded), Ok(expected)) => recorded == expected,
        _ => false,
    }
}

/// Parses an RFC 3339 timestamp into (seconds since the Unix epoch, nanoseconds), so session
/// times can be ordered and sanity-checked without a date library. Returns `None` for anything
/// that is not RFC 3339.
pub fn parse_rfc3339(text: &str) -> Option<(i64, u32)> {
    let bytes = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = bytes.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let separators_ok = bytes.get(4) == Some(&b'-')
        && bytes.get(7) == Some(&b'-')
        && matches!(bytes.get(10), Some(b'T' | b't' | b' '))
        && bytes.get(13) == Some(&b':')
        && bytes.get(16) == Some(&b':');
    if !separators_ok {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Leap seconds (":60") are allowed by RFC 3339.
    if second > 60 {
        return None;
    }

    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let len = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return None;
        }
        // Keep nanosecond precision; further digits cannot change the order we care about.
        let significant = &fraction[..len.min(9)];
        nanos = significant.parse::<u32>().ok()? * 10u32.pow(9 - significant.len() as u32);
        rest = &fraction[len..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let offset = rest.as_bytes();
            let well_formed =
                offset.len() == 6 && offset[3] == b':' && [1, 2, 4, 5].iter().all(|&i| offset[i].is_ascii_digit());
            if !well_formed {
                return None;
            }
            let hours: i64 = rest[1..3].parse().ok()?;
            let minutes: i64 = rest[4..6].parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some((local - offset_seconds, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(parse_rfc3339("2024-02-29T12:34:56.5Z"), Some((1_709_210_096, 500_000_000)));
        assert_eq!(parse_rfc3339("2024-02-29T14:34:56.123456789+02:00"), Some((1_709_210_096, 123_456_789)));
        assert_eq!(parse_rfc3339("2024-02-29 12:34:56-00:30"), Some((1_709_211_896, 0)));
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("2024-01-01T00:00:00"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
