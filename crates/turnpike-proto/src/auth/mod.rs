//! Long-term credentials (RFC 8489 §9.2): stateless nonces, static users and TURN REST API shared secrets.

pub mod cred;
pub mod nonce;

pub use cred::{CredentialStore, Verdict};
pub use nonce::{NonceCheck, NonceKey};
