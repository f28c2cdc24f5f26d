//! The admin API: `GET /v1/admin/sessions?user=NAME`,
//! `DELETE /v1/admin/sessions/{sid}` and `DELETE /v1/admin/sessions?user=NAME`
//! (see docs/src/http.md). Without `--admin-token-file` or `--policy-ref`
//! every admin route answers 404, as a route that does not exist.
//!
//! Only `Authorization: Bearer` is read: never a cookie, so a browser
//! cannot be made to call it cross-site.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Shared;
use crate::clock::now_millis;
use crate::service::admin::{AdminAuth, Verb};
use crate::service::error::{ApiError, Code};
use crate::service::session::admin::NamedUser;

/// Session ids are UUIDs; anything much longer is no session of anybody's.
const MAX_SID_LEN: usize = 64;
/// Longer than any user name or subject we would issue a session for.
const MAX_NAME_LEN: usize = 1_024;

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, rest)| rest.trim())
}

/// The admin's name, or why not; `None`: the admin API is off (404).
async fn admin(
    auth: Option<&AdminAuth>,
    headers: &HeaderMap,
    verb: Verb,
) -> Option<Result<String, ApiError>> {
    Some(auth?.authorize(bearer(headers), verb).await)
}

fn off() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

fn bad(message: &str) -> ApiError {
    ApiError::new(Code::InvalidRequest, message)
}

/// `user=NAME` and, for an OpenID Connect user, `provider=ISSUER`.
fn named_user(query: &RawQuery) -> Result<NamedUser, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.0.as_deref().unwrap_or(""))
        .map_err(|_| bad("unreadable query string"))?;
    let (mut name, mut provider) = (None, None);
    for (k, v) in pairs {
        let slot = match k.as_str() {
            "user" => &mut name,
            "provider" => &mut provider,
            _ => return Err(bad("the query takes user and provider only")),
        };
        if slot.replace(v).is_some() {
            return Err(bad("user and provider may each be given once"));
        }
    }
    let name = name.ok_or_else(|| bad("user=NAME is required"))?;
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad("user must be 1 to 1024 bytes"));
    }
    if provider.as_deref().is_some_and(str::is_empty) {
        return Err(bad("provider must not be empty"));
    }
    Ok(NamedUser { name, provider })
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(super) async fn list(
    State(app): Shared,
    query: RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(who) = admin(app.config.admin.as_deref(), &headers, Verb::List).await else {
        return Ok(off());
    };
    who?;
    let user = named_user(&query)?;
    let entries = app.service.admin_sessions(&user, now_millis()).await?;
    let sessions: Vec<_> = entries.iter().map(super::sessions::entry_json).collect();
    Ok(no_store(
        axum::Json(serde_json::json!({
            "user": user.name,
            "provider": user.provider,
            "sessions": sessions,
        }))
        .into_response(),
    ))
}

pub(super) async fn end_user(
    State(app): Shared,
    query: RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(who) = admin(app.config.admin.as_deref(), &headers, Verb::Delete).await else {
        return Ok(off());
    };
    let who = who?;
    let user = named_user(&query)?;
    let ended = app
        .service
        .admin_end_user(&user, &who, now_millis())
        .await?;
    Ok(no_store(
        axum::Json(serde_json::json!({ "revoked": ended })).into_response(),
    ))
}

pub(super) async fn end_one(
    State(app): Shared,
    Path(sid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(who) = admin(app.config.admin.as_deref(), &headers, Verb::Delete).await else {
        return Ok(off());
    };
    let who = who?;
    if sid.is_empty() || sid.len() > MAX_SID_LEN {
        return Err(ApiError::new(Code::SessionNotFound, "no such live session"));
    }
    app.service
        .admin_end_session(&sid, &who, now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests;
