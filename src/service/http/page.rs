//! The HTML pages (sign-in, account, a refused OpenID Connect sign-in):
//! askama templates in `templates/`, checked when the crate is compiled and
//! HTML-escaped by default, and the headers every page carries.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

/// No script, no frames, inline style only, and forms post back here.
pub(super) const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'";

/// The template's HTML. Rendering only fails if a value's `Display` does,
/// which none of ours do; it then answers a bare error page, never a panic.
pub(super) fn render(page: &impl askama::Template) -> String {
    page.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "a page template did not render");
        "<!doctype html><title>Error</title><p>This page could not be shown.</p>".into()
    })
}

/// The headers of a page that shows a person's own state: never cached,
/// never framed, under [`CSP`].
pub(super) fn page_headers(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
}

/// A page answer with [`page_headers`].
pub(super) fn respond(status: StatusCode, page: &impl askama::Template) -> Response {
    let mut resp = (status, Html(render(page))).into_response();
    page_headers(resp.headers_mut());
    resp
}
