//! Writes the seed corpus under fuzz/corpus/<target>/:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.
//! The seeds are committed; run this again when a format changes.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tokenpolicy::service::jwt::Claims;
use tokenpolicy_fuzz::{AUDIENCE, ISSUER, ed25519_key, keyset, p256_key};

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    fs::create_dir_all(dir).expect("create the corpus directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");

    // Tokens: valid ones from both keys, then the forgeries the decoder must
    // refuse, so that the fuzzer starts next to each of its checks.
    let dir = root.join("token");
    let claims = Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: "alice".into(),
        sid: "3f1c2a4e-5b6d-4e7f-8a9b-0c1d2e3f4a5b".into(),
        jti: "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d".into(),
        iat: 1_767_225_600,
        exp: 1_767_227_400,
        auth_time: 1_767_225_600,
        pwv: None,
        ..Default::default()
    };
    let ed = keyset(vec![ed25519_key()]);
    let p = keyset(vec![p256_key()]);
    let valid_ed = ed.sign(&claims);
    let valid_p = p.sign(&Claims {
        pwv: Some("q1w2e3r4t5y6".into()),
        ..claims.clone()
    });
    write(&dir, "valid-eddsa", &valid_ed);
    write(&dir, "valid-es256", &valid_p);
    let parts: Vec<&str> = valid_ed.split('.').collect();
    let payload = parts[1];
    let header = |h: &str| b64(h.as_bytes());
    write(
        &dir,
        "alg-none",
        format!("{}.{payload}.", header(r#"{"alg":"none"}"#)),
    );
    write(
        &dir,
        "alg-hs256",
        format!(
            "{}.{payload}.{}",
            header(r#"{"alg":"HS256","typ":"JWT"}"#),
            parts[2]
        ),
    );
    write(
        &dir,
        "alg-swapped",
        format!(
            "{}.{payload}.{}",
            header(&format!(
                r#"{{"alg":"ES256","kid":"{}"}}"#,
                ed.signing_key().kid()
            )),
            parts[2]
        ),
    );
    write(
        &dir,
        "no-kid",
        format!("{}.{payload}.{}", header(r#"{"alg":"EdDSA"}"#), parts[2]),
    );
    write(
        &dir,
        "embedded-jwk",
        format!(
            "{}.{payload}.{}",
            header(r#"{"alg":"EdDSA","jwk":{"kty":"OKP","crv":"Ed25519","x":"AAAA"}}"#),
            parts[2]
        ),
    );
    write(
        &dir,
        "duplicate-keys",
        format!(
            "{}.{payload}.{}",
            header(r#"{"alg":"EdDSA","alg":"none"}"#),
            parts[2]
        ),
    );
    write(&dir, "two-parts", format!("{}.{payload}", parts[0]));
    write(&dir, "four-parts", format!("{valid_ed}.x"));
    write(&dir, "padded", format!("{valid_ed}=="));
    write(&dir, "empty", "");

    // Durations.
    let dir = root.join("duration");
    for (i, s) in [
        "8h",
        "30m",
        "10m",
        "10s",
        "0",
        "0s",
        "7d",
        "365d",
        "1d2h3m4s",
        "1h30m",
        " 5m ",
        "1.5h",
        "10ms",
        "5x",
        "h",
        "d1",
        "1h1d",
        "",
        "18446744073709551615s",
        "213503982334601d",
    ]
    .iter()
    .enumerate()
    {
        write(&dir, &format!("seed-{i:02}"), s);
    }

    // Users files: the example htpasswd, an argon2id line, and the errors.
    let dir = root.join("users");
    let htpasswd = fs::read_to_string(repo.join("examples/users.htpasswd"))
        .expect("read examples/users.htpasswd");
    write(&dir, "htpasswd", &htpasswd);
    let argon =
        tokenpolicy::service::users::hash_password("correct horse").expect("hash a fixed password");
    write(&dir, "argon2id", format!("# comment\n\ncarol:{argon}\n"));
    write(&dir, "duplicate", format!("carol:{argon}\ncarol:{argon}\n"));
    write(&dir, "no-colon", "carol\n");
    write(&dir, "md5", "carol:$apr1$abc$0123456789abcdef\n");

    // Policies: every TokenPolicy among the examples, and the broken ones the
    // tests already keep.
    let dir = root.join("policy");
    for folder in ["examples", "tests/invalid"] {
        let Ok(entries) = fs::read_dir(repo.join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            if path.extension().is_some_and(|e| e == "yaml") && text.contains("kind: TokenPolicy") {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                write(
                    &dir,
                    &format!("{folder}-{}", name.unwrap_or_default()).replace('/', "-"),
                    text,
                );
            }
        }
    }
}
