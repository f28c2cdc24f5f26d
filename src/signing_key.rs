//! A signing key: Ed25519 (`EdDSA`) or P-256 (`ES256`), read from and written
//! as PKCS#8 PEM, with its RFC 7638 thumbprint as `kid`, its public JWK, and
//! the one JWS header that tokens signed with it carry. A leaf shared by the
//! token service (which signs and verifies with it, `service/jwt.rs`) and
//! the operator (which generates keys and names them by kid).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a PKCS#8 PEM Ed25519 or P-256 private key")]
    Unsupported(String),
    #[error("no signing key given")]
    Empty,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    EdDsa,
    Es256,
}

impl Alg {
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::EdDsa => "EdDSA",
            Alg::Es256 => "ES256",
        }
    }
}

enum Secret {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

/// One private key, its public half, `kid`, and the one JWS header that
/// tokens signed with it carry.
pub struct Key {
    kid: String,
    secret: Secret,
    jwk: serde_json::Value,
    header: String,
}

impl Key {
    pub fn from_pem(pem: &str, origin: &str) -> Result<Key, KeyError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey as _;
        if let Ok(k) = ed25519_dalek::SigningKey::from_pkcs8_pem(pem) {
            return Ok(Key::from_secret(Secret::Ed25519(k)));
        }
        if let Ok(k) = p256::ecdsa::SigningKey::from_pkcs8_pem(pem) {
            return Ok(Key::from_secret(Secret::P256(k)));
        }
        Err(KeyError::Unsupported(origin.to_string()))
    }

    /// A fresh Ed25519 key.
    pub fn generate() -> Key {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the operating system's random source failed");
        Key::from_secret(Secret::Ed25519(ed25519_dalek::SigningKey::from_bytes(
            &seed,
        )))
    }

    /// The private key as PKCS#8 PEM, as `openssl genpkey` writes it.
    pub fn to_pem(&self) -> String {
        use ed25519_dalek::pkcs8::EncodePrivateKey as _;
        let pem = match &self.secret {
            Secret::Ed25519(k) => k.to_pkcs8_pem(Default::default()).map(|p| p.to_string()),
            Secret::P256(k) => k.to_pkcs8_pem(Default::default()).map(|p| p.to_string()),
        };
        pem.expect("encoding an in-memory key as PKCS#8 cannot fail")
    }

    fn from_secret(secret: Secret) -> Key {
        // RFC 7638 thumbprint members, in lexicographic order.
        let (thumb_input, mut jwk) = match &secret {
            Secret::Ed25519(k) => {
                let x = B64.encode(k.verifying_key().as_bytes());
                (
                    format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
                    serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA"}),
                )
            }
            Secret::P256(k) => {
                let point = k.verifying_key().to_sec1_point(false);
                let x = B64.encode(point.x().expect("uncompressed point has x"));
                let y = B64.encode(point.y().expect("uncompressed point has y"));
                (
                    format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#),
                    serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "alg": "ES256"}),
                )
            }
        };
        let kid = B64.encode(Sha256::digest(thumb_input.as_bytes()));
        jwk["kid"] = kid.clone().into();
        jwk["use"] = "sig".into();
        let mut key = Key {
            kid,
            secret,
            jwk,
            header: String::new(),
        };
        key.header = format!(
            r#"{{"alg":"{}","typ":"JWT","kid":"{}"}}"#,
            key.alg().as_str(),
            key.kid
        );
        key
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWS header of every token this key signs, byte for byte.
    pub(crate) fn header(&self) -> &str {
        &self.header
    }

    /// The public key as a JWK (with `kid`, `alg` and `use`).
    pub(crate) fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    pub fn alg(&self) -> Alg {
        match self.secret {
            Secret::Ed25519(_) => Alg::EdDsa,
            Secret::P256(_) => Alg::Es256,
        }
    }

    /// The signature of `msg` (for a JWS, its signing input).
    pub(crate) fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer as _;
        match &self.secret {
            Secret::Ed25519(k) => k.sign(msg).to_bytes().to_vec(),
            Secret::P256(k) => {
                // RFC 6979 nonce (deterministic), then the low-S form of the
                // signature: the only one `verify` accepts.
                let sig: p256::ecdsa::Signature = k.sign(msg);
                sig.normalize_s().to_bytes().to_vec()
            }
        }
    }

    /// Whether `sig` is this key's one valid signature of `msg`.
    pub(crate) fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match &self.secret {
            Secret::Ed25519(k) => {
                let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
                    return false;
                };
                k.verifying_key().verify_strict(msg, &sig).is_ok()
            }
            Secret::P256(k) => {
                use p256::ecdsa::signature::Verifier as _;
                let Ok(sig) = p256::ecdsa::Signature::from_slice(sig) else {
                    return false;
                };
                // (r, n - s) verifies as well as (r, s): refuse the high-S
                // form so that a token has exactly one valid signature.
                if sig.normalize_s() != sig {
                    return false;
                }
                k.verifying_key().verify(msg, &sig).is_ok()
            }
        }
    }
}
