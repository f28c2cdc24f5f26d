//! Signing in: `POST /v1/login` (JSON or the form), the sign-in page, and
//! the redirect after it, which never leaves this site or an allowed domain.

use std::net::SocketAddr;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::extract::{Credentials, client_ip, cookie, is_form, is_json, user_agent};
use super::notice::Notice;
use super::origin::{Site, check_same_site, site_allowed};
use super::{HttpConfig, MAX_BODY, Shared, issued_response};
use crate::clock::now_millis;
use crate::service::error::{ApiError, Code};
use crate::service::session::Client;

/// `POST /v1/login`: JSON `{username,password}` from API clients, or the
/// sign-in form (which then redirects to `rd`).
pub(super) async fn login(
    State(app): Shared,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let form = is_form(&headers);
    let secure = app.service.policy().cookie.secure;
    if form {
        // The form is what a cross-site page can post (login CSRF).
        check_same_site(&app.config, &headers, secure)?;
    } else if !is_json(&headers) {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "send application/json or the sign-in form (application/x-www-form-urlencoded)",
        ));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                Code::PayloadTooLarge,
                format!("request body over {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(Code::InvalidRequest, e.body_text())
        }
    })?;
    let creds: Credentials = if form {
        serde_urlencoded::from_bytes(&body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    }
    .map_err(|e| {
        ApiError::new(
            Code::InvalidRequest,
            format!("expected {{\"username\",\"password\"}}: {e}"),
        )
    })?;
    let target = match &creds.rd {
        Some(rd) if form => Some(safe_redirect(&app.config, &headers, secure, rd).ok_or_else(
            || {
                ApiError::new(
                    Code::InvalidRedirect,
                    "rd must point to this site or an allowed domain",
                )
            },
        )?),
        _ => None,
    };
    let client = Client {
        addr: client_ip(&app, &headers, peer.map(|c| c.0.0)),
        user_agent: user_agent(&headers),
    };
    match app
        .service
        .login(&creds.username, &creds.password, client, now_millis)
        .await
    {
        Ok(issued) => {
            let mut resp = issued_response(&app, &issued, issued.claims.iat);
            if form {
                *resp.status_mut() = StatusCode::SEE_OTHER;
                let location = target.unwrap_or_else(|| "/".into());
                if let Ok(v) = HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
            }
            Ok(resp)
        }
        Err(e) if form => {
            let policy = app.service.policy();
            let methods = Methods::of(&app, &policy);
            let page = signin_html(creds.rd.as_deref(), Some(&e.message), None, methods);
            Ok((e.code.status(), Html(page)).into_response())
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
pub(super) struct SigninQuery {
    pub rd: Option<String>,
    /// Why the browser is here: `signed-out` or `session-expired`.
    pub reason: Option<String>,
}

/// `GET /v1/login`: the sign-in form, for ingress `auth-signin`.
pub(super) async fn signin_page(
    State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<SigninQuery>,
) -> Response {
    let secure = app.service.policy().cookie.secure;
    if let Some(rd) = &q.rd
        && safe_redirect(&app.config, &headers, secure, rd).is_none()
    {
        return ApiError::new(
            Code::InvalidRedirect,
            "rd must point to this site or an allowed domain",
        )
        .into_response();
    }
    let notice = match q.reason.as_deref().and_then(Notice::from_param) {
        Some(n) => Some(n),
        None => cookie_notice(&app, &headers).await,
    };
    let policy = app.service.policy();
    let methods = Methods::of(&app, &policy);
    let mut resp = Html(signin_html(q.rd.as_deref(), None, notice, methods)).into_response();
    super::page::page_headers(resp.headers_mut());
    resp
}

/// What the browser's own cookie says about its session, if it still sends
/// one (the cookie outlives the session by COOKIE_KEPT_AFTER_SESSION_SECS).
async fn cookie_notice(app: &super::App, headers: &HeaderMap) -> Option<Notice> {
    let policy = app.service.policy();
    let token = cookie(app, headers, &policy.cookie.name)
        .await
        .ok()
        .flatten()?;
    if token.is_empty() {
        return None;
    }
    match app.service.verify(token, false, now_millis()).await {
        Ok(_) => None,
        Err(e) => Notice::from_refusal(e.code),
    }
}

/// The ways in that the sign-in page offers.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Methods<'a> {
    /// The OpenID Connect provider's name, when one is configured.
    pub provider: Option<&'a str>,
    /// The password form (always without a provider; with one, only when
    /// there are users).
    pub password: bool,
}

impl<'a> Methods<'a> {
    pub(super) fn of(app: &'a super::App, policy: &'a crate::policy::Policy) -> Methods<'a> {
        let provider = app
            .config
            .oidc
            .as_ref()
            .and(policy.oidc.as_ref())
            .map(|o| o.provider_name.as_str());
        Methods {
            provider,
            password: provider.is_none() || app.service.has_users(),
        }
    }
}

/// The provider button: where it goes and what it says.
pub(super) struct ProviderButton<'a> {
    pub href: String,
    pub name: &'a str,
}

/// The sign-in page (`templates/signin.html`; every value is HTML-escaped).
#[derive(askama::Template)]
#[template(path = "signin.html")]
struct SigninPage<'a> {
    rd: Option<&'a str>,
    error: Option<&'a str>,
    /// One of the fixed texts of [`Notice`], never text from the request.
    notice: Option<&'static str>,
    provider: Option<ProviderButton<'a>>,
    password: bool,
}

fn signin_html(
    rd: Option<&str>,
    error: Option<&str>,
    notice: Option<Notice>,
    methods: Methods<'_>,
) -> String {
    let provider = methods.provider.map(|name| ProviderButton {
        href: match rd {
            Some(r) => format!(
                "oidc/login?rd={}",
                url::form_urlencoded::byte_serialize(r.as_bytes()).collect::<String>()
            ),
            None => "oidc/login".into(),
        },
        name,
    });
    let page = SigninPage {
        rd,
        error,
        notice: notice.map(Notice::text),
        provider,
        password: methods.password,
    };
    super::page::render(&page)
}

/// `rd` is followed only to this site (a relative path, or an absolute URL
/// with the request's scheme, host and port) or to an allow-listed domain
/// (with the request's scheme and port): never an open redirect. What is
/// followed is written out percent-encoded, so a `Location` header never
/// carries raw non-ASCII bytes. `secure`: the session cookie's `Secure`,
/// which tells the site's scheme when no trusted proxy does.
pub fn safe_redirect(
    config: &HttpConfig,
    headers: &HeaderMap,
    secure: bool,
    rd: &str,
) -> Option<String> {
    if rd.is_empty() || rd.len() > 4_096 || rd.contains('\\') || rd.chars().any(|c| c.is_control())
    {
        return None;
    }
    if rd.starts_with('/') {
        if rd.starts_with("//") {
            return None;
        }
        // Resolved against a placeholder origin, only to normalise and
        // encode the path, query and fragment.
        let base = url::Url::parse("http://relative.invalid/").ok()?;
        let resolved = base.join(rd).ok()?;
        if resolved.host_str() != Some("relative.invalid") {
            return None;
        }
        let path = &resolved[url::Position::BeforePath..];
        // Dot segments (`/..//evil.example`) must not make it protocol-relative.
        return (path.starts_with('/') && !path.starts_with("//")).then(|| path.to_string());
    }
    let url = url::Url::parse(rd).ok()?;
    if !url.username().is_empty() || url.password().is_some() {
        return None;
    }
    let site = Site::of(&url)?;
    site_allowed(config, headers, secure, &site).then(|| url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::api_server::headers;

    #[test]
    fn signin_page_offers_the_configured_ways_in() {
        let page = |provider, password| {
            signin_html(Some("/app"), None, None, Methods { provider, password })
        };
        let both = page(Some("Keycloak"), true);
        assert!(
            both.contains(
                r#"<a class="btn" href="oidc/login?rd=%2Fapp">Sign in with Keycloak</a>"#
            )
        );
        assert!(both.contains(r#"<form method="post" action="login">"#));
        let oidc_only = page(Some("Keycloak"), false);
        assert!(oidc_only.contains("Sign in with Keycloak"));
        assert!(!oidc_only.contains("<form"));
        assert!(!oidc_only.contains("<script"));
        let password_only = page(None, true);
        assert!(!password_only.contains("oidc/login"));
        assert!(password_only.contains("<form"));
    }

    #[test]
    fn redirects_stay_on_site_or_allowed_domains() {
        let cfg = HttpConfig {
            redirect_domains: vec![".example.com".into(), "other.org".into()],
            ..Default::default()
        };
        let h = headers(&[("host", "auth.example.net")]);
        let ok = |rd: &str| safe_redirect(&cfg, &h, true, rd).is_some();
        assert!(ok("/app?x=1"));
        assert!(ok("https://auth.example.net/app"));
        assert!(ok("https://app.example.com/x"));
        assert!(ok("https://example.com/"));
        assert!(ok("https://other.org/"));
        assert!(!ok("https://evil.org/"));
        assert!(!ok("https://example.com.evil.org/"));
        assert!(!ok("https://evilexample.com/"));
        assert!(!ok("//evil.org/"));
        assert!(!ok("/\\evil.org"));
        assert!(!ok("https://user@evil.org/"));
        assert!(!ok("javascript:alert(1)"));
        assert!(!ok("https://app.example.com@evil.org/"));
        assert!(!ok(""));
        assert!(!ok("/..//evil.org/"));
        assert!(!ok("/./\u{2f}evil.org"));
    }

    #[test]
    fn redirects_keep_the_scheme_and_port() {
        let cfg = HttpConfig {
            redirect_domains: vec![".example.com".into()],
            ..Default::default()
        };
        let h = headers(&[("host", "auth.example.net")]);
        let ok =
            |cfg: &HttpConfig, secure: bool, rd: &str| safe_redirect(cfg, &h, secure, rd).is_some();
        assert!(ok(&cfg, true, "https://auth.example.net/app"));
        assert!(ok(&cfg, true, "https://auth.example.net:443/app"));
        // http on an https site (its cookie is Secure), another port.
        assert!(!ok(&cfg, true, "http://auth.example.net/app"));
        assert!(!ok(&cfg, true, "https://auth.example.net:8443/app"));
        assert!(!ok(&cfg, true, "http://app.example.com/"));
        assert!(!ok(&cfg, true, "https://app.example.com:8443/"));
        // Plain http use (no Secure): the other way round.
        assert!(ok(&cfg, false, "http://auth.example.net/app"));
        assert!(!ok(&cfg, false, "https://auth.example.net/app"));
        // The port the client used.
        let on_port = headers(&[("host", "auth.example.net:8443")]);
        assert!(safe_redirect(&cfg, &on_port, true, "https://auth.example.net:8443/").is_some());
        assert!(safe_redirect(&cfg, &on_port, true, "https://auth.example.net/").is_none());
        // A trusted proxy's X-Forwarded-Proto is the scheme.
        let trusting = HttpConfig {
            trust_forwarded_headers: true,
            ..cfg.clone()
        };
        let fwd = headers(&[("host", "auth.example.net"), ("x-forwarded-proto", "http")]);
        assert!(safe_redirect(&trusting, &fwd, true, "http://auth.example.net/").is_some());
        assert!(safe_redirect(&trusting, &fwd, true, "https://auth.example.net/").is_none());
        // --redirect-any-port: any port, never another scheme.
        let any_port = HttpConfig {
            redirect_any_port: true,
            ..cfg.clone()
        };
        assert!(ok(&any_port, true, "https://auth.example.net:8443/app"));
        assert!(ok(&any_port, true, "https://app.example.com:8443/"));
        assert!(!ok(&any_port, true, "http://auth.example.net:8443/app"));
    }

    #[test]
    fn relative_redirects_are_percent_encoded() {
        let cfg = HttpConfig::default();
        let h = headers(&[("host", "auth.example.net")]);
        let rd = |r: &str| safe_redirect(&cfg, &h, true, r);
        assert_eq!(
            rd("/caf\u{e9}?q=\u{e9}t\u{e9}#\u{e9}").as_deref(),
            Some("/caf%C3%A9?q=%C3%A9t%C3%A9#%C3%A9")
        );
        assert_eq!(rd("/a b?x=1&y=%41").as_deref(), Some("/a%20b?x=1&y=%41"));
        assert_eq!(rd("/app/../x").as_deref(), Some("/x"));
        // Absolute ones too.
        assert_eq!(
            rd("https://auth.example.net/caf\u{e9}").as_deref(),
            Some("https://auth.example.net/caf%C3%A9")
        );
        for out in [rd("/\u{e9}"), rd("https://auth.example.net/\u{e9}")]
            .into_iter()
            .flatten()
        {
            assert!(out.is_ascii(), "{out}");
            assert!(HeaderValue::from_str(&out).is_ok());
        }
    }

    #[test]
    fn signin_page_escapes_rd() {
        let page = signin_html(
            Some("/\"><script>"),
            Some("<b>"),
            None,
            Methods {
                provider: Some("<i>Corp</i>"),
                password: true,
            },
        );
        assert!(!page.contains("<i>"));
        assert!(page.contains("Sign in with &#60;i&#62;Corp&#60;/i&#62;"));
        assert!(page.contains(r#"href="oidc/login?rd=%2F%22%3E%3Cscript%3E""#));
        assert!(!page.contains("<script>"));
        assert!(page.contains(r#"value="/&#34;&#62;&#60;script&#62;""#));
        assert!(page.contains(r#"<p class="err" role="alert">&#60;b&#62;</p>"#));
    }
}
