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
//! 2. Otherwise `Origin`, when present, must be the request's own scheme
//!    and port (any port with `--redirect-any-port`) with the request's host
//!    or an allowed redirect domain; `Origin: null` is rejected.
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

/// The host the client used, as sent (with its port, if any).
fn raw_host<'a>(config: &HttpConfig, headers: &'a HeaderMap) -> Option<&'a str> {
    let forwarded = config
        .trust_forwarded_headers
        .then(|| headers.get("x-forwarded-host"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(last_hop);
    match forwarded {
        Some(h) => Some(h),
        None => Some(headers.get(header::HOST)?.to_str().ok()?.trim()),
    }
}

/// The entry of a forwarded header (`X-Forwarded-Host`, `-Proto`) that the
/// nearest proxy wrote: each proxy appends its own after what it was sent,
/// so the first entries are the client's to choose and the last is not.
pub(super) fn last_hop(value: &str) -> &str {
    value.rsplit(',').next().unwrap_or(value).trim()
}

/// A site as `rd` and `Origin` are checked against: scheme, host (lower
/// case) and port (the scheme's default when none is written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Site {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
}

impl Site {
    /// An `http(s)` URL's site; None for any other scheme or no host.
    pub(super) fn of(url: &url::Url) -> Option<Site> {
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        Some(Site {
            scheme: url.scheme().to_string(),
            host: url.host_str()?.to_ascii_lowercase(),
            port: url.port_or_known_default(),
        })
    }
}

/// The site the client asked for: its scheme from `X-Forwarded-Proto` when
/// forwarded headers are trusted, else `https` when the session cookie is
/// `Secure` (it works over https only) and `http` when it is not; its host
/// and port from `Host` (or a trusted `X-Forwarded-Host`).
pub(super) fn request_site(config: &HttpConfig, headers: &HeaderMap, secure: bool) -> Option<Site> {
    let forwarded = config
        .trust_forwarded_headers
        .then(|| headers.get("x-forwarded-proto"))
        .flatten()
        .map(|v| v.to_str().map(|v| last_hop(v).to_ascii_lowercase()));
    let scheme = match forwarded {
        Some(Ok(p)) if p == "http" || p == "https" => p,
        Some(_) => return None,
        None if secure => "https".to_string(),
        None => "http".to_string(),
    };
    let host = raw_host(config, headers)?;
    // Only what a host and port are made of: nothing that could turn the
    // URL below into another one (`@`, `/`, `?`, `#`).
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b))
    {
        return None;
    }
    Site::of(&url::Url::parse(&format!("{scheme}://{host}/")).ok()?)
}

/// Whether `target` is the request's own site or an allowed domain: the
/// scheme must be the request's, and so must the port unless
/// `--redirect-any-port`.
pub(super) fn site_allowed(
    config: &HttpConfig,
    headers: &HeaderMap,
    secure: bool,
    target: &Site,
) -> bool {
    let Some(own) = request_site(config, headers, secure) else {
        return false;
    };
    if target.scheme != own.scheme || (!config.redirect_any_port && target.port != own.port) {
        return false;
    }
    let host = target.host.as_str();
    host == own.host
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

/// The cross-site rule above; `secure`: the session cookie's `Secure`
/// (see [`request_site`]).
pub(super) fn check_same_site(
    config: &HttpConfig,
    headers: &HeaderMap,
    secure: bool,
) -> Result<(), ApiError> {
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
    let site = Site::of(&url).ok_or_else(|| rejected("Origin is not an http(s) site"))?;
    if site_allowed(config, headers, secure, &site) {
        Ok(())
    } else {
        Err(rejected("Origin is another site"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::api_server::headers;

    fn ok(config: &HttpConfig, h: &[(&'static str, &str)]) -> bool {
        check_same_site(config, &headers(h), true).is_ok()
    }

    #[test]
    fn cross_site_rule() {
        let cfg = HttpConfig {
            redirect_domains: vec![".example.com".into()],
            ..Default::default()
        };
        let host = ("host", "auth.example.net");
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
        let e = check_same_site(
            &cfg,
            &headers(&[host, ("origin", "https://evil.example")]),
            true,
        )
        .unwrap_err();
        assert_eq!(e.code, Code::CrossSiteRequest);
    }

    #[test]
    fn origin_must_match_scheme_and_port() {
        let cfg = HttpConfig {
            redirect_domains: vec![".example.com".into()],
            ..Default::default()
        };
        let host = ("host", "auth.example.net");
        assert!(ok(&cfg, &[host, ("origin", "https://auth.example.net")]));
        assert!(ok(
            &cfg,
            &[host, ("origin", "https://auth.example.net:443")]
        ));
        // Plain http on a site whose cookie is Secure, and other ports.
        assert!(!ok(&cfg, &[host, ("origin", "http://auth.example.net")]));
        assert!(!ok(
            &cfg,
            &[host, ("origin", "https://auth.example.net:8443")]
        ));
        assert!(!ok(&cfg, &[host, ("origin", "http://app.example.com")]));
        assert!(!ok(
            &cfg,
            &[host, ("origin", "https://app.example.com:444")]
        ));
        // The port the client used is the site's.
        let port = ("host", "auth.example.net:8443");
        assert!(ok(
            &cfg,
            &[port, ("origin", "https://auth.example.net:8443")]
        ));
        assert!(!ok(&cfg, &[port, ("origin", "https://auth.example.net")]));
        // A cookie without Secure: the site is plain http.
        let plain = |origin: &str| {
            check_same_site(&cfg, &headers(&[host, ("origin", origin)]), false).is_ok()
        };
        assert!(plain("http://auth.example.net"));
        assert!(!plain("https://auth.example.net"));
        // A trusted X-Forwarded-Proto decides the scheme.
        let trusting = HttpConfig {
            trust_forwarded_headers: true,
            ..cfg.clone()
        };
        let fwd = |proto: &'static str, origin: &str| {
            check_same_site(
                &trusting,
                &headers(&[host, ("x-forwarded-proto", proto), ("origin", origin)]),
                true,
            )
            .is_ok()
        };
        assert!(fwd("http", "http://auth.example.net"));
        assert!(!fwd("https", "http://auth.example.net"));
        assert!(!fwd("gopher", "https://auth.example.net"));
        // --redirect-any-port relaxes the port, never the scheme.
        let any_port = HttpConfig {
            redirect_any_port: true,
            ..cfg.clone()
        };
        assert!(ok(
            &any_port,
            &[host, ("origin", "https://auth.example.net:8443")]
        ));
        assert!(ok(
            &any_port,
            &[host, ("origin", "https://app.example.com:444")]
        ));
        assert!(!ok(
            &any_port,
            &[host, ("origin", "http://auth.example.net:8443")]
        ));
        // A Host that is not a host and port is no site at all.
        assert!(!ok(
            &cfg,
            &[
                ("host", "evil.example@auth.example.net"),
                ("origin", "https://auth.example.net")
            ]
        ));
    }

    #[test]
    fn forwarded_host_only_when_trusted() {
        let host = |cfg: &HttpConfig, h: &HeaderMap| request_site(cfg, h, true).map(|s| s.host);
        let h = headers(&[("host", "auth:8080"), ("x-forwarded-host", "evil.example")]);
        let plain = HttpConfig::default();
        assert_eq!(host(&plain, &h).as_deref(), Some("auth"));
        let trusting = HttpConfig {
            trust_forwarded_headers: true,
            ..Default::default()
        };
        assert_eq!(host(&trusting, &h).as_deref(), Some("evil.example"));
        // A proxy appends its own entry: the client's entries come first.
        let chain = headers(&[
            ("host", "auth:8080"),
            ("x-forwarded-host", "evil.example, auth.example.net:8443"),
        ]);
        let site = request_site(&trusting, &chain, true).unwrap();
        assert_eq!(site.host, "auth.example.net");
        assert_eq!(site.port, Some(8443));
        let v6 = headers(&[("host", "[::1]:8080")]);
        assert_eq!(host(&plain, &v6).as_deref(), Some("[::1]"));
    }
}
