//! The signing-key ring as files: what the operator writes into the
//! signing-key Secret and the token service reads from the directory it is
//! mounted as (`serve --signing-keys-dir`). A leaf shared by both halves;
//! when each step of a rotation happens is decided in
//! `operator/rotation.rs`.

use std::path::{Path, PathBuf};

/// The key that signs.
pub const SIGNING: &str = "signing.pem";
/// During a rotation: the new key, verify-only until every replica has it.
pub const NEXT: &str = "next.pem";
/// After a rotation: the old key, verify-only until its tokens are dead.
pub const PREVIOUS: &str = "previous.pem";

/// The ring as the Secret holds it (PEM private keys).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyRing {
    pub signing: String,
    pub next: Option<String>,
    pub previous: Option<String>,
    /// The rotate annotation value last acted on.
    pub rotated_for: Option<String>,
    /// When the signing key was promoted (Unix seconds).
    pub promoted_at: Option<i64>,
}

/// The ring's keys in the order `serve` uses them: the first signs.
pub fn in_order(ring: &KeyRing) -> Vec<(&'static str, &str)> {
    let mut v = vec![(SIGNING, ring.signing.as_str())];
    if let Some(n) = &ring.next {
        v.push((NEXT, n.as_str()));
    }
    if let Some(p) = &ring.previous {
        v.push((PREVIOUS, p.as_str()));
    }
    v
}

/// The key files of a ring mounted at `dir`, first signs: `signing.pem`
/// (which must be there), then `next.pem` and `previous.pem` when present.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![dir.join(SIGNING)];
    files.extend(
        [NEXT, PREVIOUS]
            .into_iter()
            .map(|f| dir.join(f))
            .filter(|p| p.exists()),
    );
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mounted_ring_is_read_signing_key_first() {
        let dir = std::env::temp_dir().join(format!("keyring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [SIGNING, NEXT, PREVIOUS] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        // Without signing.pem it is still named: reading it then fails loudly.
        assert_eq!(files(&dir), [dir.join(SIGNING)]);
        std::fs::write(dir.join(PREVIOUS), "p").unwrap();
        assert_eq!(files(&dir), [dir.join(SIGNING), dir.join(PREVIOUS)]);
        std::fs::write(dir.join(NEXT), "n").unwrap();
        assert_eq!(
            files(&dir),
            [dir.join(SIGNING), dir.join(NEXT), dir.join(PREVIOUS)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_ring_in_order_skips_what_it_lacks() {
        let ring = KeyRing {
            signing: "S".into(),
            previous: Some("P".into()),
            ..Default::default()
        };
        assert_eq!(in_order(&ring), [(SIGNING, "S"), (PREVIOUS, "P")]);
    }
}
