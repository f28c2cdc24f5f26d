//! The caller's own sessions: `GET /v1/sessions`, `DELETE /v1/sessions/{sid}`
//! and `POST /v1/logout?everywhere=true` (see docs/src/http.md).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{Shared, extract, state_change_token};
use crate::clock::{now_millis, rfc3339};
use crate::service::error::{ApiError, Code};

/// Session ids are UUIDs; anything much longer is no session of anybody's.
const MAX_SID_LEN: usize = 64;

pub(super) async fn list(State(app): Shared, headers: HeaderMap) -> Result<Response, ApiError> {
    let policy = app.service.policy();
    let token = extract::token_of(&app, &headers, &policy.cookie.name).await?;
    let list = app.service.sessions(token, now_millis()).await?;
    let sessions: Vec<_> = list
        .sessions
        .iter()
        .map(|e| {
            let mut v = entry_json(e);
            v["current"] = serde_json::Value::Bool(e.sid == list.current);
            v
        })
        .collect();
    let mut resp = axum::Json(serde_json::json!({ "sessions": sessions })).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

pub(super) async fn end_one(
    State(app): Shared,
    peer: super::Peer,
    Path(sid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let policy = app.service.policy();
    let token = state_change_token(&app, &headers, &policy.cookie.name).await?;
    if sid.is_empty() || sid.len() > MAX_SID_LEN {
        return Err(ApiError::new(Code::SessionNotFound, "no such session"));
    }
    let client = || extract::client_of(&app, &headers, peer.as_ref().map(|c| c.0.0));
    app.service
        .end_session_from(token, &sid, &client, now_millis())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Whether `POST /v1/logout` asks to end every session (`everywhere=true`).
pub(super) fn everywhere(query: &RawQuery) -> Result<bool, ApiError> {
    let Some(q) = query.0.as_deref() else {
        return Ok(false);
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(q)
        .map_err(|_| ApiError::new(Code::InvalidRequest, "unreadable query string"))?;
    let mut all = false;
    for (k, v) in pairs {
        if k == "everywhere" {
            all = match v.as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(ApiError::new(
                        Code::InvalidRequest,
                        "everywhere must be true or false",
                    ));
                }
            };
        }
    }
    Ok(all)
}

/// One session as the session APIs list it (the caller's own, and the
/// admin's): never a token or a credential.
pub(super) fn entry_json(e: &crate::service::store::SessionEntry) -> serde_json::Value {
    serde_json::json!({
        "sid": e.sid,
        "method": e.method,
        "provider": e.idp,
        "started_at": rfc3339(e.started.div_euclid(1_000)),
        "expires_at": rfc3339(e.ends.div_euclid(1_000)),
        "last_active_at": rfc3339(e.last_active.div_euclid(1_000)),
        "client_address": e.addr,
        "user_agent": e.user_agent,
    })
}
