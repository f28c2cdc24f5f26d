//! The provider's refresh tokens at rest: sealed with AES-256-GCM under a
//! key derived (HKDF-SHA256) from a signing key, so that every replica that
//! holds that key opens them and nobody who reads the store alone does.
//!
//! A sealed token names the signing key it was sealed under (its public
//! `kid`): a replica opens it with any key of its ring (signing, next,
//! previous), so a rotation never strands one. Each renewal seals the token
//! again under the current signing key, so a live session has moved to the
//! new key long before the previous key is dropped (the operator drops it
//! `tokenExpirationTime + expiredTokenRenewLimit` after the promotion; a
//! session with no renewal for that long has no usable token left).
//!
//! The session id is the additional data: a sealed token copied onto
//! another session's key does not open there.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;

/// What the format starts with; another version is not opened.
const VERSION: &str = "v1";
const SALT: &[u8] = b"tokenpolicy oidc refresh token salt v1";
const INFO: &[u8] = b"tokenpolicy oidc refresh token v1";
/// Longest refresh token kept (Keycloak's are about 1 KiB, Entra ID's up
/// to a few KiB).
pub const MAX_REFRESH_TOKEN_LEN: usize = 8 * 1024;

/// The sealing keys, one per signing key of the ring; the first seals.
pub struct Vault {
    keys: Vec<(String, LessSafeKey)>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Vault").field("kids", &kids).finish()
    }
}

fn derive(material: &[u8]) -> Option<LessSafeKey> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(material);
    let okm = prk.expand(&[INFO], &AES_256_GCM).ok()?;
    let mut key = [0u8; 32];
    okm.fill(&mut key).ok()?;
    Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).ok()?))
}

fn aad(sid: &str) -> Vec<u8> {
    format!("tokenpolicy oidc refresh token\n{sid}").into_bytes()
}

impl Vault {
    /// `keys`: (kid, secret key material) of each signing key, the signing
    /// key first. The material is the key's private PEM: every replica
    /// that has the key has the same bytes.
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vault {
        Vault {
            keys: keys
                .into_iter()
                .filter_map(|(kid, m)| Some((kid.to_string(), derive(m)?)))
                .collect(),
        }
    }

    /// `token` sealed for session `sid`: `v1.<kid>.<nonce, ciphertext and tag>`.
    pub fn seal(&self, sid: &str, token: &str) -> Option<String> {
        let (kid, key) = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).ok()?;
        let mut data = token.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(sid)),
            &mut data,
        )
        .ok()?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Some(format!("{VERSION}.{kid}.{}", B64.encode(out)))
    }

    /// The token sealed in `blob` for `sid`, if a key of ours opens it.
    pub fn open(&self, sid: &str, blob: &str) -> Option<String> {
        let mut parts = blob.splitn(3, '.');
        let (Some(VERSION), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let (_, key) = self.keys.iter().find(|(k, _)| k == kid)?;
        let raw = B64.decode(body).ok()?;
        if raw.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(aad(sid)), &mut sealed)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }

    /// Whether `blob` is sealed under the current signing key.
    pub fn is_current(&self, blob: &str) -> bool {
        let kid = blob.split('.').nth(1);
        self.keys
            .first()
            .is_some_and(|(k, _)| Some(k.as_str()) == kid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_only_for_its_session_and_with_our_keys() {
        let v = Vault::new([("k1", b"material one".as_slice())]);
        let blob = v.seal("sid-1", "the-refresh-token").unwrap();
        assert!(!blob.contains("the-refresh-token"));
        assert!(blob.starts_with("v1.k1."));
        assert_eq!(v.open("sid-1", &blob).as_deref(), Some("the-refresh-token"));
        // Random nonce: the same token seals differently each time.
        assert_ne!(v.seal("sid-1", "the-refresh-token").unwrap(), blob);
        // Another session's key: the additional data differs.
        assert_eq!(v.open("sid-2", &blob), None);
        // Another deployment (other key material, same kid).
        let other = Vault::new([("k1", b"material two".as_slice())]);
        assert_eq!(other.open("sid-1", &blob), None);
        // A flipped byte of the ciphertext.
        let (head, body) = blob.rsplit_once('.').unwrap();
        let mut raw = B64.decode(body).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(
            v.open("sid-1", &format!("{head}.{}", B64.encode(raw))),
            None
        );
        for junk in [
            "",
            "v1",
            "v1.k1",
            "v1.k1.",
            "v2.k1.AAAA",
            "v1.k1.!!",
            "v1.nokey.AAAA",
        ] {
            assert_eq!(v.open("sid-1", junk), None, "{junk:?}");
        }
    }

    #[test]
    fn a_rotated_ring_still_opens_and_seals_under_the_new_key() {
        let old = Vault::new([("old", b"old key".as_slice())]);
        let blob = old.seal("s", "rt").unwrap();
        // After the promotion: the new key signs, the old one is previous.
        let rotated = Vault::new([
            ("new", b"new key".as_slice()),
            ("old", b"old key".as_slice()),
        ]);
        assert_eq!(rotated.open("s", &blob).as_deref(), Some("rt"));
        assert!(!rotated.is_current(&blob));
        let resealed = rotated.seal("s", "rt").unwrap();
        assert!(rotated.is_current(&resealed));
        // A replica still on the old ring with the new key as `next`.
        let before = Vault::new([
            ("old", b"old key".as_slice()),
            ("new", b"new key".as_slice()),
        ]);
        assert_eq!(before.open("s", &resealed).as_deref(), Some("rt"));
        // Once the old key is dropped, only what was sealed again opens.
        let dropped = Vault::new([("new", b"new key".as_slice())]);
        assert_eq!(dropped.open("s", &blob), None);
        assert_eq!(dropped.open("s", &resealed).as_deref(), Some("rt"));
        assert!(!format!("{dropped:?}").contains("new key"));
    }
}
