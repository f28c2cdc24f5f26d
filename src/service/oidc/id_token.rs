//! ID token validation (OpenID Connect Core 1.0, §3.1.3.7): the signature
//! with a key of the provider's JWKS, the algorithm taken from that key
//! (RS256, ES256, EdDSA; never `none`, never HMAC), `iss`, `aud`/`azp`,
//! `exp`, `iat` and `nonce`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::Value;

/// Longest ID token looked at.
pub const MAX_ID_TOKEN_LEN: usize = 16 * 1024;

/// An algorithm we verify, as a key of the JWKS fixes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    Rs256,
    Es256,
    EdDsa,
}

impl KeyAlg {
    fn name(self) -> &'static str {
        match self {
            KeyAlg::Rs256 => "RS256",
            KeyAlg::Es256 => "ES256",
            KeyAlg::EdDsa => "EdDSA",
        }
    }
}

/// A usable signing key from the provider's JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub alg: KeyAlg,
    /// RSA: (n, e); EC: the uncompressed point; OKP: the public key.
    material: KeyMaterial,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Raw(Vec<u8>),
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(s: &Option<String>) -> Option<Vec<u8>> {
    B64.decode(s.as_deref()?.trim_end_matches('=')).ok()
}

impl Jwk {
    /// The key, if it is a signing key of a kind we verify; anything else
    /// (encryption keys, HMAC `oct` keys, other curves) is skipped.
    fn parse(raw: RawJwk) -> Option<Jwk> {
        if raw.use_.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        let (alg, material) = match (raw.kty.as_str(), raw.crv.as_deref()) {
            ("RSA", _) => {
                let (n, e) = (b64(&raw.n)?, b64(&raw.e)?);
                // ring refuses moduli under 2048 bits at verification.
                (KeyAlg::Rs256, KeyMaterial::Rsa { n, e })
            }
            ("EC", Some("P-256")) => {
                let (x, y) = (b64(&raw.x)?, b64(&raw.y)?);
                if x.len() != 32 || y.len() != 32 {
                    return None;
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (KeyAlg::Es256, KeyMaterial::Raw(point))
            }
            ("OKP", Some("Ed25519")) => {
                let x = b64(&raw.x)?;
                if x.len() != 32 {
                    return None;
                }
                (KeyAlg::EdDsa, KeyMaterial::Raw(x))
            }
            _ => return None,
        };
        // A key that names another algorithm (RS384, PS256...) is not one
        // we verify with: the key fixes the algorithm, not the token.
        if raw.alg.as_deref().is_some_and(|a| a != alg.name()) {
            return None;
        }
        Some(Jwk {
            kid: raw.kid,
            alg,
            material,
        })
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match (&self.material, self.alg) {
            (KeyMaterial::Rsa { n, e }, KeyAlg::Rs256) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            (KeyMaterial::Raw(point), KeyAlg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            (KeyMaterial::Raw(x), KeyAlg::EdDsa) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
            _ => false,
        }
    }
}

/// The usable keys of a JWKS document.
pub fn parse_jwks(body: &[u8]) -> Result<Vec<Jwk>, String> {
    #[derive(Deserialize)]
    struct Doc {
        keys: Vec<Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    Ok(doc
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value::<RawJwk>(k).ok())
        .filter_map(Jwk::parse)
        .collect())
}

/// What a flow expects of its ID token.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub nonce: &'a str,
    /// Seconds since the epoch.
    pub now: i64,
    /// Clock skew tolerated on `exp` and `iat`, seconds.
    pub leeway: i64,
    /// Oldest `iat` accepted, seconds before `now`.
    pub max_age: i64,
}

/// Why an ID token was refused (the message names no value of the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    #[error("the ID token is malformed")]
    Malformed,
    #[error("the ID token's alg {0:?} is not accepted")]
    Alg(String),
    /// A `kid` (or no `kid`) that no key of the JWKS has.
    #[error("no key of the provider's JWKS matches the ID token")]
    UnknownKey,
    #[error("the ID token's signature does not verify")]
    Signature,
    #[error("the ID token's iss is not the configured issuer")]
    Issuer,
    #[error("the ID token's aud does not hold our client id")]
    Audience,
    #[error("the ID token's azp is not our client id")]
    Azp,
    #[error("the ID token expired")]
    Expired,
    #[error("the ID token's iat is in the future or too old")]
    IssuedAt,
    #[error("the ID token's nonce is not this sign-in's")]
    Nonce,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The key of `keys` that signs a token with this header: by `kid`, else
/// the only key. Its algorithm must be the header's.
fn key_for<'k>(keys: &'k [Jwk], kid: Option<&str>) -> Option<&'k Jwk> {
    match kid {
        Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
        None if keys.len() == 1 => keys.first(),
        None => None,
    }
}

/// The header's `kid`, before any check (to tell an unknown key).
pub fn kid_of(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = B64.decode(header).ok()?;
    serde_json::from_slice::<Header>(&bytes).ok()?.kid
}

/// Checks `token` against `keys` and `expect`; answers its claims.
pub fn validate(
    token: &str,
    keys: &[Jwk],
    expect: &Expect<'_>,
) -> Result<serde_json::Map<String, Value>, IdTokenError> {
    use IdTokenError::*;
    let claims = signed_claims(token, keys)?;
    check_issuer_and_audience(&claims, expect.issuer, expect.client_id)?;
    let exp = claims.get("exp").and_then(Value::as_i64).ok_or(Expired)?;
    if expect.now >= exp.saturating_add(expect.leeway) {
        return Err(Expired);
    }
    check_issued_at(&claims, expect.now, expect.leeway, expect.max_age)?;
    let nonce = claims.get("nonce").and_then(Value::as_str).ok_or(Nonce)?;
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        nonce.as_bytes(),
        expect.nonce.as_bytes(),
    )) {
        return Err(Nonce);
    }
    Ok(claims)
}

/// `iss` is `issuer` exactly; `aud` holds `client_id`; `azp`, when present
/// or with several audiences, is `client_id`.
pub fn check_issuer_and_audience(
    claims: &serde_json::Map<String, Value>,
    issuer: &str,
    client_id: &str,
) -> Result<(), IdTokenError> {
    use IdTokenError::*;
    if claims.get("iss").and_then(Value::as_str) != Some(issuer) {
        return Err(Issuer);
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => return Err(Audience),
    };
    if !audiences.contains(&client_id) {
        return Err(Audience);
    }
    match claims.get("azp") {
        Some(azp) if azp.as_str() != Some(client_id) => Err(Azp),
        None if audiences.len() > 1 => Err(Azp),
        _ => Ok(()),
    }
}

/// `iat` is there, not in the future and at most `max_age` old, both
/// within `leeway`.
pub fn check_issued_at(
    claims: &serde_json::Map<String, Value>,
    now: i64,
    leeway: i64,
    max_age: i64,
) -> Result<(), IdTokenError> {
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or(IdTokenError::IssuedAt)?;
    if iat > now.saturating_add(leeway) || iat < now.saturating_sub(max_age + leeway) {
        return Err(IdTokenError::IssuedAt);
    }
    Ok(())
}

/// The structure, the algorithm (the key's, never the header's alone), the
/// key (by `kid`) and the signature of a JWS signed by the provider;
/// answers its claims, none of them checked yet.
pub fn signed_claims(
    token: &str,
    keys: &[Jwk],
) -> Result<serde_json::Map<String, Value>, IdTokenError> {
    use IdTokenError::*;
    if token.len() > MAX_ID_TOKEN_LEN {
        return Err(Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed);
    };
    let header: Header = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Malformed)?;
    if !matches!(header.alg.as_str(), "RS256" | "ES256" | "EdDSA") {
        return Err(Alg(header.alg.chars().take(16).collect()));
    }
    let key = key_for(keys, header.kid.as_deref()).ok_or(UnknownKey)?;
    if key.alg.name() != header.alg {
        return Err(Alg(header.alg));
    }
    let sig = B64.decode(s).map_err(|_| Malformed)?;
    let signed = &token[..h.len() + 1 + p.len()];
    if !key.verify(signed.as_bytes(), &sig) {
        return Err(Signature);
    }
    B64.decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Malformed)
}

#[cfg(test)]
#[path = "id_token_tests.rs"]
mod tests;
