//! The admin API through the router: off (404), `--admin-token-file`, and
//! a reviewer standing in for the API server (the real one: tests/e2e).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt as _;
use serde_json::Value;
use tower::ServiceExt as _;

use crate::service::admin::{AdminAuth, Decision, ReviewError, Reviewer, Verb};
use crate::service::http::{App, HttpConfig, router};
use crate::service::users::Users;

const ADMIN_TOKEN: &str = "s3cret-admin-token";

fn app(admin: Option<AdminAuth>) -> Arc<App> {
    let service = crate::testing::service().build();
    let hash = bcrypt::hash("pw", 4).unwrap();
    service.set_users(Users::parse(&format!("alice:{hash}\nbob:{hash}\n"), "test").unwrap());
    Arc::new(App {
        service: Arc::new(service),
        config: HttpConfig {
            admin: admin.map(Arc::new),
            ..HttpConfig::default()
        },
    })
}

async fn send(app: &Arc<App>, req: Request<Body>) -> Response {
    router(app.clone()).oneshot(req).await.expect("infallible")
}

async fn body(resp: Response) -> Vec<u8> {
    resp.into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec()
}

async fn json(resp: Response) -> Value {
    serde_json::from_slice(&body(resp).await).unwrap_or(Value::Null)
}

fn req(method: &str, uri: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).unwrap()
}

async fn login(app: &Arc<App>, user: &str) -> (String, String) {
    let i = app
        .service
        .login(user, "pw", None, crate::clock::now_millis)
        .await
        .unwrap();
    (i.token, i.claims.sid)
}

async fn status_and_code(app: &Arc<App>, r: Request<Body>) -> (u16, String) {
    let resp = send(app, r).await;
    let status = resp.status().as_u16();
    let v = json(resp).await;
    (
        status,
        v["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn without_an_admin_config_every_admin_route_is_not_found() {
    let app = app(None);
    for (method, uri) in [
        ("GET", "/v1/admin/sessions?user=alice"),
        ("DELETE", "/v1/admin/sessions?user=alice"),
        ("DELETE", "/v1/admin/sessions/some-sid"),
    ] {
        let resp = send(&app, req(method, uri, Some(ADMIN_TOKEN))).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {uri}");
        assert!(
            body(resp).await.is_empty(),
            "as a route that does not exist"
        );
    }
}

#[tokio::test]
async fn the_admin_token_lists_and_ends_anyones_sessions() {
    let app = app(Some(AdminAuth::token(&format!("{ADMIN_TOKEN}\n")).unwrap()));
    let (a1, a1_sid) = login(&app, "alice").await;
    let (a2, a2_sid) = login(&app, "alice").await;
    let (b, _) = login(&app, "bob").await;

    // Who is not the admin gets 401, whatever they hold: a wrong token,
    // none, a user's own session token, the admin token as a cookie.
    for r in [
        req("GET", "/v1/admin/sessions?user=alice", Some("wrong")),
        req("GET", "/v1/admin/sessions?user=alice", None),
        req("DELETE", "/v1/admin/sessions?user=alice", Some(&a1)),
        Request::delete("/v1/admin/sessions?user=alice")
            .header(header::COOKIE, format!("tokenpolicy={ADMIN_TOKEN}"))
            .body(Body::empty())
            .unwrap(),
    ] {
        let resp = send(&app, r).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert!(resp.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(json(resp).await["error"]["code"], "ADMIN_UNAUTHENTICATED");
    }
    assert!(
        app.service
            .verify(&a1, true, crate::clock::now_millis())
            .await
            .is_ok()
    );

    let resp = send(
        &app,
        req("GET", "/v1/admin/sessions?user=alice", Some(ADMIN_TOKEN)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let v = json(resp).await;
    assert_eq!(v["user"], "alice");
    assert_eq!(v["provider"], Value::Null);
    let listed: Vec<&str> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sid"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [a1_sid.as_str(), a2_sid.as_str()]);
    assert_eq!(v["sessions"][0]["method"], "password");
    assert!(v["sessions"][0]["expires_at"].as_str().is_some());

    let resp = send(
        &app,
        req(
            "DELETE",
            &format!("/v1/admin/sessions/{a1_sid}"),
            Some(ADMIN_TOKEN),
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let now = crate::clock::now_millis();
    assert_eq!(
        app.service
            .verify(&a1, true, now)
            .await
            .unwrap_err()
            .code
            .as_str(),
        "REVOKED_SESSION"
    );
    assert!(app.service.verify(&a2, true, now).await.is_ok());
    for sid in [a1_sid.as_str(), "no-such-sid", &"x".repeat(65)] {
        assert_eq!(
            status_and_code(
                &app,
                req(
                    "DELETE",
                    &format!("/v1/admin/sessions/{sid}"),
                    Some(ADMIN_TOKEN)
                )
            )
            .await,
            (404, "SESSION_NOT_FOUND".into()),
            "{sid}"
        );
    }

    let resp = send(
        &app,
        req("DELETE", "/v1/admin/sessions?user=alice", Some(ADMIN_TOKEN)),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["revoked"], 1);
    let now = crate::clock::now_millis();
    assert!(app.service.verify(&a2, true, now).await.is_err());
    assert!(
        app.service.verify(&b, true, now).await.is_ok(),
        "bob's stays"
    );
}

#[tokio::test]
async fn a_query_that_names_no_user_exactly_is_a_bad_request() {
    let app = app(Some(AdminAuth::token(ADMIN_TOKEN).unwrap()));
    for uri in [
        "/v1/admin/sessions",
        "/v1/admin/sessions?user=",
        "/v1/admin/sessions?user=a&user=b",
        "/v1/admin/sessions?name=alice",
        "/v1/admin/sessions?user=alice&provider=",
        // The policy names no provider.
        "/v1/admin/sessions?user=alice&provider=https%3A%2F%2Fidp.example",
    ] {
        for method in ["GET", "DELETE"] {
            assert_eq!(
                status_and_code(&app, req(method, uri, Some(ADMIN_TOKEN))).await,
                (400, "INVALID_REQUEST".into()),
                "{method} {uri}"
            );
        }
    }
    // Authentication comes first: a stranger learns nothing of the query.
    assert_eq!(
        status_and_code(&app, req("GET", "/v1/admin/sessions", Some("x"))).await,
        (401, "ADMIN_UNAUTHENTICATED".into())
    );
}

#[test]
fn an_empty_admin_token_file_is_refused() {
    for bad in ["", "\n", "two words", "a\tb"] {
        assert!(AdminAuth::token(bad).is_err(), "{bad:?}");
    }
}

/// Stands in for the API server: `root` may do anything, `reader` may
/// list only, `garbage` is nobody's, `down` finds the API server away.
#[derive(Default)]
struct FakeApiServer {
    reviews: AtomicUsize,
}

#[async_trait]
impl Reviewer for FakeApiServer {
    async fn review(&self, token: &str, verb: Verb) -> Result<Decision, ReviewError> {
        self.reviews.fetch_add(1, Ordering::SeqCst);
        match (token, verb) {
            ("root", _) | ("reader", Verb::List) => Ok(Decision::Allowed {
                username: format!("system:serviceaccount:ops:{token}"),
            }),
            ("reader", Verb::Delete) => Ok(Decision::Denied {
                username: "system:serviceaccount:ops:reader".into(),
            }),
            ("down", _) => Err(ReviewError("connection refused".into())),
            _ => Ok(Decision::Unauthenticated),
        }
    }
}

#[tokio::test]
async fn the_cluster_decides_and_its_decisions_are_cached() {
    let api = Arc::new(FakeApiServer::default());
    let app = app(Some(AdminAuth::reviewed(api.clone())));
    let (a, sid) = login(&app, "alice").await;
    let list = "/v1/admin/sessions?user=alice";
    let reviews = || api.reviews.load(Ordering::SeqCst);

    let resp = send(&app, req("GET", list, Some("reader"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(json(resp).await["sessions"][0]["sid"], sid.as_str());
    assert_eq!(reviews(), 1);
    // The same token and verb again: the cached decision, no review.
    for _ in 0..5 {
        assert_eq!(
            send(&app, req("GET", list, Some("reader"))).await.status(),
            200
        );
    }
    assert_eq!(reviews(), 1);
    // Another verb is another decision: denied by the cluster's RBAC.
    let delete = format!("/v1/admin/sessions/{sid}");
    assert_eq!(
        status_and_code(&app, req("DELETE", &delete, Some("reader"))).await,
        (403, "ADMIN_FORBIDDEN".into())
    );
    assert_eq!(reviews(), 2);
    assert!(
        app.service
            .verify(&a, true, crate::clock::now_millis())
            .await
            .is_ok()
    );
    assert_eq!(
        status_and_code(&app, req("GET", list, Some("garbage"))).await,
        (401, "ADMIN_UNAUTHENTICATED".into())
    );
    // The API server away: 503, never a 200 nor a 401.
    let resp = send(&app, req("GET", list, Some("down"))).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    assert_eq!(json(resp).await["error"]["code"], "REVIEW_UNAVAILABLE");
    // ...and that is not cached: each call asks again.
    let before = reviews();
    send(&app, req("GET", list, Some("down"))).await;
    assert_eq!(reviews(), before + 1);

    assert_eq!(
        send(&app, req("DELETE", &delete, Some("root")))
            .await
            .status(),
        204
    );
    assert!(
        app.service
            .verify(&a, true, crate::clock::now_millis())
            .await
            .is_err()
    );
}
