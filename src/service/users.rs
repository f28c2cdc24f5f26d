//! Users: an htpasswd-style file of `name:hash` lines, hashes bcrypt
//! (`$2y$…`, as `htpasswd -B` writes) or argon2id PHC strings (as
//! `tokenpolicy hash-password` prints).

use std::collections::HashMap;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, PasswordHasher, Version};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::service::jwt::password_version;

pub const MAX_NAME_LEN: usize = 256;
pub const MAX_PASSWORD_LEN: usize = 1_024;
/// bcrypt reads only the first 72 bytes of a password; a longer one would
/// match on its prefix alone, so it is never accepted for a bcrypt user.
pub const BCRYPT_MAX_PASSWORD_LEN: usize = 72;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scheme {
    Bcrypt,
    Argon2id,
}

#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    hash: String,
    scheme: Scheme,
    /// Fingerprint of the hash, carried in tokens as `pwv`.
    pub password_version: String,
}

impl User {
    fn check(&self, password: &str) -> bool {
        match self.scheme {
            Scheme::Bcrypt if password.len() > BCRYPT_MAX_PASSWORD_LEN => {
                // Refused, but only after the same work as any other
                // check, so the answer's timing says nothing about the user.
                let _ = bcrypt::verify(&password.as_bytes()[..BCRYPT_MAX_PASSWORD_LEN], &self.hash);
                false
            }
            Scheme::Bcrypt => bcrypt::verify(password, &self.hash).unwrap_or(false),
            Scheme::Argon2id => argon2_verify(password.as_bytes(), &self.hash),
        }
    }
}

thread_local! {
    /// This thread's argon2 working memory, kept between checks.
    static ARGON2_MEMORY: std::cell::RefCell<Vec<Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Checks a password against an argon2id PHC string, in working memory that
/// the calling thread keeps for its next check. Allocating the memory cost
/// (19 MiB with the defaults) afresh for every check fragments glibc's
/// heaps: 200 racing logins on two threads grew the process to ~330 MiB;
/// kept per thread, memory stays at threads x the largest memory cost.
fn argon2_verify(password: &[u8], phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&hash.salt, &hash.hash) else {
        return false;
    };
    let Ok(params) = Params::try_from(&hash) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(hash.algorithm.as_str()) else {
        return false;
    };
    let Ok(version) = hash
        .version
        .map_or(Ok(Version::default()), Version::try_from)
    else {
        return false;
    };
    let blocks = params.block_count();
    let ctx = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    let hashed = ARGON2_MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, Block::default());
        }
        ctx.hash_password_into_with_memory(password, salt.as_ref(), &mut out, &mut memory[..blocks])
    });
    hashed.is_ok() && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}: {reason}")]
pub struct UsersError {
    pub origin: String,
    pub line: usize,
    pub reason: String,
}

/// How an unknown name is made to cost what a known one costs.
///
/// The users file may mix hash kinds and costs (bcrypt at several costs,
/// argon2id at several parameter sets), and each known name always costs
/// what its own hash costs. A single decoy would give unknown names one
/// cost of their own, and any user of another kind would stand out. So an
/// unknown name is checked against the hash of a real user, picked by a
/// keyed hash of the name: the same user every time for the same name (a
/// repeated probe sees a stable cost, as for a known name), and over all
/// names each user equally often, so unknown names take each cost present
/// in the file as often as known names do. The key is a digest of the
/// file's hashes (random salts), so an outsider cannot tell which user a
/// name maps to. Padding every login to a fixed duration was not chosen: it
/// hides nothing once the machine is loaded and checks queue up, because
/// the real work still differs. (When the users file changes, an unknown
/// name may map to another user; known names change cost only with their
/// own hash.)
#[derive(Debug, Clone, Default)]
struct Decoys {
    key: [u8; 32],
    /// All user names, sorted: the index a name's keyed hash picks.
    names: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
    decoys: Decoys,
}

fn scheme_of(hash: &str) -> Result<Scheme, String> {
    if ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p)) {
        // Validates cost and length without a password.
        let cost = hash
            .get(4..6)
            .and_then(|c| c.parse::<u32>().ok())
            .filter(|c| (4..=31).contains(c));
        if cost.is_none() || hash.len() != 60 {
            return Err("malformed bcrypt hash".into());
        }
        return Ok(Scheme::Bcrypt);
    }
    if hash.starts_with("$argon2id$") {
        PasswordHash::new(hash).map_err(|e| format!("malformed argon2id hash: {e}"))?;
        return Ok(Scheme::Argon2id);
    }
    Err(
        "unsupported hash: use bcrypt ($2y$, htpasswd -B) or argon2id (tokenpolicy hash-password)"
            .into(),
    )
}

impl Users {
    pub fn parse(text: &str, origin: &str) -> Result<Users, UsersError> {
        let mut by_name = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| UsersError {
                origin: origin.to_string(),
                line: i + 1,
                reason,
            };
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected name:hash".into()))?;
            // The name travels in identity headers and log lines: no space,
            // and no control character (NUL, 0x01, DEL, U+0085), which no
            // header value may carry.
            if name.is_empty()
                || name.len() > MAX_NAME_LEN
                || name.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(err(
                    "user name must be 1-256 characters without spaces or control characters"
                        .into(),
                ));
            }
            let scheme = scheme_of(hash).map_err(err)?;
            let user = User {
                name: name.to_string(),
                hash: hash.to_string(),
                scheme,
                password_version: password_version(hash),
            };
            if by_name.insert(name.to_string(), user).is_some() {
                return Err(err(format!("user {name:?} appears twice")));
            }
        }
        let mut names: Vec<String> = by_name.keys().cloned().collect();
        names.sort();
        let mut digest = Sha256::new();
        digest.update(b"tokenpolicy decoy key\n");
        for n in &names {
            digest.update(by_name[n].hash.as_bytes());
            digest.update(b"\n");
        }
        let decoys = Decoys {
            key: digest.finalize().into(),
            names,
        };
        Ok(Users { by_name, decoys })
    }

    /// The same users with `from` renamed to `to`, past the file's checks:
    /// for tests of what a name the file refuses would do downstream.
    #[cfg(test)]
    pub(crate) fn renamed_unchecked(mut self, from: &str, to: &str) -> Users {
        if let Some(mut u) = self.by_name.remove(from) {
            u.name = to.to_string();
            self.by_name.insert(to.to_string(), u);
        }
        self
    }

    /// The known user whose hash an unknown `name` is checked against.
    fn decoy_for(&self, name: &str) -> Option<&User> {
        let n = self.decoys.names.len();
        if n == 0 {
            return None;
        }
        let mut h = Sha256::new();
        h.update(self.decoys.key);
        h.update(name.as_bytes());
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        // u64 % n: the bias for any realistic n is below 2^-40.
        let i = (u64::from_le_bytes(first) % n as u64) as usize;
        self.by_name.get(&self.decoys.names[i])
    }

    pub fn load(path: &std::path::Path) -> Result<Users, UsersError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| UsersError {
            origin: origin.clone(),
            line: 0,
            reason: e.to_string(),
        })?;
        Users::parse(&text, &origin)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Every user, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &User> {
        self.by_name.values()
    }

    pub fn get(&self, name: &str) -> Option<&User> {
        self.by_name.get(name)
    }

    /// Checks a password. CPU-heavy by design: call it off the async runtime.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<&User> {
        match self.by_name.get(name) {
            Some(user) if user.check(password) => Some(user),
            Some(_) => None,
            None => {
                if let Some(decoy) = self.decoy_for(name) {
                    let _ = decoy.check(password);
                }
                None
            }
        }
    }
}

/// An argon2id PHC string for the users file.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    // `htpasswd -nbB alice wonderland` (cost 5 to keep the test quick).
    fn bcrypt_line(name: &str, pw: &str) -> String {
        let h = bcrypt::hash(pw, 5).unwrap().replacen("$2b$", "$2y$", 1);
        format!("{name}:{h}")
    }

    #[test]
    fn bcrypt_and_argon2id_users_log_in() {
        let text = format!(
            "# demo\n{}\n\nbob:{}\n",
            bcrypt_line("alice", "wonderland"),
            hash_password("builder").unwrap()
        );
        let users = Users::parse(&text, "users").unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.authenticate("alice", "wonderland").is_some());
        assert!(users.authenticate("alice", "wrong").is_none());
        assert!(users.authenticate("bob", "builder").is_some());
        assert!(users.authenticate("bob", "wonderland").is_none());
        assert!(users.authenticate("carol", "wonderland").is_none());
    }

    #[test]
    fn bad_lines_name_the_line() {
        let e = Users::parse("alice\n", "f").unwrap_err();
        assert_eq!(
            (e.line, e.to_string().as_str()),
            (1, "f:1: expected name:hash")
        );
        let e = Users::parse("\n# c\nbob:plaintext\n", "f").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("unsupported hash"));
        let e = Users::parse("bob:$2y$99$abc\n", "f").unwrap_err();
        assert!(e.reason.contains("malformed bcrypt"));
        let e = Users::parse("bob:$argon2id$garbage\n", "f").unwrap_err();
        assert!(e.reason.contains("malformed argon2id"));
        let dup = format!("{}\n{}\n", bcrypt_line("a", "x"), bcrypt_line("a", "y"));
        assert!(
            Users::parse(&dup, "f")
                .unwrap_err()
                .reason
                .contains("twice")
        );
    }

    /// A name that no header can carry would make verify answer without
    /// the identity headers; a name with ESC or U+2028 would forge log lines.
    #[test]
    fn names_with_control_characters_are_refused() {
        for name in [
            "ali\u{0}ce",
            "\u{1}alice",
            "alice\u{7f}",
            "ali\u{1b}[31mce",
            "ali\u{85}ce",
            "ali\u{2028}ce",
            "ali\rce",
        ] {
            let e = Users::parse(&bcrypt_line(name, "x"), "f").unwrap_err();
            assert!(e.reason.contains("control characters"), "{name:?}: {e}");
        }
        // The control: names beyond ASCII, and punctuation, are fine.
        let ok = format!(
            "{}\n{}\n",
            bcrypt_line("zoë", "x"),
            bcrypt_line("a.b@c-d_e", "y")
        );
        assert_eq!(Users::parse(&ok, "f").unwrap().len(), 2);
    }

    #[test]
    fn bcrypt_never_accepts_a_password_past_72_bytes() {
        let long = "p".repeat(72);
        let users = Users::parse(&bcrypt_line("alice", &long), "f").unwrap();
        assert!(users.authenticate("alice", &long).is_some());
        // The same 72 bytes and more: bcrypt alone would accept it.
        assert!(users.authenticate("alice", &format!("{long}x")).is_none());
        assert!(
            users
                .authenticate("alice", &format!("{long}{long}"))
                .is_none()
        );
        // argon2id reads every byte: long passwords are fine there.
        let a = format!("bob:{}\n", hash_password(&format!("{long}x")).unwrap());
        let users = Users::parse(&a, "f").unwrap();
        assert!(users.authenticate("bob", &format!("{long}x")).is_some());
        assert!(users.authenticate("bob", &long).is_none());
    }

    #[test]
    fn unknown_names_map_to_every_known_user_stably() {
        let text = format!(
            "{}\n{}\n{}\n",
            bcrypt_line("alice", "a"),
            bcrypt_line("carol", "c"),
            format_args!("bob:{}", hash_password("b").unwrap())
        );
        let users = Users::parse(&text, "f").unwrap();
        let mut seen = std::collections::HashMap::new();
        for i in 0..300 {
            let name = format!("nobody-{i}");
            let d = users.decoy_for(&name).unwrap().name.clone();
            // The same name always maps to the same user.
            assert_eq!(users.decoy_for(&name).unwrap().name, d);
            *seen.entry(d).or_insert(0) += 1;
        }
        // Each of the three users is picked, roughly a third of the time each.
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|&c| (60..=140).contains(&c)), "{seen:?}");
        // Another file (other salts) maps names differently.
        let other = Users::parse(&text.replace("alice:", "zed:"), "f").unwrap();
        let moved = (0..50)
            .filter(|i| {
                let n = format!("nobody-{i}");
                users.decoy_for(&n).unwrap().name != other.decoy_for(&n).unwrap().name
            })
            .count();
        assert!(moved > 0);
        assert!(Users::default().decoy_for("x").is_none());
    }

    #[test]
    fn password_version_changes_with_the_password() {
        let a = Users::parse(&bcrypt_line("alice", "one"), "f").unwrap();
        let b = Users::parse(&bcrypt_line("alice", "two"), "f").unwrap();
        assert_ne!(
            a.get("alice").unwrap().password_version,
            b.get("alice").unwrap().password_version
        );
    }
}
