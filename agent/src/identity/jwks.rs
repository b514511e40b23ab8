//! JSON Web Key Sets, from a file or an issuer's URL, cached.

use std::{
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use jsonwebtoken::jwk::JwkSet;

/// How long a fetched JWKS is trusted before it is fetched again.
const JWKS_TTL: Duration = Duration::from_secs(300);
/// A token with an unknown `kid` may trigger a refetch at most this often.
const REFETCH_GAP: Duration = Duration::from_secs(10);
/// Upper bound on a JWKS document; real ones are a few kilobytes.
const JWKS_MAX_BYTES: u64 = 1 << 20;

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A local file, read on every verification (cheap, and edits apply at once).
    File(PathBuf),
    /// An HTTPS URL (or HTTP on loopback), cached.
    Url(String),
    /// Keys held in memory (the dev issuer).
    Static(JwkSet),
}

/// An issuer's key set, with its cache.
#[derive(Debug)]
pub struct Jwks {
    source: JwksSource,
    cache: Mutex<Option<(JwkSet, Instant)>>,
}

impl Jwks {
    /// Keys from `source`, fetched when first needed.
    pub fn new(source: JwksSource) -> Self {
        Self { source, cache: Mutex::new(None) }
    }

    /// The current keys. With `refresh`, a URL source is fetched again unless
    /// it was fetched very recently (a token signed with a new key).
    pub fn keys(&self, refresh: bool) -> Result<JwkSet, String> {
        match &self.source {
            JwksSource::Static(set) => Ok(set.clone()),
            JwksSource::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))?;
                serde_json::from_str(&text).map_err(|e| format!("JWKS file {} is not a key set: {e}", path.display()))
            }
            JwksSource::Url(url) => {
                let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let Some((set, fetched)) = cache.as_ref() {
                    let age = fetched.elapsed();
                    if age < JWKS_TTL && !(refresh && age > REFETCH_GAP) {
                        return Ok(set.clone());
                    }
                }
                let set = fetch(url)?;
                *cache = Some((set.clone(), Instant::now()));
                Ok(set)
            }
        }
    }
}

fn fetch(url: &str) -> Result<JwkSet, String> {
    let response = ureq::get(url)
        .timeout(Duration::from_secs(5))
        .call()
        .map_err(|e| format!("cannot fetch JWKS from {url}: {e}"))?;
    let mut body = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(response.into_reader(), JWKS_MAX_BYTES), &mut body)
        .map_err(|e| format!("cannot read JWKS from {url}: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("JWKS at {url} is not a key set: {e}"))
}

/// A JWKS URL must be HTTPS, or HTTP to a loopback address (tests, local IdPs).
pub fn check_url(url: &str) -> Result<(), String> {
    check_https_url(url, "jwks_url")
}

/// `url` (the value of config key `key`) must be HTTPS, or HTTP to a loopback address.
pub fn check_https_url(url: &str, key: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{key} '{url}' is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(name)) => name == "localhost",
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err(format!("{key} '{url}' must use https (http is allowed only for loopback)"))
            }
        }
        other => Err(format!("{key} '{url}' has unsupported scheme '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn jwks_urls_must_be_https_except_on_loopback() {
        assert!(check_url("https://token.actions.githubusercontent.com/.well-known/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://[::1]/jwks").is_ok());
        assert!(check_url("http://idp.example/jwks").is_err());
        assert!(check_url("ftp://idp.example/jwks").is_err());
        assert!(check_url("not a url").is_err());
    }
}
