//! Each ID token rule, with a token that breaks only that rule.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use serde_json::json;

const NOW: i64 = 1_800_000_000;
const ISS: &str = "https://idp.example.com/realms/r";
const CLIENT: &str = "tokenpolicy";
const NONCE: &str = "n-0S6_WzA2Mj";
const RSA_KEY: &[u8] = include_bytes!("testdata/rsa-test-key.der");

fn expect() -> Expect<'static> {
    Expect {
        issuer: ISS,
        client_id: CLIENT,
        nonce: NONCE,
        now: NOW,
        leeway: 60,
        max_age: 600,
    }
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": CLIENT, "sub": "u1", "exp": NOW + 300, "iat": NOW, "nonce": NONCE})
}

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl Signer {
    fn rsa() -> Signer {
        Signer::Rsa(RsaKeyPair::from_der(RSA_KEY).unwrap())
    }
    fn ec() -> Signer {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pk8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Signer::Ec(EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).unwrap())
    }
    fn ed() -> Signer {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Signer::Ed(Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap())
    }
    fn alg(&self) -> &'static str {
        match self {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
            Signer::Ed(_) => "EdDSA",
        }
    }
    fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Rsa(k) => {
                let c: RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "use": "sig",
                    "n": B64.encode(&c.n), "e": B64.encode(&c.e)})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": kid,
                    "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])})
            }
            Signer::Ed(k) => json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                "x": B64.encode(k.public_key().as_ref())}),
        }
    }
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .unwrap();
                sig
            }
            Signer::Ec(k) => k.sign(&rng, message).unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.sign(message).as_ref().to_vec(),
        }
    }
    fn token(&self, header: Value, claims: &Value) -> String {
        let signed = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(sig))
    }
    fn good(&self, claims: &Value) -> String {
        self.token(json!({"alg": self.alg(), "kid": "k1"}), claims)
    }
}

fn keys(s: &Signer) -> Vec<Jwk> {
    parse_jwks(json!({"keys": [s.jwk("k1")]}).to_string().as_bytes()).unwrap()
}

fn check(s: &Signer, token: &str) -> Result<(), IdTokenError> {
    validate(token, &keys(s), &expect()).map(|_| ())
}

fn with(change: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Value {
    let mut c = claims();
    change(c.as_object_mut().unwrap());
    c
}

#[test]
fn good_tokens_of_each_algorithm_pass() {
    for s in [Signer::rsa(), Signer::ec(), Signer::ed()] {
        let got = validate(&s.good(&claims()), &keys(&s), &expect()).unwrap();
        assert_eq!(got["sub"], "u1", "{}", s.alg());
    }
}

#[test]
fn iss_must_be_the_issuer_exactly() {
    let s = Signer::ec();
    for iss in [
        json!("https://evil.example.com"),
        json!(format!("{ISS}/")),
        json!(null),
    ] {
        let c = with(|c| {
            c.insert("iss".into(), iss);
        });
        assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Issuer));
    }
}

#[test]
fn aud_must_hold_the_client_and_azp_name_it() {
    let s = Signer::ec();
    let c = with(|c| {
        c.insert("aud".into(), json!("other"));
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Audience));
    let c = with(|c| {
        c.remove("aud");
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Audience));
    // Several audiences: azp must be there and be ours.
    let c = with(|c| {
        c.insert("aud".into(), json!([CLIENT, "other"]));
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Azp));
    let c = with(|c| {
        c.insert("aud".into(), json!([CLIENT, "other"]));
        c.insert("azp".into(), json!("other"));
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Azp));
    let c = with(|c| {
        c.insert("aud".into(), json!([CLIENT, "other"]));
        c.insert("azp".into(), json!(CLIENT));
    });
    assert_eq!(check(&s, &s.good(&c)), Ok(()));
    let c = with(|c| {
        c.insert("aud".into(), json!([CLIENT]));
    });
    assert_eq!(check(&s, &s.good(&c)), Ok(()));
}

#[test]
fn exp_is_checked_with_the_leeway() {
    let s = Signer::ed();
    let at = |exp: i64| {
        with(|c| {
            c.insert("exp".into(), json!(exp));
        })
    };
    assert_eq!(
        check(&s, &s.good(&at(NOW - 61))),
        Err(IdTokenError::Expired)
    );
    assert_eq!(
        check(&s, &s.good(&at(NOW - 60))),
        Err(IdTokenError::Expired)
    );
    assert_eq!(check(&s, &s.good(&at(NOW - 59))), Ok(()));
    let c = with(|c| {
        c.remove("exp");
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Expired));
}

#[test]
fn iat_is_within_the_leeway_and_recent() {
    let s = Signer::ed();
    let at = |iat: i64| {
        with(|c| {
            c.insert("iat".into(), json!(iat));
        })
    };
    assert_eq!(
        check(&s, &s.good(&at(NOW + 61))),
        Err(IdTokenError::IssuedAt)
    );
    assert_eq!(check(&s, &s.good(&at(NOW + 60))), Ok(()));
    assert_eq!(
        check(&s, &s.good(&at(NOW - 661))),
        Err(IdTokenError::IssuedAt)
    );
    assert_eq!(check(&s, &s.good(&at(NOW - 600))), Ok(()));
    let c = with(|c| {
        c.remove("iat");
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::IssuedAt));
}

#[test]
fn nonce_must_be_the_flows() {
    let s = Signer::rsa();
    let c = with(|c| {
        c.insert("nonce".into(), json!("other"));
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Nonce));
    let c = with(|c| {
        c.remove("nonce");
    });
    assert_eq!(check(&s, &s.good(&c)), Err(IdTokenError::Nonce));
}

#[test]
fn alg_none_and_hmac_are_never_accepted() {
    let s = Signer::rsa();
    let body = B64.encode(claims().to_string());
    for alg in ["none", "None", "HS256", "HS384", "HS512", "RS384", "PS256"] {
        let header = B64.encode(json!({"alg": alg, "kid": "k1"}).to_string());
        let unsigned = format!("{header}.{body}.");
        assert_eq!(
            check(&s, &unsigned),
            Err(IdTokenError::Alg(alg.into())),
            "{alg}"
        );
    }
    // HS256 keyed with the provider's public key (the key-confusion attack).
    let header = B64.encode(json!({"alg": "HS256", "kid": "k1"}).to_string());
    let signed = format!("{header}.{body}");
    let Signer::Rsa(k) = &s else { unreachable!() };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.public().as_ref());
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    let forged = format!("{signed}.{}", B64.encode(tag.as_ref()));
    assert_eq!(check(&s, &forged), Err(IdTokenError::Alg("HS256".into())));
    // An oct key in the JWKS is never a key we verify with.
    let jwks = json!({"keys": [{"kty": "oct", "kid": "k1", "k": B64.encode(b"secret")}]});
    assert!(parse_jwks(jwks.to_string().as_bytes()).unwrap().is_empty());
}

#[test]
fn the_algorithm_comes_from_the_key_not_the_header() {
    // An EC key with a token whose header says RS256 (and an RSA signature).
    let ec = Signer::ec();
    let rsa = Signer::rsa();
    let token = rsa.token(json!({"alg": "RS256", "kid": "k1"}), &claims());
    assert_eq!(
        validate(&token, &keys(&ec), &expect()).map(|_| ()),
        Err(IdTokenError::Alg("RS256".into()))
    );
    // A key that names another algorithm is skipped.
    let mut jwk = rsa.jwk("k1");
    jwk["alg"] = json!("RS512");
    assert!(
        parse_jwks(json!({"keys": [jwk]}).to_string().as_bytes())
            .unwrap()
            .is_empty()
    );
    // Encryption keys are skipped.
    let mut jwk = ec.jwk("k1");
    jwk["use"] = json!("enc");
    assert!(
        parse_jwks(json!({"keys": [jwk]}).to_string().as_bytes())
            .unwrap()
            .is_empty()
    );
}

#[test]
fn the_signature_is_checked() {
    for s in [Signer::rsa(), Signer::ec(), Signer::ed()] {
        let good = s.good(&claims());
        let (signed, _) = good.rsplit_once('.').unwrap();
        // Claims swapped after signing.
        let other = B64.encode(
            with(|c| {
                c.insert("sub".into(), json!("admin"));
            })
            .to_string(),
        );
        let (header, _) = signed.split_once('.').unwrap();
        let sig = good.rsplit_once('.').unwrap().1;
        let swapped = format!("{header}.{other}.{sig}");
        assert_eq!(
            check(&s, &swapped),
            Err(IdTokenError::Signature),
            "{}",
            s.alg()
        );
        // Signed by another key of the same kind.
        let stranger = match s {
            Signer::Rsa(_) => continue,
            Signer::Ec(_) => Signer::ec(),
            Signer::Ed(_) => Signer::ed(),
        };
        assert_eq!(
            check(&s, &stranger.good(&claims())),
            Err(IdTokenError::Signature)
        );
    }
}

#[test]
fn an_unknown_kid_is_told_apart() {
    let s = Signer::ec();
    let token = s.token(json!({"alg": "ES256", "kid": "k2"}), &claims());
    assert_eq!(kid_of(&token).as_deref(), Some("k2"));
    assert_eq!(check(&s, &token), Err(IdTokenError::UnknownKey));
    // No kid: the only key.
    let token = s.token(json!({"alg": "ES256"}), &claims());
    assert_eq!(check(&s, &token), Ok(()));
}

#[test]
fn malformed_tokens_are_refused_without_panic() {
    let s = Signer::ed();
    for t in ["", ".", "..", "a.b.c", "a.b.c.d", "\u{e9}.\u{e9}.\u{e9}"] {
        assert!(check(&s, t).is_err(), "{t:?}");
    }
    assert_eq!(
        check(&s, &"a".repeat(MAX_ID_TOKEN_LEN + 1)),
        Err(IdTokenError::Malformed)
    );
}
