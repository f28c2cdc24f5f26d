//! The HTTP API (routes and error codes: see docs/src/http.md).
//! Handlers are thin: they pull the token and the request's shape
//! out of HTTP and hand them to [`TokenService`].
//!
//! `extract` reads the token, the client address and login credentials;
//! `signin` holds login, the sign-in page and safe redirects;
//! `account` the account page (the caller's sessions); `page` the pages'
//! templates;
//! `forward_auth` is `/v1/verify`; `error` how a rejection looks on the
//! wire (status, headers, JSON body).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};

use crate::clock::{now_millis, rfc3339};
use crate::policy::Cookie;
use crate::service::error::{ApiError, Code};
use crate::service::listen::Draining;
use crate::service::metrics::UNMATCHED;
use crate::service::session::{Issued, TokenService};
pub use crate::trusted_proxies::TrustedProxies;

/// Request bodies are small JSON or form posts.
pub const MAX_BODY: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Another header to read the token from (besides `Authorization` and the cookie).
    pub token_header: Option<HeaderName>,
    /// The proxies whose `X-Forwarded-For` entries give the client address
    /// (login throttling); none: the peer's address, always.
    pub trusted_proxies: TrustedProxies,
    /// Take the client's host, scheme and path from `X-Forwarded-Host`,
    /// `-Proto` and `-Uri` (only behind a proxy that sets them itself).
    pub trust_forwarded_headers: bool,
    /// Time a request may take, reading its body included.
    pub request_timeout: Duration,
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
    /// `rd` and `Origin` may name any port of an allowed host (the scheme
    /// must still be the request's). Off: the port must be the request's.
    pub redirect_any_port: bool,
    /// Sign-in through an OpenID Connect provider (`spec.oidc`).
    pub oidc: Option<Arc<oidc::OidcLogin>>,
    /// Who may call the admin API; none: it answers 404.
    pub admin: Option<Arc<crate::service::admin::AdminAuth>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            token_header: None,
            trusted_proxies: TrustedProxies::default(),
            trust_forwarded_headers: false,
            request_timeout: Duration::from_secs(30),
            renew_on_verify: true,
            signin_url: None,
            redirect_domains: Vec::new(),
            redirect_any_port: false,
            oidc: None,
            admin: None,
        }
    }
}

pub struct App {
    pub service: Arc<TokenService>,
    pub config: HttpConfig,
}

type Shared = State<Arc<App>>;

mod account;
mod admin;
mod backchannel;
mod error;
mod extract;
mod forward_auth;
mod notice;
pub mod oidc;
mod origin;
mod page;
mod sessions;
mod signin;
#[cfg(test)]
mod tests;

use extract::{Source, token_and_source};
use forward_auth::verify;
pub use signin::safe_redirect;
use signin::{login, signin_page};

/// Every route on one listener.
pub fn router(app: Arc<App>) -> Router {
    layered(public_routes().merge(admin_routes()), app)
}

/// The routes clients and proxies call, with the probes (for load
/// balancers that check this port) but without /metrics.
pub fn public_router(app: Arc<App>) -> Router {
    layered(public_routes().merge(probe_routes()), app)
}

/// `/v1/verify` and `/v1/verify/{*rest}` only, for `--forward-auth-listen`:
/// what an ingress controller calls, on connection slots of its own.
pub fn forward_auth_router(app: Arc<App>) -> Router {
    layered(forward_auth_routes(), app)
}

/// /healthz, /readyz and /metrics, for `--metrics-listen`.
pub fn admin_router(app: Arc<App>) -> Router {
    layered(admin_routes(), app)
}

fn public_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/login", post(login).get(signin_page))
        .route("/v1/refresh", post(refresh))
        .route("/v1/logout", post(logout))
        .route("/v1/sessions", get(sessions::list))
        .route("/v1/sessions/{sid}", delete(sessions::end_one))
        .route("/v1/account", get(account::page))
        .route("/v1/account/sessions/{sid}/end", post(account::end))
        .route(
            "/v1/account/logout-everywhere",
            post(account::logout_everywhere),
        )
        .route(
            "/v1/admin/sessions",
            get(admin::list).delete(admin::end_user),
        )
        .route("/v1/admin/sessions/{sid}", delete(admin::end_one))
        .route("/v1/oidc/login", get(oidc::oidc_login))
        .route("/v1/oidc/callback", get(oidc::oidc_callback))
        .route(
            "/v1/oidc/backchannel-logout",
            post(backchannel::backchannel_logout),
        )
        .merge(forward_auth_routes())
        .route("/.well-known/jwks.json", get(jwks))
}

fn forward_auth_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/verify", any(verify))
        .route("/v1/verify/{*rest}", any(verify))
}

fn probe_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

fn admin_routes() -> Router<Arc<App>> {
    probe_routes().route("/metrics", get(metrics))
}

fn layered(routes: Router<Arc<App>>, app: Arc<App>) -> Router {
    routes
        .layer(middleware::from_fn_with_state(app.clone(), deadline))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(())
                .on_failure(()),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

/// One span per request: method and route only (never the query string or
/// a header: they may carry a token or a redirect target).
fn request_span(req: &Request) -> tracing::Span {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, |p| p.as_str());
    tracing::debug_span!("request", method = %req.method(), route = %route)
}

/// A request (its body included) that takes longer than the request timeout
/// gets a 408: a client sending its body slowly cannot hold a handler.
async fn deadline(State(app): Shared, req: Request, next: Next) -> Response {
    match tokio::time::timeout(app.config.request_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(Code::RequestTimeout, "the request took too long").into_response(),
    }
}

/// Latency by route, and one debug line per request (path only: a query
/// string may carry a redirect target, never a token, but we keep logs lean).
async fn observe(State(app): Shared, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    let elapsed = started.elapsed();
    let route = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    app.service.metrics.latency.observe(route, elapsed);
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

/// The token of a refresh or logout: a cookie-borne one only from a
/// same-site request (see [`origin`]).
async fn state_change_token<'a>(
    app: &App,
    headers: &'a HeaderMap,
    cookie_name: &str,
) -> Result<&'a str, ApiError> {
    let (token, source) = token_and_source(app, headers, cookie_name).await?;
    if source == Source::Cookie {
        origin::check_same_site(&app.config, headers, app.service.policy().cookie.secure)?;
    }
    Ok(token)
}

/// The peer of the connection, for [`extract::client_of`].
type Peer = Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

async fn refresh(State(app): Shared, peer: Peer, headers: HeaderMap) -> Result<Response, ApiError> {
    let policy = app.service.policy();
    let now = now_millis();
    let token = state_change_token(&app, &headers, &policy.cookie.name).await?;
    let client = || extract::client_of(&app, &headers, peer.as_ref().map(|c| c.0.0));
    let issued = app.service.refresh_from(token, &client, now).await?;
    Ok(issued_response(&app, &issued, now / 1_000))
}

async fn logout(
    State(app): Shared,
    peer: Peer,
    query: RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let policy = app.service.policy();
    let everywhere = sessions::everywhere(&query)?;
    let token = state_change_token(&app, &headers, &policy.cookie.name).await?;
    let client = || extract::client_of(&app, &headers, peer.as_ref().map(|c| c.0.0));
    if everywhere {
        app.service
            .logout_everywhere_from(token, &client, now_millis())
            .await?;
    } else {
        app.service
            .logout_from(token, &client, now_millis())
            .await?;
    }
    // A sign-out button (a form post) goes on to the sign-in page, which
    // says why; API clients get 204.
    let mut resp = if extract::is_form(&headers) {
        let location = format!("login?reason={}", notice::Notice::SignedOut.param());
        (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
    } else {
        StatusCode::NO_CONTENT.into_response()
    };
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&policy.cookie, "", 0));
    Ok(resp)
}

async fn jwks(State(app): Shared) -> Response {
    let mut resp = axum::Json(app.service.keys().jwks()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

/// Unready once shutdown began (load balancers stop sending new requests
/// while in-flight ones finish), while the store is unreachable, or while
/// the OpenID Connect provider is not discovered.
async fn readyz(
    State(app): Shared,
    draining: Option<Extension<Draining>>,
) -> Result<&'static str, ApiError> {
    if draining.is_some_and(|d| d.is_set()) {
        return Err(ApiError::new(Code::ShuttingDown, "shutting down"));
    }
    app.service.store().ping().await?;
    if let Some(why) = app.config.oidc.as_ref().and_then(|o| o.provider.unready()) {
        return Err(ApiError::new(Code::ProviderUnavailable, why.as_str()));
    }
    Ok("ready")
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
