//! The dev issuer: a local signing key in the state directory, trusted only
//! when the config says `dev_issuer: true`. For trying tollgate out and for
//! tests; packaged configs leave it off.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, EncodingKey, Header,
    jwk::{Jwk, JwkSet},
};
use ring::signature::{Ed25519KeyPair, KeyPair};

/// The `iss` of dev tokens.
pub const DEV_ISSUER: &str = "tollgate-dev";
/// The `aud` of dev tokens.
pub const DEV_AUDIENCE: &str = "tollgate";
const DEV_KID: &str = "tollgate-dev-1";

/// Errors of the dev issuer.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    /// The key file could not be read or written.
    #[error("dev issuer key {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold an Ed25519 PKCS#8 key.
    #[error("dev issuer key {0} is not an Ed25519 PKCS#8 key")]
    BadKey(String),
    /// Signing failed.
    #[error("cannot sign dev token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Loads the dev key from `path`, creating it (mode 0600) if absent.
pub fn ensure_key(path: &Path) -> Result<Vec<u8>, DevIssuerError> {
    let io = |source| DevIssuerError::Io { path: path.display().to_string(), source };
    match std::fs::read(path) {
        Ok(bytes) => {
            Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| DevIssuerError::BadKey(path.display().to_string()))?;
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 =
                Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| DevIssuerError::BadKey(path.display().to_string()))?;
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
            file.write_all(pkcs8.as_ref()).map_err(io)?;
            Ok(pkcs8.as_ref().to_vec())
        }
        Err(e) => Err(io(e)),
    }
}

/// The public half of the dev key as a JWKS.
pub fn jwks(pkcs8: &[u8]) -> Result<JwkSet, DevIssuerError> {
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| DevIssuerError::BadKey("(in memory)".into()))?;
    let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let jwk: Jwk = serde_json::from_value(serde_json::json!({
        "kty": "OKP", "crv": "Ed25519", "x": x, "kid": DEV_KID, "alg": "EdDSA", "use": "sig"
    }))
    .map_err(|_| DevIssuerError::BadKey("(in memory)".into()))?;
    Ok(JwkSet { keys: vec![jwk] })
}

/// Signs a dev token for `subject` with extra claims, valid for `valid_for_secs`
/// (negative makes an already expired token, for tests).
pub fn mint(
    pkcs8: &[u8],
    subject: &str,
    claims: &BTreeMap<String, serde_json::Value>,
    valid_for_secs: i64,
) -> Result<String, DevIssuerError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    let mut body = serde_json::Map::new();
    for (name, value) in claims {
        body.insert(name.clone(), value.clone());
    }
    body.insert("iss".into(), DEV_ISSUER.into());
    body.insert("aud".into(), DEV_AUDIENCE.into());
    body.insert("sub".into(), subject.into());
    body.insert("iat".into(), now.into());
    body.insert("nbf".into(), now.into());
    body.insert("exp".into(), (now + valid_for_secs).into());
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(DEV_KID.into());
    Ok(jsonwebtoken::encode(&header, &body, &EncodingKey::from_ed_der(pkcs8))?)
}
