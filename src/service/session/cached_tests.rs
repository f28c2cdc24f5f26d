//! A token whose signature is remembered (the verified-token cache) must
//! still lose to everything that can change after it was first verified:
//! revocation, a shortened policy, the user's removal, a password change.
//! Each test first makes sure the token IS served from the cache.

use super::*;

const T0: Millis = 1_800_000_000_000;

fn service() -> (TokenService, String) {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let s = crate::testing::service()
        .users(crate::testing::users(&format!("alice:{hash}\n")))
        .build();
    (s, hash)
}

/// Logs in, verifies once (which stores the token), and checks that the
/// second verify is answered from the cache.
async fn cached_token(s: &TokenService) -> Issued {
    let t = s.login("alice", "pw", None, || T0).await.unwrap();
    // A token we signed is known good from the start.
    assert!(s.verified.get(&t.token, T0 + 1_000).is_some());
    assert!(s.verify(&t.token, false, T0 + 1_000).await.is_ok());
    assert!(s.verified.get(&t.token, T0 + 2_000).is_some());
    assert!(s.verify(&t.token, false, T0 + 2_000).await.is_ok());
    t
}

fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
    r.unwrap_err().code.as_str()
}

#[tokio::test]
async fn revocation_applies_to_a_cached_token() {
    let (s, _) = service();
    let t = cached_token(&s).await;
    let other = s.login("alice", "pw", None, || T0).await.unwrap();
    s.logout(&other.token, T0 + 2_500).await.unwrap();
    assert!(s.verify(&t.token, false, T0 + 2_600).await.is_ok());
    s.logout(&t.token, T0 + 3_000).await.unwrap();
    assert_eq!(
        code(s.verify(&t.token, false, T0 + 3_000).await),
        "REVOKED_SESSION"
    );
    assert_eq!(
        code(s.verify(&t.token, true, T0 + 3_100).await),
        "REVOKED_SESSION"
    );
}

#[tokio::test]
async fn shortened_policy_applies_to_a_cached_token() {
    let (s, _) = service();
    let t = cached_token(&s).await;
    // The token's validity shrinks below its age: expired, renewable.
    s.set_policy(Policy {
        token: 1,
        renew_limit: 60,
        ..Policy::default()
    });
    assert_eq!(
        code(s.verify(&t.token, false, T0 + 3_000).await),
        "EXPIRED_TOKEN"
    );
    // The session shrinks below its age: over.
    s.set_policy(Policy {
        session: 2,
        token: 2,
        renew_limit: 0,
        ..Policy::default()
    });
    assert_eq!(
        code(s.verify(&t.token, true, T0 + 3_000).await),
        "EXPIRED_SESSION"
    );
    // Back to the old policy: the token is worth what it was.
    s.set_policy(Policy::default());
    assert!(s.verify(&t.token, false, T0 + 3_000).await.is_ok());
}

#[tokio::test]
async fn user_removal_applies_to_a_cached_token() {
    let (s, hash) = service();
    let t = cached_token(&s).await;
    s.set_users_at(
        Users::parse(&format!("bob:{hash}\n"), "t").unwrap(),
        T0 + 2_500,
    );
    assert_eq!(
        code(s.verify(&t.token, false, T0 + 3_000).await),
        "REVOKED_SESSION"
    );
    // Added back: the cached token stays refused.
    s.set_users_at(
        Users::parse(&format!("alice:{hash}\n"), "t").unwrap(),
        T0 + 2_600,
    );
    assert_eq!(
        code(s.verify(&t.token, false, T0 + 3_000).await),
        "REVOKED_SESSION"
    );
}

#[tokio::test]
async fn password_change_applies_to_a_cached_token() {
    let (s, _) = service();
    let t = cached_token(&s).await;
    let other = bcrypt::hash("new", 4).unwrap();
    s.set_users(Users::parse(&format!("alice:{other}\n"), "t").unwrap());
    assert_eq!(
        code(s.verify(&t.token, false, T0 + 3_000).await),
        "REVOKED_SESSION"
    );
    assert_eq!(
        code(s.refresh(&t.token, T0 + 3_000).await),
        "REVOKED_SESSION"
    );
}

#[tokio::test]
async fn a_cached_token_expires_with_its_validity() {
    let (s, _) = service();
    let t = cached_token(&s).await;
    let p = Policy::default();
    let end = rules::token_end(&t.claims, &p) * 1_000;
    assert!(s.verify(&t.token, false, end - 1).await.is_ok());
    assert_eq!(code(s.verify(&t.token, false, end).await), "EXPIRED_TOKEN");
    let gone = crate::service::verified_cache::useful_until(&t.claims, &p);
    assert!(s.verify(&t.token, true, gone).await.is_err());
    assert!(s.verified.get(&t.token, gone).is_none());
}

#[tokio::test]
async fn a_forged_token_never_rides_on_a_cached_one() {
    let (s, _) = service();
    let t = cached_token(&s).await;
    let mut forged = t.token.clone();
    forged.pop();
    forged.push(if t.token.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        code(s.verify(&forged, false, T0 + 3_000).await),
        "INVALID_TOKEN"
    );
    let off = service().0.with_verified_cache(0);
    let u = off.login("alice", "pw", None, || T0).await.unwrap();
    assert!(off.verify(&u.token, false, T0 + 1_000).await.is_ok());
    assert!(off.verified.is_empty());
}
