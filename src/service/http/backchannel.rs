//! `POST /v1/oidc/backchannel-logout`: OpenID Connect Back-Channel Logout
//! 1.0. The provider posts a `logout_token` (a form body) when a session
//! of its own ends; the sessions of ours it names end on every replica.
//! 200 when done, 400 `INVALID_LOGOUT_TOKEN` (the JSON error) otherwise;
//! both `Cache-Control: no-store` (§2.8).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};

use super::Shared;
use crate::clock::now_millis;
use crate::service::error::{ApiError, Code};
use crate::service::oidc::ID_TOKEN_LEEWAY_SECS;
use crate::service::oidc::logout_token::{LogoutTokenError, MAX_AGE_SECS};
use crate::service::session::provider::ProviderEnd;
use crate::service::store::Take;

/// The store key that takes a logout token's `jti` once, across replicas.
fn jti_key(issuer: &str, jti: &str) -> String {
    let d = Sha256::digest(format!("tokenpolicy logout jti\n{issuer}\n{jti}").as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("oidc-logout-jti:{hex}")
}

fn refused(message: impl Into<String>) -> ApiError {
    ApiError::new(Code::InvalidLogoutToken, message)
}

pub(super) async fn backchannel_logout(
    State(app): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut resp = match logout(&app, &headers, &body).await {
        Ok(ended) => {
            tracing::info!(sessions = ended, "back-channel logout accepted");
            StatusCode::OK.into_response()
        }
        Err(e) => {
            tracing::info!(code = e.code.as_str(), reason = %e.message, "back-channel logout refused");
            e.into_response()
        }
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn logout(app: &super::App, headers: &HeaderMap, body: &[u8]) -> Result<usize, ApiError> {
    let Some(oidc) = app.config.oidc.as_ref() else {
        return Err(ApiError::new(
            Code::InvalidRequest,
            "OpenID Connect is not configured (spec.oidc)",
        ));
    };
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim() == "application/x-www-form-urlencoded");
    if !form {
        return Err(refused(
            "the logout token must be posted as application/x-www-form-urlencoded",
        ));
    }
    let mut tokens = url::form_urlencoded::parse(body)
        .filter(|(k, _)| k == "logout_token")
        .map(|(_, v)| v.into_owned());
    let (Some(token), None) = (tokens.next(), tokens.next()) else {
        return Err(refused("the body must hold exactly one logout_token"));
    };
    let provider = &oidc.provider;
    if let Some(why) = provider.unready() {
        return Err(ApiError::new(Code::ProviderUnavailable, why.as_str()).retry_after(5));
    }
    let now = now_millis();
    let request = provider
        .validate_logout(&token, now / 1_000)
        .await
        .map_err(|e: LogoutTokenError| refused(e.to_string()))?;
    // Once, across replicas: remembered while its iat could still pass.
    let once = jti_key(&provider.config.issuer_url, &request.jti);
    let store = app.service.store();
    let window = (MAX_AGE_SECS + 2 * ID_TOKEN_LEEWAY_SECS) * 1_000;
    if let Take::Refused { .. } = store.take_attempt(&once, 1, window).await? {
        return Err(refused(LogoutTokenError::Replayed.to_string()));
    }
    let issuer = provider.config.issuer_url.as_str();
    let ended = async {
        let end = match (&request.sid, &request.sub) {
            (Some(psid), _) => ProviderEnd::ProviderSession {
                issuer,
                sessions: oidc.sessions.take_provider_session(psid, now).await?,
            },
            (None, Some(sub)) => ProviderEnd::Subject { issuer, sub },
            (None, None) => return Err(refused(LogoutTokenError::Subject.to_string())),
        };
        app.service.end_by_provider(end, now).await
    }
    .await;
    if ended.is_err() {
        // Nothing (or not all) was ended: the provider may send it again.
        let _ = store.release_attempt(&once).await;
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_keys_are_per_issuer() {
        assert_eq!(jti_key("https://a", "j"), jti_key("https://a", "j"));
        assert_ne!(jti_key("https://a", "j"), jti_key("https://b", "j"));
        assert_ne!(jti_key("https://a", "j"), jti_key("https://a", "k"));
    }
}
