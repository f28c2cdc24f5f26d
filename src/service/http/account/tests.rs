//! The account page and its forms, through the router.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use super::super::{App, HttpConfig, router};
use super::*;
use crate::service::users::Users;

const HOSTILE_USER: &str = "<img/src=x>\"&'";
const HOSTILE_UA: &str = "Evil/1.0 <script>alert(1)</script> \"'&";

fn app() -> Arc<App> {
    let service = crate::testing::service().build();
    let hash = bcrypt::hash("pw", 4).expect("bcrypt");
    service.set_users(
        Users::parse(
            &format!("alice:{hash}\nbob:{hash}\n{HOSTILE_USER}:{hash}\n"),
            "test",
        )
        .expect("users"),
    );
    Arc::new(App {
        service: Arc::new(service),
        config: HttpConfig::default(),
    })
}

async fn send(app: &Arc<App>, req: Request<Body>) -> Response {
    router(app.clone()).oneshot(req).await.expect("infallible")
}

async fn body(resp: Response) -> String {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn location(resp: &Response) -> &str {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A password login as `user` from a browser saying `ua`: its token.
async fn login(app: &Arc<App>, user: &str, ua: &str) -> String {
    let req = Request::post("/v1/login")
        .header("host", "auth.example.net")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, ua)
        .body(Body::from(
            serde_json::json!({"username": user, "password": "pw"}).to_string(),
        ))
        .unwrap();
    let resp = send(app, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body(resp).await).expect("json");
    v["access_token"].as_str().expect("token").to_string()
}

fn cookie(token: &str) -> String {
    format!("__Host-tokenpolicy={token}")
}

async fn account_page(app: &Arc<App>, token: &str) -> Response {
    let req = Request::get("/v1/account")
        .header("host", "auth.example.net")
        .header(header::COOKIE, cookie(token))
        .body(Body::empty())
        .unwrap();
    send(app, req).await
}

fn post(path: &str, token: &str, form: &str, extra: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::post(path)
        .header("host", "auth.example.net")
        .header(header::COOKIE, cookie(token))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Body::from(form.to_string())).unwrap()
}

fn sid_of(app: &Arc<App>, token: &str) -> String {
    app.service.keys().verify(token).expect("ours").sid
}

/// The form token that the page shows `token`'s browser.
async fn csrf_of(app: &Arc<App>, token: &str) -> String {
    let page = body(account_page(app, token).await).await;
    let at = page.find(r#"name="csrf" value=""#).expect("a form token") + 19;
    page[at..at + 32].to_string()
}

async fn verify_code(app: &Arc<App>, token: &str) -> &'static str {
    match app.service.verify(token, false, now_millis()).await {
        Ok(_) => "OK",
        Err(e) => e.code.as_str(),
    }
}

#[tokio::test]
async fn without_a_session_the_page_sends_to_sign_in() {
    let app = app();
    for c in [
        None,
        Some("__Host-tokenpolicy=forged"),
        Some("__Host-tokenpolicy="),
    ] {
        let mut req = Request::get("/v1/account").header("host", "auth.example.net");
        if let Some(c) = c {
            req = req.header(header::COOKIE, c);
        }
        let resp = send(&app, req.body(Body::empty()).unwrap()).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{c:?}");
        assert_eq!(location(&resp), "login?rd=%2Fv1%2Faccount", "{c:?}");
    }
    // A revoked session too.
    let t = login(&app, "alice", "a").await;
    app.service.logout(&t, now_millis()).await.unwrap();
    let resp = account_page(&app, &t).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "login?rd=%2Fv1%2Faccount");
}

#[tokio::test]
async fn the_page_lists_the_callers_sessions_escaped_and_marks_this_one() {
    let app = app();
    let laptop = login(&app, "alice", HOSTILE_UA).await;
    let phone = login(&app, "alice", "Phone/2.0").await;
    let bob = login(&app, "bob", "Bob/1.0").await;
    let resp = account_page(&app, &phone).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h[header::CACHE_CONTROL], "no-store");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let page = body(resp).await;
    assert!(page.contains(r#"<meta name="viewport" content="width=device-width">"#));
    assert!(!page.contains("<script"), "{page}");
    assert!(page.contains("Evil/1.0 &#60;script&#62;alert(1)&#60;/script&#62; &#34;&#39;&#38;"));
    let (l, p, b) = (
        sid_of(&app, &laptop),
        sid_of(&app, &phone),
        sid_of(&app, &bob),
    );
    assert!(page.contains(&format!(r#"class="session" data-sid="{l}""#)));
    assert!(page.contains(&format!(r#"class="session current" data-sid="{p}""#)));
    assert!(!page.contains(&b), "another user's session is listed");
    assert_eq!(page.matches("this browser").count(), 1);
    assert_eq!(page.matches(r#"<li class="session"#).count(), 2);
    assert!(page.contains("Signed in with a password"));
    // The current session comes first.
    assert!(page.find(&p) < page.find(&l));
    // Every form posts here with this session's form token.
    let csrf = form_token(&app, &p);
    assert_eq!(
        page.matches(&format!(r#"name="csrf" value="{csrf}""#))
            .count(),
        3
    );
    assert!(page.contains(r#"action="account/logout-everywhere""#));
    let encoded = p.replace('-', "%2D");
    assert!(page.contains(&format!(r#"action="account/sessions/{encoded}/end""#)));
    // Bearer works too.
    let req = Request::get("/v1/account")
        .header(header::AUTHORIZATION, format!("Bearer {laptop}"))
        .body(Body::empty())
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let page = body(resp).await;
    assert!(page.contains(&format!(r#"class="session current" data-sid="{l}""#)));
}

#[tokio::test]
async fn a_hostile_user_name_is_escaped() {
    let app = app();
    let t = login(&app, HOSTILE_USER, "a").await;
    let page = body(account_page(&app, &t).await).await;
    assert!(!page.contains("<img"), "{page}");
    assert!(page.contains("Signed in as <b>&#60;img/src=x&#62;&#34;&#38;&#39;</b>"));
}

#[tokio::test]
async fn signing_out_another_session_ends_it_and_comes_back_with_a_notice() {
    let app = app();
    let other = login(&app, "alice", "a").await;
    let me = login(&app, "alice", "b").await;
    let csrf = csrf_of(&app, &me).await;
    let path = format!("/v1/account/sessions/{}/end", sid_of(&app, &other));
    let resp = send(&app, post(&path, &me, &format!("csrf={csrf}"), &[])).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "../../../account?done=session-ended");
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    assert_eq!(verify_code(&app, &other).await, "REVOKED_SESSION");
    assert_eq!(verify_code(&app, &me).await, "OK");
    // The page says so, from a fixed text; anything else is not shown.
    let req = |q: &str| {
        Request::get(format!("/v1/account?done={q}"))
            .header(header::COOKIE, cookie(&me))
            .body(Body::empty())
            .unwrap()
    };
    let page = body(send(&app, req("session-ended")).await).await;
    assert!(page.contains(Done::SessionEnded.text()));
    assert_eq!(page.matches(r#"<li class="session"#).count(), 1);
    let page = body(send(&app, req("%3Cb%3Ex")).await).await;
    assert!(!page.contains("role=\"status\""), "{page}");
    // Again: it had already ended.
    let resp = send(&app, post(&path, &me, &format!("csrf={csrf}"), &[])).await;
    assert_eq!(location(&resp), "../../../account?done=already-ended");
    // Another user's session is no session of the caller's, and stays.
    let bob = login(&app, "bob", "c").await;
    let path = format!("/v1/account/sessions/{}/end", sid_of(&app, &bob));
    let resp = send(&app, post(&path, &me, &format!("csrf={csrf}"), &[])).await;
    assert_eq!(location(&resp), "../../../account?done=already-ended");
    assert_eq!(verify_code(&app, &bob).await, "OK");
}

#[tokio::test]
async fn a_post_without_the_sessions_form_token_or_from_another_site_ends_nothing() {
    let app = app();
    let other = login(&app, "alice", "a").await;
    let me = login(&app, "alice", "b").await;
    let bob = login(&app, "bob", "c").await;
    let good = csrf_of(&app, &me).await;
    let path = format!("/v1/account/sessions/{}/end", sid_of(&app, &other));
    let bobs = csrf_of(&app, &bob).await;
    for (form, extra) in [
        ("".to_string(), vec![]),
        ("csrf=".to_string(), vec![]),
        ("csrf=00000000000000000000000000000000".to_string(), vec![]),
        // Another session's form token is not this one's.
        (format!("csrf={bobs}"), vec![]),
        (format!("csrf={good}x"), vec![]),
        // The right token from another site: the cross-site rule.
        (
            format!("csrf={good}"),
            vec![("sec-fetch-site", "cross-site")],
        ),
        (
            format!("csrf={good}"),
            vec![("origin", "https://evil.example")],
        ),
    ] {
        for p in [path.as_str(), "/v1/account/logout-everywhere"] {
            let resp = send(&app, post(p, &me, &form, &extra)).await;
            assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{p} {form} {extra:?}");
            let text = body(resp).await;
            assert!(text.contains("CSRF_REJECTED"), "{text}");
        }
    }
    // Not a form.
    let mut req = post(&path, &me, &format!("csrf={good}"), &[]);
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    assert_eq!(
        send(&app, req).await.status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    for t in [&other, &me, &bob] {
        assert_eq!(verify_code(&app, t).await, "OK");
    }
    // Without a session: to the sign-in page, nothing ended.
    let resp = send(&app, post(&path, "forged", &format!("csrf={good}"), &[])).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "../../../login?rd=%2Fv1%2Faccount");
    assert_eq!(verify_code(&app, &other).await, "OK");
}

#[tokio::test]
async fn signing_out_this_session_clears_the_cookie_and_goes_to_sign_in() {
    let app = app();
    let other = login(&app, "alice", "a").await;
    let me = login(&app, "alice", "b").await;
    let csrf = csrf_of(&app, &me).await;
    let path = format!("/v1/account/sessions/{}/end", sid_of(&app, &me));
    let resp = send(&app, post(&path, &me, &format!("csrf={csrf}"), &[])).await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "../../../login?reason=signed-out");
    let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    assert!(set.starts_with("__Host-tokenpolicy=;") && set.contains("Max-Age=0;"));
    assert_eq!(verify_code(&app, &me).await, "REVOKED_SESSION");
    assert_eq!(verify_code(&app, &other).await, "OK");
}

#[tokio::test]
async fn signing_out_everywhere_ends_every_session_of_the_caller_only() {
    let app = app();
    let a = login(&app, "alice", "a").await;
    let me = login(&app, "alice", "b").await;
    let bob = login(&app, "bob", "c").await;
    let csrf = csrf_of(&app, &me).await;
    let resp = send(
        &app,
        post(
            "/v1/account/logout-everywhere",
            &me,
            &format!("csrf={csrf}"),
            &[("sec-fetch-site", "same-origin")],
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "../login?reason=signed-out");
    assert!(
        resp.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0;")
    );
    assert_eq!(verify_code(&app, &a).await, "REVOKED_SESSION");
    assert_eq!(verify_code(&app, &me).await, "REVOKED_SESSION");
    assert_eq!(verify_code(&app, &bob).await, "OK");
}

#[tokio::test]
async fn an_expired_but_renewable_cookie_is_renewed_on_the_page() {
    let app = app();
    let now = now_millis() / 1_000;
    let keys = app.service.keys();
    // Alice's session, its token made to have run out two seconds ago (the
    // default policy still renews it).
    let real = keys.verify(&login(&app, "alice", "a").await).expect("ours");
    let token = keys.sign(&crate::service::jwt::Claims {
        jti: "j-renew".into(),
        iat: now - 62,
        exp: now - 2,
        auth_time: now - 62,
        ..real.clone()
    });
    assert_eq!(verify_code(&app, &token).await, "EXPIRED_TOKEN");
    let resp = account_page(&app, &token).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let set = resp.headers()[header::SET_COOKIE].to_str().unwrap();
    let renewed = set
        .strip_prefix("__Host-tokenpolicy=")
        .and_then(|s| s.split(';').next())
        .expect("the renewed cookie");
    assert_ne!(renewed, token);
    assert_eq!(sid_of(&app, renewed), real.sid);
    assert_eq!(verify_code(&app, renewed).await, "OK");
    // A bearer token is never renewed behind its holder's back.
    let req = Request::get("/v1/account")
        .header(header::AUTHORIZATION, format!("Bearer {renewed}"))
        .body(Body::empty())
        .unwrap();
    let resp = send(&app, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
}

#[test]
fn only_fixed_notices_are_understood() {
    for d in [Done::SessionEnded, Done::AlreadyEnded] {
        assert_eq!(Done::from_param(d.param()), Some(d));
    }
    for other in ["", "session-ended ", "<b>", "Session-Ended"] {
        assert_eq!(Done::from_param(other), None);
    }
}

#[test]
fn form_tokens_are_per_session_and_per_key() {
    let a = app();
    let b = app();
    assert_eq!(form_token(&a, "s1"), form_token(&a, "s1"));
    assert_ne!(form_token(&a, "s1"), form_token(&a, "s2"));
    assert_ne!(form_token(&a, "s1"), form_token(&b, "s1"));
    assert!(form_token_ok(&a, "s1", Some(&form_token(&a, "s1"))));
    assert!(!form_token_ok(&a, "s1", None));
    assert!(!form_token_ok(&a, "s1", Some("")));
}
