//! The token decoder: any bytes as a bearer token.
//!
//! Beyond "no panic": whatever verifies must be exactly what our own signer
//! writes for the claims it carries. A token that verifies but differs
//! (another encoding of the same signature, a high-S ECDSA twin, extra
//! header members, padding) would be a malleable token.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tokenpolicy::service::jwt::KeySet;
use tokenpolicy_fuzz::{ed25519_key, keyset, p256_key};

struct Sets {
    ed25519: KeySet,
    p256: KeySet,
    /// Both keys: the `kid` picks the key; no `kid` is refused.
    both: KeySet,
}

static SETS: LazyLock<Sets> = LazyLock::new(|| Sets {
    ed25519: keyset(vec![ed25519_key()]),
    p256: keyset(vec![p256_key()]),
    both: keyset(vec![ed25519_key(), p256_key()]),
});

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let sets = &*SETS;
    for set in [&sets.ed25519, &sets.p256] {
        if let Ok(claims) = set.verify(token) {
            assert_eq!(
                set.sign(&claims),
                token,
                "a verified token is not canonical"
            );
        }
    }
    if let Ok(claims) = sets.both.verify(token) {
        assert!(
            sets.ed25519.sign(&claims) == token || sets.p256.sign(&claims) == token,
            "a verified token is not canonical"
        );
    }
});
