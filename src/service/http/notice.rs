//! Why a browser is on the sign-in page: a fixed notice chosen from a
//! `reason` query parameter or from what a check of the browser's own
//! cookie says. The page shows only the fixed texts below, never text
//! taken from the request.

use crate::service::error::Code;

/// How long the session cookie outlives the session, so that a browser that
/// comes back after its session ended still sends the dead token and the
/// sign-in page can tell it that its session expired. The token itself is
/// refused from the session end on (rule 2), so this keeps nothing alive.
pub const COOKIE_KEPT_AFTER_SESSION_SECS: i64 = 24 * 3600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Logged out here (the logout form) or elsewhere (the session was revoked).
    SignedOut,
    /// The session or the token ran out.
    SessionExpired,
    /// The session ended after `sessionIdleTimeout` without activity.
    Inactive,
}

impl Notice {
    /// The `reason` query parameter. Anything but these values is ignored.
    pub fn from_param(value: &str) -> Option<Notice> {
        match value {
            "signed-out" => Some(Notice::SignedOut),
            "session-expired" => Some(Notice::SessionExpired),
            "inactive" => Some(Notice::Inactive),
            _ => None,
        }
    }

    pub fn param(self) -> &'static str {
        match self {
            Notice::SignedOut => "signed-out",
            Notice::SessionExpired => "session-expired",
            Notice::Inactive => "inactive",
        }
    }

    /// The notice for a cookie whose token the service refused with `code`.
    pub fn from_refusal(code: Code) -> Option<Notice> {
        match code {
            Code::ExpiredSession | Code::ExpiredToken => Some(Notice::SessionExpired),
            Code::RevokedSession | Code::TokenAlreadyRefreshed => Some(Notice::SignedOut),
            Code::IdleSession => Some(Notice::Inactive),
            _ => None,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Notice::SignedOut => "You have been signed out.",
            Notice::SessionExpired => "Your session has expired. Please sign in again.",
            Notice::Inactive => "You were signed out after inactivity. Please sign in again.",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fixed_reasons_are_understood() {
        for n in [Notice::SignedOut, Notice::SessionExpired, Notice::Inactive] {
            assert_eq!(Notice::from_param(n.param()), Some(n));
        }
        for other in ["", "Signed-Out", "signed-out ", "<script>", "expired"] {
            assert_eq!(Notice::from_param(other), None, "{other:?}");
        }
        assert_ne!(Notice::SignedOut.text(), Notice::SessionExpired.text());
        assert!(
            Notice::Inactive
                .text()
                .contains("signed out after inactivity")
        );
        assert_ne!(Notice::Inactive.text(), Notice::SessionExpired.text());
    }

    #[test]
    fn refusals_map_to_what_a_person_needs_to_know() {
        assert_eq!(
            Notice::from_refusal(Code::ExpiredSession),
            Some(Notice::SessionExpired)
        );
        assert_eq!(
            Notice::from_refusal(Code::ExpiredToken),
            Some(Notice::SessionExpired)
        );
        assert_eq!(
            Notice::from_refusal(Code::RevokedSession),
            Some(Notice::SignedOut)
        );
        assert_eq!(
            Notice::from_refusal(Code::IdleSession),
            Some(Notice::Inactive)
        );
        // A forged or broken cookie says nothing about the person's session.
        assert_eq!(Notice::from_refusal(Code::InvalidToken), None);
        assert_eq!(Notice::from_refusal(Code::EmptyToken), None);
        assert_eq!(Notice::from_refusal(Code::StoreUnavailable), None);
    }
}

/// The notices through the HTTP API: the sign-in page, the cookie it reads,
/// and the sign-out form.
#[cfg(test)]
mod http_tests {
    use std::sync::Arc;

    use axum::extract::Request;
    use axum::http::{StatusCode, header};

    use super::super::{App, HttpConfig, router, set_cookie};
    use super::*;
    use crate::clock::now_millis;

    async fn page(app: Arc<App>, uri: &str, cookie: Option<&str>) -> (StatusCode, String) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let mut req = Request::builder().uri(uri);
        if let Some(c) = cookie {
            req = req.header(header::COOKIE, c);
        }
        let resp = router(app)
            .oneshot(req.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn test_app() -> Arc<App> {
        Arc::new(App {
            service: Arc::new(crate::testing::service().build()),
            config: HttpConfig::default(),
        })
    }

    #[tokio::test]
    async fn signin_page_says_why_from_a_fixed_set() {
        let expired = Notice::SessionExpired.text();
        let out = Notice::SignedOut.text();
        let (status, body) = page(test_app(), "/v1/login?reason=session-expired", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains(expired) && !body.contains(out), "{body}");
        let (_, body) = page(test_app(), "/v1/login?reason=signed-out", None).await;
        assert!(body.contains(out) && !body.contains(expired), "{body}");
        // Any other value is ignored, never shown.
        let (status, body) = page(test_app(), "/v1/login?reason=%3Cb%3Ehi", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            !body.contains("<b>hi")
                && !body.contains("&lt;b&gt;hi")
                && !body.contains("&#60;b&#62;hi"),
            "{body}"
        );
        assert!(!body.contains(expired) && !body.contains(out), "{body}");
    }

    #[tokio::test]
    async fn signin_page_reads_why_from_the_dead_cookie() {
        let app = test_app();
        let now = now_millis() / 1_000;
        let keys = app.service.keys();
        let token = |auth_time: i64| {
            keys.sign(&crate::service::jwt::Claims {
                iss: keys.issuer().into(),
                aud: keys.audience().into(),
                ..crate::testing::claims_at(auth_time)
            })
        };
        // Logged in ten days ago: the default 8 h session is over.
        let cookie = format!("__Host-tokenpolicy={}", token(now - 10 * 86_400));
        let (_, body) = page(app.clone(), "/v1/login", Some(&cookie)).await;
        assert!(body.contains(Notice::SessionExpired.text()), "{body}");
        // A cookie that is not ours says nothing.
        let (_, body) = page(app.clone(), "/v1/login", Some("__Host-tokenpolicy=forged")).await;
        assert!(!body.contains(Notice::SessionExpired.text()), "{body}");
        assert!(!body.contains(Notice::SignedOut.text()), "{body}");
        // The session cookie outlives the session, so that this works.
        let c = set_cookie(&crate::policy::Policy::default().cookie, "t", 10);
        assert!(
            c.to_str()
                .unwrap()
                .contains(&format!("Max-Age={}", 10 + COOKIE_KEPT_AFTER_SESSION_SECS))
        );
        let c = set_cookie(&crate::policy::Policy::default().cookie, "", 0);
        assert!(c.to_str().unwrap().contains("Max-Age=0;"));
    }

    /// A session that ended for inactivity: the page says so, not "expired".
    #[tokio::test]
    async fn signin_page_tells_an_idle_end_from_an_expired_session() {
        let policy = crate::policy::Policy {
            idle_timeout: Some(10),
            ..crate::policy::Policy::default()
        };
        let users = crate::testing::users(&crate::testing::user_line("alice", "pw"));
        let pwv = users.get("alice").unwrap().password_version.clone();
        let service = crate::testing::service()
            .policy(policy)
            .users(users)
            .build();
        let app = Arc::new(App {
            service: Arc::new(service),
            config: HttpConfig::default(),
        });
        let now = now_millis() / 1_000;
        let keys = app.service.keys();
        // Signed in a minute ago, no activity since; the timeout is 10 s.
        let token = keys.sign(&crate::service::jwt::Claims {
            sid: "s-idle".into(),
            jti: "j-idle".into(),
            exp: now + 600,
            pwv: Some(pwv),
            ..crate::testing::claims_at(now - 60)
        });
        let cookie = format!("__Host-tokenpolicy={token}");
        let (_, body) = page(app.clone(), "/v1/login", Some(&cookie)).await;
        assert!(body.contains(Notice::Inactive.text()), "{body}");
        assert!(!body.contains(Notice::SessionExpired.text()), "{body}");
        let (_, body) = page(app, "/v1/login?reason=inactive", None).await;
        assert!(body.contains("signed out after inactivity"), "{body}");
    }

    #[tokio::test]
    async fn sign_out_form_goes_to_the_signin_page() {
        use tower::ServiceExt;
        let app = test_app();
        let now = now_millis() / 1_000;
        let keys = app.service.keys();
        let token = keys.sign(&crate::service::jwt::Claims {
            iss: keys.issuer().into(),
            aud: keys.audience().into(),
            sid: "sid-2".into(),
            ..crate::testing::claims_at(now)
        });
        let logout = |form: bool| {
            let mut req = Request::builder()
                .method("POST")
                .uri("/v1/logout")
                .header(header::COOKIE, format!("__Host-tokenpolicy={token}"));
            if form {
                req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            }
            router(app.clone()).oneshot(req.body(axum::body::Body::empty()).unwrap())
        };
        let resp = logout(true).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
        assert_eq!(resp.headers()[header::LOCATION], "login?reason=signed-out");
        assert!(
            resp.headers()[header::SET_COOKIE]
                .to_str()
                .unwrap()
                .contains("Max-Age=0;")
        );
        // API clients keep their 204.
        assert_eq!(
            logout(false).await.unwrap().status(),
            StatusCode::NO_CONTENT
        );
    }
}
