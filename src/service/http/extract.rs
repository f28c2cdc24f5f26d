//! What a request carries: the token (Bearer, a configured header or the
//! cookie), the client's address, and login credentials.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, HeaderValue, header};
use serde::Deserialize;

use super::App;
use crate::service::error::{ApiError, Code};
use crate::trusted_proxies::client_address;

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

/// Our cookie's value. The header is read as bytes: other cookies (set by
/// other applications on the domain) may hold anything and are skipped;
/// only our value must be visible ASCII.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    for v in headers.get_all(header::COOKIE) {
        for pair in v.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name.as_bytes() {
                continue;
            }
            let value = std::str::from_utf8(pair[eq + 1..].trim_ascii())
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| ApiError::new(Code::InvalidToken, "token is not ASCII"))?;
            return Ok(Some(value.trim_matches('"')));
        }
    }
    Ok(None)
}

/// Where the token came from: a cross-site page can make a browser send
/// the cookie, never a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    Header,
    Cookie,
    None,
}

/// The token, from `Authorization: Bearer`, the configured header, or the
/// cookie; `""` when there is none (the service answers `EMPTY_TOKEN`).
pub(super) fn token_of<'a>(
    app: &App,
    headers: &'a HeaderMap,
    cookie_name: &str,
) -> Result<&'a str, ApiError> {
    token_and_source(app, headers, cookie_name).map(|(t, _)| t)
}

pub(super) fn token_and_source<'a>(
    app: &App,
    headers: &'a HeaderMap,
    cookie_name: &str,
) -> Result<(&'a str, Source), ApiError> {
    if let Some(t) = bearer(headers)? {
        return Ok((t, Source::Header));
    }
    if let Some(v) = app
        .config
        .token_header
        .as_ref()
        .and_then(|h| headers.get(h))
    {
        return Ok((readable(v)?, Source::Header));
    }
    Ok(match cookie(headers, cookie_name)? {
        Some(t) => (t, Source::Cookie),
        None => ("", Source::None),
    })
}

/// The client's address (see `proxies.rs`): the peer's, or behind a
/// trusted proxy the nearest `X-Forwarded-For` hop that is not one; a hop
/// that is not an address is counted.
pub(super) fn client_ip(
    app: &App,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<IpAddr> {
    let at = client_address(&app.config.trusted_proxies, headers, peer.map(|p| p.ip()));
    if at.invalid_hop {
        app.service.metrics.forwarded_for_invalid.inc();
    }
    at.ip
}

#[derive(Deserialize)]
pub(super) struct Credentials {
    pub username: String,
    pub password: String,
    #[serde(default)]
    pub rd: Option<String>,
}

/// The media type of the body, lower case, without parameters.
fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub(super) fn is_form(headers: &HeaderMap) -> bool {
    media_type(headers) == "application/x-www-form-urlencoded"
}

pub(super) fn is_json(headers: &HeaderMap) -> bool {
    media_type(headers) == "application/json"
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
