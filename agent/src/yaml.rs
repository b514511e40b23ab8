//! YAML loading with `file:line:column` errors.
//!
//! Type errors and bad values (a malformed CIDR, a relative path) are caught
//! while deserializing, so serde_yaml_ng reports where they are. Errors found
//! after parsing (a grant naming an unknown identity) are located by
//! [`locate`], which finds the `key: value` line in the source.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de, de::DeserializeOwned};

/// A YAML file that did not load, with where and why.
#[derive(Debug, thiserror::Error)]
pub struct YamlError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => {
                write!(f, "{}:{line}:{column}: {}", self.path.display(), self.message)
            }
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// An optional duration written `90s`, `5m`, `1h 30m` (`deserialize_with`).
pub fn optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<std::time::Duration>, D::Error> {
    let Some(text) = Option::<String>::deserialize(deserializer)? else { return Ok(None) };
    let duration = humantime::parse_duration(&text)
        .map_err(|e| de::Error::custom(format!("duration '{text}' is not valid: {e}")))?;
    if duration.is_zero() {
        return Err(de::Error::custom(format!("duration '{text}' must be longer than zero")));
    }
    Ok(Some(duration))
}

/// Reads and deserializes `path`, returning the source too for [`locate`].
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(T, String), YamlError> {
    let source = std::fs::read_to_string(path).map_err(|e| YamlError {
        path: path.to_owned(),
        position: None,
        message: format!("cannot read: {e}"),
    })?;
    let value = parse(path, &source)?;
    Ok((value, source))
}

/// Deserializes `source`, naming `path` in errors.
pub fn parse<T: DeserializeOwned>(path: &Path, source: &str) -> Result<T, YamlError> {
    serde_yaml_ng::from_str(source).map_err(|e| {
        let position = e.location().map(|l| (l.line(), l.column()));
        // serde_yaml_ng appends " at line N column M"; we print it up front.
        let mut message = e.to_string();
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        YamlError { path: path.to_owned(), position, message }
    })
}

/// The 1-based line and column of the first `key: value` line (the value
/// optionally quoted, the line optionally a list item).
pub fn locate(source: &str, key: &str, value: &str) -> Option<(usize, usize)> {
    for (index, line) in source.lines().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(rest) = trimmed.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let found = rest.trim().trim_matches(|c| c == '"' || c == '\'');
        if found == value {
            // `rest` is the tail of `line` after the colon; the value starts after its blanks.
            let value_start = line.len() - rest.len() + (rest.len() - rest.trim_start().len());
            return Some((index + 1, value_start + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_quoted_and_list_item_values() {
        let source = "grants:\n  - name: a\n    identity: \"bots\"\n";
        assert_eq!(locate(source, "identity", "bots"), Some((3, 15)));
        assert_eq!(locate(source, "name", "a"), Some((2, 11)));
        assert_eq!(locate(source, "identity", "other"), None);
    }
}
