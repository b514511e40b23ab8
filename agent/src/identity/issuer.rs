//! A trusted issuer as the configuration names it.

use std::path::PathBuf;

use serde::Deserialize;

/// One trusted OIDC issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` claim.
    pub issuer: String,
    /// The `aud` the token must carry.
    pub audience: String,
    /// Fetch the JWKS from here (https, or http to a loopback address).
    pub jwks_url: Option<String>,
    /// Or read it from this file.
    pub jwks_file: Option<PathBuf>,
}
