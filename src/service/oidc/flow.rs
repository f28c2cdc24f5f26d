//! One sign-in's state between `/v1/oidc/login` and the callback.
//!
//! The browser keeps it, in a short-lived HttpOnly cookie: `state`, `nonce`,
//! the PKCE verifier, `rd` and the expiry, sealed with a MAC whose key comes
//! from the signing key (so that every replica checks it alike). A callback
//! counts only with the cookie of the browser that started the flow and the
//! same `state`; the store then takes the `state` once, across replicas:
//! replayed, it is refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// How long a flow may take, seconds (the `state` then expires).
pub const FLOW_TTL_SECS: i64 = 600;
/// The flow cookie's name where the session cookie is `Secure` (the
/// `__Host-` prefix: only this host, over https, can set it).
pub const HOST_COOKIE: &str = "__Host-tokenpolicy-oidc";
/// Its name for plain-http use.
pub const PLAIN_COOKIE: &str = "tokenpolicy-oidc";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    /// Where to go after the sign-in (checked at `/v1/oidc/login`).
    pub rd: String,
    /// Seconds since the epoch.
    pub exp: i64,
}

/// 32 random bytes, base64url (43 characters: also a valid PKCE verifier).
pub fn random() -> String {
    let mut b = [0u8; 32];
    // getrandom fails only without an OS source of randomness.
    if getrandom::fill(&mut b).is_err() {
        let fallback = uuid::Uuid::new_v4();
        b[..16].copy_from_slice(fallback.as_bytes());
    }
    B64.encode(b)
}

/// The PKCE S256 challenge of `verifier`.
pub fn challenge(verifier: &str) -> String {
    B64.encode(Sha256::digest(verifier.as_bytes()))
}

/// The store key that takes `state` once.
pub fn once_key(state: &str) -> String {
    let d = Sha256::digest(format!("tokenpolicy oidc state\n{state}").as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("oidc-state:{hex}")
}

/// Seals and opens flow cookies.
pub struct Sealer {
    key: hmac::Key,
}

/// Why a callback's state was refused (the message goes to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the callback has no state")]
    Missing,
    #[error("this browser did not start this sign-in (no or another sign-in cookie)")]
    OtherBrowser,
    #[error("the sign-in cookie was tampered with")]
    Tampered,
    #[error("the sign-in took too long; start again")]
    Expired,
    #[error("this sign-in was already completed")]
    Replayed,
}

impl Sealer {
    /// `secret`: key material every replica shares (the signing key).
    pub fn new(secret: &[u8]) -> Sealer {
        let mut h = Sha256::new();
        h.update(b"tokenpolicy oidc flow cookie v1\n");
        h.update(secret);
        Sealer {
            key: hmac::Key::new(hmac::HMAC_SHA256, &h.finalize()),
        }
    }

    pub fn seal(&self, flow: &Flow) -> String {
        let body = B64.encode(serde_json::to_vec(flow).unwrap_or_default());
        let tag = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", B64.encode(tag.as_ref()))
    }

    /// The flow of `cookie` if it is ours, unexpired and for `state`.
    pub fn open(
        &self,
        cookie: Option<&str>,
        state: Option<&str>,
        now: i64,
    ) -> Result<Flow, StateError> {
        let state = state.filter(|s| !s.is_empty()).ok_or(StateError::Missing)?;
        let cookie = cookie
            .filter(|c| !c.is_empty())
            .ok_or(StateError::OtherBrowser)?;
        let (body, tag) = cookie.split_once('.').ok_or(StateError::Tampered)?;
        let tag = B64.decode(tag).map_err(|_| StateError::Tampered)?;
        hmac::verify(&self.key, body.as_bytes(), &tag).map_err(|_| StateError::Tampered)?;
        let flow: Flow = B64
            .decode(body)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(StateError::Tampered)?;
        let same: bool =
            subtle::ConstantTimeEq::ct_eq(flow.state.as_bytes(), state.as_bytes()).into();
        if !same {
            return Err(StateError::OtherBrowser);
        }
        if now >= flow.exp {
            return Err(StateError::Expired);
        }
        Ok(flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(now: i64) -> Flow {
        Flow {
            state: random(),
            nonce: random(),
            verifier: random(),
            rd: "/app".into(),
            exp: now + FLOW_TTL_SECS,
        }
    }

    #[test]
    fn a_sealed_flow_opens_with_its_state_only() {
        let s = Sealer::new(b"key");
        let f = flow(1_000);
        let c = s.seal(&f);
        assert_eq!(s.open(Some(&c), Some(&f.state), 1_000), Ok(f.clone()));
        assert_eq!(s.open(Some(&c), None, 1_000), Err(StateError::Missing));
        assert_eq!(s.open(Some(&c), Some(""), 1_000), Err(StateError::Missing));
        assert_eq!(
            s.open(None, Some(&f.state), 1_000),
            Err(StateError::OtherBrowser)
        );
        // Another browser's cookie (another flow) with this state.
        let other = s.seal(&flow(1_000));
        assert_eq!(
            s.open(Some(&other), Some(&f.state), 1_000),
            Err(StateError::OtherBrowser)
        );
        // Expired.
        assert_eq!(
            s.open(Some(&c), Some(&f.state), 1_000 + FLOW_TTL_SECS),
            Err(StateError::Expired)
        );
    }

    #[test]
    fn a_tampered_or_foreign_cookie_is_refused() {
        let s = Sealer::new(b"key");
        let mut f = flow(1_000);
        let c = s.seal(&f);
        // Another key (another deployment).
        assert_eq!(
            Sealer::new(b"other").open(Some(&c), Some(&f.state), 1_000),
            Err(StateError::Tampered)
        );
        // The body changed (a later expiry), the tag kept.
        f.exp += 10_000;
        let forged_body = B64.encode(serde_json::to_vec(&f).unwrap());
        let tag = c.split_once('.').unwrap().1;
        let forged = format!("{forged_body}.{tag}");
        assert_eq!(
            s.open(Some(&forged), Some(&f.state), 1_000),
            Err(StateError::Tampered)
        );
        for junk in [".", "a.b", "abc", "\u{e9}.\u{e9}"] {
            assert_eq!(
                s.open(Some(junk), Some(&f.state), 1_000),
                Err(StateError::Tampered)
            );
        }
    }

    #[test]
    fn pkce_challenge_is_s256() {
        // base64url(SHA-256(verifier)), as computed by Python's hashlib.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gXk2y5wNc"),
            "v0iHTm3JJA1pE1JXj74XXITiVD6Bh-T8qxEYRaMaK3Y"
        );
        assert_eq!(random().len(), 43);
        assert_ne!(random(), random());
    }
}
