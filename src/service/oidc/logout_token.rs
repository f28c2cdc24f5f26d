//! Logout token validation (OpenID Connect Back-Channel Logout 1.0, §2.6):
//! the signature with a key of the provider's JWKS under the same rules as
//! an ID token's (the algorithm is the key's: never `none`, never HMAC),
//! `iss`, `aud` (and `azp`), `iat` within the leeway and at most
//! [`MAX_AGE_SECS`] old, `exp` when present, the `events` claim with the
//! back-channel logout member, no `nonce`, and `sid` and/or `sub`. The
//! `jti` is required; that it is never accepted twice is the caller's
//! business (the store, across replicas).

use serde_json::Value;

use super::id_token::{self, IdTokenError, Jwk};

/// The `events` member that makes a JWT a logout token.
pub const EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// Oldest `iat` accepted, seconds: a logout token is sent as soon as the
/// provider's session ends. Its `jti` is remembered this long (plus the
/// leeway), so that a token is refused for good once seen.
pub const MAX_AGE_SECS: i64 = 600;

/// What the checked token asks: end the sessions of `sid`, or else of `sub`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub jti: String,
    /// The provider's session id.
    pub sid: Option<String>,
    pub sub: Option<String>,
}

/// Why a logout token was refused (no value of the token is named).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogoutTokenError {
    #[error("{0}")]
    Signed(#[from] IdTokenError),
    #[error("the logout token has no backchannel-logout event")]
    Event,
    #[error("a logout token must not carry a nonce")]
    Nonce,
    #[error("the logout token has neither sid nor sub")]
    Subject,
    #[error("the logout token has no jti")]
    Jti,
    #[error("the logout token expired")]
    Expired,
    #[error("this logout token was already used")]
    Replayed,
}

/// A claim that is a non-empty string of at most 255 bytes, if there.
fn text(claims: &serde_json::Map<String, Value>, name: &str) -> Result<Option<String>, ()> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 255 => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

/// Checks `token` with `keys`; answers what it asks to end.
pub fn validate(
    token: &str,
    keys: &[Jwk],
    issuer: &str,
    client_id: &str,
    now: i64,
    leeway: i64,
) -> Result<LogoutRequest, LogoutTokenError> {
    let claims = id_token::signed_claims(token, keys)?;
    id_token::check_issuer_and_audience(&claims, issuer, client_id)?;
    id_token::check_issued_at(&claims, now, leeway, MAX_AGE_SECS)?;
    if let Some(exp) = claims.get("exp") {
        let exp = exp.as_i64().ok_or(LogoutTokenError::Expired)?;
        if now >= exp.saturating_add(leeway) {
            return Err(LogoutTokenError::Expired);
        }
    }
    let event = claims
        .get("events")
        .and_then(Value::as_object)
        .and_then(|e| e.get(EVENT));
    if !event.is_some_and(Value::is_object) {
        return Err(LogoutTokenError::Event);
    }
    if claims.contains_key("nonce") {
        return Err(LogoutTokenError::Nonce);
    }
    let sid = text(&claims, "sid").map_err(|_| LogoutTokenError::Subject)?;
    let sub = text(&claims, "sub").map_err(|_| LogoutTokenError::Subject)?;
    if sid.is_none() && sub.is_none() {
        return Err(LogoutTokenError::Subject);
    }
    let jti = text(&claims, "jti")
        .map_err(|_| LogoutTokenError::Jti)?
        .ok_or(LogoutTokenError::Jti)?;
    Ok(LogoutRequest { jti, sid, sub })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://idp.example.com/realms/r";
    const CLIENT: &str = "tokenpolicy";

    struct Signer(Ed25519KeyPair);

    impl Signer {
        fn new() -> Signer {
            let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Signer(Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap())
        }
        fn keys(&self) -> Vec<Jwk> {
            let jwk = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "use": "sig",
                "x": B64.encode(self.0.public_key().as_ref())}]});
            id_token::parse_jwks(jwk.to_string().as_bytes()).unwrap()
        }
        fn token_with(&self, header: Value, claims: &Value) -> String {
            let signed = format!(
                "{}.{}",
                B64.encode(header.to_string()),
                B64.encode(claims.to_string())
            );
            let sig = self.0.sign(signed.as_bytes());
            format!("{signed}.{}", B64.encode(sig.as_ref()))
        }
        fn token(&self, claims: &Value) -> String {
            self.token_with(
                json!({"alg": "EdDSA", "kid": "k1", "typ": "logout+jwt"}),
                claims,
            )
        }
    }

    fn good() -> Value {
        json!({"iss": ISS, "aud": CLIENT, "iat": NOW, "exp": NOW + 120, "jti": "j-1",
            "sub": "u-1", "sid": "ps-1", "events": {EVENT: {}}})
    }

    fn with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
        let mut c = good();
        change(c.as_object_mut().unwrap());
        c
    }

    fn check(s: &Signer, claims: &Value) -> Result<LogoutRequest, LogoutTokenError> {
        validate(&s.token(claims), &s.keys(), ISS, CLIENT, NOW, 60)
    }

    #[test]
    fn a_good_logout_token_names_its_sid_and_sub() {
        let s = Signer::new();
        assert_eq!(
            check(&s, &good()),
            Ok(LogoutRequest {
                jti: "j-1".into(),
                sid: Some("ps-1".into()),
                sub: Some("u-1".into())
            })
        );
        // sid alone, sub alone, and no exp (it is optional).
        let sid_only = with(|c| {
            c.remove("sub");
        });
        assert_eq!(check(&s, &sid_only).unwrap().sub, None);
        let sub_only = with(|c| {
            c.remove("sid");
            c.remove("exp");
        });
        assert_eq!(check(&s, &sub_only).unwrap().sid, None);
    }

    #[test]
    fn each_rule_refuses_a_token_that_breaks_it() {
        use LogoutTokenError as E;
        let s = Signer::new();
        let cases: Vec<(&str, Value, LogoutTokenError)> = vec![
            (
                "iss",
                with(|c| {
                    c.insert("iss".into(), json!("https://other.example.com"));
                }),
                E::Signed(IdTokenError::Issuer),
            ),
            (
                "aud",
                with(|c| {
                    c.insert("aud".into(), json!("another-client"));
                }),
                E::Signed(IdTokenError::Audience),
            ),
            (
                "iat in the future",
                with(|c| {
                    c.insert("iat".into(), json!(NOW + 120));
                }),
                E::Signed(IdTokenError::IssuedAt),
            ),
            (
                "iat too old",
                with(|c| {
                    c.insert("iat".into(), json!(NOW - MAX_AGE_SECS - 120));
                    c.remove("exp");
                }),
                E::Signed(IdTokenError::IssuedAt),
            ),
            (
                "no iat",
                with(|c| {
                    c.remove("iat");
                }),
                E::Signed(IdTokenError::IssuedAt),
            ),
            (
                "exp past",
                with(|c| {
                    c.insert("exp".into(), json!(NOW - 61));
                }),
                E::Expired,
            ),
            (
                "no events",
                with(|c| {
                    c.remove("events");
                }),
                E::Event,
            ),
            (
                "another event",
                with(|c| {
                    c.insert("events".into(), json!({"http://example.com/other": {}}));
                }),
                E::Event,
            ),
            (
                "event not an object",
                with(|c| {
                    c.insert("events".into(), json!({EVENT: "yes"}));
                }),
                E::Event,
            ),
            (
                "nonce",
                with(|c| {
                    c.insert("nonce".into(), json!("n"));
                }),
                E::Nonce,
            ),
            (
                "neither sid nor sub",
                with(|c| {
                    c.remove("sid");
                    c.remove("sub");
                }),
                E::Subject,
            ),
            (
                "sid not a string",
                with(|c| {
                    c.insert("sid".into(), json!(7));
                }),
                E::Subject,
            ),
            (
                "no jti",
                with(|c| {
                    c.remove("jti");
                }),
                E::Jti,
            ),
        ];
        for (what, claims, want) in cases {
            assert_eq!(check(&s, &claims), Err(want), "{what}");
        }
    }

    #[test]
    fn the_signature_follows_the_id_token_rules() {
        let s = Signer::new();
        let keys = s.keys();
        let v = |t: &str| validate(t, &keys, ISS, CLIENT, NOW, 60);
        // Another key with the same kid.
        let forged = Signer::new().token(&good());
        assert_eq!(v(&forged), Err(IdTokenError::Signature.into()));
        // alg none and HMAC are refused before any key is looked at.
        let header = B64.encode(json!({"alg": "none", "kid": "k1"}).to_string());
        let body = B64.encode(good().to_string());
        assert_eq!(
            v(&format!("{header}.{body}.")),
            Err(IdTokenError::Alg("none".into()).into())
        );
        let hs = s.token_with(json!({"alg": "HS256", "kid": "k1"}), &good());
        assert_eq!(v(&hs), Err(IdTokenError::Alg("HS256".into()).into()));
        // A header naming another algorithm than the key's.
        let rs = s.token_with(json!({"alg": "RS256", "kid": "k1"}), &good());
        assert_eq!(v(&rs), Err(IdTokenError::Alg("RS256".into()).into()));
        let unknown = s.token_with(json!({"alg": "EdDSA", "kid": "k2"}), &good());
        assert_eq!(v(&unknown), Err(IdTokenError::UnknownKey.into()));
        // The payload changed after signing.
        let good_token = s.token(&good());
        let mut parts: Vec<&str> = good_token.split('.').collect();
        let other = B64.encode(
            with(|c| {
                c.insert("sub".into(), json!("someone-else"));
            })
            .to_string(),
        );
        parts[1] = &other;
        assert_eq!(v(&parts.join(".")), Err(IdTokenError::Signature.into()));
    }
}
