//! What a request carries: the token (Bearer, a configured header or the
//! cookie), the client's address, and login credentials.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;

use super::App;
use crate::service::error::{ApiError, Code};

/// A token header that is present but not visible ASCII is a bad token,
/// not a missing one.
pub(super) fn readable(v: &HeaderValue) -> Result<&str, ApiError> {
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

pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
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
pub(super) fn token_of<'a>(
    app: &App,
    headers: &'a HeaderMap,
    cookie_name: &str,
) -> Result<&'a str, ApiError> {
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

pub(super) fn client_ip(
    app: &App,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<IpAddr> {
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

#[derive(Deserialize)]
pub(super) struct Credentials {
    pub username: String,
    pub password: String,
    #[serde(default)]
    pub rd: Option<String>,
}

pub(super) fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::HeaderName;

    use super::*;
    use crate::fixtures::headers;
    use crate::service::http::HttpConfig;

    #[test]
    fn token_sources_in_order() {
        let app = App {
            service: Arc::new(crate::service::tokens::tests_support::service()),
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
}
