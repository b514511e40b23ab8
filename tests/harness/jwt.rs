//! Test issuers: an Ed25519 key that signs JWTs, and the JWKS a daemon trusts it by.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

/// The key id test keys sign under.
pub const KID: &str = "k1";

/// An Ed25519 signing key with its JWKS.
pub struct SigningKey {
    pub pkcs8: Vec<u8>,
    pub public: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> SigningKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("generating an Ed25519 key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parsing the generated key");
        SigningKey { pkcs8: pkcs8.as_ref().to_vec(), public: pair.public_key().as_ref().to_vec() }
    }

    /// A JWKS holding the public key under [`KID`].
    pub fn jwks(&self) -> String {
        json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(&self.public),
            "kid": KID,
            "alg": "EdDSA",
            "use": "sig",
        }]})
        .to_string()
    }

    /// An EdDSA JWT with `kid` [`KID`].
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&self.pkcs8)).expect("signing a test token")
    }
}
