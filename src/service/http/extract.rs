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

/// Cookies of our name considered at most in one request: a browser sends
/// several when cookies of that name were set for other paths or domains
/// (a sibling subdomain can set one for the parent domain).
pub(super) const MAX_COOKIE_CANDIDATES: usize = 8;

/// The values of our cookie, in the order the browser sent them (at most
/// [`MAX_COOKIE_CANDIDATES`]). The header is read as bytes: other cookies
/// (set by other applications on the domain) may hold anything and are
/// skipped; a value of ours that is not visible ASCII is skipped too, and
/// is a bad token only when no other value came with it.
pub(super) fn cookies<'a>(headers: &'a HeaderMap, name: &str) -> Result<Vec<&'a str>, ApiError> {
    let mut found = Vec::new();
    let mut unreadable = false;
    for v in headers.get_all(header::COOKIE) {
        for pair in v.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                continue;
            };
            if pair[..eq].trim_ascii() != name.as_bytes() {
                continue;
            }
            match std::str::from_utf8(pair[eq + 1..].trim_ascii())
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_graphic()))
            {
                Some(value) => found.push(value.trim_matches('"')),
                None => unreadable = true,
            }
            if found.len() == MAX_COOKIE_CANDIDATES {
                return Ok(found);
            }
        }
    }
    if found.is_empty() && unreadable {
        return Err(ApiError::new(Code::InvalidToken, "token is not ASCII"));
    }
    Ok(found)
}

/// Our cookie's value. When the browser sent several cookies of our name,
/// the first that verifies (signature, times, user, session) counts, so a
/// cookie tossed in from a sibling subdomain ahead of ours cannot sign the
/// user out; when none verifies, the first (whose refusal is the answer).
pub(super) async fn cookie<'a>(
    app: &App,
    headers: &'a HeaderMap,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    let found = cookies(headers, name)?;
    if found.len() > 1 {
        let now = crate::clock::now_millis();
        for t in &found {
            if app.service.holds(t, now).await {
                return Ok(Some(t));
            }
        }
    }
    Ok(found.first().copied())
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
pub(super) async fn token_of<'a>(
    app: &App,
    headers: &'a HeaderMap,
    cookie_name: &str,
) -> Result<&'a str, ApiError> {
    token_and_source(app, headers, cookie_name)
        .await
        .map(|(t, _)| t)
}

pub(super) async fn token_and_source<'a>(
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
    Ok(match cookie(app, headers, cookie_name).await? {
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

/// Who is at the other end: the client's address and user agent.
pub(super) fn client_of(
    app: &App,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> crate::service::session::Client {
    crate::service::session::Client {
        addr: client_ip(app, headers, peer),
        user_agent: user_agent(headers),
    }
}

/// The most of a `User-Agent` that is kept (for the session registry and
/// the audit trail): enough to tell browsers and devices apart.
pub const MAX_USER_AGENT: usize = 256;

/// The request's `User-Agent`, if it is printable text; cut to
/// [`MAX_USER_AGENT`] bytes at a character boundary.
pub(super) fn user_agent(headers: &HeaderMap) -> Option<String> {
    let ua = headers.get(axum::http::header::USER_AGENT)?.to_str().ok()?;
    let mut end = ua.len().min(MAX_USER_AGENT);
    while !ua.is_char_boundary(end) {
        end -= 1;
    }
    Some(ua[..end].to_string()).filter(|s| !s.is_empty())
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
    use crate::service::http::HttpConfig;
    use crate::testing::api_server::headers;

    #[tokio::test]
    async fn token_sources_in_order() {
        let app = App {
            service: Arc::new(crate::testing::service().build()),
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
        assert_eq!(token_of(&app, &h, "tokenpolicy").await.unwrap(), "a");
        let h = headers(&[("x-token", "b"), ("cookie", "tokenpolicy=c")]);
        assert_eq!(token_of(&app, &h, "tokenpolicy").await.unwrap(), "b");
        let h = headers(&[("cookie", "other=x; tokenpolicy=c")]);
        assert_eq!(token_of(&app, &h, "tokenpolicy").await.unwrap(), "c");
        assert_eq!(
            token_of(&app, &HeaderMap::new(), "tokenpolicy")
                .await
                .unwrap(),
            ""
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer t\xf6k").unwrap(),
        );
        assert_eq!(
            token_of(&app, &h, "tokenpolicy").await.unwrap_err().code,
            Code::InvalidToken
        );
    }

    #[test]
    fn every_cookie_of_our_name_is_a_candidate() {
        let h = headers(&[
            ("cookie", "tokenpolicy=a; other=x; tokenpolicy=\"b\""),
            ("cookie", "tokenpolicy=c"),
        ]);
        assert_eq!(cookies(&h, "tokenpolicy").unwrap(), ["a", "b", "c"]);
        let many = (0..20)
            .map(|i| format!("tokenpolicy=t{i}"))
            .collect::<Vec<_>>();
        let joined = many.join("; ");
        let h = headers(&[("cookie", joined.as_str())]);
        assert_eq!(
            cookies(&h, "tokenpolicy").unwrap().len(),
            MAX_COOKIE_CANDIDATES
        );
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"tokenpolicy=t\xc3\xb6k; tokenpolicy=ok").unwrap(),
        );
        assert_eq!(cookies(&h, "tokenpolicy").unwrap(), ["ok"]);
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"tokenpolicy=t\xc3\xb6k").unwrap(),
        );
        assert_eq!(
            cookies(&h, "tokenpolicy").unwrap_err().code,
            Code::InvalidToken
        );
    }
}
