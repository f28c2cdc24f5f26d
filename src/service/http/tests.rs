//! The HTTP contract, through the router (`Router::oneshot`): status,
//! headers and the error JSON, for the cross-site check, the login media
//! type, forwarded headers, foreign cookies and the forwarded address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

use super::{App, HttpConfig, router};
use crate::service::users::Users;

const PASSWORD: &str = "alice-password";

fn app(config: HttpConfig) -> Arc<App> {
    let service = crate::testing::service().build();
    let hash = bcrypt::hash(PASSWORD, 4)
        .expect("bcrypt")
        .replacen("$2b$", "$2y$", 1);
    service.set_users(Users::parse(&format!("alice:{hash}\n"), "test").expect("users"));
    Arc::new(App {
        service: Arc::new(service),
        config,
    })
}

async fn send(app: &Arc<App>, req: Request<Body>) -> Response {
    router(app.clone()).oneshot(req).await.expect("infallible")
}

async fn json(resp: Response) -> Value {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

async fn error_code(resp: Response) -> String {
    json(resp).await["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn json_login(extra: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::post("/v1/login")
        .header("host", "auth.example.net")
        .header(header::CONTENT_TYPE, "application/json");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Body::from(format!(
        r#"{{"username":"alice","password":"{PASSWORD}"}}"#
    )))
    .unwrap()
}

async fn token(app: &Arc<App>) -> String {
    let resp = send(app, json_login(&[])).await;
    assert_eq!(resp.status(), StatusCode::OK);
    json(resp).await["access_token"]
        .as_str()
        .expect("token")
        .to_string()
}

fn form_login(headers: &[(&str, &str)], rd: &str) -> Request<Body> {
    let mut b = Request::post("/v1/login")
        .header("host", "auth.example.net")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = format!("username=alice&password={PASSWORD}&rd={rd}");
    b.body(Body::from(body)).unwrap()
}

#[tokio::test]
async fn json_login_needs_application_json() {
    let app = app(HttpConfig::default());
    let body = format!(r#"{{"username":"alice","password":"{PASSWORD}"}}"#);
    for ct in [Some("text/plain"), None, Some("application/jsonx")] {
        let mut b = Request::post("/v1/login");
        if let Some(ct) = ct {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let resp = send(&app, b.body(Body::from(body.clone())).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        assert_eq!(error_code(resp).await, "UNSUPPORTED_MEDIA_TYPE");
    }
    let resp = send(
        &app,
        json_login(&[("content-type", "application/json; charset=utf-8")]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
}

#[tokio::test]
async fn cross_site_form_login_is_refused() {
    let app = app(HttpConfig::default());
    let resp = send(
        &app,
        form_login(&[("origin", "https://evil.example")], "/app"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(!resp.headers().contains_key(header::SET_COOKIE));
    assert!(!resp.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(error_code(resp).await, "CSRF_REJECTED");
    let resp = send(
        &app,
        form_login(&[("sec-fetch-site", "cross-site")], "/app"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // The sign-in page posting to itself.
    let resp = send(
        &app,
        form_login(
            &[
                ("origin", "https://auth.example.net"),
                ("sec-fetch-site", "same-origin"),
            ],
            "/app",
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/app");
    assert!(resp.headers().contains_key(header::SET_COOKIE));
}

#[tokio::test]
async fn cookie_refresh_and_logout_need_a_same_site_request() {
    let app = app(HttpConfig::default());
    let t = token(&app).await;
    for path in ["/v1/refresh", "/v1/logout"] {
        let req = Request::post(path)
            .header("host", "auth.example.net")
            .header(header::COOKIE, format!("__Host-tokenpolicy={t}"))
            .header("origin", "https://evil.example")
            .body(Body::empty())
            .unwrap();
        let resp = send(&app, req).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(error_code(resp).await, "CSRF_REJECTED");
    }
    // The same token as a Bearer header: no browser sends that cross-site.
    let req = Request::post("/v1/logout")
        .header(header::AUTHORIZATION, format!("Bearer {t}"))
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.status(), StatusCode::NO_CONTENT);

    // A same-site cookie logout goes through.
    let t = token(&app).await;
    let req = Request::post("/v1/logout")
        .header("host", "auth.example.net")
        .header(header::COOKIE, format!("__Host-tokenpolicy={t}"))
        .header("sec-fetch-site", "same-origin")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn forwarded_host_is_ignored_unless_trusted() {
    let spoofed = |cfg| async move {
        let app = app(cfg);
        let req = Request::get("/v1/login?rd=https://evil.example/")
            .header("host", "auth.internal")
            .header("x-forwarded-host", "evil.example")
            .body(Body::empty())
            .unwrap();
        send(&app, req).await
    };
    let resp = spoofed(HttpConfig::default()).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "INVALID_REDIRECT");
    let trusting = HttpConfig {
        trust_forwarded_headers: true,
        ..Default::default()
    };
    assert_eq!(spoofed(trusting).await.status(), StatusCode::OK);

    // Redirect mode: the rd handed to the sign-in page comes from Host only.
    let app = app(HttpConfig {
        signin_url: Some("https://auth.example.net/v1/login".into()),
        ..Default::default()
    });
    let req = Request::get("/v1/verify")
        .header("host", "app.example.net")
        .header("accept", "text/html")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-uri", "/x")
        .body(Body::empty())
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let location = resp.headers()[header::LOCATION].to_str().unwrap();
    assert!(!location.contains("evil.example"), "{location}");
    assert!(location.contains("app.example.net"), "{location}");
}

#[tokio::test]
async fn foreign_cookies_may_hold_any_bytes() {
    let app = app(HttpConfig::default());
    let t = token(&app).await;
    let cookie = [
        b"theme=\xc3\xa9t\xe9; ".as_slice(),
        format!("__Host-tokenpolicy={t}; ").as_bytes(),
        b"other=\xff\xfe".as_slice(),
    ]
    .concat();
    let req = Request::get("/v1/verify")
        .header(header::COOKIE, cookie.as_slice())
        .body(Body::empty())
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-auth-request-user"], "alice");

    // Our own cookie must still be ASCII.
    let req = Request::get("/v1/verify")
        .header(header::COOKIE, b"__Host-tokenpolicy=t\xc3\xb6k".as_slice())
        .body(Body::empty())
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(resp).await, "INVALID_TOKEN");
}

#[tokio::test]
async fn malformed_last_forwarded_hop_falls_back_to_the_peer() {
    let app = app(HttpConfig {
        trusted_proxies: super::TrustedProxies::parse(&["127.0.0.0/8"]).unwrap(),
        ..Default::default()
    });
    // A client-chosen first hop must never become the client address.
    let peer: SocketAddr = "127.0.0.9:5000".parse().unwrap();
    let extract = super::extract::client_ip;
    let h = crate::testing::api_server::headers(&[("x-forwarded-for", "203.0.113.7, not-an-ip")]);
    assert_eq!(extract(&app, &h, Some(peer)), Some(peer.ip()));
    assert_eq!(app.service.metrics.forwarded_for_invalid.get(), 1);
    let h =
        crate::testing::api_server::headers(&[("x-forwarded-for", "203.0.113.7, 198.51.100.2")]);
    assert_eq!(
        extract(&app, &h, Some(peer)),
        Some("198.51.100.2".parse().unwrap())
    );
    let h = crate::testing::api_server::headers(&[("x-forwarded-for", "203.0.113.7,")]);
    assert_eq!(extract(&app, &h, Some(peer)), Some(peer.ip()));
    assert_eq!(app.service.metrics.forwarded_for_invalid.get(), 2);

    // Through the router: the counter shows on /metrics.
    let mut req = Request::post("/v1/login")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-forwarded-for", "203.0.113.7, bogus")
        .body(Body::from(r#"{"username":"alice","password":"wrong"}"#))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(peer));
    assert_eq!(send(&app, req).await.status(), StatusCode::UNAUTHORIZED);
    let resp = send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("tokenpolicy_forwarded_for_invalid_total 3"),
        "{text}"
    );
}

/// A name no header can carry (the users file refuses it; this test slips
/// one past it) never gets a 200 from verify, which would carry no identity
/// headers: a proxy that keeps the client's own would pass a forged one on.
#[tokio::test]
async fn verify_never_allows_without_the_identity_headers() {
    let app = app(HttpConfig::default());
    let odd = "ali\u{1}ce";
    let users = Users::parse(
        &format!(
            "alice:{}\n",
            bcrypt::hash(PASSWORD, 4)
                .expect("bcrypt")
                .replacen("$2b$", "$2y$", 1)
        ),
        "test",
    )
    .expect("users")
    .renamed_unchecked("alice", odd);
    app.service.set_users(users);
    let login = Request::post("/v1/login")
        .header("host", "auth.example.net")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(format!(
            r#"{{"username":"ali\u0001ce","password":"{PASSWORD}"}}"#
        )))
        .unwrap();
    let resp = send(&app, login).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let tok = json(resp).await["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let verify = |t: &str| {
        Request::get("/v1/verify")
            .header(header::AUTHORIZATION, format!("Bearer {t}"))
            .body(Body::empty())
            .unwrap()
    };
    let resp = send(&app, verify(&tok)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get("x-auth-request-user").is_none());
    assert_eq!(error_code(resp).await, "INVALID_TOKEN");
    // The control: a plain name verifies, with its headers.
    let app = self::app(HttpConfig::default());
    let tok = token(&app).await;
    let resp = send(&app, verify(&tok)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-auth-request-user"], "alice");
}

#[tokio::test]
async fn errors_are_json_with_a_code() {
    let app = app(HttpConfig::default());
    let resp = send(
        &app,
        Request::post("/v1/refresh").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(error_code(resp).await, "EMPTY_TOKEN");
    let big = "x".repeat(super::MAX_BODY + 1);
    let req = Request::post("/v1/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(big))
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_code(resp).await, "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn readyz_turns_unready_when_draining() {
    let app = app(HttpConfig::default());
    let draining = crate::service::listen::Draining::default();
    let r = router(app).layer(axum::Extension(draining.clone()));
    let get = || Request::get("/readyz").body(Body::empty()).unwrap();
    assert_eq!(
        r.clone().oneshot(get()).await.unwrap().status(),
        StatusCode::OK
    );
    draining.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let resp = r.oneshot(get()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(resp).await, "SHUTTING_DOWN");
}

/// Every route the router serves has its own latency histogram: none is
/// counted as `other`.
#[tokio::test]
async fn every_route_has_its_own_latency_histogram() {
    let app = app(HttpConfig::default());
    for (method, path) in [
        ("POST", "/v1/login"),
        ("GET", "/v1/login"),
        ("POST", "/v1/refresh"),
        ("POST", "/v1/logout"),
        ("GET", "/v1/verify"),
        ("GET", "/v1/verify/a/b"),
        ("GET", "/.well-known/jwks.json"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/nowhere"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        send(&app, req).await;
    }
    let text = app.service.metrics.render();
    for route in crate::service::metrics::ROUTES
        .iter()
        .filter(|r| **r != "/metrics")
    {
        let count = format!("tokenpolicy_http_request_duration_seconds_count{{route=\"{route}\"}}");
        assert!(text.contains(&count), "no histogram for {route}:\n{text}");
    }
    assert!(!text.contains("route=\"other\""), "{text}");
}

fn verify_with_cookie(cookie: &str) -> Request<Body> {
    Request::get("/v1/verify")
        .header("host", "auth.example.net")
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn the_session_cookie_is_host_prefixed_by_default() {
    let app = app(HttpConfig::default());
    let resp = send(&app, json_login(&[])).await;
    let set = resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(set.starts_with("__Host-tokenpolicy=ey"), "{set}");
    assert!(
        set.contains("; Path=/;") && set.contains("; Secure"),
        "{set}"
    );
    assert!(!set.contains("Domain"), "{set}");
    // A cookie of the unprefixed name, which a sibling subdomain could set
    // for the parent domain, is not ours: it signs nobody in.
    let t = token(&app).await;
    let resp = send(&app, verify_with_cookie(&format!("tokenpolicy={t}"))).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(resp).await, "EMPTY_TOKEN");
}

#[tokio::test]
async fn a_cookie_tossed_ahead_of_ours_does_not_sign_the_user_out() {
    let app = app(HttpConfig::default());
    let t = token(&app).await;
    // A logged-out session's token, and a forged one, sent first.
    let spent = token(&app).await;
    let logout = Request::post("/v1/logout")
        .header(header::AUTHORIZATION, format!("Bearer {spent}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, logout).await.status(), StatusCode::NO_CONTENT);
    for first in ["forged", spent.as_str()] {
        let cookie = format!("__Host-tokenpolicy={first}; __Host-tokenpolicy={t}");
        let resp = send(&app, verify_with_cookie(&cookie)).await;
        assert_eq!(resp.status(), StatusCode::OK, "{first}");
        assert_eq!(resp.headers()["x-auth-request-user"], "alice");
    }
    // Refresh takes the same one.
    let req = Request::post("/v1/refresh")
        .header("host", "auth.example.net")
        .header(
            header::COOKIE,
            format!("__Host-tokenpolicy=forged; __Host-tokenpolicy={t}"),
        )
        .header("sec-fetch-site", "same-origin")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&app, req).await.status(), StatusCode::OK);
    // When none verifies, the first one's refusal is the answer.
    let cookie = format!("__Host-tokenpolicy=forged; __Host-tokenpolicy={spent}");
    let resp = send(&app, verify_with_cookie(&cookie)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(resp).await, "INVALID_TOKEN");
}

#[tokio::test]
async fn rd_keeps_scheme_and_port_and_goes_out_percent_encoded() {
    let app = app(HttpConfig::default());
    for (rd, status) in [
        ("https://auth.example.net/app", StatusCode::OK),
        ("http://auth.example.net/app", StatusCode::BAD_REQUEST),
        ("https://auth.example.net:8443/app", StatusCode::BAD_REQUEST),
    ] {
        let req = Request::get(format!("/v1/login?rd={rd}"))
            .header("host", "auth.example.net")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, req).await.status(), status, "{rd}");
    }
    // The form's rd, in UTF-8 (percent-encoded in the form body).
    let resp = send(
        &app,
        form_login(&[("sec-fetch-site", "same-origin")], "/caf%C3%A9?q=%C3%A9"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        resp.headers()[header::LOCATION].as_bytes(),
        b"/caf%C3%A9?q=%C3%A9"
    );
}

#[tokio::test]
async fn sessions_are_listed_ended_and_guarded_against_cross_site_requests() {
    let app = app(HttpConfig::default());
    let first = token(&app).await;
    let second = token(&app).await;
    let list = |t: String| {
        Request::get("/v1/sessions")
            .header("host", "auth.example.net")
            .header(header::COOKIE, format!("__Host-tokenpolicy={t}"))
            .body(Body::empty())
            .unwrap()
    };
    let resp = send(&app, list(second.clone())).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let body = json(resp).await;
    let sessions = body["sessions"].as_array().expect("a list");
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0]["current"], false);
    assert_eq!(sessions[1]["current"], true);
    assert_eq!(sessions[1]["method"], "password");
    let old_sid = sessions[0]["sid"].as_str().expect("sid").to_string();
    // Never a token in the listing.
    assert!(!body.to_string().contains(&first));

    // A cross-site DELETE carrying the cookie is refused and ends nothing.
    let delete = |sid: &str, site: &str| {
        Request::delete(format!("/v1/sessions/{sid}"))
            .header("host", "auth.example.net")
            .header(header::COOKIE, format!("__Host-tokenpolicy={second}"))
            .header("sec-fetch-site", site)
            .body(Body::empty())
            .unwrap()
    };
    let resp = send(&app, delete(&old_sid, "cross-site")).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(resp).await, "CSRF_REJECTED");
    assert_eq!(
        send(&app, list(first.clone())).await.status(),
        StatusCode::OK
    );

    let resp = send(&app, delete("not-a-session", "same-origin")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "SESSION_NOT_FOUND");
    let long = "x".repeat(5_000);
    let resp = send(&app, delete(&long, "same-origin")).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    let resp = send(&app, delete(&old_sid, "same-origin")).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = send(&app, list(first.clone())).await;
    assert_eq!(error_code(resp).await, "REVOKED_SESSION");

    // Log out everywhere: a bad value is refused, `true` ends every session.
    let third = token(&app).await;
    let everywhere = |q: &str| {
        Request::post(format!("/v1/logout?{q}"))
            .header(header::AUTHORIZATION, format!("Bearer {third}"))
            .body(Body::empty())
            .unwrap()
    };
    let resp = send(&app, everywhere("everywhere=yes")).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "INVALID_REQUEST");
    assert_eq!(
        send(&app, list(second.clone())).await.status(),
        StatusCode::OK
    );
    let resp = send(&app, everywhere("everywhere=true")).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    for t in [second, third] {
        let resp = send(&app, list(t)).await;
        assert_eq!(error_code(resp).await, "REVOKED_SESSION");
    }
}
