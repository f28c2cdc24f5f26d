//! Micro-benchmarks of the token service's hot paths:
//! the policy decision (rules), verify of a token never seen vs one whose
//! signature is remembered, the one-time refresh claim (in-process store),
//! a whole forward-auth request through the router (headers in, headers
//! out, every middleware) against `/healthz` through the same router, and a
//! login refused before its password check; forward-auth with
//! `--audit-log` on beside the same without (a valid verify writes no
//! event, so the two must cost the same).
//!
//!     cargo bench --bench service

use std::hint::black_box;
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use tokenpolicy::clock::{Millis, now_millis};
use tokenpolicy::policy::Policy;
use tokenpolicy::service::audit::AuditLog;
use tokenpolicy::service::http::{App, HttpConfig, router};
use tokenpolicy::service::jwt::{Claims, Key, KeySet};
use tokenpolicy::service::rules;
use tokenpolicy::service::session::{Throttle, TokenService};
use tokenpolicy::service::store::{MemoryStore, OneTimeStore, RefreshRecord};
use tokenpolicy::testing;
use tower::ServiceExt as _;

fn claims(now: Millis) -> Claims {
    let t = now / 1_000;
    Claims {
        sid: uuid::Uuid::new_v4().to_string(),
        jti: uuid::Uuid::new_v4().to_string(),
        exp: t + 1_800,
        ..testing::claims_at(t)
    }
}

fn service(cache: usize) -> TokenService {
    service_with(cache, tokenpolicy::policy::Policy::default())
}

fn service_with(cache: usize, policy: tokenpolicy::policy::Policy) -> TokenService {
    testing::service()
        .policy(policy)
        .user("alice", "pw")
        // The benches log one user in thousands of times.
        .throttle(Throttle {
            max_logins_per_user: u64::MAX,
            ..Throttle::default()
        })
        .build()
        .with_verified_cache(cache)
}

fn policy_decision(c: &mut Criterion) {
    let now = now_millis();
    let claims = claims(now);
    let policy = Policy::default();
    c.bench_function("rules::standing", |b| {
        b.iter(|| rules::standing(black_box(&claims), black_box(&policy), black_box(now), 0))
    });
}

fn verify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (name, cache) in [("verify, cold (no cache)", 0), ("verify, cached", 1_000)] {
        let s = service(cache);
        let now = now_millis();
        let token = rt
            .block_on(s.login("alice", "pw", None, || now))
            .expect("login")
            .token;
        c.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(s.verify(black_box(&token), false, now))
                    .expect("valid")
            })
        });
    }
    let keys = KeySet::new(vec![Key::generate()], "tokenpolicy", "tokenpolicy").expect("keys");
    let token = keys.sign(&claims(now_millis()));
    c.bench_function("KeySet::verify (signature + decode)", |b| {
        b.iter(|| keys.verify(black_box(&token)).expect("valid"))
    });
    c.bench_function("KeySet::sign", |b| {
        let cl = claims(now_millis());
        b.iter(|| keys.sign(black_box(&cl)))
    });
}

fn refresh_claim(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let store = MemoryStore::new();
    let record = RefreshRecord {
        jti: uuid::Uuid::new_v4().to_string(),
        iat: 1,
        exp: 2,
        at: 3,
    };
    let mut n = 0u64;
    c.bench_function("MemoryStore::claim_refresh (first claim)", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(store.claim_refresh("sid", &n.to_string(), 1, &record, 60_000))
                .expect("claim")
        })
    });
    let s = service(1_000);
    let now = now_millis();
    let mut token = rt
        .block_on(s.login("alice", "pw", None, || now))
        .expect("login")
        .token;
    c.bench_function("TokenService::refresh (chain, in-process store)", |b| {
        b.iter(|| {
            token = rt.block_on(s.refresh(&token, now)).expect("refresh").token;
        })
    });
}

/// A request as ingress-nginx's auth subrequest sends it.
fn forward_auth_request(token: &str) -> Request<Body> {
    Request::get("/v1/verify")
        .header("host", "tokenpolicy.auth.svc")
        .header("x-original-url", "https://app.example.com/items?page=2")
        .header("x-original-method", "GET")
        .header("x-sent-from", "nginx-ingress-controller")
        .header("x-real-ip", "203.0.113.7")
        .header("x-forwarded-for", "203.0.113.7")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .expect("request")
}

fn http(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let service = Arc::new(service(50_000));
    let now = now_millis();
    let tokens: Vec<String> = (0..10_000)
        .map(|_| {
            rt.block_on(service.login("alice", "pw", None, || now))
                .expect("login")
                .token
        })
        .collect();
    let app = Arc::new(App {
        service,
        config: HttpConfig::default(),
    });
    let routes = router(app);
    let answer = |req: Request<Body>| {
        rt.block_on(routes.clone().oneshot(req))
            .expect("infallible")
    };
    let send = |req: Request<Body>| {
        let resp = answer(req);
        assert_eq!(resp.status(), 200);
        resp
    };
    // Every token once, so that all are remembered.
    for t in &tokens {
        send(forward_auth_request(t));
    }
    c.bench_function("http: GET /healthz", |b| {
        b.iter(|| {
            send(
                Request::get("/healthz")
                    .body(Body::empty())
                    .expect("request"),
            )
        })
    });
    c.bench_function("http: forward-auth, 1 token", |b| {
        b.iter(|| send(forward_auth_request(&tokens[0])))
    });
    // The same with the audit trail written (to a file in the temp dir).
    let path = std::env::temp_dir().join(format!("tp-bench-audit-{}", std::process::id()));
    let audited = {
        let s = crate::service(50_000);
        let log = AuditLog::open(&path.to_string_lossy(), &s.metrics.audit).expect("audit log");
        Arc::new(s.with_audit_log(log))
    };
    let audited_token = rt
        .block_on(audited.login("alice", "pw", None, || now))
        .expect("login")
        .token;
    let audited_routes = router(Arc::new(App {
        service: audited,
        config: HttpConfig::default(),
    }));
    c.bench_function("http: forward-auth, 1 token, --audit-log on", |b| {
        b.iter(|| {
            let resp = rt
                .block_on(
                    audited_routes
                        .clone()
                        .oneshot(forward_auth_request(&audited_token)),
                )
                .expect("infallible");
            assert_eq!(resp.status(), 200);
            resp
        })
    });
    let _ = std::fs::remove_file(&path);
    let mut i = 0usize;
    c.bench_function("http: forward-auth, 10,000 tokens in turn", |b| {
        b.iter(|| {
            // A stride that is prime to 10,000 visits every token.
            i = (i + 7_919) % tokens.len();
            send(forward_auth_request(&tokens[i]))
        })
    });
    // The same two with `sessionIdleTimeout: 30m`: each verify is also the
    // session's activity (a map lookup; the store is written in the
    // background, at most once per session per write slice).
    let idle = Arc::new(service_with(
        50_000,
        tokenpolicy::policy::Policy {
            idle_timeout: Some(1_800),
            ..tokenpolicy::policy::Policy::default()
        },
    ));
    let idle_tokens: Vec<String> = (0..10_000)
        .map(|_| {
            rt.block_on(idle.login("alice", "pw", None, || now))
                .expect("login")
                .token
        })
        .collect();
    let idle_routes = router(Arc::new(App {
        service: idle,
        config: HttpConfig::default(),
    }));
    let idle_send = |req: Request<Body>| {
        let resp = rt
            .block_on(idle_routes.clone().oneshot(req))
            .expect("infallible");
        assert_eq!(resp.status(), 200);
        resp
    };
    for t in &idle_tokens {
        idle_send(forward_auth_request(t));
    }
    c.bench_function("http: forward-auth, 1 token, idle timeout", |b| {
        b.iter(|| idle_send(forward_auth_request(&idle_tokens[0])))
    });
    c.bench_function(
        "http: forward-auth, 10,000 tokens in turn, idle timeout",
        |b| {
            b.iter(|| {
                i = (i + 7_919) % idle_tokens.len();
                idle_send(forward_auth_request(&idle_tokens[i]))
            })
        },
    );
    // A login refused before any password check or store call, as one
    // turned away by a full hashing line is (the same body read, JSON
    // decode and JSON error; here the refusal is for the empty password,
    // which is decided just before the line is asked).
    c.bench_function("http: POST /v1/login refused before the check", |b| {
        b.iter(|| {
            let resp = answer(
                Request::post("/v1/login")
                    .header("host", "tokenpolicy.auth.svc")
                    .header("content-type", "application/json")
                    .header("content-length", "33")
                    .body(Body::from(r#"{"username":"demo","password":""}"#))
                    .expect("request"),
            );
            assert_eq!(resp.status(), 400);
            resp
        })
    });
}

criterion_group!(benches, policy_decision, verify, refresh_claim, http);
criterion_main!(benches);
