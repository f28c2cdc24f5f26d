//! Signing in through an OpenID Connect provider: discovery, the JWKS, the
//! code exchange and what an ID token says about its user.
//!
//! Discovery runs at start and, while the provider cannot be reached, again
//! in the background: the service serves meanwhile, unready (`/readyz` says
//! why). The JWKS is cached; a token whose `kid` it lacks makes it fetched
//! again, at most once per [`JWKS_REFETCH_EVERY`], so forged `kid`s cannot
//! make us hammer the provider.

pub mod flow;
pub mod id_token;
pub mod logout_token;
pub mod recheck;
pub mod vault;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::body::Bytes;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64_STD;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::policy::Oidc;
use crate::service::session::SessionStart;
use id_token::{Expect, IdTokenError, Jwk};
use logout_token::{LogoutRequest, LogoutTokenError};

/// An unknown `kid` fetches the JWKS again at most this often.
pub const JWKS_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// Each request to the provider, connection included.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer read from the provider.
const MAX_ANSWER: usize = 256 * 1024;
/// Clock skew tolerated on an ID token's `exp` and `iat`, seconds.
pub const ID_TOKEN_LEEWAY_SECS: i64 = 60;
/// Groups kept of an ID token, and the longest group name and email kept:
/// our token must stay under its length bound.
pub const MAX_GROUPS: usize = 32;
pub const MAX_GROUP_LEN: usize = 64;
const MAX_GROUPS_BYTES: usize = 1_024;
const MAX_CLAIM_LEN: usize = 254;

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// The provider's endpoints, from its discovery document.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub authorization: url::Url,
    pub token: url::Url,
    pub jwks: url::Url,
    /// `client_secret_basic` (the default) or `client_secret_post`.
    pub basic_auth: bool,
}

pub struct Provider {
    pub config: Oidc,
    client_secret: String,
    /// `<externalURL>/v1/oidc/callback`.
    pub redirect_uri: String,
    http: HttpClient<Https, Full<Bytes>>,
    endpoints: ArcSwapOption<Endpoints>,
    keys: ArcSwapOption<Vec<Jwk>>,
    last_jwks_fetch: Mutex<Option<Instant>>,
    /// Why discovery has not succeeded yet (for /readyz).
    unready: ArcSwapOption<String>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.config.issuer_url)
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// Why the code exchange gave no ID token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The provider answered with an error (`invalid_grant` for a code
    /// already used): a definite refusal.
    #[error("the provider refused the code: {0}")]
    Refused(String),
    /// Unreachable, timed out, or an answer we cannot read.
    #[error("the provider cannot be reached: {0}")]
    Unavailable(String),
}

/// What the code exchange gave.
pub struct Exchanged {
    pub id_token: String,
    /// Kept server-side only (see `recheck.rs`), never logged.
    pub refresh_token: Option<String>,
}

impl std::fmt::Debug for Exchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchanged")
            .field("refresh_token", &self.refresh_token.as_ref().map(|_| "…"))
            .finish_non_exhaustive()
    }
}

fn refresh_token_of(answer: &Value) -> Option<String> {
    answer
        .get("refresh_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= vault::MAX_REFRESH_TOKEN_LEN)
        .map(str::to_string)
}

/// Why a validated ID token gives no session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Token(#[from] IdTokenError),
    #[error("the ID token's sub is missing or cannot be used")]
    Subject,
    #[error("you are not in a group that may sign in here")]
    Group,
    #[error("your email address is not in a domain that may sign in here")]
    EmailDomain,
}

fn tls_config(ca_pem: Option<&[u8]>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert?)?;
            }
            anyhow::ensure!(!roots.is_empty(), "no PEM certificate in it");
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// `http` is allowed only where the issuer is itself a loopback http URL.
fn endpoint(issuer: &url::Url, value: Option<&str>, name: &str) -> anyhow::Result<url::Url> {
    let value = value.ok_or_else(|| anyhow::anyhow!("the discovery document has no {name}"))?;
    let url = url::Url::parse(value).map_err(|e| anyhow::anyhow!("{name} {value:?}: {e}"))?;
    let ok = url.scheme() == "https" || (url.scheme() == "http" && issuer.scheme() == "http");
    anyhow::ensure!(ok, "{name} {value:?} is not https");
    Ok(url)
}

impl Provider {
    /// `ca_pem`: certificate authorities to trust instead of the system's.
    pub fn new(
        config: Oidc,
        client_secret: String,
        external_url: &str,
        ca_pem: Option<&[u8]>,
    ) -> anyhow::Result<Provider> {
        let tls = tls_config(ca_pem)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(HTTP_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Provider {
            config,
            client_secret,
            redirect_uri: format!("{}/v1/oidc/callback", external_url.trim_end_matches('/')),
            http,
            endpoints: ArcSwapOption::empty(),
            keys: ArcSwapOption::empty(),
            last_jwks_fetch: Mutex::new(None),
            unready: ArcSwapOption::from_pointee("discovery has not run yet".to_string()),
        })
    }

    /// One request; no redirect is ever followed.
    async fn call(&self, req: axum::http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String> {
        let answer = tokio::time::timeout(HTTP_TIMEOUT, async {
            let resp = self.http.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            })?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await;
        answer.unwrap_or_else(|_| Err(format!("no answer within {}s", HTTP_TIMEOUT.as_secs())))
    }

    async fn get(&self, url: &url::Url) -> Result<Bytes, String> {
        let req = axum::http::Request::get(url.as_str())
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        match self.call(req).await? {
            (200, body) => Ok(body),
            (status, _) => Err(format!("{url} answered {status}")),
        }
    }

    /// Reads the discovery document and the JWKS.
    pub async fn discover(&self) -> anyhow::Result<()> {
        let issuer = url::Url::parse(&self.config.issuer_url)?;
        let doc_url = url::Url::parse(&format!(
            "{}/.well-known/openid-configuration",
            self.config.issuer_url.trim_end_matches('/')
        ))?;
        let body = self.get(&doc_url).await.map_err(anyhow::Error::msg)?;
        let doc: Value = serde_json::from_slice(&body)
            .map_err(|e| anyhow::anyhow!("{doc_url}: not JSON: {e}"))?;
        let s = |k: &str| doc.get(k).and_then(Value::as_str);
        anyhow::ensure!(
            s("issuer") == Some(self.config.issuer_url.as_str()),
            "the discovery document's issuer {:?} is not {:?}",
            s("issuer").unwrap_or(""),
            self.config.issuer_url
        );
        let methods: Vec<&str> = doc
            .get("token_endpoint_auth_methods_supported")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let basic_auth = methods.is_empty() || methods.contains(&"client_secret_basic");
        anyhow::ensure!(
            basic_auth || methods.contains(&"client_secret_post"),
            "the provider takes neither client_secret_basic nor client_secret_post"
        );
        let endpoints = Endpoints {
            authorization: endpoint(
                &issuer,
                s("authorization_endpoint"),
                "authorization_endpoint",
            )?,
            token: endpoint(&issuer, s("token_endpoint"), "token_endpoint")?,
            jwks: endpoint(&issuer, s("jwks_uri"), "jwks_uri")?,
            basic_auth,
        };
        let keys = self.fetch_jwks(&endpoints.jwks).await?;
        self.keys.store(Some(Arc::new(keys)));
        self.endpoints.store(Some(Arc::new(endpoints)));
        self.unready.store(None);
        Ok(())
    }

    async fn fetch_jwks(&self, url: &url::Url) -> anyhow::Result<Vec<Jwk>> {
        if let Ok(mut last) = self.last_jwks_fetch.lock() {
            *last = Some(Instant::now());
        }
        let body = self.get(url).await.map_err(anyhow::Error::msg)?;
        id_token::parse_jwks(&body).map_err(|e| anyhow::anyhow!("{url}: {e}"))
    }

    /// Discovery until it succeeds: one WARN line when it first fails, one
    /// INFO line when it succeeds.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            let mut warned = false;
            loop {
                match me.discover().await {
                    Ok(()) => {
                        tracing::info!(issuer = %me.config.issuer_url, "OpenID Connect provider discovered");
                        return;
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        if !warned {
                            tracing::warn!(issuer = %me.config.issuer_url, error = %why, "OpenID Connect provider not reachable: unready until it is; retrying in the background");
                            warned = true;
                        }
                        me.unready.store(Some(Arc::new(format!(
                            "OpenID Connect provider {} not discovered: {why}",
                            me.config.issuer_url
                        ))));
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// Why sign-ins cannot run yet, if so.
    pub fn unready(&self) -> Option<Arc<String>> {
        self.unready.load_full()
    }

    pub fn endpoints(&self) -> Option<Arc<Endpoints>> {
        self.endpoints.load_full()
    }

    /// The authorization request's URL.
    pub fn authorize_url(&self, state: &str, nonce: &str, challenge: &str) -> Option<String> {
        let mut url = self.endpoints()?.authorization.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.redirect_uri)
            .append_pair("scope", &self.config.scopes.join(" "))
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        Some(url.into())
    }

    /// Exchanges `code` at the token endpoint; answers the ID token and
    /// the refresh token, if the provider gave one.
    pub async fn exchange(&self, code: &str, verifier: &str) -> Result<Exchanged, ExchangeError> {
        let answer = self
            .token_call(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.redirect_uri),
                ("code_verifier", verifier),
            ])
            .await?;
        let id_token = answer
            .get("id_token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ExchangeError::Refused("the answer has no id_token".into()))?;
        Ok(Exchanged {
            id_token,
            refresh_token: refresh_token_of(&answer),
        })
    }

    /// The refresh_token grant: whether the provider still stands by the
    /// session. Answers the rotated refresh token, if it sent one. Only
    /// `invalid_grant` is a refusal (the user disabled, the provider's
    /// session ended, consent revoked); any other error answer (our client
    /// misconfigured, say) ends nobody's session: it counts as unavailable.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Option<String>, ExchangeError> {
        match self
            .token_call(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
            ])
            .await
        {
            Ok(answer) => Ok(refresh_token_of(&answer)),
            Err(ExchangeError::Refused(code)) if code == "invalid_grant" => {
                Err(ExchangeError::Refused(code))
            }
            Err(ExchangeError::Refused(code)) => Err(ExchangeError::Unavailable(format!(
                "the token endpoint answered {code}"
            ))),
            Err(e) => Err(e),
        }
    }

    /// One request to the token endpoint with the client's credentials;
    /// answers the JSON of a 200, else the provider's error code.
    async fn token_call(&self, params: &[(&str, &str)]) -> Result<Value, ExchangeError> {
        let unavailable = ExchangeError::Unavailable;
        let endpoints = self
            .endpoints()
            .ok_or_else(|| unavailable("not discovered yet".into()))?;
        let basic = endpoints.basic_auth;
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in params {
                form.append_pair(k, v);
            }
            if !basic {
                form.append_pair("client_id", &self.config.client_id)
                    .append_pair("client_secret", &self.client_secret);
            }
            form.finish()
        };
        let mut req = axum::http::Request::post(endpoints.token.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json");
        if basic {
            // RFC 6749 §2.3.1: each part form-encoded, then Basic.
            let enc =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let basic = B64_STD.encode(format!(
                "{}:{}",
                enc(&self.config.client_id),
                enc(&self.client_secret)
            ));
            req = req.header("authorization", format!("Basic {basic}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(e.to_string()))?;
        let (status, body) = self.call(req).await.map_err(unavailable)?;
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if let Some(err) = answer.get("error").and_then(Value::as_str) {
            // The provider's error code only: its description may echo input.
            let code: String = err
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .take(64)
                .collect();
            return Err(ExchangeError::Refused(code));
        }
        if status != 200 {
            return Err(if (400..500).contains(&status) {
                ExchangeError::Refused(format!("status {status}"))
            } else {
                unavailable(format!("the token endpoint answered {status}"))
            });
        }
        Ok(answer)
    }

    /// Checks a back-channel logout token; an unknown `kid` fetches the
    /// JWKS again (rate-limited, as for ID tokens) before it is refused.
    pub async fn validate_logout(
        &self,
        token: &str,
        now_secs: i64,
    ) -> Result<LogoutRequest, LogoutTokenError> {
        let check = |keys: &[Jwk]| {
            logout_token::validate(
                token,
                keys,
                &self.config.issuer_url,
                &self.config.client_id,
                now_secs,
                ID_TOKEN_LEEWAY_SECS,
            )
        };
        let keys = self.keys.load_full().unwrap_or_default();
        match check(&keys) {
            Err(LogoutTokenError::Signed(IdTokenError::UnknownKey)) => {
                match self.fresh_keys().await {
                    Some(fresh) => check(&fresh),
                    None => Err(IdTokenError::UnknownKey.into()),
                }
            }
            other => other,
        }
    }

    /// The JWKS fetched again, if the rate limit allows it now.
    async fn fresh_keys(&self) -> Option<Arc<Vec<Jwk>>> {
        if !self.may_refetch() {
            return None;
        }
        let endpoints = self.endpoints()?;
        match self.fetch_jwks(&endpoints.jwks).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                self.keys.store(Some(fresh.clone()));
                Some(fresh)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "JWKS fetch failed");
                None
            }
        }
    }

    /// Validates an ID token of the flow with `nonce`; an unknown `kid`
    /// fetches the JWKS again (rate-limited) before it is refused.
    pub async fn validate(
        &self,
        token: &str,
        nonce: &str,
        now_secs: i64,
    ) -> Result<serde_json::Map<String, Value>, IdTokenError> {
        let expect = Expect {
            issuer: &self.config.issuer_url,
            client_id: &self.config.client_id,
            nonce,
            now: now_secs,
            leeway: ID_TOKEN_LEEWAY_SECS,
            max_age: flow::FLOW_TTL_SECS,
        };
        let keys = self.keys.load_full().unwrap_or_default();
        match id_token::validate(token, &keys, &expect) {
            Err(IdTokenError::UnknownKey) => match self.fresh_keys().await {
                Some(fresh) => id_token::validate(token, &fresh, &expect),
                None => Err(IdTokenError::UnknownKey),
            },
            other => other,
        }
    }

    /// Whether the last JWKS fetch is at least [`JWKS_REFETCH_EVERY`] old
    /// (and if so, this caller takes the refetch).
    fn may_refetch(&self) -> bool {
        let Ok(mut last) = self.last_jwks_fetch.lock() else {
            return false;
        };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < JWKS_REFETCH_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Who the ID token's claims say the user is, if they may sign in.
    pub fn identity(
        &self,
        claims: &serde_json::Map<String, Value>,
    ) -> Result<SessionStart, Refusal> {
        identity(&self.config, claims)
    }
}

/// A claim value that can go into a header: printable, no comma, bounded.
fn header_safe(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.contains(',')
        && s.chars().all(|c| !c.is_control())
        && axum::http::HeaderValue::from_str(s).is_ok()
}

/// The session a provider's user gets: `sub` with the issuer, the display
/// claim, `email` unless `email_verified` is false, and the groups whose
/// names are safe header values. `allowedGroups` and `allowedEmailDomains`
/// are checked here.
pub fn identity(
    config: &Oidc,
    claims: &serde_json::Map<String, Value>,
) -> Result<SessionStart, Refusal> {
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| header_safe(s, 255))
        .ok_or(Refusal::Subject)?;
    let name = claims
        .get(&config.username_claim)
        .and_then(Value::as_str)
        .filter(|n| header_safe(n, MAX_CLAIM_LEN))
        .filter(|n| *n != sub)
        .map(str::to_string);
    let verified = claims.get("email_verified").and_then(Value::as_bool) != Some(false);
    let email = claims
        .get("email")
        .and_then(Value::as_str)
        .filter(|_| verified)
        .filter(|e| header_safe(e, MAX_CLAIM_LEN) && e.contains('@') && !e.contains(' '))
        .map(str::to_string);
    let mut groups = Vec::new();
    let mut bytes = 0;
    let listed: Vec<&str> = match claims.get(&config.groups_claim) {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(s)) => vec![s.as_str()],
        _ => Vec::new(),
    };
    for g in listed {
        if groups.len() >= MAX_GROUPS || bytes + g.len() > MAX_GROUPS_BYTES {
            break;
        }
        if header_safe(g, MAX_GROUP_LEN) && !groups.iter().any(|k: &String| k == g) {
            bytes += g.len();
            groups.push(g.to_string());
        }
    }
    if !config.allowed_groups.is_empty()
        && !groups.iter().any(|g| config.allowed_groups.contains(g))
    {
        return Err(Refusal::Group);
    }
    if !config.allowed_email_domains.is_empty() {
        let domain = email
            .as_deref()
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
        if !domain.is_some_and(|d| config.allowed_email_domains.contains(&d)) {
            return Err(Refusal::EmailDomain);
        }
    }
    Ok(SessionStart {
        sub: sub.to_string(),
        pwv: None,
        idp: Some(config.issuer_url.clone()),
        name,
        email,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> Oidc {
        let doc = "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nspec:\n  externalURL: https://auth.example.com\n  oidc:\n    issuerURL: https://idp.example.com\n    clientID: c\n    clientSecretRef: {name: s, key: k}\n";
        crate::policy::Policy::from_yaml(doc).unwrap().oidc.unwrap()
    }

    fn claims(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_identity_is_issuer_and_sub_with_safe_claims() {
        let c = claims(json!({"sub": "s-1", "preferred_username": "alice",
            "email": "alice@example.com", "groups": ["admins", "a,b", "x\r\ny", "dev", "admins"]}));
        let s = identity(&config(), &c).unwrap();
        assert_eq!(s.sub, "s-1");
        assert_eq!(s.idp.as_deref(), Some("https://idp.example.com"));
        assert_eq!(s.name.as_deref(), Some("alice"));
        assert_eq!(s.email.as_deref(), Some("alice@example.com"));
        assert_eq!(s.groups, ["admins", "dev"]);
        assert_eq!(s.pwv, None);
    }

    #[test]
    fn unsafe_or_unverified_values_are_dropped() {
        let c = claims(json!({"sub": "s-1", "preferred_username": "a\nb",
            "email": "alice@example.com", "email_verified": false}));
        let s = identity(&config(), &c).unwrap();
        assert_eq!(s.name, None);
        assert_eq!(s.email, None);
        let c = claims(json!({"sub": "s-1", "email": "x\r\n@example.com", "email_verified": true}));
        assert_eq!(identity(&config(), &c).unwrap().email, None);
        for sub in [json!("a\nb"), json!(""), json!(7), json!("x".repeat(256))] {
            let c = claims(json!({"sub": sub}));
            assert_eq!(identity(&config(), &c).unwrap_err(), Refusal::Subject);
        }
        // Bounded: many long groups do not make our token too long.
        let many: Vec<String> = (0..500).map(|i| format!("group-{i:04}")).collect();
        let c = claims(json!({"sub": "s", "groups": many}));
        let s = identity(&config(), &c).unwrap();
        assert_eq!(s.groups.len(), MAX_GROUPS);
        let c = claims(json!({"sub": "s", "groups": ["g".repeat(MAX_GROUP_LEN + 1), "ok"]}));
        assert_eq!(identity(&config(), &c).unwrap().groups, ["ok"]);
    }

    #[test]
    fn allowed_groups_and_email_domains() {
        let mut cfg = config();
        cfg.allowed_groups = vec!["admins".into()];
        let member = claims(json!({"sub": "s", "groups": ["admins"]}));
        let other = claims(json!({"sub": "s", "groups": ["dev"]}));
        let none = claims(json!({"sub": "s"}));
        assert!(identity(&cfg, &member).is_ok());
        assert_eq!(identity(&cfg, &other).unwrap_err(), Refusal::Group);
        assert_eq!(identity(&cfg, &none).unwrap_err(), Refusal::Group);
        let mut cfg = config();
        cfg.allowed_email_domains = vec!["example.com".into()];
        let ok = claims(json!({"sub": "s", "email": "a@EXAMPLE.com"}));
        let other = claims(json!({"sub": "s", "email": "a@example.com.evil.org"}));
        let unverified =
            claims(json!({"sub": "s", "email": "a@example.com", "email_verified": false}));
        assert!(identity(&cfg, &ok).is_ok());
        assert_eq!(identity(&cfg, &other).unwrap_err(), Refusal::EmailDomain);
        assert_eq!(
            identity(&cfg, &unverified).unwrap_err(),
            Refusal::EmailDomain
        );
    }

    #[test]
    fn a_ca_file_must_hold_certificates() {
        let e = Provider::new(config(), "x".into(), "https://a.example.com", Some(b"junk"))
            .unwrap_err();
        assert!(format!("{e:#}").contains("no PEM certificate"), "{e:#}");
        let p = Provider::new(config(), "x".into(), "https://a.example.com/", None).unwrap();
        assert_eq!(p.redirect_uri, "https://a.example.com/v1/oidc/callback");
        assert!(p.unready().is_some());
    }

    #[test]
    fn unknown_kid_refetches_are_rate_limited() {
        let p = Provider::new(config(), "secret".into(), "https://auth.example.com", None).unwrap();
        assert!(p.may_refetch());
        assert!(!p.may_refetch());
        assert!(!p.may_refetch());
        if let Ok(mut last) = p.last_jwks_fetch.lock() {
            *last = Some(Instant::now() - JWKS_REFETCH_EVERY);
        }
        assert!(p.may_refetch());
        assert!(!format!("{p:?}").contains("secret"));
    }
}
