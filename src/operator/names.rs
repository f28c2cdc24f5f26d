//! The names the operator writes: its field manager, the annotations and
//! labels it reads and sets, and the names of the objects it owns for a
//! TokenPolicy. A leaf: it depends on the TokenPolicy type only.
//!
//! Owned objects never carry the policy's bare name. A Service, Role or
//! ServiceAccount that a person made under that name is not ours to
//! rewrite, so every owned object is called `tokenpolicy-<policy>` (the
//! signing keys `tokenpolicy-<policy>-signing-keys`), which does not collide
//! by accident. A deliberate collision is caught by `ownership.rs`.

use std::collections::BTreeMap;

use kube::ResourceExt;
use sha2::{Digest, Sha256};

use crate::crd::TokenPolicy;

/// The one field manager for everything the operator applies.
pub const MANAGER: &str = "tokenpolicy-operator";
/// The token service's HTTP port.
pub const PORT: i32 = 8080;
/// The token service's port for the kubelet probes and /metrics.
pub const METRICS_PORT: i32 = 9090;
/// On a TokenPolicy: change its value to rotate the signing key.
pub const ROTATE_ANNOTATION: &str = "auth.tokenpolicy.io/rotate-signing-key";
/// On the signing-key Secret: the rotate value it was last made for.
pub const ROTATED_FOR_ANNOTATION: &str = "auth.tokenpolicy.io/rotated-for";
/// On the signing-key Secret: when the signing key was promoted (Unix seconds).
pub const PROMOTED_AT_ANNOTATION: &str = "auth.tokenpolicy.io/promoted-at";
/// On the pod template: the signing keys' kids, so a rotation rolls the pods.
pub const KEYS_ANNOTATION: &str = "auth.tokenpolicy.io/signing-keys";

/// What every owned name starts with.
const PREFIX: &str = "tokenpolicy-";
/// A Service's name is a DNS-1035 label: at most 63 characters.
const MAX_LABEL: usize = 63;

/// The labels of every owned object.
pub fn labels(tp: &TokenPolicy) -> BTreeMap<String, String> {
    let mut l = selector(tp);
    l.insert("app.kubernetes.io/managed-by".into(), MANAGER.into());
    l
}

/// The labels that select the token service's pods.
pub fn selector(tp: &TokenPolicy) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "tokenpolicy".into()),
        ("app.kubernetes.io/instance".into(), tp.name_any()),
        ("app.kubernetes.io/component".into(), "token-service".into()),
    ])
}

/// The name of the Deployment, Service, ServiceAccount, Role, RoleBinding,
/// PodDisruptionBudget and NetworkPolicy made for `tp`.
pub fn object_name(tp: &TokenPolicy) -> String {
    derived(&tp.name_any())
}

/// The Secret that holds `tp`'s signing keys.
pub fn signing_secret_name(tp: &TokenPolicy) -> String {
    format!("{}-signing-keys", object_name(tp))
}

/// The in-cluster forward-auth URL, for an ingress `auth-url` annotation.
pub fn endpoint(tp: &TokenPolicy) -> String {
    format!(
        "http://{}.{}.svc.cluster.local:{PORT}/v1/verify",
        object_name(tp),
        tp.namespace().unwrap_or_else(|| "default".into())
    )
}

/// `tokenpolicy-<policy>`, made a valid DNS-1035 label: a policy name may be
/// a 253-character DNS subdomain with dots. A name that had to be changed
/// ends in 8 hex digits of its SHA-256, so that two policies whose names
/// shorten or map to the same label still get different names.
fn derived(policy: &str) -> String {
    let plain = format!("{PREFIX}{policy}");
    let valid = plain.len() <= MAX_LABEL
        && plain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !plain.ends_with('-');
    if valid {
        return plain;
    }
    let digest = Sha256::digest(policy.as_bytes());
    let hash: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    let mut head: String = plain
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            _ => '-',
        })
        .take(MAX_LABEL - hash.len() - 1)
        .collect();
    while head.ends_with('-') {
        head.pop();
    }
    format!("{head}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_dns_label(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_LABEL
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && !s.ends_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    #[test]
    fn owned_names_never_are_the_policy_name() {
        assert_eq!(derived("demo"), "tokenpolicy-demo");
        assert_eq!(derived("a-1"), "tokenpolicy-a-1");
        let mut tp = TokenPolicy::new("demo", Default::default());
        tp.metadata.namespace = Some("team".into());
        assert_eq!(signing_secret_name(&tp), "tokenpolicy-demo-signing-keys");
        assert_eq!(
            endpoint(&tp),
            "http://tokenpolicy-demo.team.svc.cluster.local:8080/v1/verify"
        );
    }

    #[test]
    fn long_or_dotted_names_become_distinct_dns_labels() {
        let long = "x".repeat(253);
        let longer = format!("{}y", "x".repeat(252));
        let names = [
            derived(&long),
            derived(&longer),
            derived("a.b"),
            derived("a-b"),
            derived("9lives"),
            derived(&"a".repeat(51)),
            derived(&"a".repeat(52)),
        ];
        for n in &names {
            assert!(is_dns_label(n), "{n}");
            assert!(n.starts_with(PREFIX), "{n}");
        }
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        // 12 + 51 = 63: still the plain name; one more and it is hashed.
        assert_eq!(names[5], format!("tokenpolicy-{}", "a".repeat(51)));
        assert_ne!(names[6], format!("tokenpolicy-{}", "a".repeat(52)));
    }
}
