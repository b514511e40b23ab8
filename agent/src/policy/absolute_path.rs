//! Absolute paths in policy files (executables, secret and CA files).

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, de};

/// An absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsolutePath(pub PathBuf);

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if !text.starts_with('/') {
            return Err(de::Error::custom(format!("exec path '{text}' must be absolute")));
        }
        Ok(Self(PathBuf::from(text)))
    }
}
