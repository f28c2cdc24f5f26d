//! The account page: `GET /v1/account` lists the caller's live sessions,
//! and its two forms end one of them (`POST /v1/account/sessions/{sid}/end`)
//! or all of them (`POST /v1/account/logout-everywhere`). Server-rendered,
//! without JavaScript (`templates/account.html`); see docs/src/http.md.
//!
//! The forms are protected against cross-site posts twice over:
//!
//! 1. the cross-site rule of the sign-in form (see [`super::origin`]), for
//!    every post whose token is the cookie;
//! 2. a form token in each form, a keyed hash of the session's `sid` (the
//!    key derived from the signing key, which every replica shares). A post
//!    whose form token is missing or is not the session's is refused
//!    (`403 CROSS_SITE_REQUEST`) and ends nothing. A page loaded before a
//!    signing-key rotation carries the old key's token: reloading the page
//!    gives the new one.
//!
//! A browser without a session, or whose session is over, is sent to the
//! sign-in page with `rd=/v1/account`. A cookie whose token is past its
//! expiry but still renewable is renewed on the way (its new cookie is
//! set), as `/v1/verify` does; a bearer token never is.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ring::hmac;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::extract::{Source, is_form, token_and_source};
use super::{App, Shared, origin, page, set_cookie};
use crate::clock::{now_millis, rfc3339};
use crate::service::error::{ApiError, Code};
use crate::service::jwt::Claims;
use crate::service::session::Issued;
use crate::service::store::SessionEntry;

/// Session ids are UUIDs; anything much longer is no session of anybody's.
const MAX_SID_LEN: usize = 64;
/// A user agent is shown up to this many characters.
const MAX_USER_AGENT_CHARS: usize = 200;
/// Where a browser without a session is sent, relative to `/v1/`.
const SIGNIN: &str = "login?rd=%2Fv1%2Faccount";
/// Where a browser that signed itself out is sent, relative to `/v1/`.
const SIGNED_OUT: &str = "login?reason=signed-out";

/// What the page says after one of its forms: a fixed text chosen by the
/// `done` query parameter (anything else is ignored, never shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    SessionEnded,
    AlreadyEnded,
}

impl Done {
    fn from_param(value: &str) -> Option<Done> {
        match value {
            "session-ended" => Some(Done::SessionEnded),
            "already-ended" => Some(Done::AlreadyEnded),
            _ => None,
        }
    }

    fn param(self) -> &'static str {
        match self {
            Done::SessionEnded => "session-ended",
            Done::AlreadyEnded => "already-ended",
        }
    }

    fn text(self) -> &'static str {
        match self {
            Done::SessionEnded => "That session has been signed out.",
            Done::AlreadyEnded => "That session had already ended.",
        }
    }
}

/// One session as the page shows it.
struct SessionView {
    sid: String,
    /// The sid as one path segment of the form's action.
    sid_path: String,
    current: bool,
    how: String,
    /// (machine-readable, as shown) times.
    started: (String, String),
    last_active: (String, String),
    ends: (String, String),
    addr: String,
    user_agent: String,
}

#[derive(askama::Template)]
#[template(path = "account.html")]
struct AccountPage<'a> {
    user: &'a str,
    notice: Option<&'static str>,
    sessions: Vec<SessionView>,
    csrf: String,
}

fn when(millis: i64) -> (String, String) {
    let iso = rfc3339(millis.div_euclid(1_000));
    let shown = iso.replacen('T', " ", 1).replace('Z', " UTC");
    (iso, shown)
}

/// How a session signed in: with a password, or through the provider
/// (by its configured name when it is the one configured now).
fn how(app: &App, e: &SessionEntry) -> String {
    match e.idp.as_deref() {
        None => "Signed in with a password".into(),
        Some(idp) => {
            let policy = app.service.policy();
            let name = app
                .config
                .oidc
                .as_ref()
                .and(policy.oidc.as_ref())
                .filter(|o| o.issuer_url == idp)
                .map_or(idp, |o| o.provider_name.as_str());
            format!("Signed in with {name}")
        }
    }
}

fn view(app: &App, e: &SessionEntry, current: &str) -> SessionView {
    let mut user_agent: String = e
        .user_agent
        .as_deref()
        .unwrap_or("unknown")
        .chars()
        .take(MAX_USER_AGENT_CHARS)
        .collect();
    if e.user_agent
        .as_ref()
        .is_some_and(|u| u.chars().count() > MAX_USER_AGENT_CHARS)
    {
        user_agent.push('…');
    }
    SessionView {
        sid: e.sid.clone(),
        sid_path: percent_encoding::utf8_percent_encode(&e.sid, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
        current: e.sid == current,
        how: how(app, e),
        started: when(e.started),
        last_active: when(e.last_active),
        ends: when(e.ends),
        addr: e.addr.clone().unwrap_or_else(|| "unknown".into()),
        user_agent,
    }
}

/// The form token of session `sid` (see the module docs).
fn form_token(app: &App, sid: &str) -> String {
    let mut k = Sha256::new();
    k.update(b"tokenpolicy account form v1\n");
    k.update(app.service.keys().signing_key().to_pem().as_bytes());
    let key = hmac::Key::new(hmac::HMAC_SHA256, &k.finalize());
    let tag = hmac::sign(&key, sid.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn form_token_ok(app: &App, sid: &str, given: Option<&str>) -> bool {
    let Some(given) = given else {
        return false;
    };
    subtle::ConstantTimeEq::ct_eq(form_token(app, sid).as_bytes(), given.as_bytes()).into()
}

fn see_other(location: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whether a refusal means the caller has no session (sign in again), as
/// opposed to a failure of ours (the store, shutting down) or a bad request.
fn no_session(e: &ApiError) -> bool {
    e.code.status() == StatusCode::UNAUTHORIZED
}

/// The caller's token, and whether a browser's cookie carried it.
async fn token<'a>(app: &App, headers: &'a HeaderMap) -> Result<(&'a str, bool), ApiError> {
    let policy = app.service.policy();
    let (token, source) = token_and_source(app, headers, &policy.cookie.name).await?;
    Ok((token, source == Source::Cookie))
}

/// Runs `op` with the caller's token; a cookie's token that is past its
/// expiry but renewable is renewed first (and `op` runs with the new one).
async fn with_renewal<T, F, Fut>(
    app: &App,
    token: &str,
    from_cookie: bool,
    op: F,
) -> Result<(T, Option<Issued>), ApiError>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, ApiError>>,
{
    match op(token.to_string()).await {
        Err(e) if e.code == Code::ExpiredToken && from_cookie => {
            let issued = app.service.refresh(token, now_millis()).await?;
            let out = op(issued.token.clone()).await?;
            Ok((out, Some(issued)))
        }
        other => other.map(|out| (out, None)),
    }
}

fn set_renewed(app: &App, resp: &mut Response, renewed: Option<&Issued>) {
    if let Some(issued) = renewed {
        let cookie = set_cookie(
            &app.service.policy().cookie,
            &issued.token,
            issued.session_end - issued.claims.iat,
        );
        resp.headers_mut().insert(header::SET_COOKIE, cookie);
    }
}

fn clear_cookie(app: &App, resp: &mut Response) {
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&app.service.policy().cookie, "", 0),
    );
}

#[derive(Deserialize)]
pub(super) struct PageQuery {
    done: Option<String>,
}

/// `GET /v1/account`.
pub(super) async fn page(
    State(app): Shared,
    headers: HeaderMap,
    Query(q): Query<PageQuery>,
) -> Response {
    let (token, from_cookie) = match token(&app, &headers).await {
        Ok((t, c)) if !t.is_empty() => (t, c),
        Ok(_) => return see_other(SIGNIN),
        Err(e) if no_session(&e) => return see_other(SIGNIN),
        Err(e) => return e.into_response(),
    };
    let svc = &app.service;
    let listed = with_renewal(&app, token, from_cookie, |t| async move {
        let list = svc.sessions(&t, now_millis()).await?;
        let claims = svc
            .keys()
            .verify(&t)
            .map_err(|e| ApiError::new(Code::InvalidToken, e.to_string()))?;
        Ok((list, claims))
    })
    .await;
    let ((list, claims), renewed) = match listed {
        Ok(x) => x,
        Err(e) if no_session(&e) => return see_other(SIGNIN),
        Err(e) => return e.into_response(),
    };
    let mut sessions: Vec<SessionView> = list
        .sessions
        .iter()
        .map(|e| view(&app, e, &list.current))
        .collect();
    // The caller's own session first; the others in the order they started.
    sessions.sort_by_key(|s| !s.current);
    let page = AccountPage {
        user: claims.user_name(),
        notice: q.done.as_deref().and_then(Done::from_param).map(Done::text),
        sessions,
        csrf: form_token(&app, &claims.sid),
    };
    let mut resp = page::respond(StatusCode::OK, &page);
    set_renewed(&app, &mut resp, renewed.as_ref());
    resp
}

#[derive(Deserialize)]
struct AccountForm {
    csrf: Option<String>,
}

/// What every form post goes through before it changes anything: a form,
/// from this site when the cookie carries the token, with a token whose
/// signature is ours and the session's own form token. `Ok(Err(resp))`:
/// no session, answered with the way to the sign-in page.
async fn checked_post<'a>(
    app: &App,
    headers: &'a HeaderMap,
    body: Result<Bytes, BytesRejection>,
    to_v1: &str,
) -> Result<Result<(&'a str, bool, Claims), Response>, ApiError> {
    if !is_form(headers) {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            "send the account page's form (application/x-www-form-urlencoded)",
        ));
    }
    let (token, from_cookie) = match token(app, headers).await {
        Ok(t) => t,
        Err(e) if no_session(&e) => return Ok(Err(see_other(&format!("{to_v1}{SIGNIN}")))),
        Err(e) => return Err(e),
    };
    if from_cookie {
        origin::check_same_site(&app.config, headers, app.service.policy().cookie.secure)?;
    }
    let body = body.map_err(|e| ApiError::new(Code::InvalidRequest, e.body_text()))?;
    let form: AccountForm = serde_urlencoded::from_bytes(&body)
        .map_err(|e| ApiError::new(Code::InvalidRequest, format!("unreadable form: {e}")))?;
    let claims = match app.service.keys().verify(token) {
        Ok(c) if !token.is_empty() => c,
        _ => return Ok(Err(see_other(&format!("{to_v1}{SIGNIN}")))),
    };
    if !form_token_ok(app, &claims.sid, form.csrf.as_deref()) {
        return Err(ApiError::new(
            Code::CrossSiteRequest,
            "cross-site request refused: the form's token is missing or not this session's; reload the account page",
        ));
    }
    Ok(Ok((token, from_cookie, claims)))
}

/// `POST /v1/account/sessions/{sid}/end`: ends one of the caller's
/// sessions and goes back to the page; ending the caller's own signs this
/// browser out and goes to the sign-in page.
pub(super) async fn end(
    State(app): Shared,
    Path(sid): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    const TO_V1: &str = "../../../";
    let (token, from_cookie, claims) = match checked_post(&app, &headers, body, TO_V1).await? {
        Ok(x) => x,
        Err(to_signin) => return Ok(to_signin),
    };
    if sid == claims.sid {
        app.service.logout(token, now_millis()).await?;
        let mut resp = see_other(&format!("{TO_V1}{SIGNED_OUT}"));
        clear_cookie(&app, &mut resp);
        return Ok(resp);
    }
    let svc = &app.service;
    let sid = sid.as_str();
    let ended = if sid.is_empty() || sid.len() > MAX_SID_LEN {
        Err(ApiError::new(Code::SessionNotFound, "no such session"))
    } else {
        with_renewal(&app, token, from_cookie, |t| async move {
            svc.end_session(&t, sid, now_millis()).await
        })
        .await
    };
    let back = |done: Done| see_other(&format!("{TO_V1}account?done={}", done.param()));
    match ended {
        Ok(((), renewed)) => {
            let mut resp = back(Done::SessionEnded);
            set_renewed(&app, &mut resp, renewed.as_ref());
            Ok(resp)
        }
        Err(e) if e.code == Code::SessionNotFound => Ok(back(Done::AlreadyEnded)),
        Err(e) if no_session(&e) => Ok(see_other(&format!("{TO_V1}{SIGNIN}"))),
        Err(e) => Err(e),
    }
}

/// `POST /v1/account/logout-everywhere`: ends every session of the caller,
/// on every replica, and goes to the sign-in page.
pub(super) async fn logout_everywhere(
    State(app): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    const TO_V1: &str = "../";
    let (token, _, _) = match checked_post(&app, &headers, body, TO_V1).await? {
        Ok(x) => x,
        Err(to_signin) => return Ok(to_signin),
    };
    match app.service.logout_everywhere(token, now_millis()).await {
        Ok(()) => {
            let mut resp = see_other(&format!("{TO_V1}{SIGNED_OUT}"));
            clear_cookie(&app, &mut resp);
            Ok(resp)
        }
        Err(e) if no_session(&e) => Ok(see_other(&format!("{TO_V1}{SIGNIN}"))),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
