//! The HTTP surface (DESIGN.md §4). Handlers are thin: they pull the token
//! and the request's shape out of HTTP and hand them to [`TokenService`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;

use crate::error::{ApiError, Code};
use crate::policy::Cookie;
use crate::service::{Issued, TokenService, now_millis};

/// Request bodies are small JSON or form posts.
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Another header to read the token from (besides `Authorization` and the cookie).
    pub token_header: Option<HeaderName>,
    /// Take the client address from the last `X-Forwarded-For` hop (set this
    /// when the service sits behind a proxy that appends it).
    pub trust_forwarded_for: bool,
    /// Redirect mode: browsers without a valid token get a 302 to this
    /// sign-in URL (with `rd`), for proxies that hand our answer to the client
    /// as-is (Traefik). API clients keep their 401.
    pub signin_url: Option<String>,
    /// Renew expired-but-renewable tokens on verify. Turn off behind a proxy
    /// that cannot hand a successful check's `Set-Cookie` to the client:
    /// there, renewal would spend the token's one refresh unseen.
    pub renew_on_verify: bool,
    /// Hosts that `rd` may point to besides the request's own host. A
    /// leading dot (`.example.com`) allows every subdomain.
    pub redirect_domains: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            token_header: None,
            trust_forwarded_for: false,
            renew_on_verify: true,
            signin_url: None,
            redirect_domains: Vec::new(),
        }
    }
}

pub struct App {
    pub service: Arc<TokenService>,
    pub config: HttpConfig,
}

type Shared = State<Arc<App>>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/login", post(login).get(signin_page))
        .route("/v1/refresh", post(refresh))
        .route("/v1/logout", post(logout))
        .route("/v1/verify", any(verify))
        .route("/v1/verify/{*rest}", any(verify))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// Latency by route, and one debug line per request (path only: a query
/// string may carry a redirect target, never a token, but we keep logs lean).
async fn observe(State(app): Shared, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    let elapsed = started.elapsed();
    app.service
        .metrics
        .latency
        .get_or_create(&crate::metrics::Route {
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, %route, status = resp.status().as_u16(), micros = elapsed.as_micros() as u64, "request");
    resp
}

/// A token header that is present but not visible ASCII is a bad token,
/// not a missing one.
fn readable(v: &HeaderValue) -> Result<&str, ApiError> {
    v.to_str()
        .map_err(|_| ApiError::new(Code::InvalidToken, "token is not ASCII"))
}

fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = readable(v)?;
    Ok(v.split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, rest)| rest.trim()))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    for v in headers.get_all(header::COOKIE) {
        let found = readable(v)?
            .split(';')
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name);
        if let Some((_, v)) = found {
            return Ok(Some(v.trim_matches('"')));
        }
    }
    Ok(None)
}

/// The token, from `Authorization: Bearer`, the configured header, or the
/// cookie; `""` when there is none (the service answers `EMPTY_TOKEN`).
fn token_of<'a>(app: &App, headers: &'a HeaderMap, cookie_name: &str) -> Result<&'a str, ApiError> {
    if let Some(t) = bearer(headers)? {
        return Ok(t);
    }
    if let Some(v) = app
        .config
        .token_header
        .as_ref()
        .and_then(|h| headers.get(h))
    {
        return readable(v);
    }
    Ok(cookie(headers, cookie_name)?.unwrap_or(""))
}

fn client_ip(app: &App, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
    if app.config.trust_forwarded_for {
        let hop = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .next_back();
        if hop.is_some() {
            return hop;
        }
    }
    peer.map(|p| p.ip())
}

fn set_cookie(c: &Cookie, value: &str, max_age: i64) -> HeaderValue {
    let mut s = format!(
        "{}={}; Path={}; Max-Age={}; HttpOnly; SameSite={}",
        c.name,
        value,
        c.path,
        max_age.max(0),
        c.same_site.as_str()
    );
    if c.secure {
        s.push_str("; Secure");
    }
    if let Some(d) = &c.domain {
        s.push_str("; Domain=");
        s.push_str(d);
    }
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The login/refresh answer: JSON body and the session cookie.
fn issued_response(app: &App, issued: &Issued, now_secs: i64) -> Response {
    let body = serde_json::json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_in": (issued.claims.exp - now_secs).max(0),
        "session_expires_at": rfc3339(issued.session_end),
    });
    let cookie = set_cookie(
        &app.service.policy().cookie,
        &issued.token,
        issued.session_end - now_secs,
    );
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    resp.headers_mut().insert(header::SET_COOKIE, cookie);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[derive(Deserialize)]
struct Credentials {
    username: String,
    password: String,
    #[serde(default)]
    rd: Option<String>,
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

/// `POST /v1/login`: JSON `{username,password}` from API clients, or the
/// sign-in form (which then redirects to `rd`).
async fn login(
    State(app): Shared,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return ApiError::new(
                Code::PayloadTooLarge,
                format!("request body over {MAX_BODY} bytes"),
            )
            .into_response();
        }
        Err(e) => return ApiError::new(Code::InvalidRequest, e.body_text()).into_response(),
    };
    let form = is_form(&headers);
    let creds: Credentials = match if form {
        serde_urlencoded::from_bytes(&body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(&body).map_err(|e| e.to_string())
    } {
        Ok(c) => c,
        Err(e) => {
            return ApiError::new(
                Code::InvalidRequest,
                format!("expected {{\"username\",\"password\"}}: {e}"),
            )
            .into_response();
        }
    };
    let target = match &creds.rd {
        Some(rd) if form => match safe_redirect(&app.config, &headers, rd) {
            Some(t) => Some(t),
            None => {
                return ApiError::new(
                    Code::InvalidRedirect,
                    "rd must point to this site or an allowed domain",
                )
                .into_response();
            }
        },
        _ => None,
    };
    let ip = client_ip(&app, &headers, peer.map(|c| c.0.0));
    match app
        .service
        .login(&creds.username, &creds.password, ip, now_millis)
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
            resp
        }
        Err(e) if form => {
            let page = signin_html(creds.rd.as_deref(), Some(&e.message));
            (e.code.status(), Html(page)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct SigninQuery {
    rd: Option<String>,
}

/// `GET /v1/login`: the sign-in form, for ingress `auth-signin`.
async fn signin_page(
    State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<SigninQuery>,
) -> Response {
    if let Some(rd) = &q.rd
        && safe_redirect(&app.config, &headers, rd).is_none()
    {
        return ApiError::new(
            Code::InvalidRedirect,
            "rd must point to this site or an allowed domain",
        )
        .into_response();
    }
    let mut resp = Html(signin_html(q.rd.as_deref(), None)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    resp
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

fn signin_html(rd: Option<&str>, error: Option<&str>) -> String {
    let rd_field = rd
        .map(|r| format!(r#"<input type="hidden" name="rd" value="{}">"#, escape(r)))
        .unwrap_or_default();
    let err = error
        .map(|e| format!(r#"<p class="err">{}</p>"#, escape(e)))
        .unwrap_or_default();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Sign in</title>
<style>body{{font-family:sans-serif;max-width:22rem;margin:4rem auto}}label,input,button{{display:block;width:100%;margin:.4rem 0}}.err{{color:#b00}}</style>
</head><body><h1>Sign in</h1>{err}
<form method="post" action="login">{rd_field}
<label>User name <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Sign in</button></form></body></html>
"#
    )
}

/// The host the client used, as the proxy reports it.
fn request_host(headers: &HeaderMap) -> Option<String> {
    let h = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))?
        .to_str()
        .ok()?;
    let h = h.split(',').next()?.trim();
    Some(
        h.rsplit_once(':')
            .map_or(h, |(host, port)| {
                if port.chars().all(|c| c.is_ascii_digit()) {
                    host
                } else {
                    h
                }
            })
            .to_ascii_lowercase(),
    )
}

/// `rd` is followed only to this site (a relative path, or an absolute URL
/// on the request's host) or to an allow-listed domain: never an open redirect.
pub fn safe_redirect(config: &HttpConfig, headers: &HeaderMap, rd: &str) -> Option<String> {
    if rd.is_empty() || rd.len() > 4_096 || rd.contains('\\') || rd.chars().any(|c| c.is_control())
    {
        return None;
    }
    if rd.starts_with('/') {
        return (!rd.starts_with("//")).then(|| rd.to_string());
    }
    let url = url::Url::parse(rd).ok()?;
    if !matches!(url.scheme(), "http" | "https")
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return None;
    }
    let host = url.host_str()?.to_ascii_lowercase();
    let allowed = request_host(headers).as_deref() == Some(host.as_str())
        || config.redirect_domains.iter().any(|d| {
            let d = d.to_ascii_lowercase();
            match d.strip_prefix('.') {
                Some(parent) => host == parent || host.ends_with(&d),
                None => host == d,
            }
        });
    allowed.then(|| url.to_string())
}

async fn refresh(State(app): Shared, headers: HeaderMap) -> Response {
    let policy = app.service.policy();
    let now = now_millis();
    let token = match token_of(&app, &headers, &policy.cookie.name) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    match app.service.refresh(token, now).await {
        Ok(issued) => issued_response(&app, &issued, now / 1_000),
        Err(e) => e.into_response(),
    }
}

async fn logout(State(app): Shared, headers: HeaderMap) -> Response {
    let policy = app.service.policy();
    let token = match token_of(&app, &headers, &policy.cookie.name) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    match app.service.logout(token, now_millis()).await {
        Ok(()) => {
            let mut resp = StatusCode::NO_CONTENT.into_response();
            resp.headers_mut()
                .insert(header::SET_COOKIE, set_cookie(&policy.cookie, "", 0));
            resp
        }
        Err(e) => e.into_response(),
    }
}

/// Streams (SSE, WebSocket) are never renewed on the fly: a long-lived
/// connection must not spend the token's one refresh behind the page's back.
fn is_stream(headers: &HeaderMap) -> bool {
    let has = |name: HeaderName, needle: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains(needle))
    };
    has(header::ACCEPT, "text/event-stream") || has(header::UPGRADE, "websocket")
}

/// A browser navigation (gets the sign-in redirect in redirect mode), as
/// opposed to an API client (keeps the 401).
fn is_browser(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    !headers.contains_key(header::AUTHORIZATION)
        && accept.contains("text/html")
        && !accept.contains("application/json")
}

/// The URL the client asked for, from whichever proxy convention is present:
/// ingress-nginx `X-Original-URL`, Traefik `X-Forwarded-Proto/Host/Uri`, or
/// the path after `/v1/verify` (Envoy ext_authz with a path prefix).
fn original_url(headers: &HeaderMap, path: &str) -> Option<String> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(u) = get("x-original-url") {
        return Some(u.to_string());
    }
    let host = get("x-forwarded-host").or_else(|| get("host"))?;
    let proto = get("x-forwarded-proto").unwrap_or("http");
    let uri = get("x-forwarded-uri")
        .map(str::to_string)
        .or_else(|| {
            path.strip_prefix("/v1/verify")
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/".into());
    Some(format!("{proto}://{host}{uri}"))
}

/// `/v1/verify` (any method, any sub-path): forward-auth.
async fn verify(State(app): Shared, req: Request) -> Response {
    let headers = req.headers();
    let policy = app.service.policy();
    let now = now_millis();
    let decision = match token_of(&app, headers, &policy.cookie.name) {
        Ok(token) => {
            let may_renew = app.config.renew_on_verify && !is_stream(headers);
            app.service.verify(token, may_renew, now).await
        }
        Err(e) => Err(e),
    };
    match decision {
        Ok(id) => {
            let mut resp = StatusCode::OK.into_response();
            let h = resp.headers_mut();
            let c = &id.claims;
            let mut put = |name: &'static str, value: &str| {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            };
            put("x-auth-request-user", &c.sub);
            put("remote-user", &c.sub);
            put("x-auth-request-session", &c.sid);
            if c.sub.contains('@') {
                put("x-auth-request-email", &c.sub);
            }
            if let Some(issued) = &id.renewed {
                put("x-new-token", &issued.token);
                put("authorization", &format!("Bearer {}", issued.token));
                h.insert(
                    header::SET_COOKIE,
                    set_cookie(
                        &policy.cookie,
                        &issued.token,
                        issued.session_end - now / 1_000,
                    ),
                );
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => {
            // nginx auth_request (ingress-nginx) takes only 2xx/401/403 and
            // does its own sign-in redirect (auth-signin): never a 302 there.
            let behind_nginx = headers.contains_key("x-original-url");
            if let (Some(signin), StatusCode::UNAUTHORIZED, true, false) = (
                &app.config.signin_url,
                e.code.status(),
                is_browser(headers),
                behind_nginx,
            ) {
                let rd = original_url(headers, req.uri().path()).unwrap_or_else(|| "/".into());
                let sep = if signin.contains('?') { '&' } else { '?' };
                let location = format!("{signin}{sep}rd={}", url_encode(&rd));
                if let Ok(v) = HeaderValue::from_str(&location) {
                    return (StatusCode::FOUND, [(header::LOCATION, v)]).into_response();
                }
            }
            e.into_response()
        }
    }
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn jwks(State(app): Shared) -> Response {
    let mut resp = axum::Json(app.service.keys().jwks()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

async fn readyz(State(app): Shared) -> Response {
    match app.service.store().ping().await {
        Ok(()) => "ready".into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn metrics(State(app): Shared) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.service.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn redirects_stay_on_site_or_allowed_domains() {
        let cfg = HttpConfig {
            redirect_domains: vec![".example.com".into(), "other.org".into()],
            ..Default::default()
        };
        let h = headers(&[("host", "auth.example.net:8443")]);
        let ok = |rd: &str| safe_redirect(&cfg, &h, rd).is_some();
        assert!(ok("/app?x=1"));
        assert!(ok("https://auth.example.net/app"));
        assert!(ok("https://app.example.com/x"));
        assert!(ok("https://example.com/"));
        assert!(ok("http://other.org/"));
        assert!(!ok("https://evil.org/"));
        assert!(!ok("https://example.com.evil.org/"));
        assert!(!ok("https://evilexample.com/"));
        assert!(!ok("//evil.org/"));
        assert!(!ok("/\\evil.org"));
        assert!(!ok("https://user@evil.org/"));
        assert!(!ok("javascript:alert(1)"));
        assert!(!ok("https://app.example.com@evil.org/"));
        assert!(!ok(""));
    }

    #[test]
    fn token_sources_in_order() {
        let app = App {
            service: Arc::new(crate::service::tests_support::service()),
            config: HttpConfig {
                token_header: Some(HeaderName::from_static("x-token")),
                ..Default::default()
            },
        };
        let h = headers(&[
            ("authorization", "Bearer a"),
            ("x-token", "b"),
            ("cookie", "tokenpolicy=c"),
        ]);
        assert_eq!(token_of(&app, &h, "tokenpolicy").unwrap(), "a");
        let h = headers(&[("x-token", "b"), ("cookie", "tokenpolicy=c")]);
        assert_eq!(token_of(&app, &h, "tokenpolicy").unwrap(), "b");
        let h = headers(&[("cookie", "other=x; tokenpolicy=c")]);
        assert_eq!(token_of(&app, &h, "tokenpolicy").unwrap(), "c");
        assert_eq!(
            token_of(&app, &HeaderMap::new(), "tokenpolicy").unwrap(),
            ""
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer t\xf6k").unwrap(),
        );
        assert_eq!(
            token_of(&app, &h, "tokenpolicy").unwrap_err().code,
            Code::InvalidToken
        );
    }

    #[test]
    fn streams_and_browsers() {
        assert!(is_stream(&headers(&[("accept", "text/event-stream")])));
        assert!(is_stream(&headers(&[("upgrade", "WebSocket")])));
        assert!(!is_stream(&headers(&[("accept", "text/html")])));
        assert!(is_browser(&headers(&[(
            "accept",
            "text/html,application/xhtml+xml"
        )])));
        assert!(!is_browser(&headers(&[("accept", "application/json")])));
        assert!(!is_browser(&headers(&[
            ("accept", "text/html"),
            ("authorization", "Bearer x")
        ])));
    }

    #[test]
    fn original_url_from_each_proxy() {
        let nginx = headers(&[("x-original-url", "https://app.example.com/a?b=1")]);
        assert_eq!(
            original_url(&nginx, "/v1/verify").unwrap(),
            "https://app.example.com/a?b=1"
        );
        let traefik = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example.com"),
            ("x-forwarded-uri", "/x"),
        ]);
        assert_eq!(
            original_url(&traefik, "/v1/verify").unwrap(),
            "https://app.example.com/x"
        );
        let envoy = headers(&[("host", "app.example.com")]);
        assert_eq!(
            original_url(&envoy, "/v1/verify/api/items").unwrap(),
            "http://app.example.com/api/items"
        );
    }

    #[test]
    fn signin_page_escapes_rd() {
        let page = signin_html(Some("/\"><script>"), Some("<b>"));
        assert!(!page.contains("<script>"));
        assert!(page.contains("&quot;&gt;&lt;script&gt;"));
        assert!(page.contains("&lt;b&gt;"));
    }
}
