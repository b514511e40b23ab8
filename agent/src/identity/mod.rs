//! Identity: verifying OIDC JWTs against the configured issuers.

pub mod dev;
mod issuer;
pub mod jwks;
pub mod verify;

pub use issuer::IssuerConfig;
pub use verify::{MAX_TOKEN_BYTES, TokenError, VerifiedToken, Verifier};
