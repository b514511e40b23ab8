//! Credentials the proxy injects: read from root-only secret files, kept
//! between requests, refreshed when the file changes, and scrubbed from
//! whatever the upstream sends back.

use std::{os::unix::fs::MetadataExt, path::Path};

use hyper::header::{HeaderName, HeaderValue};

use super::file_cache::FileCache;
use crate::policy::route::Credential;

/// What replaces an echoed credential.
pub const REMOVED: &str = "[credential removed]";

/// Secret header values by file.
pub struct Credentials {
    secrets: FileCache<HeaderValue>,
}

impl Default for Credentials {
    fn default() -> Self {
        Self { secrets: FileCache::new("secret file", load_secret) }
    }
}

impl Credentials {
    /// The header to inject for `credential`.
    pub async fn header(&self, credential: &Credential) -> Result<(HeaderName, HeaderValue), String> {
        let name = HeaderName::from_bytes(credential.header.as_bytes())
            .map_err(|_| format!("'{}' is not a header name", credential.header))?;
        let value = self.secrets.get(&credential.secret_file.0).await?;
        Ok((name, HeaderValue::clone(&value)))
    }
}

/// Reads a secret; the file must belong to root and be private.
fn load_secret(path: &Path, meta: &std::fs::Metadata) -> Result<HeaderValue, String> {
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!("secret file {} must be owned by root and readable by root only", path.display()));
    }
    let secret =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let mut value = HeaderValue::from_str(secret.trim_end_matches(['\r', '\n']))
        .map_err(|_| format!("secret file {} does not hold a valid header value", path.display()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Replaces every occurrence of `secret` in `body`; returns the new body
/// and how many were found.
pub fn scrub(body: &[u8], secret: &str) -> (Vec<u8>, usize) {
    let needle = secret.as_bytes();
    let (mut out, mut found, mut i) = (Vec::with_capacity(body.len()), 0, 0);
    while i < body.len() {
        if body[i..].starts_with(needle) {
            out.extend_from_slice(REMOVED.as_bytes());
            found += 1;
            i += needle.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    (out, found)
}
