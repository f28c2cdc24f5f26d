//! Where a request says it comes from and goes to: the host the client
//! used (from `Host`, or `X-Forwarded-Host` only when the operator trusts
//! forwarded headers), and the cross-site request check.
//!
//! The cross-site rule, for state-changing requests a browser could be
//! tricked into sending with its cookie (the sign-in form post, and refresh
//! or logout authenticated by the cookie):
//!
//! 1. `Sec-Fetch-Site: cross-site` is rejected; `same-origin`, `same-site`
//!    and `none` (typed by the user) are allowed. When the header is
//!    present, it decides.
//! 2. Otherwise `Origin`, when present, must be `http(s)://` with the
//!    request's host or an allowed redirect domain; `Origin: null` is
//!    rejected.
//! 3. A request with neither header (API clients, curl) is allowed.
//!
//! A refresh or logout whose token comes from `Authorization` or the
//! configured token header is not checked: a cross-site page cannot set
//! those. A JSON login needs `Content-Type: application/json`, which a
//! cross-site page cannot send without a CORS preflight, which this service
//! never grants.

use axum::http::{HeaderMap, header};

use super::HttpConfig;
use crate::service::error::{ApiError, Code};

/// The host the client used (lower case, without port).
pub(super) fn request_host(config: &HttpConfig, headers: &HeaderMap) -> Option<String> {
    let forwarded = config
        .trust_forwarded_headers
        .then(|| headers.get("x-forwarded-host"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(last_hop);
    let h = match forwarded {
        Some(h) => h,
        None => headers.get(header::HOST)?.to_str().ok()?.trim(),
    };
    Some(strip_port(h).to_ascii_lowercase())
}

/// The entry of a forwarded header (`X-Forwarded-Host`, `-Proto`) that the
/// nearest proxy wrote: each proxy appends its own after what it was sent,
/// so the first entries are the client's to choose and the last is not.
pub(super) fn last_hop(value: &str) -> &str {
    value.rsplit(',').next().unwrap_or(value).trim()
}

fn strip_port(h: &str) -> &str {
    h.rsplit_once(':').map_or(h, |(host, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) && !host.ends_with(':') {
            host
        } else {
            h
        }
    })
}

/// Whether `host` is the request's own host or an allowed domain.
pub(super) fn host_allowed(config: &HttpConfig, headers: &HeaderMap, host: &str) -> bool {
    request_host(config, headers).as_deref() == Some(host)
        || config.redirect_domains.iter().any(|d| {
            let d = d.to_ascii_lowercase();
            match d.strip_prefix('.') {
                Some(parent) => host == parent || host.ends_with(&d),
                None => host == d,
            }
        })
}

fn rejected(why: &str) -> ApiError {
    ApiError::new(
        Code::CrossSiteRequest,
        format!("cross-site request refused: {why}"),
    )
}

/// The cross-site rule above.
pub(super) fn check_same_site(config: &HttpConfig, headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.to_str().map(str::to_ascii_lowercase).as_deref() {
            Ok("same-origin" | "same-site" | "none") => Ok(()),
            _ => Err(rejected("Sec-Fetch-Site is not same-site")),
        };
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| rejected("Origin is not ASCII"))?;
    let url = url::Url::parse(origin).map_err(|_| rejected("Origin is not a URL"))?;
    let host = match (url.scheme(), url.host_str()) {
        ("http" | "https", Some(h)) => h.to_ascii_lowercase(),
        _ => return Err(rejected("Origin is not an http(s) site")),
    };
    if host_allowed(config, headers, &host) {
        Ok(())
    } else {
        Err(rejected("Origin is another site"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::headers;

    fn ok(config: &HttpConfig, h: &[(&'static str, &str)]) -> bool {
        check_same_site(config, &headers(h)).is_ok()
    }

    #[test]
    fn cross_site_rule() {
        let cfg = HttpConfig {
            redirect_domains: vec![".example.com".into()],
            ..Default::default()
        };
        let host = ("host", "auth.example.net:8443");
        assert!(ok(&cfg, &[host]));
        assert!(ok(&cfg, &[host, ("sec-fetch-site", "same-origin")]));
        assert!(ok(&cfg, &[host, ("sec-fetch-site", "same-site")]));
        assert!(ok(&cfg, &[host, ("sec-fetch-site", "none")]));
        assert!(!ok(&cfg, &[host, ("sec-fetch-site", "cross-site")]));
        // Sec-Fetch-Site decides when present.
        assert!(!ok(
            &cfg,
            &[
                host,
                ("sec-fetch-site", "cross-site"),
                ("origin", "https://auth.example.net")
            ]
        ));
        assert!(ok(&cfg, &[host, ("origin", "https://auth.example.net")]));
        assert!(ok(&cfg, &[host, ("origin", "https://app.example.com")]));
        assert!(!ok(&cfg, &[host, ("origin", "https://evil.example")]));
        assert!(!ok(&cfg, &[host, ("origin", "null")]));
        assert!(!ok(&cfg, &[host, ("origin", "file://auth.example.net")]));
        let e = check_same_site(&cfg, &headers(&[host, ("origin", "https://evil.example")]))
            .unwrap_err();
        assert_eq!(e.code, Code::CrossSiteRequest);
    }

    #[test]
    fn forwarded_host_only_when_trusted() {
        let h = headers(&[("host", "auth:8080"), ("x-forwarded-host", "evil.example")]);
        let plain = HttpConfig::default();
        assert_eq!(request_host(&plain, &h).as_deref(), Some("auth"));
        let trusting = HttpConfig {
            trust_forwarded_headers: true,
            ..Default::default()
        };
        assert_eq!(request_host(&trusting, &h).as_deref(), Some("evil.example"));
        // A proxy appends its own entry: the client's entries come first.
        let chain = headers(&[
            ("host", "auth:8080"),
            ("x-forwarded-host", "evil.example, auth.example.net:8443"),
        ]);
        assert_eq!(
            request_host(&trusting, &chain).as_deref(),
            Some("auth.example.net")
        );
        let v6 = headers(&[("host", "[::1]:8080")]);
        assert_eq!(request_host(&plain, &v6).as_deref(), Some("[::1]"));
    }
}
