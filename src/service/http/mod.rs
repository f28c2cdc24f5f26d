//! The HTTP API (routes and error codes: see the README's "HTTP"
//! section). Handlers are thin: they pull the token and the request's shape
//! out of HTTP and hand them to [`TokenService`].
//!
//! `extract` reads the token, the client address and login credentials;
//! `signin` holds login, the sign-in page and safe redirects;
//! `forward_auth` is `/v1/verify`.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};

use crate::clock::now_millis;
use crate::policy::Cookie;
use crate::service::error::ApiError;
use crate::service::tokens::{Issued, TokenService};

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

mod extract;
mod forward_auth;
mod notice;
mod signin;

use extract::token_of;
use forward_auth::verify;
pub use signin::safe_redirect;
use signin::{login, signin_page};

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
        .get_or_create(&crate::service::metrics::Route {
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, %route, status = resp.status().as_u16(), micros = elapsed.as_micros() as u64, "request");
    resp
}

pub(super) fn set_cookie(c: &Cookie, value: &str, max_age: i64) -> HeaderValue {
    let mut s = format!(
        "{}={}; Path={}; Max-Age={}; HttpOnly; SameSite={}",
        c.name,
        value,
        c.path,
        if max_age > 0 {
            max_age + notice::COOKIE_KEPT_AFTER_SESSION_SECS
        } else {
            0
        },
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
pub(super) fn issued_response(app: &App, issued: &Issued, now_secs: i64) -> Response {
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
            // A sign-out button (a form post) goes on to the sign-in page,
            // which says why; API clients get 204.
            let mut resp = if extract::is_form(&headers) {
                let location = format!("login?reason={}", notice::Notice::SignedOut.param());
                (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
            } else {
                StatusCode::NO_CONTENT.into_response()
            };
            resp.headers_mut()
                .insert(header::SET_COOKIE, set_cookie(&policy.cookie, "", 0));
            resp
        }
        Err(e) => e.into_response(),
    }
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
