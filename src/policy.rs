//! The TokenPolicy document (the same schema as the cluster object) and the
//! validated [`Policy`] that the rules work with.

use serde::Deserialize;

pub use crate::crd::{CookieSpec, OidcSpec, TokenPolicySpec};
use crate::duration::{format_seconds, parse_seconds};

const MINUTE: u64 = 60;
const DAY: u64 = 86_400;

/// Bounds of each duration (docs/src/tokenpolicy.md), `(min, max)` in seconds.
pub const SESSION_BOUNDS: (u64, u64) = (1, 365 * DAY);
pub const TOKEN_BOUNDS: (u64, u64) = (1, 7 * DAY);
pub const RENEW_LIMIT_BOUNDS: (u64, u64) = (0, 7 * DAY);
pub const GRACE_BOUNDS: (u64, u64) = (0, MINUTE);
/// `sessionIdleTimeout`, when set (and never longer than the session).
pub const IDLE_BOUNDS: (u64, u64) = (10, 365 * DAY);

pub use crate::crd::DEFAULT_OIDC_SCOPES;

/// `spec.oidc`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oidc {
    /// The issuer, exactly as the policy spells it (ID tokens' `iss`).
    pub issuer_url: String,
    pub client_id: String,
    /// Always holds `openid`.
    pub scopes: Vec<String>,
    pub username_claim: String,
    pub groups_claim: String,
    /// Empty: anyone.
    pub allowed_groups: Vec<String>,
    /// Lower case, without a leading `@`. Empty: anyone.
    pub allowed_email_domains: Vec<String>,
    pub recheck_on_renew: bool,
    pub provider_name: String,
}

/// Whether `host` is a loopback name or address (`localhost`, 127.0.0.0/8,
/// `[::1]`): the one place a policy file may name a plain-http URL, for a
/// provider on the same machine.
fn loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

/// An absolute https URL (http only for a loopback host), without
/// credentials or fragment.
fn base_url(name: &'static str, value: &str) -> Result<url::Url, PolicyError> {
    let url = url::Url::parse(value).map_err(|e| field(name, format!("{value:?}: {e}")))?;
    let ok_scheme = url.scheme() == "https" || (url.scheme() == "http" && loopback_host(&url));
    if !ok_scheme {
        return Err(field(
            name,
            format!("{value:?} must be an https URL (http only for localhost and 127.0.0.1)"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(field(
            name,
            format!("{value:?}: no user, password or #fragment"),
        ));
    }
    if url.query().is_some() {
        return Err(field(name, format!("{value:?}: no ?query")));
    }
    Ok(url)
}

fn claim_name(
    name: &'static str,
    value: Option<&String>,
    default: &str,
) -> Result<String, PolicyError> {
    match value {
        None => Ok(default.into()),
        Some(v) if !v.is_empty() && v.len() <= 128 && !v.chars().any(char::is_control) => {
            Ok(v.clone())
        }
        Some(v) => Err(field(name, format!("{v:?} is not a claim name"))),
    }
}

impl Oidc {
    fn from_spec(spec: &OidcSpec) -> Result<Oidc, PolicyError> {
        base_url("oidc.issuerURL", &spec.issuer_url)?;
        if spec.client_id.is_empty() {
            return Err(field("oidc.clientID", "must not be empty"));
        }
        let mut scopes = Vec::new();
        for s in &spec.scopes {
            let ok = !s.is_empty()
                && s.bytes()
                    .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
            if !ok {
                return Err(field("oidc.scopes", format!("{s:?} is not a scope")));
            }
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        if !scopes.iter().any(|s| s == "openid") {
            scopes.insert(0, "openid".into());
        }
        let username_claim = claim_name(
            "oidc.usernameClaim",
            spec.username_claim.as_ref(),
            "preferred_username",
        )?;
        let groups_claim = claim_name("oidc.groupsClaim", spec.groups_claim.as_ref(), "groups")?;
        let allowed_groups = spec.allowed_groups.clone().unwrap_or_default();
        if let Some(g) = allowed_groups.iter().find(|g| g.is_empty()) {
            return Err(field("oidc.allowedGroups", format!("{g:?} is not a group")));
        }
        let mut allowed_email_domains = Vec::new();
        for d in spec.allowed_email_domains.iter().flatten() {
            let d = d.strip_prefix('@').unwrap_or(d).to_ascii_lowercase();
            if d.is_empty() || d.contains(['@', ' ', ',']) || d.chars().any(char::is_control) {
                return Err(field(
                    "oidc.allowedEmailDomains",
                    format!("{d:?} is not a domain"),
                ));
            }
            allowed_email_domains.push(d);
        }
        let provider_name = spec
            .provider_name
            .clone()
            .unwrap_or_else(|| "OpenID Connect".into());
        if provider_name.is_empty() || provider_name.chars().any(char::is_control) {
            return Err(field("oidc.providerName", "must be a line of text"));
        }
        Ok(Oidc {
            issuer_url: spec.issuer_url.clone(),
            client_id: spec.client_id.clone(),
            scopes,
            username_claim,
            groups_claim,
            allowed_groups,
            allowed_email_domains,
            recheck_on_renew: spec.recheck_on_renew.unwrap_or(true),
            provider_name,
        })
    }
}

/// A whole TokenPolicy document as `kubectl get tp -o yaml` shows it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenPolicyDocument {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    #[serde(default)]
    pub spec: TokenPolicySpec,
    #[serde(default)]
    pub status: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("spec.{field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("{0}")]
    Document(String),
}

fn field(field: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Field {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Strict,
    Lax,
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub name: String,
    pub domain: Option<String>,
    pub path: String,
    pub secure: bool,
    pub same_site: SameSite,
}

/// The session cookie's name when the policy names none and the cookie can
/// carry the `__Host-` prefix (Secure, `Path=/`, no `Domain`): a browser
/// takes such a cookie only from this very host over https, so no sibling
/// subdomain can set one in its place.
pub const HOST_COOKIE_NAME: &str = "__Host-tokenpolicy";
/// The default name otherwise (a `domain`, another `path`, or `secure: false`
/// for plain-http use, where browsers refuse `__Host-` cookies).
pub const PLAIN_COOKIE_NAME: &str = "tokenpolicy";

impl Cookie {
    /// Whether the cookie's attributes allow the `__Host-` prefix.
    fn host_only(&self) -> bool {
        self.secure && self.path == "/" && self.domain.is_none()
    }
}

impl Default for Cookie {
    fn default() -> Self {
        Cookie {
            name: HOST_COOKIE_NAME.into(),
            domain: None,
            path: "/".into(),
            secure: true,
            same_site: SameSite::Lax,
        }
    }
}

/// What a login past `maxSessionsPerUser` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionLimitPolicy {
    /// The login succeeds; the user's oldest session ends, on every replica.
    #[default]
    RevokeOldest,
    /// The login is refused (`409 SESSION_LIMIT`).
    RefuseNew,
}

/// The most `maxSessionsPerUser` may be.
pub const MAX_SESSIONS_PER_USER: u32 = 1_000;

/// A checked policy; all durations in whole seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub session: u64,
    pub token: u64,
    pub renew_limit: u64,
    pub grace: u64,
    pub revoke_session_on_reuse: bool,
    /// Live sessions per user at most (0: no limit).
    pub max_sessions_per_user: u32,
    pub session_limit_action: SessionLimitPolicy,
    /// `sessionIdleTimeout` in seconds: a session with no activity for this
    /// long ends (rule 2). `None`: no idle timeout.
    pub idle_timeout: Option<u64>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub cookie: Cookie,
    pub oidc: Option<Oidc>,
    /// `spec.externalURL`, without a trailing `/`.
    pub external_url: Option<String>,
}

impl Default for Policy {
    /// The recommended values (session 8h, token 30m, renew limit 10m,
    /// grace 10s), from the same constants as the CRD's defaults.
    fn default() -> Self {
        let secs = |s: &str| parse_seconds(s).expect("the default durations parse");
        Policy {
            session: secs(crate::default_session!()),
            token: secs(crate::default_token!()),
            renew_limit: secs(crate::default_renew_limit!()),
            grace: secs(crate::default_grace!()),
            revoke_session_on_reuse: true,
            max_sessions_per_user: 0,
            session_limit_action: SessionLimitPolicy::RevokeOldest,
            idle_timeout: None,
            issuer: None,
            audience: None,
            cookie: Cookie::default(),
            oidc: None,
            external_url: None,
        }
    }
}

fn duration_field(
    name: &'static str,
    value: &str,
    (min, max): (u64, u64),
) -> Result<u64, PolicyError> {
    let secs = parse_seconds(value).map_err(|e| field(name, e.to_string()))?;
    if secs < min || secs > max {
        return Err(field(
            name,
            format!(
                "{value} is out of range: must be between {} and {}",
                format_seconds(min),
                format_seconds(max)
            ),
        ));
    }
    Ok(secs)
}

impl Policy {
    pub fn from_spec(spec: &TokenPolicySpec) -> Result<Policy, PolicyError> {
        let session = duration_field(
            "sessionExpirationTime",
            &spec.session_expiration_time,
            SESSION_BOUNDS,
        )?;
        let token = duration_field(
            "tokenExpirationTime",
            &spec.token_expiration_time,
            TOKEN_BOUNDS,
        )?;
        let renew_limit = duration_field(
            "expiredTokenRenewLimit",
            &spec.expired_token_renew_limit,
            RENEW_LIMIT_BOUNDS,
        )?;
        let grace = duration_field(
            "refreshGracePeriod",
            &spec.refresh_grace_period,
            GRACE_BOUNDS,
        )?;
        if token > session {
            return Err(field(
                "tokenExpirationTime",
                format!(
                    "must not be longer than sessionExpirationTime ({} > {})",
                    format_seconds(token),
                    format_seconds(session)
                ),
            ));
        }
        if renew_limit > session {
            return Err(field(
                "expiredTokenRenewLimit",
                format!(
                    "must not be longer than sessionExpirationTime ({} > {})",
                    format_seconds(renew_limit),
                    format_seconds(session)
                ),
            ));
        }
        if !(1..=50).contains(&spec.replicas) {
            return Err(field(
                "replicas",
                format!(
                    "{} is out of range: must be between 1 and 50",
                    spec.replicas
                ),
            ));
        }
        if spec.replicas > 1 && spec.redis.is_none() {
            return Err(field(
                "redis",
                "replicas above 1 need redis: the one-time refresh state must be shared",
            ));
        }
        let mut cookie = Cookie::default();
        let mut named = false;
        if let Some(c) = &spec.cookie {
            if let Some(name) = &c.name {
                let ok = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !ok {
                    return Err(field(
                        "cookie.name",
                        format!("{name:?} is not a valid cookie name (letters, digits, - _ .)"),
                    ));
                }
                cookie.name = name.clone();
                named = true;
            }
            let attr_ok = |v: &str| v.bytes().all(|b| b.is_ascii_graphic() && b != b';');
            if let Some(domain) = &c.domain {
                if domain.is_empty() || !attr_ok(domain) {
                    return Err(field(
                        "cookie.domain",
                        format!("{domain:?} is not a domain"),
                    ));
                }
                cookie.domain = Some(domain.clone());
            }
            if let Some(path) = &c.path {
                if !path.starts_with('/') || !attr_ok(path) {
                    return Err(field("cookie.path", format!("{path:?} must start with /")));
                }
                cookie.path = path.clone();
            }
            if let Some(secure) = c.secure {
                cookie.secure = secure;
            }
            if let Some(ss) = &c.same_site {
                cookie.same_site = match ss.as_str() {
                    "Strict" => SameSite::Strict,
                    "Lax" => SameSite::Lax,
                    "None" => SameSite::None,
                    other => {
                        return Err(field(
                            "cookie.sameSite",
                            format!("{other:?} must be Strict, Lax or None"),
                        ));
                    }
                };
            }
            if cookie.same_site == SameSite::None && !cookie.secure {
                return Err(field(
                    "cookie.sameSite",
                    "None requires cookie.secure: true (browsers drop the cookie otherwise)",
                ));
            }
        }
        if !named && !cookie.host_only() {
            cookie.name = PLAIN_COOKIE_NAME.into();
        }
        // Browsers drop a prefixed cookie whose attributes break the
        // prefix's rules (matched without regard to case).
        let lower = cookie.name.to_ascii_lowercase();
        if lower.starts_with("__host-") && !cookie.host_only() {
            return Err(field(
                "cookie.name",
                "a __Host- cookie needs secure: true, path: / and no domain",
            ));
        }
        if lower.starts_with("__secure-") && !cookie.secure {
            return Err(field(
                "cookie.name",
                "a __Secure- cookie needs secure: true",
            ));
        }
        let external_url = match &spec.external_url {
            Some(u) => {
                base_url("externalURL", u)?;
                Some(u.trim_end_matches('/').to_string())
            }
            None => None,
        };
        let oidc = spec.oidc.as_ref().map(Oidc::from_spec).transpose()?;
        if oidc.is_some() && external_url.is_none() {
            return Err(field(
                "externalURL",
                "oidc needs externalURL: the provider sends the browser back to <externalURL>/v1/oidc/callback",
            ));
        }
        let max_sessions_per_user = spec.max_sessions_per_user.unwrap_or(0);
        if max_sessions_per_user > MAX_SESSIONS_PER_USER {
            return Err(field(
                "maxSessionsPerUser",
                format!(
                    "{max_sessions_per_user} is out of range: must be between 0 and {MAX_SESSIONS_PER_USER}"
                ),
            ));
        }
        let session_limit_action = match spec.session_limit_action.as_deref() {
            None | Some("RevokeOldest") => SessionLimitPolicy::RevokeOldest,
            Some("RefuseNew") => SessionLimitPolicy::RefuseNew,
            Some(other) => {
                return Err(field(
                    "sessionLimitAction",
                    format!("{other:?} is not RevokeOldest or RefuseNew"),
                ));
            }
        };
        let idle_timeout = spec
            .session_idle_timeout
            .as_deref()
            .map(|v| duration_field("sessionIdleTimeout", v, IDLE_BOUNDS))
            .transpose()?;
        if let Some(idle) = idle_timeout
            && idle > session
        {
            return Err(field(
                "sessionIdleTimeout",
                format!(
                    "must not be longer than sessionExpirationTime ({} > {})",
                    format_seconds(idle),
                    format_seconds(session)
                ),
            ));
        }
        Ok(Policy {
            idle_timeout,
            session,
            token,
            renew_limit,
            grace,
            revoke_session_on_reuse: spec.revoke_session_on_reuse.unwrap_or(true),
            max_sessions_per_user,
            session_limit_action,
            issuer: spec.issuer.clone(),
            audience: spec.audience.clone(),
            cookie,
            oidc,
            external_url,
        })
    }

    /// Parses a TokenPolicy YAML document and checks it.
    pub fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        // A file is checked strictly: an unknown spec field is most likely a
        // typo. (Objects read from the cluster are not: the API server's
        // schema is the authority there, and it may be newer than we are.)
        let mut unknown = Vec::new();
        let doc: TokenPolicyDocument =
            serde_ignored::deserialize(serde_yaml_ng::Deserializer::from_str(text), |path| {
                // `?` marks an Option layer in serde_ignored's paths.
                let path = path.to_string().replace(".?", "");
                if path.starts_with("spec") {
                    unknown.push(path);
                }
            })
            .map_err(|e| PolicyError::Document(e.to_string()))?;
        if let Some(path) = unknown.first() {
            return Err(PolicyError::Document(format!(
                "unknown field {path} (see `tokenpolicy crd` for the schema)"
            )));
        }
        // The apiVersion and kind come from the CRD's derive: one source.
        use kube::Resource as _;
        let (api_version, kind) = (
            crate::crd::TokenPolicy::api_version(&()),
            crate::crd::TokenPolicy::kind(&()),
        );
        if doc.api_version != api_version || doc.kind != kind {
            return Err(PolicyError::Document(format!(
                "expected apiVersion {api_version} and kind {kind}, got {} {}",
                doc.api_version, doc.kind
            )));
        }
        Policy::from_spec(&doc.spec)
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        format!(
            "session={} token={} renewLimit={} grace={}",
            format_seconds(self.session),
            format_seconds(self.token),
            format_seconds(self.renew_limit),
            format_seconds(self.grace)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(session: &str, token: &str, renew: &str) -> TokenPolicySpec {
        TokenPolicySpec {
            session_expiration_time: session.into(),
            token_expiration_time: token.into(),
            expired_token_renew_limit: renew.into(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_the_recommended_values() {
        let p = Policy::from_spec(&TokenPolicySpec::default()).unwrap();
        assert_eq!(
            (p.session, p.token, p.renew_limit, p.grace),
            (28_800, 1_800, 600, 10)
        );
        assert!(p.revoke_session_on_reuse);
        assert_eq!(p.cookie, Cookie::default());
    }

    #[test]
    fn token_longer_than_session_is_refused() {
        let err = Policy::from_spec(&spec("1h", "2h", "0s")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.tokenExpirationTime: must not be longer than sessionExpirationTime (2h > 1h)"
        );
    }

    #[test]
    fn renew_limit_longer_than_session_is_refused() {
        let err = Policy::from_spec(&spec("1h", "10m", "2h")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spec.expiredTokenRenewLimit: must not be longer")
        );
    }

    #[test]
    fn the_session_limit_is_read_and_checked() {
        let p = Policy::from_yaml(
            "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nspec:\n  \
             maxSessionsPerUser: 3\n  sessionLimitAction: RefuseNew\n",
        )
        .unwrap();
        assert_eq!(p.max_sessions_per_user, 3);
        assert_eq!(p.session_limit_action, SessionLimitPolicy::RefuseNew);
        let d = Policy::from_spec(&spec("8h", "30m", "10m")).unwrap();
        assert_eq!(d.max_sessions_per_user, 0);
        assert_eq!(d.session_limit_action, SessionLimitPolicy::RevokeOldest);
        let mut s = spec("8h", "30m", "10m");
        s.max_sessions_per_user = Some(1_001);
        assert_eq!(
            Policy::from_spec(&s).unwrap_err().to_string(),
            "spec.maxSessionsPerUser: 1001 is out of range: must be between 0 and 1000"
        );
        let mut s = spec("8h", "30m", "10m");
        s.session_limit_action = Some("Oldest".into());
        assert_eq!(
            Policy::from_spec(&s).unwrap_err().to_string(),
            "spec.sessionLimitAction: \"Oldest\" is not RevokeOldest or RefuseNew"
        );
    }

    #[test]
    fn the_idle_timeout_is_read_and_checked() {
        let p = Policy::from_yaml(
            "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nspec:\n  \
             sessionIdleTimeout: 15m\n",
        )
        .unwrap();
        assert_eq!(p.idle_timeout, Some(900));
        assert_eq!(Policy::default().idle_timeout, None);
        // The cluster object, as the API server hands it to `--policy-ref`.
        let tp: crate::crd::TokenPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "auth.tokenpolicy.io/v1alpha1", "kind": "TokenPolicy",
            "metadata": {"name": "a", "namespace": "team"},
            "spec": {"sessionIdleTimeout": "10m"}
        }))
        .unwrap();
        assert_eq!(Policy::from_spec(&tp.spec).unwrap().idle_timeout, Some(600));
        let with = |idle: &str, session: &str| {
            let mut s = spec(session, "1s", "0s");
            s.session_idle_timeout = Some(idle.into());
            Policy::from_spec(&s).map(|p| p.idle_timeout)
        };
        assert_eq!(with("10s", "10s"), Ok(Some(10)));
        assert_eq!(with("8h", "8h"), Ok(Some(28_800)));
        assert_eq!(
            with("9s", "8h").unwrap_err().to_string(),
            "spec.sessionIdleTimeout: 9s is out of range: must be between 10s and 365d"
        );
        assert_eq!(
            with("2h", "1h").unwrap_err().to_string(),
            "spec.sessionIdleTimeout: must not be longer than sessionExpirationTime (2h > 1h)"
        );
        assert!(
            with("1.5m", "1h")
                .unwrap_err()
                .to_string()
                .starts_with("spec.sessionIdleTimeout:")
        );
    }

    #[test]
    fn bounds_name_field_and_value() {
        let err = Policy::from_spec(&spec("366d", "1h", "0s")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.sessionExpirationTime: 366d is out of range: must be between 1s and 365d"
        );
        let err = Policy::from_spec(&spec("8h", "0s", "0s")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spec.tokenExpirationTime: 0s is out of range")
        );
        let err = Policy::from_spec(&spec("8h", "abc", "0s")).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.tokenExpirationTime: invalid duration \"abc\"")
        );
        let mut s = spec("8h", "30m", "10m");
        s.refresh_grace_period = "2m".into();
        assert!(
            Policy::from_spec(&s)
                .unwrap_err()
                .to_string()
                .contains("refreshGracePeriod")
        );
    }

    #[test]
    fn defaults_count_in_cross_field_rules() {
        // The token default (30m) is longer than this session: said, not silently capped,
        // so that the file and the cluster object mean the same.
        let s = TokenPolicySpec {
            session_expiration_time: "5m".into(),
            ..Default::default()
        };
        let err = Policy::from_spec(&s).unwrap_err().to_string();
        assert!(err.contains("(30m > 5m)"), "{err}");
    }

    #[test]
    fn yaml_document_is_checked() {
        let ok = "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nmetadata: {name: a}\nspec:\n  sessionExpirationTime: 2h\n  tokenExpirationTime: 15m\n  expiredTokenRenewLimit: 5m\n";
        let p = Policy::from_yaml(ok).unwrap();
        assert_eq!((p.session, p.token, p.renew_limit), (7_200, 900, 300));

        let typo = ok.replace("tokenExpirationTime", "tokenExpiration");
        let err = Policy::from_yaml(&typo).unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown field spec.tokenExpiration (see `tokenpolicy crd` for the schema)"
        );
        let nested = ok.replace(
            "spec:\n",
            "spec:\n  cookie: {secure: false, sameSit: Lax}\n",
        );
        let err = Policy::from_yaml(&nested).unwrap_err().to_string();
        assert!(
            err.starts_with("unknown field spec.cookie.sameSit"),
            "{err}"
        );
        // What the cluster adds around the spec is fine.
        let listed = format!("{ok}status:\n  observedGeneration: 3\n");
        assert!(Policy::from_yaml(&listed).is_ok());

        let wrong_kind = ok.replace("kind: TokenPolicy", "kind: ConfigMap");
        assert!(Policy::from_yaml(&wrong_kind).is_err());
        assert!(Policy::from_yaml("{{{{").is_err());
    }

    #[test]
    fn cookie_settings() {
        let mut s = TokenPolicySpec {
            cookie: Some(CookieSpec {
                same_site: Some("None".into()),
                secure: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(Policy::from_spec(&s).is_err());
        s.cookie = Some(CookieSpec {
            name: Some("a;b".into()),
            ..Default::default()
        });
        assert!(Policy::from_spec(&s).is_err());
        s.cookie = Some(CookieSpec {
            name: Some("sess".into()),
            secure: Some(false),
            same_site: Some("Strict".into()),
            ..Default::default()
        });
        let p = Policy::from_spec(&s).unwrap();
        assert_eq!(p.cookie.name, "sess");
        assert!(!p.cookie.secure);
        assert_eq!(p.cookie.same_site, SameSite::Strict);
    }

    #[test]
    fn the_default_cookie_name_is_host_prefixed_when_it_can_be() {
        let name = |c: Option<CookieSpec>| {
            Policy::from_spec(&TokenPolicySpec {
                cookie: c,
                ..Default::default()
            })
            .map(|p| p.cookie.name)
        };
        assert_eq!(name(None).unwrap(), "__Host-tokenpolicy");
        assert_eq!(Cookie::default().name, "__Host-tokenpolicy");
        assert_eq!(
            name(Some(CookieSpec::default())).unwrap(),
            "__Host-tokenpolicy"
        );
        // Plain http, a domain or another path cannot carry the prefix.
        for c in [
            CookieSpec {
                secure: Some(false),
                ..Default::default()
            },
            CookieSpec {
                domain: Some("example.com".into()),
                ..Default::default()
            },
            CookieSpec {
                path: Some("/auth".into()),
                ..Default::default()
            },
        ] {
            assert_eq!(name(Some(c)).unwrap(), "tokenpolicy");
        }
        // A name given is kept, but a prefix must keep its rules.
        let named = |n: &str, c: CookieSpec| {
            name(Some(CookieSpec {
                name: Some(n.into()),
                ..c
            }))
        };
        assert_eq!(
            named("tokenpolicy", CookieSpec::default()).unwrap(),
            "tokenpolicy"
        );
        assert_eq!(
            named("__Host-s", CookieSpec::default()).unwrap(),
            "__Host-s"
        );
        let insecure = || CookieSpec {
            secure: Some(false),
            ..Default::default()
        };
        assert!(named("__Host-s", insecure()).is_err());
        assert!(named("__host-s", insecure()).is_err());
        assert!(
            named(
                "__Host-s",
                CookieSpec {
                    domain: Some("example.com".into()),
                    ..Default::default()
                }
            )
            .is_err()
        );
        assert!(named("__Secure-s", insecure()).is_err());
        assert!(
            named(
                "__Secure-s",
                CookieSpec {
                    domain: Some("example.com".into()),
                    ..Default::default()
                }
            )
            .is_ok()
        );
    }

    const OIDC: &str = "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nmetadata: {name: a}\nspec:\n  externalURL: https://auth.example.com/\n  oidc:\n    issuerURL: https://idp.example.com/realms/r\n    clientID: tokenpolicy\n    clientSecretRef: {name: oidc, key: secret}\n";

    #[test]
    fn oidc_defaults() {
        let p = Policy::from_yaml(OIDC).unwrap();
        assert_eq!(p.external_url.as_deref(), Some("https://auth.example.com"));
        let o = p.oidc.unwrap();
        assert_eq!(o.issuer_url, "https://idp.example.com/realms/r");
        assert_eq!(o.client_id, "tokenpolicy");
        assert_eq!(o.scopes, ["openid", "email", "profile"]);
        assert_eq!(o.username_claim, "preferred_username");
        assert_eq!(o.groups_claim, "groups");
        assert!(o.allowed_groups.is_empty() && o.allowed_email_domains.is_empty());
        assert!(o.recheck_on_renew);
        assert_eq!(o.provider_name, "OpenID Connect");
        assert_eq!(Policy::default().oidc, None);
    }

    #[test]
    fn oidc_fields() {
        let doc = format!(
            "{OIDC}    scopes: [email, groups, email]\n    usernameClaim: email\n    groupsClaim: roles\n    allowedGroups: [admins]\n    allowedEmailDomains: ['@Example.COM']\n    recheckOnRenew: false\n    providerName: Keycloak\n    caSecretRef: {{name: ca, key: ca.crt}}\n"
        );
        let o = Policy::from_yaml(&doc).unwrap().oidc.unwrap();
        assert_eq!(o.scopes, ["openid", "email", "groups"]);
        assert_eq!(o.username_claim, "email");
        assert_eq!(o.groups_claim, "roles");
        assert_eq!(o.allowed_groups, ["admins"]);
        assert_eq!(o.allowed_email_domains, ["example.com"]);
        assert!(!o.recheck_on_renew);
        assert_eq!(o.provider_name, "Keycloak");
    }

    #[test]
    fn oidc_urls_are_https_except_on_loopback() {
        let with = |from: &str, to: &str| Policy::from_yaml(&OIDC.replace(from, to));
        for bad in [
            "http://idp.example.com",
            "ftp://idp.example.com",
            "idp.example.com",
            "https://u:p@idp.example.com",
            "https://idp.example.com/#x",
            "https://idp.example.com/?a=b",
        ] {
            let err = with("https://idp.example.com/realms/r", bad)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("spec.oidc.issuerURL"), "{bad}: {err}");
            let err = with("https://auth.example.com/", bad)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("spec.externalURL"), "{bad}: {err}");
        }
        for loopback in [
            "http://127.0.0.1:5556",
            "http://localhost:5556/x",
            "http://[::1]:5556",
        ] {
            assert!(
                with("https://idp.example.com/realms/r", loopback).is_ok(),
                "{loopback}"
            );
            assert!(
                with("https://auth.example.com/", loopback).is_ok(),
                "{loopback}"
            );
        }
        let err = with("  externalURL: https://auth.example.com/\n", "")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("spec.externalURL: oidc needs externalURL"),
            "{err}"
        );
    }

    #[test]
    fn oidc_client_secret_is_not_a_policy_field() {
        let doc = format!("{OIDC}    clientSecret: hunter2\n");
        let err = Policy::from_yaml(&doc).unwrap_err().to_string();
        assert!(
            err.starts_with("unknown field spec.oidc.clientSecret"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let scope = format!("{OIDC}    scopes: ['a b']\n");
        assert!(
            Policy::from_yaml(&scope)
                .unwrap_err()
                .to_string()
                .starts_with("spec.oidc.scopes")
        );
    }
}
