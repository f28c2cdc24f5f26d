//! Users: an htpasswd-style file of `name:hash` lines, hashes bcrypt
//! (`$2y$…`, as `htpasswd -B` writes) or argon2id PHC strings (as
//! `tokenpolicy hash-password` prints).

use std::collections::HashMap;

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use crate::service::token::password_version;

pub const MAX_NAME_LEN: usize = 256;
pub const MAX_PASSWORD_LEN: usize = 1_024;

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
            Scheme::Bcrypt => bcrypt::verify(password, &self.hash).unwrap_or(false),
            Scheme::Argon2id => Argon2::default()
                .verify_password(password.as_bytes(), self.hash.as_str())
                .is_ok(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}:{line}: {reason}")]
pub struct UsersError {
    pub origin: String,
    pub line: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: HashMap<String, User>,
    /// A real hash of the most common scheme: unknown names are checked
    /// against it so that they cost what a wrong password costs.
    decoy: Option<User>,
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
            if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_whitespace)
            {
                return Err(err(
                    "user name must be 1-256 characters without spaces".into()
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
        let bcrypt_count = by_name
            .values()
            .filter(|u| u.scheme == Scheme::Bcrypt)
            .count();
        let common = if bcrypt_count * 2 >= by_name.len() {
            Scheme::Bcrypt
        } else {
            Scheme::Argon2id
        };
        let decoy = by_name.values().find(|u| u.scheme == common).cloned();
        Ok(Users { by_name, decoy })
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

    pub fn get(&self, name: &str) -> Option<&User> {
        self.by_name.get(name)
    }

    /// Checks a password. CPU-heavy by design: call it off the async runtime.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<&User> {
        match self.by_name.get(name) {
            Some(user) if user.check(password) => Some(user),
            Some(_) => None,
            None => {
                if let Some(decoy) = &self.decoy {
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
