//! What the fuzz targets and the seed writer share: fixed signing keys, so
//! that the committed seed tokens verify and the fuzzer starts from the
//! inside of the signature check, not only from its door.

use tokenpolicy::service::jwt::{Key, KeySet};

pub const ISSUER: &str = "tokenpolicy-fuzz";
pub const AUDIENCE: &str = "fuzz";

/// An Ed25519 key from a fixed seed. It signs nothing but fuzz inputs.
pub fn ed25519_key() -> Key {
    use ed25519_dalek::pkcs8::EncodePrivateKey as _;
    let pem = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
        .to_pkcs8_pem(Default::default())
        .expect("encoding a fixed key");
    Key::from_pem(&pem, "fuzz ed25519").expect("a fixed Ed25519 key loads")
}

/// A P-256 key from a fixed scalar. It signs nothing but fuzz inputs.
pub fn p256_key() -> Key {
    use p256::pkcs8::EncodePrivateKey as _;
    let pem = p256::ecdsa::SigningKey::from_slice(&[9u8; 32])
        .expect("a fixed scalar below the group order")
        .to_pkcs8_pem(Default::default())
        .expect("encoding a fixed key");
    Key::from_pem(&pem, "fuzz p256").expect("a fixed P-256 key loads")
}

pub fn keyset(keys: Vec<Key>) -> KeySet {
    KeySet::new(keys, ISSUER, AUDIENCE).expect("a key set of fixed keys")
}
