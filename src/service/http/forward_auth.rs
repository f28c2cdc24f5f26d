//! `/v1/verify`: forward-auth for ingress controllers, with renewal on the
//! fly and, for proxies that pass our answer through, the sign-in redirect.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::extract::{client_of, token_of};
use super::origin::last_hop;
use super::{Shared, set_cookie};
use crate::clock::now_millis;
use crate::service::error::{ApiError, Code};

// The answer's header names, built once (a `&str` name is parsed on every
// insert).
const USER: HeaderName = HeaderName::from_static("x-auth-request-user");
const REMOTE_USER: HeaderName = HeaderName::from_static("remote-user");
const SESSION: HeaderName = HeaderName::from_static("x-auth-request-session");
const EMAIL: HeaderName = HeaderName::from_static("x-auth-request-email");
const GROUPS: HeaderName = HeaderName::from_static("x-auth-request-groups");
const NEW_TOKEN: HeaderName = HeaderName::from_static("x-new-token");

/// Streams (SSE, WebSocket) are never renewed on the fly: a long-lived
/// connection must not spend the token's one refresh behind the page's back.
fn is_stream(headers: &HeaderMap) -> bool {
    let has = |name: HeaderName, needle: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains(needle))
    };
    has(header::ACCEPT, "text/event-stream") || has(header::UPGRADE, "websocket")
}

/// A browser navigation (gets the sign-in redirect in redirect mode), as
/// opposed to an API client (keeps the 401).
fn is_browser(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    !headers.contains_key(header::AUTHORIZATION)
        && accept.contains("text/html")
        && !accept.contains("application/json")
}

/// The URL the client asked for, from whichever proxy convention is present:
/// ingress-nginx `X-Original-URL`, Traefik `X-Forwarded-Proto/Host/Uri`, or
/// the path after `/v1/verify` (Envoy ext_authz with a path prefix). The
/// forwarded headers count only when the operator trusts them.
fn original_url(trust_forwarded: bool, headers: &HeaderMap, path: &str) -> Option<String> {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let forwarded = |n: &str| if trust_forwarded { get(n) } else { None };
    if let Some(u) = forwarded("x-original-url") {
        return Some(u.to_string());
    }
    let host = forwarded("x-forwarded-host")
        .map(last_hop)
        .or_else(|| get("host"))?;
    let proto = forwarded("x-forwarded-proto").map_or("http", last_hop);
    let uri = forwarded("x-forwarded-uri")
        .map(str::to_string)
        .or_else(|| {
            path.strip_prefix("/v1/verify")
                .filter(|p| p.starts_with('/'))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "/".into());
    Some(format!("{proto}://{host}{uri}"))
}

/// `allowed_groups=a,b` of the query, if given: the groups of which the
/// user must be in one.
fn allowed_groups(query: &str) -> Option<Vec<String>> {
    let mut out: Option<Vec<String>> = None;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "allowed_groups" {
            out.get_or_insert_with(Vec::new).extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_string),
            );
        }
    }
    out
}

/// `/v1/verify` (any method, any sub-path): forward-auth.
pub(super) async fn verify(State(app): Shared, req: Request) -> Response {
    // Parsed only when the request has a query at all: a plain verify
    // costs nothing more.
    let required = req.uri().query().and_then(allowed_groups);
    let headers = req.headers();
    let policy = app.service.policy();
    let now = now_millis();
    let decision = match token_of(&app, headers, &policy.cookie.name).await {
        Ok(token) => {
            let may_renew = app.config.renew_on_verify && !is_stream(headers);
            // Read only if the audit trail needs it.
            let extensions = req.extensions();
            let client = || {
                let peer = extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
                client_of(&app, headers, peer.map(|c| c.0))
            };
            app.service
                .verify_from(token, may_renew, &client, now)
                .await
        }
        Err(e) => Err(e),
    };
    // Never a 200 without the identity headers: behind a proxy that keeps
    // the client's own `X-Auth-Request-User` when the answer lacks one, that
    // would let the client name itself.
    let decision = decision.and_then(|id| match HeaderValue::from_str(id.claims.user_name()) {
        Ok(user) => Ok((id, user)),
        Err(_) => Err(ApiError::new(
            Code::InvalidToken,
            "the token's user name cannot be sent in a header",
        )),
    });
    let decision = decision.and_then(|(id, user)| match &required {
        Some(groups) if !id.claims.groups.iter().any(|g| groups.contains(g)) => Err(ApiError::new(
            Code::ForbiddenGroup,
            "you are not in a group allowed here",
        )),
        _ => Ok((id, user)),
    });
    match decision {
        Ok((id, user)) => {
            let mut resp = StatusCode::OK.into_response();
            let h = resp.headers_mut();
            let c = &id.claims;
            match &c.email {
                Some(email) => {
                    if let Ok(v) = HeaderValue::from_str(email) {
                        h.insert(EMAIL, v);
                    }
                }
                None if c.idp.is_none() && c.sub.contains('@') => {
                    h.insert(EMAIL, user.clone());
                }
                None => {}
            }
            if !c.groups.is_empty()
                && let Ok(v) = HeaderValue::from_str(&c.groups.join(","))
            {
                h.insert(GROUPS, v);
            }
            h.insert(REMOTE_USER, user.clone());
            h.insert(USER, user);
            let mut put = |name: HeaderName, value: &str| {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            };
            put(SESSION, &c.sid);
            if let Some(issued) = &id.renewed {
                put(NEW_TOKEN, &issued.token);
                put(header::AUTHORIZATION, &format!("Bearer {}", issued.token));
                h.insert(
                    header::SET_COOKIE,
                    set_cookie(
                        &policy.cookie,
                        &issued.token,
                        issued.session_end - now / 1_000,
                    ),
                );
            }
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        Err(e) => {
            // nginx auth_request (ingress-nginx) takes only 2xx/401/403 and
            // does its own sign-in redirect (auth-signin): never a 302 there.
            let behind_nginx = headers.contains_key("x-original-url");
            if let (Some(signin), StatusCode::UNAUTHORIZED, true, false) = (
                &app.config.signin_url,
                e.code.status(),
                is_browser(headers),
                behind_nginx,
            ) {
                let rd = original_url(
                    app.config.trust_forwarded_headers,
                    headers,
                    req.uri().path(),
                )
                .unwrap_or_else(|| "/".into());
                let sep = if signin.contains('?') { '&' } else { '?' };
                let location = format!("{signin}{sep}rd={}", url_encode(&rd));
                if let Ok(v) = HeaderValue::from_str(&location) {
                    return (StatusCode::FOUND, [(header::LOCATION, v)]).into_response();
                }
            }
            e.into_response()
        }
    }
}

fn url_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::api_server::headers;

    #[test]
    fn streams_and_browsers() {
        assert!(is_stream(&headers(&[("accept", "text/event-stream")])));
        assert!(is_stream(&headers(&[("upgrade", "WebSocket")])));
        assert!(!is_stream(&headers(&[("accept", "text/html")])));
        assert!(is_browser(&headers(&[(
            "accept",
            "text/html,application/xhtml+xml"
        )])));
        assert!(!is_browser(&headers(&[("accept", "application/json")])));
        assert!(!is_browser(&headers(&[
            ("accept", "text/html"),
            ("authorization", "Bearer x")
        ])));
    }

    #[test]
    fn original_url_from_each_proxy() {
        let nginx = headers(&[("x-original-url", "https://app.example.com/a?b=1")]);
        assert_eq!(
            original_url(true, &nginx, "/v1/verify").unwrap(),
            "https://app.example.com/a?b=1"
        );
        let traefik = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "app.example.com"),
            ("x-forwarded-uri", "/x"),
        ]);
        assert_eq!(
            original_url(true, &traefik, "/v1/verify").unwrap(),
            "https://app.example.com/x"
        );
        // Behind a chain of proxies the nearest one's entry is the last.
        let chained = headers(&[
            ("x-forwarded-proto", "http, https"),
            ("x-forwarded-host", "evil.example, app.example.com"),
            ("x-forwarded-uri", "/x"),
        ]);
        assert_eq!(
            original_url(true, &chained, "/v1/verify").unwrap(),
            "https://app.example.com/x"
        );
        // Untrusted, the client's own X-Forwarded-* are ignored.
        let mut spoofed = traefik.clone();
        spoofed.insert("host", HeaderValue::from_static("auth.internal"));
        assert_eq!(
            original_url(false, &spoofed, "/v1/verify").unwrap(),
            "http://auth.internal/"
        );
        let envoy = headers(&[("host", "app.example.com")]);
        assert_eq!(
            original_url(false, &envoy, "/v1/verify/api/items").unwrap(),
            "http://app.example.com/api/items"
        );
    }
}
