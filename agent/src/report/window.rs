//! Review windows as reviewers type them: a duration back from now
//! (`90d`, `12h`), a date (`2026-01-31`, midnight UTC) or an RFC 3339 time.

use std::time::SystemTime;

use crate::store::rfc3339;

/// The RFC 3339 time `text` names, relative to `now`.
pub fn bound(text: &str, now: SystemTime) -> Result<String, WindowError> {
    if let Ok(back) = humantime::parse_duration(text) {
        return Ok(rfc3339(now.checked_sub(back).unwrap_or(SystemTime::UNIX_EPOCH)));
    }
    let full = if text.len() == 10 { format!("{text}T00:00:00Z") } else { text.to_owned() };
    let at = humantime::parse_rfc3339_weak(&full).map_err(|_| WindowError(text.to_owned()))?;
    Ok(rfc3339(at))
}

/// A time bound that is neither a duration, a date nor a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is neither a duration (30d) nor a date (2026-01-31) nor an RFC 3339 time")]
pub struct WindowError(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_dates_and_times_are_accepted_and_nonsense_is_named() {
        let now = humantime::parse_rfc3339("2026-03-10T12:00:00Z").expect("time");
        assert!(bound("1d", now).expect("duration").starts_with("2026-03-09T12:00:00"));
        assert!(bound("2026-01-31", now).expect("date").starts_with("2026-01-31T00:00:00"));
        assert!(bound("2026-01-31T05:06:07Z", now).expect("time").starts_with("2026-01-31T05:06:07"));
        let error = bound("last tuesday", now).expect_err("nonsense");
        assert!(error.to_string().contains("last tuesday"), "{error}");
    }
}
