//! Verifying a token: header, issuer, key, signature, `aud`, `exp`, `nbf`.
//!
//! The header and the issuer are read before any key is chosen so that a
//! refused token gets the precise reason: `alg: none` and HMAC are refused
//! outright (an HMAC "signed" with an issuer's public key is a classic forgery).

use std::collections::{BTreeMap, HashMap};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::Jwk};

use super::{
    IssuerConfig,
    dev::{DEV_AUDIENCE, DEV_ISSUER},
    jwks::{Jwks, JwksSource},
};

/// The longest token accepted. Real OIDC tokens are a few KiB; this bounds
/// what a caller can make the daemon parse.
pub const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// Why a token was refused. The text is what the caller of `tollgate run` sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token is {0} bytes; tokens are at most {MAX_TOKEN_BYTES} bytes")]
    TooLarge(usize),
    /// Not three base64url parts with a JSON header and payload.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg: none`.
    #[error("algorithm 'none' is refused: tokens must be signed")]
    AlgNone,
    /// HMAC or another algorithm we do not accept.
    #[error("algorithm '{0}' is refused: only asymmetric signatures (RS*, PS*, ES*, EdDSA) are accepted")]
    AlgRefused(String),
    /// `iss` is not a configured issuer.
    #[error("unknown issuer '{0}'")]
    UnknownIssuer(String),
    /// The issuer's keys could not be had.
    #[error("cannot get keys for issuer '{issuer}': {why}")]
    Keys {
        /// The issuer.
        issuer: String,
        /// Why.
        why: String,
    },
    /// No key with the token's `kid`.
    #[error("no key '{kid}' in the key set of issuer '{issuer}'")]
    UnknownKey {
        /// The issuer.
        issuer: String,
        /// The key id.
        kid: String,
    },
    /// The signature does not verify with the issuer's keys.
    #[error("bad signature: not signed by a key of issuer '{0}'")]
    BadSignature(String),
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid (nbf is in the future)")]
    NotYetValid,
    /// `aud` does not name this host's audience.
    #[error("audience does not match: expected '{0}'")]
    Audience(String),
    /// A required claim is absent.
    #[error("token has no '{0}' claim")]
    MissingClaim(String),
    /// Anything else the JWT library refused.
    #[error("token refused: {0}")]
    Other(String),
}

/// A token that verified.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// Every claim, as sent.
    pub claims: BTreeMap<String, serde_json::Value>,
}

struct Issuer {
    audience: String,
    keys: Jwks,
}

/// Verifies tokens against the configured issuers.
pub struct Verifier {
    issuers: HashMap<String, Issuer>,
}

impl Verifier {
    /// Trusts the configured issuers, and the dev issuer's key when given.
    pub fn new(configs: &[IssuerConfig], dev_jwks: Option<jsonwebtoken::jwk::JwkSet>) -> Self {
        let mut issuers = HashMap::new();
        for config in configs {
            let source = match (&config.jwks_url, &config.jwks_file) {
                (Some(url), _) => JwksSource::Url(url.clone()),
                (None, Some(file)) => JwksSource::File(file.clone()),
                (None, None) => continue, // refused by config validation
            };
            issuers
                .insert(config.issuer.clone(), Issuer { audience: config.audience.clone(), keys: Jwks::new(source) });
        }
        if let Some(set) = dev_jwks {
            issuers.insert(
                DEV_ISSUER.to_owned(),
                Issuer { audience: DEV_AUDIENCE.to_owned(), keys: Jwks::new(JwksSource::Static(set)) },
            );
        }
        Self { issuers }
    }

    /// Verifies `token`. May fetch a JWKS over the network: call off the async runtime.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(token.len()));
        }
        let (header, payload) = peek(token)?;
        let alg_name = header.get("alg").and_then(|v| v.as_str()).unwrap_or("");
        let algorithm = match alg_name {
            "none" | "None" | "NONE" | "" => return Err(TokenError::AlgNone),
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "EdDSA" => Algorithm::EdDSA,
            other => return Err(TokenError::AlgRefused(other.to_owned())),
        };
        let issuer_name =
            payload.get("iss").and_then(|v| v.as_str()).ok_or_else(|| TokenError::MissingClaim("iss".into()))?;
        let issuer = self.issuers.get(issuer_name).ok_or_else(|| TokenError::UnknownIssuer(issuer_name.to_owned()))?;
        let kid = header.get("kid").and_then(|v| v.as_str());

        let keys_error = |why| TokenError::Keys { issuer: issuer_name.to_owned(), why };
        let mut set = issuer.keys.keys(false).map_err(keys_error)?;
        if let Some(kid) = kid
            && set.find(kid).is_none()
        {
            set = issuer.keys.keys(true).map_err(keys_error)?;
        }
        let candidates: Vec<&Jwk> = match kid {
            Some(kid) => set.keys.iter().filter(|k| k.common.key_id.as_deref() == Some(kid)).collect(),
            None => set.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Err(match kid {
                Some(kid) => TokenError::UnknownKey { issuer: issuer_name.to_owned(), kid: kid.to_owned() },
                None => TokenError::BadSignature(issuer_name.to_owned()),
            });
        }

        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[issuer_name]);
        validation.set_audience(&[issuer.audience.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);

        let mut last = TokenError::BadSignature(issuer_name.to_owned());
        for jwk in candidates {
            // A key that declares its algorithm is used for that algorithm only.
            if let Some(key_alg) = jwk.common.key_algorithm
                && format!("{key_alg:?}") != format!("{algorithm:?}")
            {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            match jsonwebtoken::decode::<BTreeMap<String, serde_json::Value>>(token, &key, &validation) {
                Ok(data) => {
                    let subject = data.claims.get("sub").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                    return Ok(VerifiedToken { issuer: issuer_name.to_owned(), subject, claims: data.claims });
                }
                Err(e) => {
                    last = map_error(e.kind(), issuer_name, &issuer.audience);
                    // Only a signature failure is worth trying the next key for.
                    if !matches!(last, TokenError::BadSignature(_)) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn map_error(kind: &ErrorKind, issuer: &str, audience: &str) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
            TokenError::BadSignature(issuer.to_owned())
        }
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience(audience.to_owned()),
        ErrorKind::InvalidIssuer => TokenError::UnknownIssuer(issuer.to_owned()),
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed("cannot decode".into())
        }
        other => TokenError::Other(format!("{other:?}")),
    }
}

type JsonObject = serde_json::Map<String, serde_json::Value>;

/// The header and payload, unverified, to pick the issuer and key.
fn peek(token: &str) -> Result<(JsonObject, JsonObject), TokenError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(TokenError::Malformed(format!("expected 3 dot-separated parts, found {}", parts.len())));
    }
    let decode = |part: &str, what: &str| -> Result<JsonObject, TokenError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|_| TokenError::Malformed(format!("{what} is not base64url")))?;
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed(format!("{what} is not a JSON object")))
    };
    Ok((decode(parts[0], "header")?, decode(parts[1], "payload")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev;

    fn dev_verifier() -> (Verifier, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("key").as_ref().to_vec();
        (Verifier::new(&[], Some(dev::jwks(&pkcs8).expect("jwks"))), pkcs8)
    }

    #[test]
    fn oversized_tokens_are_refused_before_parsing() {
        let verifier = Verifier::new(&[], None);
        let token = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(verifier.verify(&token).err(), Some(TokenError::TooLarge(MAX_TOKEN_BYTES + 1)));
    }

    #[test]
    fn a_dev_token_verifies_and_keeps_its_claims() {
        let (verifier, key) = dev_verifier();
        let claims = BTreeMap::from([("repository_owner".to_owned(), serde_json::json!("acme"))]);
        let token = dev::mint(&key, "bot-1", &claims, 60).expect("mint");
        let verified = verifier.verify(&token).expect("verifies");
        assert_eq!(verified.subject, "bot-1");
        assert_eq!(verified.claims["repository_owner"], "acme");
    }

    #[test]
    fn refusals_name_their_reason() {
        let (verifier, key) = dev_verifier();
        let expired = dev::mint(&key, "bot", &BTreeMap::new(), -3600).expect("mint");
        assert_eq!(verifier.verify(&expired).expect_err("refused"), TokenError::Expired);
        assert!(matches!(verifier.verify("garbage").expect_err("refused"), TokenError::Malformed(_)));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"iss":"tollgate-dev","sub":"x"}"#)
        );
        assert_eq!(verifier.verify(&none).expect_err("refused"), TokenError::AlgNone);
        let (_, other_key) = dev_verifier();
        let forged = dev::mint(&other_key, "bot", &BTreeMap::new(), 60).expect("mint");
        assert!(matches!(verifier.verify(&forged).expect_err("refused"), TokenError::BadSignature(_)));
    }
}
