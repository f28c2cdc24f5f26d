//! Which images a TokenPolicy may run. Creating a TokenPolicy must not be a
//! way to run any image in a namespace: `spec.image` is accepted only when
//! its repository is on the operator's allow-list (`--allowed-images`, the
//! chart's `tokenService.allowedImages`, by default the operator's own image
//! repository), beside the repository of the image the operator runs when a
//! TokenPolicy names none.

/// The operator's allow-list of image repositories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedImages {
    entries: Vec<String>,
}

impl AllowedImages {
    /// The repository of `default_image` (what runs when a TokenPolicy
    /// names no image), and `entries` (each a repository such as
    /// `ghcr.io/tokenpolicy/tokenpolicy`, or a path ending in `/*` for every
    /// repository under it).
    pub fn new(entries: &[String], default_image: &str) -> Self {
        let mut all = vec![repository(default_image).to_string()];
        for e in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if !all.iter().any(|a| a == e) {
                all.push(e.to_string());
            }
        }
        AllowedImages { entries: all }
    }

    /// Whether `image` may run: its repository (the reference without tag
    /// or digest) is an entry, or lies under an entry ending in `/*`.
    /// Compared as written: `nginx` and `docker.io/library/nginx` differ.
    pub fn allows(&self, image: &str) -> bool {
        if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return false;
        }
        let repo = repository(image);
        self.entries.iter().any(|e| match e.strip_suffix("/*") {
            Some(prefix) => repo
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
            None => repo == e,
        })
    }

    /// The entries, for messages.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }
}

/// The repository of an image reference: `registry:5000/a/b:tag@sha256:…`
/// gives `registry:5000/a/b` (a colon before the last `/` is a port).
pub fn repository(image: &str) -> &str {
    let no_digest = image.split_once('@').map_or(image, |(r, _)| r);
    match no_digest.rfind(':') {
        Some(colon) if no_digest.rfind('/').is_none_or(|slash| colon > slash) => {
            &no_digest[..colon]
        }
        _ => no_digest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_drops_tag_and_digest_but_not_the_port() {
        assert_eq!(repository("tokenpolicy:0.1.0"), "tokenpolicy");
        assert_eq!(repository("ghcr.io/a/b"), "ghcr.io/a/b");
        assert_eq!(repository("ghcr.io/a/b:1"), "ghcr.io/a/b");
        assert_eq!(repository("reg:5000/a/b"), "reg:5000/a/b");
        assert_eq!(repository("reg:5000/a/b:2"), "reg:5000/a/b");
        assert_eq!(repository("reg:5000/a/b:2@sha256:0123abcd"), "reg:5000/a/b");
        assert_eq!(repository("ghcr.io/a/b@sha256:0123abcd"), "ghcr.io/a/b");
    }

    #[test]
    fn by_default_only_the_operators_own_repository_runs() {
        let allowed = AllowedImages::new(&[], "ghcr.io/tokenpolicy/tokenpolicy:0.1.0");
        assert_eq!(allowed.entries(), ["ghcr.io/tokenpolicy/tokenpolicy"]);
        assert!(allowed.allows("ghcr.io/tokenpolicy/tokenpolicy:0.2.0"));
        assert!(allowed.allows("ghcr.io/tokenpolicy/tokenpolicy@sha256:00ff"));
        for foreign in [
            "busybox",
            "ghcr.io/tokenpolicy/tokenpolicy-evil:1",
            "ghcr.io/tokenpolicy/tokenpolicy/evil:1",
            "ghcr.io/tokenpolicy:5000/tokenpolicy:1",
            "evil.io/ghcr.io/tokenpolicy/tokenpolicy:1",
            "ghcr.io/tokenpolicy/tokenpolicy :1",
            "",
        ] {
            assert!(!allowed.allows(foreign), "{foreign}");
        }
    }

    #[test]
    fn entries_add_to_the_default_and_a_star_takes_a_path() {
        let allowed = AllowedImages::new(
            &[
                " reg.example/platform/* ".into(),
                "mirror/tp".into(),
                "".into(),
                "ghcr.io/tokenpolicy/tokenpolicy".into(),
            ],
            "ghcr.io/tokenpolicy/tokenpolicy:0.1.0",
        );
        assert_eq!(
            allowed.entries(),
            [
                "ghcr.io/tokenpolicy/tokenpolicy",
                "reg.example/platform/*",
                "mirror/tp"
            ]
        );
        assert!(allowed.allows("ghcr.io/tokenpolicy/tokenpolicy:0.1.0"));
        assert!(allowed.allows("reg.example/platform/tp:1"));
        assert!(allowed.allows("reg.example/platform/team/tp@sha256:aa"));
        assert!(allowed.allows("mirror/tp:9"));
        assert!(!allowed.allows("reg.example/platform:1"));
        assert!(!allowed.allows("reg.example/platformx/tp:1"));
        assert!(!allowed.allows("reg.example/platform/"));
        assert!(!allowed.allows("mirror/tp2:1"));
    }
}
