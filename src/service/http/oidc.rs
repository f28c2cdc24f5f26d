//! `GET /v1/oidc/login` and `GET /v1/oidc/callback`: the Authorization
//! Code flow with PKCE (S256), `state` and `nonce`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::extract::{client_ip, cookies, user_agent};
use super::{Shared, safe_redirect, set_cookie};
use crate::clock::now_millis;
use crate::service::error::{ApiError, Code};
use crate::service::oidc::flow::{self, FLOW_TTL_SECS, Flow, Sealer};
use crate::service::oidc::recheck::{ProviderSessions, Started};
use crate::service::oidc::{ExchangeError, Provider, Refusal};
use crate::service::session::Client;
use crate::service::store::Take;

/// The provider, the key that seals flow cookies, and what is kept of
/// the provider's side of each session.
pub struct OidcLogin {
    pub provider: Arc<Provider>,
    pub sealer: Sealer,
    pub sessions: Arc<ProviderSessions>,
}

impl std::fmt::Debug for OidcLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcLogin")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

fn not_configured() -> ApiError {
    ApiError::new(
        Code::InvalidRequest,
        "OpenID Connect is not configured (spec.oidc)",
    )
}

fn flow_cookie_name(secure: bool) -> &'static str {
    if secure {
        flow::HOST_COOKIE
    } else {
        flow::PLAIN_COOKIE
    }
}

fn flow_cookie(secure: bool, value: &str, max_age: i64) -> HeaderValue {
    let s = format!(
        "{}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
        flow_cookie_name(secure),
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    pub rd: Option<String>,
}

/// `GET /v1/oidc/login?rd=URL`: 302 to the provider's authorization endpoint.
pub(super) async fn oidc_login(
    State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Result<Response, ApiError> {
    let oidc = app.config.oidc.as_ref().ok_or_else(not_configured)?;
    let secure = app.service.policy().cookie.secure;
    let rd = match q.rd.as_deref() {
        Some(rd) if !rd.is_empty() => {
            safe_redirect(&app.config, &headers, secure, rd).ok_or_else(|| {
                ApiError::new(
                    Code::InvalidRedirect,
                    "rd must point to this site or an allowed domain",
                )
            })?
        }
        _ => "/".into(),
    };
    if let Some(why) = oidc.provider.unready() {
        return Err(ApiError::new(Code::ProviderUnavailable, why.as_str()).retry_after(5));
    }
    let flow = Flow {
        state: flow::random(),
        nonce: flow::random(),
        verifier: flow::random(),
        rd,
        exp: now_millis() / 1_000 + FLOW_TTL_SECS,
    };
    let location = oidc
        .provider
        .authorize_url(&flow.state, &flow.nonce, &flow::challenge(&flow.verifier))
        .ok_or_else(|| ApiError::new(Code::ProviderUnavailable, "not discovered yet"))?;
    let location = HeaderValue::from_str(&location).map_err(|_| {
        ApiError::new(
            Code::ProviderUnavailable,
            "the authorization endpoint is not a valid URL",
        )
    })?;
    let mut resp = StatusCode::FOUND.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(
        header::SET_COOKIE,
        flow_cookie(secure, &oidc.sealer.seal(&flow), FLOW_TTL_SECS),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

#[derive(Deserialize)]
pub(super) struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
}

/// `GET /v1/oidc/callback?code=&state=`: the code exchange, the ID token's
/// checks, then a session and a 302 to `rd`. Any refusal starts no session
/// and clears the flow cookie; a browser gets a page that says why.
pub(super) async fn oidc_callback(
    State(app): Shared,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let secure = app.service.policy().cookie.secure;
    let addr = peer.as_ref().map(|c| c.0.0);
    // A refusal once the session was asked for is audited by the service.
    let mut session_asked = false;
    let mut resp = match callback(&app, peer, &headers, q, &mut session_asked).await {
        Ok(resp) => resp,
        Err(e) => {
            if !session_asked {
                let client = super::extract::client_of(&app, &headers, addr);
                app.service
                    .audit_oidc_refusal(&client, e.code, now_millis());
            }
            tracing::info!(code = e.code.as_str(), reason = %e.message, "OpenID Connect sign-in refused");
            refusal(&headers, e)
        }
    };
    resp.headers_mut()
        .append(header::SET_COOKIE, flow_cookie(secure, "", 0));
    resp
}

async fn callback(
    app: &super::App,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: &HeaderMap,
    q: CallbackQuery,
    session_asked: &mut bool,
) -> Result<Response, ApiError> {
    let oidc = app.config.oidc.as_ref().ok_or_else(not_configured)?;
    let policy = app.service.policy();
    let now = now_millis() / 1_000;
    // The flow of this browser with this state: each candidate cookie.
    let candidates = cookies(headers, flow_cookie_name(policy.cookie.secure)).unwrap_or_default();
    let mut opened = oidc.sealer.open(None, q.state.as_deref(), now);
    for c in candidates {
        opened = oidc.sealer.open(Some(c), q.state.as_deref(), now);
        if opened.is_ok() {
            break;
        }
    }
    let flow = opened.map_err(|e| ApiError::new(Code::InvalidState, e.to_string()))?;
    // Once, across replicas.
    let once = flow::once_key(&flow.state);
    if let Take::Refused { .. } = app
        .service
        .store()
        .take_attempt(&once, 1, FLOW_TTL_SECS * 1_000)
        .await?
    {
        return Err(ApiError::new(
            Code::InvalidState,
            flow::StateError::Replayed.to_string(),
        ));
    }
    if let Some(error) = q.error {
        let error: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return Err(ApiError::new(
            Code::ProviderRefused,
            format!("the provider refused the sign-in: {error}"),
        ));
    }
    let code = q
        .code
        .filter(|c| !c.is_empty() && c.len() <= 4_096)
        .ok_or_else(|| ApiError::new(Code::InvalidRequest, "the callback has no code"))?;
    let exchanged = oidc
        .provider
        .exchange(&code, &flow.verifier)
        .await
        .map_err(|e| match e {
            ExchangeError::Refused(_) => ApiError::new(Code::ProviderRefused, e.to_string()),
            ExchangeError::Unavailable(_) => {
                tracing::warn!(error = %e, "OpenID Connect code exchange failed");
                ApiError::new(Code::ProviderUnavailable, e.to_string()).retry_after(5)
            }
        })?;
    let claims = oidc
        .provider
        .validate(&exchanged.id_token, &flow.nonce, now)
        .await
        .map_err(|e| ApiError::new(Code::InvalidIdToken, e.to_string()))?;
    let start = oidc.provider.identity(&claims).map_err(|e| match e {
        Refusal::Group | Refusal::EmailDomain => ApiError::new(Code::ForbiddenUser, e.to_string()),
        Refusal::Token(_) | Refusal::Subject => ApiError::new(Code::InvalidIdToken, e.to_string()),
    })?;
    let client = Client {
        addr: client_ip(app, headers, peer.map(|c| c.0.0)),
        user_agent: user_agent(headers),
    };
    let provider_sid = claims
        .get("sid")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .map(str::to_string);
    *session_asked = true;
    let issued = app
        .service
        .start_session(start, &client, now_millis)
        .await?;
    let started = Started {
        sid: &issued.claims.sid,
        sub: &issued.claims.sub,
        auth_time: issued.claims.auth_time,
        session_end: issued.session_end,
        provider_sid: provider_sid.as_deref(),
    };
    let kept = oidc
        .sessions
        .remember(&started, exchanged.refresh_token.as_deref(), now_millis())
        .await;
    if let Err(e) = kept {
        // A session the provider could not end later is not handed out.
        let _ = app.service.logout(&issued.token, now_millis()).await;
        return Err(e.into());
    }
    let mut resp = StatusCode::FOUND.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&flow.rd).unwrap_or_else(|_| HeaderValue::from_static("/")),
    );
    h.insert(
        header::SET_COOKIE,
        set_cookie(
            &policy.cookie,
            &issued.token,
            issued.session_end - issued.claims.iat,
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// A refused callback's page (`templates/refused.html`).
#[derive(askama::Template)]
#[template(path = "refused.html")]
struct RefusedPage<'a> {
    message: &'a str,
    code: &'a str,
}

/// The refusal: a page for a browser, the JSON error otherwise; both carry
/// the code.
fn refusal(headers: &HeaderMap, e: ApiError) -> Response {
    if !wants_html(headers) {
        return e.into_response();
    }
    let page = RefusedPage {
        message: &e.message,
        code: e.code.as_str(),
    };
    super::page::respond(e.code.status(), &page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn a_refusal_page_escapes_the_message_and_keeps_the_code() {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        let e = ApiError::new(Code::ForbiddenUser, "<script>alert(1)</script> not allowed");
        let resp = refusal(&headers, e);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert!(
            resp.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .starts_with("default-src 'none'")
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let page = String::from_utf8_lossy(&body);
        assert!(page.contains("Sign-in refused"), "{page}");
        assert!(page.contains("<code>FORBIDDEN_USER</code>"), "{page}");
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&#60;script&#62;alert(1)&#60;/script&#62; not allowed"));
    }
}
