//! Signing, verification and forgeries: every forged token must fail to
//! verify, each for the one thing it changes.
use super::*;

use crate::testing::claims;

fn set(keys: Vec<Key>) -> KeySet {
    KeySet::new(keys, "tokenpolicy", "tokenpolicy").unwrap()
}

fn p256_pem() -> String {
    use p256::pkcs8::EncodePrivateKey as _;
    let mut bytes = [7u8; 32];
    bytes[0] = 1;
    let k = p256::ecdsa::SigningKey::from_slice(&bytes).unwrap();
    k.to_pkcs8_pem(Default::default()).unwrap().to_string()
}

#[test]
fn sign_and_verify_round_trip_both_algorithms() {
    let ed = set(vec![Key::generate()]);
    let t = ed.sign(&claims());
    assert_eq!(ed.verify(&t).unwrap(), claims());

    let ec = set(vec![Key::from_pem(&p256_pem(), "test").unwrap()]);
    assert_eq!(ec.signing_key().alg(), Alg::Es256);
    let t = ec.sign(&claims());
    assert_eq!(ec.verify(&t).unwrap(), claims());
}

#[test]
fn signing_is_deterministic() {
    let k = set(vec![Key::generate()]);
    assert_eq!(k.sign(&claims()), k.sign(&claims()));
    let ec = set(vec![Key::from_pem(&p256_pem(), "test").unwrap()]);
    assert_eq!(ec.sign(&claims()), ec.sign(&claims()));
}

#[test]
fn pem_round_trip_keeps_kid() {
    let k = Key::generate();
    let again = Key::from_pem(&k.to_pem(), "mem").unwrap();
    assert_eq!(k.kid(), again.kid());
    assert!(
        Key::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "x"
        )
        .is_err()
    );
}

#[test]
fn rotation_old_key_verifies_new_key_signs() {
    let old = Key::generate();
    let old_pem = old.to_pem();
    let before = set(vec![old]);
    let t_old = before.sign(&claims());
    let new = Key::generate();
    let after = set(vec![new, Key::from_pem(&old_pem, "old").unwrap()]);
    assert!(after.verify(&t_old).is_ok());
    let t_new = after.sign(&claims());
    assert!(before.verify(&t_new).is_err());
    assert_eq!(after.jwks()["keys"].as_array().unwrap().len(), 2);
}

#[test]
fn header_alg_never_picks_the_algorithm() {
    let k = set(vec![Key::generate()]);
    let t = k.sign(&claims());
    let (_, rest) = t.split_once('.').unwrap();
    for alg in ["none", "HS256", "ES256"] {
        let h = B64.encode(format!(
            r#"{{"alg":"{alg}","kid":"{}"}}"#,
            k.signing_key().kid()
        ));
        assert_eq!(
            k.verify(&format!("{h}.{rest}")),
            Err(TokenError::AlgorithmMismatch)
        );
    }
}

#[test]
fn tampering_and_garbage_are_refused() {
    let k = set(vec![Key::generate()]);
    let t = k.sign(&claims());
    let mut c = claims();
    c.sub = "mallory".into();
    let forged_payload = B64.encode(serde_json::to_vec(&c).unwrap());
    let parts: Vec<&str> = t.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert_eq!(k.verify(&forged), Err(TokenError::BadSignature));
    assert!(matches!(k.verify(""), Err(TokenError::Malformed(_))));
    assert!(matches!(k.verify("a.b"), Err(TokenError::Malformed(_))));
    assert!(matches!(k.verify("a.b.c.d"), Err(TokenError::Malformed(_))));
    assert!(matches!(
        k.verify("!!.!!.!!"),
        Err(TokenError::Malformed(_))
    ));
    assert!(matches!(
        k.verify(&"a".repeat(MAX_TOKEN_LEN + 1)),
        Err(TokenError::Malformed(_))
    ));
    let other = set(vec![Key::generate()]);
    assert_eq!(other.verify(&t), Err(TokenError::UnknownKey));
    let wrong_aud = KeySet::new(
        vec![Key::from_pem(&k.signing_key().to_pem(), "m").unwrap()],
        "tokenpolicy",
        "other",
    )
    .unwrap();
    assert_eq!(wrong_aud.verify(&t), Err(TokenError::WrongAudience));
}

/// A compact JWS from raw header and payload JSON, signed by `sign`.
fn forge(header: &str, payload: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let signed = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let sig = sign(signed.as_bytes());
    format!("{signed}.{}", B64.encode(sig))
}

fn payload() -> String {
    serde_json::to_string(&claims()).unwrap()
}

/// HMAC-SHA256 (RFC 2104), to forge HS256 tokens keyed with public material.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

fn es256_set() -> KeySet {
    set(vec![Key::from_pem(&p256_pem(), "test").unwrap()])
}

fn high_s(sig: &p256::ecdsa::Signature) -> bool {
    sig.normalize_s() != *sig
}

#[test]
fn es256_signatures_are_low_s_and_still_deterministic() {
    let ec = es256_set();
    // About half of raw ECDSA signatures have a high S; we sign only low-S
    // ones, and every one of our own tokens verifies.
    for i in 0..64 {
        let mut c = claims();
        c.jti = format!("jti-{i}");
        let t = ec.sign(&c);
        let sig = B64.decode(t.rsplit_once('.').unwrap().1).unwrap();
        let sig = p256::ecdsa::Signature::from_slice(&sig).unwrap();
        assert!(!high_s(&sig), "token {i} was signed with a high S");
        assert_eq!(ec.verify(&t).unwrap(), c);
        assert_eq!(ec.sign(&c), t, "re-signing the same claims differs");
    }
}

#[test]
fn es256_high_s_variant_of_a_valid_signature_is_refused() {
    let ec = es256_set();
    let t = ec.sign(&claims());
    assert!(ec.verify(&t).is_ok());
    let (signed, s) = t.rsplit_once('.').unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&B64.decode(s).unwrap()).unwrap();
    let (r, s) = sig.split_scalars();
    // (r, n - s) verifies under plain ECDSA: the signature is malleable.
    let flipped = p256::ecdsa::Signature::from_scalars(r, -*s.as_ref()).unwrap();
    assert_ne!(flipped, sig);
    let variant = format!("{signed}.{}", B64.encode(flipped.to_bytes()));
    assert_ne!(variant, t);
    assert_eq!(ec.verify(&variant), Err(TokenError::BadSignature));
}

#[test]
fn ed25519_s_plus_l_is_refused() {
    let k = set(vec![Key::generate()]);
    let t = k.sign(&claims());
    let (signed, s) = t.rsplit_once('.').unwrap();
    let mut sig = B64.decode(s).unwrap();
    // The group order L, little-endian.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for (b, l) in sig[32..].iter_mut().zip(L) {
        let v = *b as u16 + l as u16 + carry;
        *b = v as u8;
        carry = v >> 8;
    }
    assert_eq!(carry, 0);
    let variant = format!("{signed}.{}", B64.encode(&sig));
    assert_eq!(k.verify(&variant), Err(TokenError::BadSignature));
}

#[test]
fn none_and_hmac_with_public_key_material_are_refused() {
    let k = set(vec![Key::generate()]);
    let kid = k.signing_key().kid().to_string();
    let jwk = &k.jwks()["keys"][0];
    let x = jwk["x"].as_str().unwrap().to_string();
    let raw = B64.decode(&x).unwrap();
    for alg in ["none", "None", "NONE"] {
        let t = forge(
            &format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#),
            &payload(),
            |_| vec![],
        );
        assert_eq!(k.verify(&t), Err(TokenError::AlgorithmMismatch), "{alg}");
    }
    for secret in [
        raw.clone(),
        x.clone().into_bytes(),
        jwk.to_string().into_bytes(),
    ] {
        for (header, want) in [
            (
                format!(r#"{{"alg":"HS256","kid":"{kid}"}}"#),
                TokenError::AlgorithmMismatch,
            ),
            (r#"{"alg":"HS256"}"#.to_string(), TokenError::UnknownKey),
        ] {
            let t = forge(&header, &payload(), |m| hmac_sha256(&secret, m));
            assert_eq!(k.verify(&t), Err(want), "{header}");
        }
    }
    // An Ed25519 token relabelled ES256, and an ES256 one relabelled EdDSA.
    let ec = es256_set();
    let ec_kid = ec.signing_key().kid().to_string();
    let t = forge(
        &format!(r#"{{"alg":"EdDSA","kid":"{ec_kid}"}}"#),
        &payload(),
        |m| ec.signing_key().sign(m),
    );
    assert_eq!(ec.verify(&t), Err(TokenError::AlgorithmMismatch));
}

#[test]
fn keys_embedded_in_the_header_are_never_used() {
    let k = set(vec![Key::generate()]);
    let kid = k.signing_key().kid().to_string();
    let attacker = set(vec![Key::generate()]);
    let ajwk = attacker.jwks()["keys"][0].to_string();
    let akid = attacker.signing_key().kid().to_string();
    let by_attacker = |m: &[u8]| attacker.signing_key().sign(m);
    for (header, want) in [
        (
            format!(r#"{{"alg":"EdDSA","kid":"{kid}","jwk":{ajwk}}}"#),
            TokenError::BadSignature,
        ),
        (
            format!(r#"{{"alg":"EdDSA","jwk":{ajwk}}}"#),
            TokenError::UnknownKey,
        ),
        (
            format!(r#"{{"alg":"EdDSA","kid":"{akid}","jwk":{ajwk}}}"#),
            TokenError::UnknownKey,
        ),
        (
            format!(r#"{{"alg":"EdDSA","kid":"{kid}","jku":"http://127.0.0.1:1/jwks.json"}}"#),
            TokenError::BadSignature,
        ),
        (
            format!(r#"{{"alg":"EdDSA","kid":"{kid}","x5c":["MIIBszCCAVmgAwIBAgIU"]}}"#),
            TokenError::BadSignature,
        ),
    ] {
        let t = forge(&header, &payload(), by_attacker);
        assert_eq!(k.verify(&t), Err(want), "{header}");
    }
}

#[test]
fn kid_tricks_find_no_key() {
    let a = Key::generate();
    let a_pem = a.to_pem();
    let two = set(vec![a, Key::generate()]);
    let one = set(vec![Key::from_pem(&a_pem, "a").unwrap()]);
    let sign = |m: &[u8]| two.signing_key().sign(m);
    let kid = two.signing_key().kid().to_string();
    for header in [
        r#"{"alg":"EdDSA","kid":"../../../../dev/null"}"#.to_string(),
        r#"{"alg":"EdDSA","kid":""}"#.to_string(),
        format!(r#"{{"alg":"EdDSA","kid":"{kid} "}}"#),
        format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, kid.to_uppercase()),
        // Without a kid, a ring of two keys does not guess.
        r#"{"alg":"EdDSA"}"#.to_string(),
    ] {
        let t = forge(&header, &payload(), sign);
        assert_eq!(two.verify(&t), Err(TokenError::UnknownKey), "{header}");
    }
    // A kid that is not a string is a malformed header, not a lookup.
    for header in [
        r#"{"alg":"EdDSA","kid":0}"#,
        r#"{"alg":"EdDSA","kid":["x"]}"#,
        r#"{"alg":"EdDSA","kid":null,"kid":"x"}"#,
    ] {
        let t = forge(header, &payload(), sign);
        assert!(
            matches!(two.verify(&t), Err(TokenError::Malformed(_))),
            "{header}"
        );
    }
    // Our signer always names its key, so even a lone key does not guess.
    let t = forge(r#"{"alg":"EdDSA","typ":"JWT"}"#, &payload(), |m| {
        one.signing_key().sign(m)
    });
    assert_eq!(one.verify(&t), Err(TokenError::UnknownKey));
    // The control: the same key's own token verifies.
    assert_eq!(one.verify(&one.sign(&claims())).unwrap(), claims());
}

/// Signed with our own key, but with a header our signer never writes:
/// `crit` names extensions the verifier must understand (RFC 7515
/// §4.1.11), `jku`/`x5u` point at keys elsewhere, and a missing or other
/// `typ` is not our token type. Each is refused, not ignored.
#[test]
fn headers_our_signer_never_writes_are_refused() {
    for k in [set(vec![Key::generate()]), es256_set()] {
        let kid = k.signing_key().kid().to_string();
        let alg = k.signing_key().alg().as_str();
        let sign = |m: &[u8]| k.signing_key().sign(m);
        let ours = format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}"}}"#);
        // The control: our own header, forged by hand, verifies.
        assert_eq!(k.verify(&forge(&ours, &payload(), sign)).unwrap(), claims());
        for header in [
            format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}","crit":["exp"],"exp":1}}"#),
            format!(r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}","crit":[]}}"#),
            format!(
                r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}","jku":"https://127.0.0.1:1/jwks.json"}}"#
            ),
            format!(
                r#"{{"alg":"{alg}","typ":"JWT","kid":"{kid}","x5u":"https://127.0.0.1:1/cert.pem"}}"#
            ),
            format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"{alg}","typ":"at+jwt","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"{alg}","typ":"jwt","kid":"{kid}"}}"#),
            format!(r#"{{"typ":"JWT","alg":"{alg}","kid":"{kid}"}}"#),
            format!(r#"{{ "alg":"{alg}","typ":"JWT","kid":"{kid}"}}"#),
        ] {
            let t = forge(&header, &payload(), sign);
            assert_eq!(k.verify(&t), Err(TokenError::ForeignHeader), "{header}");
        }
    }
}

#[test]
fn duplicate_members_are_malformed_not_first_or_last_wins() {
    let k = set(vec![Key::generate()]);
    let kid = k.signing_key().kid().to_string();
    let sign = |m: &[u8]| k.signing_key().sign(m);
    let header = format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{kid}"}}"#);
    // The control: the same header and payload, without duplicates, verify.
    assert!(k.verify(&forge(&header, &payload(), sign)).is_ok());
    let dup_alg = format!(r#"{{"alg":"none","alg":"EdDSA","kid":"{kid}"}}"#);
    assert!(matches!(
        k.verify(&forge(&dup_alg, &payload(), sign)),
        Err(TokenError::Malformed(_))
    ));
    let p = payload();
    for dup in [
        p.replacen(r#""sub":"alice""#, r#""sub":"alice","sub":"admin""#, 1),
        p.replacen(
            r#""exp":1800000060"#,
            r#""exp":1800000060,"exp":9999999999"#,
            1,
        ),
    ] {
        assert_ne!(dup, p);
        assert!(
            matches!(
                k.verify(&forge(&header, &dup, sign)),
                Err(TokenError::Malformed(_))
            ),
            "{dup}"
        );
    }
}

#[test]
fn malformed_times_are_refused() {
    let k = set(vec![Key::generate()]);
    let kid = k.signing_key().kid().to_string();
    let header = format!(r#"{{"alg":"EdDSA","typ":"JWT","kid":"{kid}"}}"#);
    let p = payload();
    let good = r#""exp":1800000060"#;
    assert!(p.contains(good));
    for bad in [
        r#""exp":"1800000060""#,
        r#""exp":1800000060.5"#,
        r#""exp":1.8e9"#,
        r#""exp":null"#,
        r#""exp":99999999999999999999999"#,
        r#""exp":true"#,
    ] {
        let t = forge(&header, &p.replacen(good, bad, 1), |m| {
            k.signing_key().sign(m)
        });
        assert!(
            matches!(k.verify(&t), Err(TokenError::Malformed(_))),
            "{bad}"
        );
    }
    let no_exp = p.replacen(&format!("{good},"), "", 1);
    assert_ne!(no_exp, p);
    let t = forge(&header, &no_exp, |m| k.signing_key().sign(m));
    assert!(matches!(k.verify(&t), Err(TokenError::Malformed(_))));
}

/// The same signature bytes written another way (padding, or a last
/// character that differs only in bits base64 leaves unused) would make a
/// second token string for one token: refused, so that a token string is
/// the token.
#[test]
fn padded_and_non_canonical_base64_are_refused() {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let k = set(vec![Key::generate()]);
    let t = k.sign(&claims());
    assert!(k.verify(&t).is_ok());
    assert!(matches!(
        k.verify(&format!("{t}=")),
        Err(TokenError::Malformed(_))
    ));
    assert!(matches!(
        k.verify(&format!("{t}==")),
        Err(TokenError::Malformed(_))
    ));
    // An Ed25519 signature is 64 bytes: 86 characters, the last of which
    // carries 2 bits and 4 unused ones. Flip the lowest unused one.
    let (signed, sig) = t.rsplit_once('.').unwrap();
    assert_eq!(sig.len(), 86);
    let last = *sig.as_bytes().last().unwrap();
    let i = ALPHABET.iter().position(|&c| c == last).unwrap();
    let twin = format!("{signed}.{}{}", &sig[..85], ALPHABET[i ^ 1] as char);
    assert_ne!(twin, t);
    assert!(matches!(k.verify(&twin), Err(TokenError::Malformed(_))));
}
