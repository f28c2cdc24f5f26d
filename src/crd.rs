//! The `TokenPolicy` custom resource: the same schema for the cluster object
//! and for `serve --policy FILE`. `tokenpolicy crd` prints it; CEL rules in
//! it make the API server refuse invalid policies.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// CEL: the whole seconds a policy duration string stands for. Kubernetes'
/// `duration()` takes Go's syntax, which has no days, so a leading `Nd`
/// counts `N * 86400` and the rest goes to `duration()`. Everything is an int
/// or a substring of the field (at most 32 characters): a string built from
/// an int (`string(int(…))`) has no size bound, and the API server's cost
/// estimator then refuses the whole CRD.
macro_rules! cel_seconds {
    ($($x:literal),+) => {
        concat!(
            "(", $($x),+, ".matches('^[0-9]+d') ? int(", $($x),+,
            ".find('^[0-9]+')) * 86400 + (", $($x),+, ".matches('^[0-9]+d$') ? 0 : duration(",
            $($x),+, ".replace(", $($x),+, ".find('^[0-9]+d'), '')).getSeconds()) : duration(",
            $($x),+, ").getSeconds())"
        )
    };
}

/// CEL: a spec field's seconds, or its default's when the field is absent
/// (the API server fills defaults before it validates; offline checks may not).
macro_rules! cel_field {
    ($field:literal, $default:expr) => {
        concat!(
            "(has(self.",
            $field,
            ") ? ",
            cel_seconds!("self.", $field),
            " : ",
            $default,
            ")"
        )
    };
}

const TOKEN_WITHIN_SESSION: &str = concat!(
    cel_field!("tokenExpirationTime", crate::default_token_secs!()),
    " <= ",
    cel_field!("sessionExpirationTime", crate::default_session_secs!())
);
const RENEW_WITHIN_SESSION: &str = concat!(
    cel_field!("expiredTokenRenewLimit", crate::default_renew_limit_secs!()),
    " <= ",
    cel_field!("sessionExpirationTime", crate::default_session_secs!())
);
const SESSION_BOUNDS: &str = concat!(
    cel_seconds!("self"),
    " >= 1 && ",
    cel_seconds!("self"),
    " <= 31536000"
);
const TOKEN_BOUNDS: &str = concat!(
    cel_seconds!("self"),
    " >= 1 && ",
    cel_seconds!("self"),
    " <= 604800"
);
/// `sessionIdleTimeout`, when set, lies within the session.
const IDLE_WITHIN_SESSION: &str = concat!(
    "!has(self.sessionIdleTimeout) || ",
    cel_seconds!("self.sessionIdleTimeout"),
    " <= ",
    cel_field!("sessionExpirationTime", crate::default_session_secs!())
);
const IDLE_BOUNDS: &str = concat!(
    cel_seconds!("self"),
    " >= 10 && ",
    cel_seconds!("self"),
    " <= 31536000"
);
const RENEW_BOUNDS: &str = concat!(cel_seconds!("self"), " <= 604800");
const GRACE_BOUNDS: &str = concat!(cel_seconds!("self"), " <= 60");

fn default_session() -> String {
    crate::default_session!().into()
}
fn default_token() -> String {
    crate::default_token!().into()
}
fn default_renew_limit() -> String {
    crate::default_renew_limit!().into()
}
fn default_grace() -> String {
    crate::default_grace!().into()
}
fn default_replicas() -> i32 {
    1
}

/// A policy for issued tokens and the service that enforces it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "auth.tokenpolicy.io",
    version = "v1alpha1",
    kind = "TokenPolicy",
    namespaced,
    shortname = "tp",
    category = "tokenpolicy",
    status = "TokenPolicyStatus",
    cel,
    printcolumn = r#"{"name":"Session","type":"string","jsonPath":".spec.sessionExpirationTime"}"#,
    printcolumn = r#"{"name":"Token","type":"string","jsonPath":".spec.tokenExpirationTime"}"#,
    printcolumn = r#"{"name":"Renew limit","type":"string","jsonPath":".spec.expiredTokenRenewLimit"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new(TOKEN_WITHIN_SESSION).message("tokenExpirationTime must not be longer than sessionExpirationTime"),
    validation = Rule::new(RENEW_WITHIN_SESSION).message("expiredTokenRenewLimit must not be longer than sessionExpirationTime"),
    validation = Rule::new(IDLE_WITHIN_SESSION).message("sessionIdleTimeout must not be longer than sessionExpirationTime"),
    validation = Rule::new("self.replicas <= 1 || has(self.redis)").message("replicas above 1 need redis: the one-time refresh state must be shared"),
    validation = Rule::new("!has(self.oidc) || has(self.externalURL)").message("oidc needs externalURL: the provider sends the browser back to <externalURL>/v1/oidc/callback")
)]
#[serde(rename_all = "camelCase")]
pub struct TokenPolicySpec {
    /// Longest a login lasts (1s..365d); refreshing never extends it.
    #[serde(default = "default_session")]
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = crate::duration::PATTERN)
    )]
    #[x_kube(validation = Rule::new(SESSION_BOUNDS).message("sessionExpirationTime must be between 1s and 365d"))]
    pub session_expiration_time: String,

    /// Life of each issued token (1s..7d, at most the session).
    #[serde(default = "default_token")]
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = crate::duration::PATTERN)
    )]
    #[x_kube(validation = Rule::new(TOKEN_BOUNDS).message("tokenExpirationTime must be between 1s and 7d"))]
    pub token_expiration_time: String,

    /// How long after expiry a token may still be exchanged for a new one,
    /// once (0s..7d, at most the session). 0s: never.
    #[serde(default = "default_renew_limit")]
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = crate::duration::PATTERN)
    )]
    #[x_kube(validation = Rule::new(RENEW_BOUNDS).message("expiredTokenRenewLimit must be between 0s and 7d"))]
    pub expired_token_renew_limit: String,

    /// After a token's one refresh, how long racing requests still get the
    /// same new token (0s..1m).
    #[serde(default = "default_grace")]
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = crate::duration::PATTERN)
    )]
    #[x_kube(validation = Rule::new(GRACE_BOUNDS).message("refreshGracePeriod must be between 0s and 1m"))]
    pub refresh_grace_period: String,

    /// Revoke the whole session when a spent token is shown again after the
    /// grace (reuse detection). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_session_on_reuse: Option<bool>,

    /// Live sessions per user at most (0..1000); 0 or absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub max_sessions_per_user: Option<u32>,

    /// What a login past `maxSessionsPerUser` does: `RevokeOldest`
    /// (default: it succeeds and the user's oldest session ends) or
    /// `RefuseNew` (it is refused with 409 SESSION_LIMIT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(RevokeOldest|RefuseNew)$"))]
    pub session_limit_action: Option<String>,

    /// A session with no activity (a verify, refresh or API call carrying
    /// one of its tokens, on any replica) for this long ends (10s up to the
    /// session time). Absent: no idle timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = crate::duration::PATTERN)
    )]
    #[x_kube(validation = Rule::new(IDLE_BOUNDS).message("sessionIdleTimeout must be between 10s and 365d"))]
    pub session_idle_timeout: Option<String>,

    /// `iss` of issued tokens. Default `tokenpolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub issuer: Option<String>,

    /// `aud` of issued tokens. Default `tokenpolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub audience: Option<String>,

    /// Session cookie attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<CookieSpec>,

    /// Token service replicas (1..50, default 1). Above one, `redis` is required.
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 50").message("replicas must be between 1 and 50"))]
    pub replicas: i32,

    /// Token service image; default: the operator's own image. Only images
    /// on the operator's allow-list run (chart value
    /// tokenService.allowedImages); any other turns the policy Degraded
    /// (reason ImageNotAllowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Proxies whose `X-Forwarded-For` entries give the client address (for
    /// login throttling): address ranges (CIDR) or addresses, e.g. your
    /// ingress controllers' pod range; at most 32. Default: the operator's
    /// (chart value tokenService.trustedProxies). None: the address of the
    /// connection, whatever the headers say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 32),
        inner(
            length(min = 1, max = 43),
            regex(pattern = r"^[0-9A-Fa-f.:]+(/[0-9]{1,3})?$")
        )
    )]
    pub trusted_proxies: Option<Vec<String>>,

    /// Redis shared by the replicas: a Secret key holding the URL, one of
    /// `redis://[:password@]host:6379/0` (one server; `rediss://` for TLS),
    /// `redis+sentinel://[:password@]host:26379[,host:port...]/MASTER_NAME`
    /// (Sentinels and the master's name; `?sentinel_password=...` when the
    /// Sentinels have their own; `rediss+sentinel://` for TLS) or
    /// `redis+cluster://[:password@]host:6379[,host:port...]` (Redis Cluster
    /// seed nodes; `rediss+cluster://` for TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,

    /// Users: a Secret key holding `name:hash` lines (htpasswd -B, or
    /// `tokenpolicy hash-password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<UsersSpec>,

    /// Resources of each token service container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Sign-in through an OpenID Connect provider (Keycloak, Dex, Entra ID,
    /// Okta, Google...). Needs `externalURL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcSpec>,

    /// The public https base URL the token service is reached under (the
    /// OpenID Connect callback is `<externalURL>/v1/oidc/callback`).
    #[serde(
        default,
        rename = "externalURL",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("externalURL must be an https URL"))]
    pub external_url: Option<String>,
}

impl Default for TokenPolicySpec {
    fn default() -> Self {
        TokenPolicySpec {
            session_expiration_time: default_session(),
            token_expiration_time: default_token(),
            expired_token_renew_limit: default_renew_limit(),
            refresh_grace_period: default_grace(),
            revoke_session_on_reuse: None,
            max_sessions_per_user: None,
            session_limit_action: None,
            session_idle_timeout: None,
            issuer: None,
            audience: None,
            cookie: None,
            replicas: default_replicas(),
            image: None,
            trusted_proxies: None,
            redis: None,
            users: None,
            resources: None,
            oidc: None,
            external_url: None,
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CookieSpec {
    /// Default `__Host-tokenpolicy` (with `secure`, path `/` and no
    /// domain), else `tokenpolicy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^[A-Za-z0-9._-]{1,64}$"))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub domain: Option<String>,
    /// Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^/[^;\\s]*$"))]
    pub path: Option<String>,
    /// Default true. Turn off only for plain-HTTP development.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<bool>,
    /// `Strict`, `Lax` (default) or `None` (needs `secure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^(Strict|Lax|None)$"))]
    pub same_site: Option<String>,
}

/// A key of a Secret in the TokenPolicy's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// The Secret key holding the Redis URL: `redis://`, `redis+sentinel://`
    /// or `redis+cluster://` (`rediss...` for TLS).
    pub url_secret_ref: SecretKeyRef,
    /// Certificates for a `rediss` URL (the service refuses them with a
    /// plaintext one). Without them, the system's certificate authorities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTlsSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.caSecretRef) || has(self.clientSecretName)").message("redis.tls needs caSecretRef, clientSecretName or both"))]
pub struct RedisTlsSpec {
    /// The Secret key holding the PEM certificate authorities to trust
    /// instead of the system's (e.g. `ca.crt` of a cert-manager Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`): the client
    /// certificate for a Redis that asks for one (`tls-auth-clients`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_secret_name: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsersSpec {
    /// The Secret key holding the users file.
    pub secret_ref: SecretKeyRef,
}

/// `spec.oidc.scopes` when the policy names none.
pub const DEFAULT_OIDC_SCOPES: [&str; 3] = ["openid", "email", "profile"];

fn default_scopes() -> Vec<String> {
    DEFAULT_OIDC_SCOPES.iter().map(|s| s.to_string()).collect()
}

/// An OpenID Connect provider that users sign in through.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OidcSpec {
    /// The provider's issuer (https), exactly as its ID tokens' `iss`
    /// says it; discovery reads `<issuerURL>/.well-known/openid-configuration`.
    #[serde(rename = "issuerURL")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')").message("oidc.issuerURL must be an https URL"))]
    pub issuer_url: String,
    /// The client id registered at the provider.
    #[serde(rename = "clientID")]
    #[schemars(length(min = 1, max = 253))]
    pub client_id: String,
    /// The Secret key holding the client secret.
    pub client_secret_ref: SecretKeyRef,
    /// The Secret key holding PEM certificate authorities to trust for the
    /// provider instead of the system's (a private CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
    /// Scopes asked for (default `openid email profile`; `openid` is
    /// always sent).
    #[serde(default = "default_scopes")]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 128), regex(pattern = "^[!#-\\[\\]-~]+$"))
    )]
    pub scopes: Vec<String>,
    /// The ID token claim shown as the user's name (default
    /// `preferred_username`; `sub` when the token has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub username_claim: Option<String>,
    /// The ID token claim holding the user's groups (default `groups`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub groups_claim: Option<String>,
    /// Only members of one of these groups may sign in (default: anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 256)))]
    pub allowed_groups: Option<Vec<String>>,
    /// Only users whose verified email is in one of these domains may sign
    /// in (default: anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    pub allowed_email_domains: Option<Vec<String>>,
    /// Ask the provider again (refresh token grant) at each renewal of a
    /// token. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recheck_on_renew: Option<bool>,
    /// The provider's name on the sign-in button (default `OpenID Connect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub provider_name: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The in-cluster forward-auth URL, for an ingress `auth-url` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// The CRD as YAML, as `tokenpolicy crd` prints it and `crds/` keeps it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt as _;
    let crd = TokenPolicy::crd();
    let body = serde_yaml_ng::to_string(&crd).expect("a CRD serializes to YAML");
    format!("# Generated by `tokenpolicy crd`; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use kube::CustomResourceExt as _;
    use proptest::prelude::*;

    fn policy(spec: TokenPolicySpec) -> TokenPolicy {
        TokenPolicy::new("t", spec)
    }

    fn durations(session: &str, token: &str, renew: &str, grace: &str) -> TokenPolicySpec {
        TokenPolicySpec {
            session_expiration_time: session.into(),
            token_expiration_time: token.into(),
            expired_token_renew_limit: renew.into(),
            refresh_grace_period: grace.into(),
            ..Default::default()
        }
    }

    fn cel_errors(tp: &TokenPolicy) -> String {
        match tp.validate_cel() {
            Ok(()) => String::new(),
            Err(e) => format!("{e:?}"),
        }
    }

    #[test]
    fn generated_crd_matches_crds_dir() {
        let on_disk = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/crds/tokenpolicy.yaml"
        ))
        .expect("crds/tokenpolicy.yaml exists");
        assert!(
            on_disk == crd_yaml(),
            "crds/tokenpolicy.yaml is out of date: run `cargo run -- crd > crds/tokenpolicy.yaml`"
        );
    }

    #[test]
    fn crd_shape() {
        let crd = TokenPolicy::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("tokenpolicies.auth.tokenpolicy.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["tp".to_string()]));
        assert_eq!(
            crd.spec.names.categories,
            Some(vec!["tokenpolicy".to_string()])
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            [
                "Session",
                "Token",
                "Renew limit",
                "Ready",
                "Endpoint",
                "Replicas",
                "Age"
            ]
        );
        let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let rules: Vec<_> = spec["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["message"].as_str().unwrap())
            .collect();
        assert_eq!(
            rules,
            [
                "tokenExpirationTime must not be longer than sessionExpirationTime",
                "expiredTokenRenewLimit must not be longer than sessionExpirationTime",
                "sessionIdleTimeout must not be longer than sessionExpirationTime",
                "replicas above 1 need redis: the one-time refresh state must be shared",
                "oidc needs externalURL: the provider sends the browser back to <externalURL>/v1/oidc/callback"
            ]
        );
        let session = &spec["properties"]["sessionExpirationTime"];
        assert_eq!(session["default"], "8h");
        assert_eq!(session["pattern"], crate::duration::PATTERN);
        assert!(
            session["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .unwrap()
                .contains("duration(")
        );
    }

    #[test]
    fn valid_specs_pass_cel() {
        for (s, t, r, g) in [
            ("8h", "30m", "10m", "10s"),
            ("7d", "1d", "7d", "0s"),
            ("1d12h", "1h30m", "0", "1m"),
            ("365d", "7d", "7d", "60s"),
            ("1s", "1s", "0s", "0s"),
        ] {
            let tp = policy(durations(s, t, r, g));
            assert_eq!(cel_errors(&tp), "", "{s} {t} {r} {g}");
            assert!(Policy::from_spec(&tp.spec).is_ok());
        }
    }

    #[test]
    fn redis_tls_names_at_least_one_secret() {
        let with_tls = |tls: RedisTlsSpec| {
            let mut tp = policy(durations("8h", "30m", "10m", "10s"));
            tp.spec.redis = Some(RedisSpec {
                url_secret_ref: SecretKeyRef {
                    name: "redis".into(),
                    key: "url".into(),
                },
                tls: Some(tls),
            });
            cel_errors(&tp)
        };
        let message = "redis.tls needs caSecretRef, clientSecretName or both";
        assert!(with_tls(RedisTlsSpec::default()).contains(message));
        let ca = SecretKeyRef {
            name: "redis-ca".into(),
            key: "ca.crt".into(),
        };
        for tls in [
            RedisTlsSpec {
                ca_secret_ref: Some(ca.clone()),
                client_secret_name: None,
            },
            RedisTlsSpec {
                ca_secret_ref: None,
                client_secret_name: Some("redis-client".into()),
            },
            RedisTlsSpec {
                ca_secret_ref: Some(ca),
                client_secret_name: Some("redis-client".into()),
            },
        ] {
            assert_eq!(with_tls(tls), "");
        }
    }

    #[test]
    fn oidc_urls_are_https_for_the_api_server() {
        let with = |issuer: &str, external: &str| {
            let mut tp = policy(durations("8h", "30m", "10m", "10s"));
            tp.spec.external_url = Some(external.into());
            tp.spec.oidc = Some(OidcSpec {
                issuer_url: issuer.into(),
                client_id: "tokenpolicy".into(),
                client_secret_ref: SecretKeyRef {
                    name: "oidc".into(),
                    key: "secret".into(),
                },
                scopes: default_scopes(),
                ..Default::default()
            });
            cel_errors(&tp)
        };
        assert_eq!(
            with("https://idp.example.com", "https://auth.example.com"),
            ""
        );
        // Loopback http is for local files only: the API server refuses it.
        for http in ["http://idp.example.com", "http://127.0.0.1:5556"] {
            let e = with(http, "https://auth.example.com");
            assert!(e.contains("oidc.issuerURL must be an https URL"), "{e}");
            let e = with("https://idp.example.com", http);
            assert!(e.contains("externalURL must be an https URL"), "{e}");
        }
    }

    #[test]
    fn invalid_specs_fail_cel_with_their_message() {
        for (spec, message) in [
            (
                durations("1h", "2h", "0s", "0s"),
                "tokenExpirationTime must not be longer than sessionExpirationTime",
            ),
            (
                durations("1d", "2d", "0s", "0s"),
                "tokenExpirationTime must not be longer than sessionExpirationTime",
            ),
            (
                durations("30m", "10m", "1h", "0s"),
                "expiredTokenRenewLimit must not be longer than sessionExpirationTime",
            ),
            (
                durations("366d", "1h", "0s", "0s"),
                "sessionExpirationTime must be between 1s and 365d",
            ),
            (
                durations("8h", "8d", "0s", "0s"),
                "tokenExpirationTime must be between 1s and 7d",
            ),
            (
                durations("8h", "0s", "0s", "0s"),
                "tokenExpirationTime must be between 1s and 7d",
            ),
            (
                durations("8d", "1h", "7d1s", "0s"),
                "expiredTokenRenewLimit must be between 0s and 7d",
            ),
            (
                durations("8h", "1h", "0s", "61s"),
                "refreshGracePeriod must be between 0s and 1m",
            ),
        ] {
            let errors = cel_errors(&policy(spec.clone()));
            assert!(errors.contains(message), "expected {message:?} in {errors}");
            assert!(Policy::from_spec(&spec).is_err());
        }
    }

    #[test]
    fn the_idle_timeout_is_checked_by_cel_as_by_the_service() {
        let with = |session: &str, idle: &str| {
            let mut spec = durations(session, "1s", "0s", "0s");
            spec.session_idle_timeout = Some(idle.into());
            let ok = Policy::from_spec(&spec).is_ok();
            (cel_errors(&policy(spec)), ok)
        };
        for (session, idle) in [
            ("10s", "10s"),
            ("8h", "15m"),
            ("365d", "365d"),
            ("1d", "1d"),
        ] {
            assert_eq!(
                with(session, idle),
                (String::new(), true),
                "{session} {idle}"
            );
        }
        for (session, idle, message) in [
            (
                "8h",
                "9s",
                "sessionIdleTimeout must be between 10s and 365d",
            ),
            (
                "8h",
                "0s",
                "sessionIdleTimeout must be between 10s and 365d",
            ),
            (
                "1h",
                "1h1s",
                "sessionIdleTimeout must not be longer than sessionExpirationTime",
            ),
            (
                "1d",
                "2d",
                "sessionIdleTimeout must not be longer than sessionExpirationTime",
            ),
        ] {
            let (errors, ok) = with(session, idle);
            assert!(errors.contains(message), "{session} {idle}: {errors}");
            assert!(!ok, "{session} {idle}: the service accepted it");
        }
        // Absent: off, and nothing to check.
        assert_eq!(
            cel_errors(&policy(durations("8h", "30m", "10m", "10s"))),
            ""
        );
    }

    /// Samples: every TokenPolicy under examples/ passes both checks; every
    /// one under tests/invalid/ fails the CEL check with the message its
    /// `# expect:` line names, and fails the service's own check too.
    #[test]
    fn samples() {
        let root = env!("CARGO_MANIFEST_DIR");
        let docs = |dir: &str| -> Vec<(String, String)> {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "yaml") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for doc in text.split("\n---") {
                        if doc.contains("kind: TokenPolicy") {
                            out.push((path.display().to_string(), doc.to_string()));
                        }
                    }
                }
            }
            assert!(!out.is_empty(), "no TokenPolicy under {dir}");
            out
        };
        for (path, doc) in docs("examples") {
            let tp: TokenPolicy =
                serde_yaml_ng::from_str(&doc).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(cel_errors(&tp), "", "{path}");
            Policy::from_yaml(&doc).unwrap_or_else(|e| panic!("{path}: {e}"));
        }
        for (path, doc) in docs("tests/invalid") {
            let expect = doc
                .lines()
                .find_map(|l| l.strip_prefix("# expect: "))
                .unwrap_or_else(|| panic!("{path}: no # expect: line"));
            let tp: TokenPolicy =
                serde_yaml_ng::from_str(&doc).unwrap_or_else(|e| panic!("{path}: {e}"));
            let errors = cel_errors(&tp);
            assert!(
                errors.contains(expect),
                "{path}: expected {expect:?}, got {errors:?}"
            );
            assert!(
                Policy::from_yaml(&doc).is_err(),
                "{path}: the service accepted it"
            );
        }
    }

    fn duration_string() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..400).prop_map(|d| format!("{d}d")),
            (0u64..200, 0u64..60).prop_map(|(h, m)| format!("{h}h{m}m")),
            (0u64..100_000).prop_map(|s| format!("{s}s")),
            (0u64..10, 0u64..30).prop_map(|(d, h)| format!("{d}d{h}h")),
            Just("0".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// The API server's CEL rules and the service's own checks agree on
        /// every spec: nothing the cluster accepts is refused by `serve`.
        #[test]
        fn cel_and_service_agree(s in duration_string(), t in duration_string(), r in duration_string(), g in duration_string()) {
            let tp = policy(durations(&s, &t, &r, &g));
            let by_cel = tp.validate_cel().is_ok();
            let by_service = Policy::from_spec(&tp.spec).is_ok();
            prop_assert_eq!(by_cel, by_service, "{} {} {} {}: {}", s, t, r, g, cel_errors(&tp));
        }
    }
}
