//! Where a token is signed and verified: compact JWS (JWT) with Ed25519
//! (`EdDSA`) or P-256 (`ES256`) keys, and the JWKS that publishes them.
//!
//! The algorithm is a property of the key, found by `kid`. The token header's
//! `alg` must name that same algorithm; it never chooses one. Signatures are
//! strict: Ed25519 by `verify_strict`, ES256 only in its low-S form.
//!
//! This is hand-written rather than built on the `jsonwebtoken` crate
//! (12.0.0, measured): its `rust_crypto` backend verifies Ed25519 with the
//! non-strict check (a small-order key forgery passes), accepts high-S ES256
//! signatures and signs high-S ones about half the time (89 of 200); its
//! `aws_lc_rs` backend signs ES256 with a random nonce, so re-signing the
//! same claims would not give the same token. See docs/src/design.md.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

pub use crate::signing_key::{Alg, Key, KeyError};
use sha2::{Digest, Sha256};

/// Longest token we look at; anything longer is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 4_096;

/// The claims of every token we issue. Field order is the serialization
/// order, which makes re-signing the same claims give the same token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub sid: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    pub auth_time: i64,
    /// Password version: a fingerprint of the user's password hash at login,
    /// so that changing the password ends the sessions made with the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pwv: Option<String>,
    /// The identity provider (its issuer URL) of an OpenID Connect
    /// session; absent for a password login. With it, `sub` is the
    /// provider's subject, and the user is the pair of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
    /// The name shown to apps (`X-Auth-Request-User`), when it is not `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The user's verified email address, when the provider gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The user's groups, as the provider named them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

impl Claims {
    /// The name apps see: the display name, else the subject.
    pub fn user_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.sub)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token is signed by an unknown key")]
    UnknownKey,
    #[error("token header names an algorithm other than its key's")]
    AlgorithmMismatch,
    #[error("token signature does not verify")]
    BadSignature,
    /// Signed by our key, but with a header our signer never writes: `crit`
    /// (RFC 7515 §4.1.11: a member we would have to understand), `jku`,
    /// `x5u`, `jwk`, no `typ`, no `kid`, or members in another order.
    #[error("token header is not the one this service writes")]
    ForeignHeader,
    #[error("token was issued for another issuer or audience")]
    WrongAudience,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The keys of one service: the first signs, all verify (rotation).
pub struct KeySet {
    keys: Vec<Key>,
    by_kid: HashMap<String, usize>,
    issuer: String,
    audience: String,
}

impl KeySet {
    pub fn new(keys: Vec<Key>, issuer: &str, audience: &str) -> Result<KeySet, KeyError> {
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        let by_kid = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.kid().to_string(), i))
            .collect();
        Ok(KeySet {
            keys,
            by_kid,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        })
    }

    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Vec<Key>, KeyError> {
        paths
            .iter()
            .map(|p| {
                let path = p.as_ref().display().to_string();
                let pem = std::fs::read_to_string(p.as_ref()).map_err(|source| KeyError::Read {
                    path: path.clone(),
                    source,
                })?;
                Key::from_pem(&pem, &path)
            })
            .collect()
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Every key, the signing key first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    pub fn signing_key(&self) -> &Key {
        &self.keys[0]
    }

    /// Signs claims with the first key. Deterministic for both algorithms
    /// (Ed25519 by construction, ECDSA by RFC 6979), so the same claims give
    /// the same token on every replica that shares the key.
    pub fn sign(&self, claims: &Claims) -> String {
        let key = self.signing_key();
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let mut out = B64.encode(key.header().as_bytes());
        out.push('.');
        out.push_str(&B64.encode(payload));
        let sig = key.sign(out.as_bytes());
        out.push('.');
        out.push_str(&B64.encode(sig));
        out
    }

    /// Checks structure, key, algorithm, signature, issuer and audience.
    /// Time is the rules' business, not this function's.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let header_bytes = B64
            .decode(h)
            .map_err(|_| TokenError::Malformed("header is not base64url"))?;
        let header: Header = serde_json::from_slice(&header_bytes)
            .map_err(|_| TokenError::Malformed("header is not a JWS header"))?;
        // Our signer always names the key: a token without a `kid` is not ours.
        let key = header
            .kid
            .as_ref()
            .and_then(|kid| self.by_kid.get(kid))
            .map(|&i| &self.keys[i])
            .ok_or(TokenError::UnknownKey)?;
        if header.alg != key.alg().as_str() {
            return Err(TokenError::AlgorithmMismatch);
        }
        let sig = B64
            .decode(s)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signed_len = h.len() + 1 + p.len();
        if !key.verify(&token.as_bytes()[..signed_len], &sig) {
            return Err(TokenError::BadSignature);
        }
        // The header must be byte for byte the one our signer writes, so a
        // member that would change its meaning (`crit`, `jku`, `x5u`) is
        // refused rather than ignored.
        if header_bytes != key.header().as_bytes() {
            return Err(TokenError::ForeignHeader);
        }
        let payload = B64
            .decode(p)
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let claims: Claims = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload lacks our claims"))?;
        if claims.iss != self.issuer || claims.aud != self.audience {
            return Err(TokenError::WrongAudience);
        }
        Ok(claims)
    }

    /// `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.keys.iter().map(|k| k.jwk().clone()).collect::<Vec<_>>() })
    }
}

/// A fingerprint of a password hash, for the `pwv` claim. The hash is salted,
/// so the fingerprint tells nothing about the password.
pub fn password_version(hash: &str) -> String {
    B64.encode(&Sha256::digest(hash.as_bytes())[..9])
}

#[cfg(test)]
mod tests;
