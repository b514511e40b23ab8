//! Identity: verifying OIDC JWTs against the configured issuers.

pub mod dev;
pub mod jwks;
pub mod verify;

pub use verify::{TokenError, VerifiedToken, Verifier};
