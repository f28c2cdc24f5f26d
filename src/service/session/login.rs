//! Login: the failed-login throttle, the bounded password check, and the
//! first token of a session.
//!
//! The throttle is taken *before* the password is checked, in one atomic
//! store step per counter (user name, client address): however many guesses
//! race, on however many replicas, at most the limit of them are ever
//! checked in a window; the rest get `429 TOO_MANY_ATTEMPTS` without any
//! hashing. A wrong password keeps its attempt counted; a right one gives
//! its own attempt back (so that successful logins never use up the
//! allowance) but does not erase the failures before it: a correct guess
//! cannot buy a fresh allowance for guesses racing with it.
//!
//! Successful logins have a counter of their own per user (`logins:` keys,
//! at most `max_logins_per_user` per `login_window`): every session is one
//! more revocation to keep when it logs out, so one account may not open
//! and close sessions at the rate of the network.

use std::net::IpAddr;
use std::time::Duration;

use super::{Client, Issued, SessionStart, TokenService};
use crate::service::audit::{Event, Limit, Method, Who};
use crate::service::error::{ApiError, Code};
use crate::service::hashing::{HashPool, PoolError};
use crate::service::jwt::Claims;
use crate::service::rules::{self, Millis};
use crate::service::store::Take;
use crate::service::users::{MAX_NAME_LEN, MAX_PASSWORD_LEN, User};

/// A login the password-check line could not take in time: come back when
/// the line would have drained (at least 1 s, at most a minute).
fn busy(e: PoolError) -> ApiError {
    match e {
        PoolError::Busy { wait } => ApiError::new(
            Code::ServiceBusy,
            "too many logins at once; try again shortly",
        )
        .retry_after(wait.as_secs_f64().ceil().clamp(1.0, 60.0) as u64),
        PoolError::Failed => ApiError::new(
            Code::ServiceBusy,
            "the password check did not run; try again",
        )
        .retry_after(1),
    }
}

fn too_many(retry_in: Millis) -> ApiError {
    ApiError::new(
        Code::TooManyAttempts,
        "too many failed logins; try again later",
    )
    .retry_after((retry_in.max(1) as u64).div_ceil(1_000))
}

fn too_many_logins(retry_in: Millis) -> ApiError {
    ApiError::new(
        Code::TooManyAttempts,
        "too many logins for this user; try again later",
    )
    .retry_after((retry_in.max(1) as u64).div_ceil(1_000))
}

impl TokenService {
    /// Sets how many password checks run at once (`threads`, each holding
    /// one hash's memory), how many may wait for one at most (`queue`), and
    /// the longest a login may wait for its check to start (`max_wait`).
    pub fn with_login_capacity(mut self, threads: usize, queue: usize, max_wait: Duration) -> Self {
        self.hashing = HashPool::new(threads, queue, max_wait);
        self
    }

    /// Runs one password check of the users file (an unknown name, checked
    /// against a known user's hash) so that the login line's forecast knows
    /// what a check costs before the first burst.
    pub async fn calibrate_logins(&self) {
        let users = self.users.load_full();
        self.hashing
            .calibrate(move || {
                // A name no users file holds (it has a colon).
                let _ = users.authenticate(":calibration", "calibration");
            })
            .await;
    }

    /// `clock` is read after the password check, so a token's life starts
    /// when it is issued, not before the (deliberately slow) hash check.
    /// The span names the user (Debug-escaped), never the password.
    #[tracing::instrument(name = "login", skip_all, fields(user = ?name))]
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        client: impl Into<Client>,
        clock: impl Fn() -> Millis,
    ) -> Result<Issued, ApiError> {
        let client = client.into();
        let result = match self.check_password(name, password, &client).await {
            Ok(user) => {
                self.start_session(
                    SessionStart {
                        sub: user.name.clone(),
                        pwv: Some(user.password_version.clone()),
                        ..SessionStart::default()
                    },
                    &client,
                    clock,
                )
                .await
            }
            Err((e, limit)) => {
                // The name as typed, if it is one a user could have.
                let who = Who {
                    user: Some(name).filter(|n| !n.is_empty() && n.len() <= MAX_NAME_LEN),
                    ..Who::default()
                };
                let (now, m) = (clock(), Method::Password);
                self.audit.emit(match limit {
                    Some(l) => Event::login_refused(now, who, m, &client, l),
                    None => Event::login_failed(now, who, m, &client, e.code),
                });
                Err(e)
            }
        };
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.code.as_str(),
        };
        self.metrics.logins.count(outcome);
        result
    }

    /// The user whose password this is; or the refusal, and the limit
    /// that refused it if one did.
    async fn check_password(
        &self,
        name: &str,
        password: &str,
        client: &Client,
    ) -> Result<User, (ApiError, Option<Limit>)> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || password.len() > MAX_PASSWORD_LEN {
            return Err((
                ApiError::new(
                    Code::InvalidRequest,
                    "username must be 1-256 bytes and password at most 1024 bytes",
                ),
                None,
            ));
        }
        // Refused for every name alike, before any lookup or hashing.
        if password.is_empty() {
            return Err((
                ApiError::new(Code::InvalidRequest, "password must not be empty"),
                None,
            ));
        }
        // A place in the hashing line first: a login that finds it full is
        // turned away before it costs a store round trip.
        let place = self.hashing.admit().map_err(|e| (busy(e), None))?;
        let user_key = format!("user:{name}");
        let addr_key = client.addr.map(address_key);
        let taken = self.take_attempts(&user_key, addr_key.as_deref()).await?;

        let users = self.users.load_full();
        let (n, p) = (name.to_string(), password.to_string());
        let checked = self
            .hashing
            .run_in(place, move || users.authenticate(&n, &p).cloned())
            .await;
        let user: Option<User> = match checked {
            Ok(u) => u,
            Err(e) => {
                // Never checked: the attempts go back.
                self.release_attempts(&taken).await;
                return Err((busy(e), None));
            }
        };
        let Some(user) = user else {
            tracing::info!(user = ?name, "login refused: invalid credentials");
            return Err((
                ApiError::new(Code::InvalidCredentials, "invalid username or password"),
                None,
            ));
        };
        self.release_attempts(&taken).await;
        Ok(user)
    }

    /// The first token of a new session, for a user who has just proved who
    /// they are (a password, or an OpenID Connect provider's ID token): one
    /// path, so that every way in gives a session that the policy governs
    /// alike. `clock` is read here, after the (slow) proof.
    /// Writes the login's event to the audit trail, whatever the outcome.
    pub async fn start_session(
        &self,
        start: SessionStart,
        client: &Client,
        clock: impl Fn() -> Millis,
    ) -> Result<Issued, ApiError> {
        let method = if start.idp.is_some() {
            Method::Oidc
        } else {
            Method::Password
        };
        let (sub, idp) = (start.sub.clone(), start.idp.clone());
        let result = self.start_session_inner(start, client, &clock).await;
        let who = Who {
            user: Some(&sub),
            provider: idp.as_deref(),
            sid: None,
        };
        let now = clock();
        self.audit.emit(match &result {
            Ok(issued) => Event::login_succeeded(now, Who::of(&issued.claims), client),
            Err(e) if e.code == Code::TooManyAttempts => {
                Event::login_refused(now, who, method, client, Limit::LoginsPerUser)
            }
            Err(e) if e.code == Code::SessionLimit => {
                Event::login_refused(now, who, method, client, Limit::SessionsPerUser)
            }
            Err(e) => Event::login_failed(now, who, method, client, e.code),
        });
        result
    }

    async fn start_session_inner(
        &self,
        start: SessionStart,
        client: &Client,
        clock: &impl Fn() -> Millis,
    ) -> Result<Issued, ApiError> {
        // Successful logins are counted too, per user: each is a session
        // the store may have to revoke later.
        let t = self.throttle;
        let user = super::user_id(start.idp.as_deref(), &start.sub);
        if let Take::Refused { retry_in } = self
            .store
            .take_attempt(
                &format!("logins:{user}"),
                t.max_logins_per_user,
                t.login_window,
            )
            .await?
        {
            tracing::info!(user = ?start.sub, "login refused: too many logins for this user");
            return Err(too_many_logins(retry_in));
        }
        self.wait_past_user_end(&user, clock()).await;
        let policy = self.policy.load();
        let now = clock();
        let (auth_time, iat, exp) = rules::login_times(&policy, now);
        let claims = Claims {
            iss: self.keys.issuer().to_string(),
            aud: self.keys.audience().to_string(),
            sub: start.sub,
            sid: uuid::Uuid::new_v4().to_string(),
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            exp,
            auth_time,
            pwv: start.pwv,
            idp: start.idp,
            name: start.name,
            email: start.email,
            groups: start.groups,
        };
        let session_end = auth_time + policy.session as i64;
        self.register(&claims, session_end, client, &policy, now)
            .await?;
        tracing::info!(user = ?claims.sub, sid = %claims.sid, client = ?client.addr, "login");
        self.store.note_issued(&claims.sid);
        let issued = self.sign(claims, session_end);
        self.remember(&issued, &policy, iat * 1_000);
        Ok(issued)
    }

    /// Takes one attempt on the user's counter, then on the address's;
    /// answers the keys taken, or 429 with nothing left taken.
    async fn take_attempts<'k>(
        &self,
        user_key: &'k str,
        addr_key: Option<&'k str>,
    ) -> Result<Vec<&'k str>, (ApiError, Option<Limit>)> {
        let t = self.throttle;
        if let Take::Refused { retry_in } = self
            .store
            .take_attempt(user_key, t.max_per_user, t.window)
            .await
            .map_err(|e| (e.into(), None))?
        {
            return Err((too_many(retry_in), Some(Limit::FailedPerUser)));
        }
        let Some(addr_key) = addr_key else {
            return Ok(vec![user_key]);
        };
        match self
            .store
            .take_attempt(addr_key, t.max_per_address, t.window)
            .await
        {
            Ok(Take::Allowed) => Ok(vec![user_key, addr_key]),
            Ok(Take::Refused { retry_in }) => {
                self.release_attempts(&[user_key]).await;
                Err((too_many(retry_in), Some(Limit::FailedPerAddress)))
            }
            Err(e) => {
                self.release_attempts(&[user_key]).await;
                Err((e.into(), None))
            }
        }
    }

    /// Best effort: an attempt that cannot be given back expires with its
    /// window.
    async fn release_attempts(&self, keys: &[&str]) {
        for k in keys {
            if let Err(e) = self.store.release_attempt(k).await {
                tracing::warn!(error = %e, "could not give back a login attempt");
            }
        }
    }
}

/// The throttle's counter for a client address: an IPv6 client is counted
/// per /64, the least a site is given, so that the addresses of one
/// network (2^64 of them) are one client.
fn address_key(ip: IpAddr) -> String {
    match crate::trusted_proxies::canonical(ip) {
        IpAddr::V6(v6) => {
            let net = ipnet::Ipv6Net::new(v6, 64).map_or(v6, |n| n.network());
            format!("addr:{net}/64")
        }
        v4 => format!("addr:{v4}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::service::session::Throttle;
    use crate::service::store::contract::attempts_counted;
    use crate::service::store::{
        Claim, MemoryStore, OneTimeStore, RefreshRecord, Revoked, StoreError, Take,
    };
    use crate::testing;

    const T0: Millis = 1_800_000_000_000;

    fn service_with(users: &str) -> TokenService {
        testing::service().users(testing::users(users)).build()
    }

    fn service() -> TokenService {
        testing::service().user("alice", "pw").build()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    #[tokio::test]
    async fn failed_logins_are_throttled() {
        let s = service();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(
                code(s.login("alice", "bad", Some(ip), || T0).await),
                "INVALID_CREDENTIALS"
            );
        }
        let e = s.login("alice", "pw", Some(ip), || T0).await.unwrap_err();
        assert_eq!(e.code, Code::TooManyAttempts);
        assert!(e.retry_after.unwrap() > 0);
        assert_eq!(
            code(s.login("nobody", "x", None, || T0).await),
            "INVALID_CREDENTIALS"
        );
        assert_eq!(code(s.login("", "x", None, || T0).await), "INVALID_REQUEST");
    }

    #[tokio::test]
    async fn racing_guesses_check_at_most_the_limit() {
        let s = Arc::new(service());
        let ip: IpAddr = "192.0.2.2".parse().unwrap();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let s = s.clone();
            let pw = if i == 30 {
                "pw".to_string()
            } else {
                format!("bad-{i}")
            };
            tasks.push(tokio::spawn(async move {
                s.login("alice", &pw, Some(ip), || T0).await
            }));
        }
        let mut checked = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => checked += 1,
                Err(e) if e.code == Code::InvalidCredentials => checked += 1,
                Err(e) => assert_eq!(e.code, Code::TooManyAttempts, "{e}"),
            }
        }
        assert!((1..=5).contains(&checked), "{checked} checked");
    }

    #[tokio::test]
    async fn a_success_gives_back_its_attempt_but_keeps_earlier_failures() {
        let s = service();
        // Successes never use up the allowance.
        for _ in 0..10 {
            s.login("alice", "pw", None, || T0).await.unwrap();
        }
        assert_eq!(attempts_counted(&*s.store, "user:alice").await, 0);
        for _ in 0..4 {
            assert_eq!(
                code(s.login("alice", "bad", None, || T0).await),
                "INVALID_CREDENTIALS"
            );
        }
        s.login("alice", "pw", None, || T0).await.unwrap();
        assert_eq!(attempts_counted(&*s.store, "user:alice").await, 4);
        assert_eq!(
            code(s.login("alice", "bad", None, || T0).await),
            "INVALID_CREDENTIALS"
        );
        assert_eq!(
            code(s.login("alice", "pw", None, || T0).await),
            "TOO_MANY_ATTEMPTS"
        );
    }

    #[tokio::test]
    async fn an_ipv6_network_is_one_client_for_the_address_limit() {
        let s = testing::service()
            .throttle(Throttle {
                max_per_user: 50,
                max_per_address: 3,
                window: 60_000,
                ..Throttle::default()
            })
            .build();
        // A new address of the same /64 for every guess, as a client that
        // holds the network can choose.
        for i in 1..=3 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            assert_eq!(
                code(s.login(&format!("u{i}"), "bad", Some(ip), || T0).await),
                "INVALID_CREDENTIALS"
            );
        }
        let same_net: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(
            code(s.login("u9", "bad", Some(same_net), || T0).await),
            "TOO_MANY_ATTEMPTS"
        );
        let next_net: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(
            code(s.login("u9", "bad", Some(next_net), || T0).await),
            "INVALID_CREDENTIALS"
        );
        // IPv4 is counted per address, also when written as IPv6.
        assert_eq!(
            address_key("::ffff:192.0.2.9".parse().unwrap()),
            "addr:192.0.2.9"
        );
        assert_eq!(address_key("192.0.2.9".parse().unwrap()), "addr:192.0.2.9");
        assert_eq!(
            address_key("2001:db8::1:2:3:4".parse().unwrap()),
            "addr:2001:db8::/64"
        );
    }

    #[tokio::test]
    async fn address_limit_refuses_and_gives_the_user_attempt_back() {
        let s = testing::service()
            .user("alice", "pw")
            .throttle(Throttle {
                max_per_user: 5,
                max_per_address: 2,
                window: 60_000,
                ..Throttle::default()
            })
            .build();
        let ip: IpAddr = "192.0.2.3".parse().unwrap();
        for u in ["x1", "x2"] {
            assert_eq!(
                code(s.login(u, "bad", Some(ip), || T0).await),
                "INVALID_CREDENTIALS"
            );
        }
        assert_eq!(
            code(s.login("alice", "pw", Some(ip), || T0).await),
            "TOO_MANY_ATTEMPTS"
        );
        // The user's counter was not charged for the refused attempt.
        assert_eq!(attempts_counted(&*s.store, "user:alice").await, 0);
        // Another address is not affected.
        s.login("alice", "pw", Some("192.0.2.4".parse().unwrap()), || T0)
            .await
            .unwrap();
    }

    /// Right passwords too are counted per user: past the limit, 429 with
    /// Retry-After and no token, however the logins race; another user is
    /// not held back, and failures are not counted as logins.
    #[tokio::test]
    async fn successful_logins_are_limited_per_user() {
        let lines = testing::user_line("alice", "pw") + &testing::user_line("bob", "pw");
        let s = Arc::new(
            testing::service()
                .users(testing::users(&lines))
                .throttle(Throttle {
                    max_per_user: 50,
                    max_logins_per_user: 3,
                    login_window: 60_000,
                    ..Throttle::default()
                })
                .build(),
        );
        assert_eq!(
            code(s.login("alice", "wrong", None, || T0).await),
            "INVALID_CREDENTIALS"
        );
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.login("alice", "pw", None, move || T0 + i).await
            }));
        }
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert_eq!(e.code.as_str(), "TOO_MANY_ATTEMPTS");
                    let retry = e.retry_after.unwrap();
                    assert!((1..=60).contains(&retry), "{retry}");
                    refused += 1;
                }
            }
        }
        assert_eq!((ok, refused), (3, 5));
        assert!(s.login("bob", "pw", None, || T0).await.is_ok());
    }

    #[tokio::test]
    async fn empty_password_is_refused_alike_for_every_name() {
        let s = service_with(&format!("blank:{}\n", bcrypt::hash("", 4).unwrap()));
        let known = s.login("blank", "", None, || T0).await.unwrap_err();
        let unknown = s.login("nobody", "", None, || T0).await.unwrap_err();
        assert_eq!(known.code, Code::InvalidRequest);
        assert_eq!(known, unknown);
        // Not counted as an attempt either.
        assert_eq!(attempts_counted(&*s.store, "user:blank").await, 0);
    }

    #[tokio::test]
    async fn a_full_waiting_line_answers_busy_at_once() {
        // One thread, no waiting line, a slow hash: racing logins beyond
        // the first are turned away with Retry-After, uncounted.
        let users = format!("slow:{}\n", bcrypt::hash("pw", 11).unwrap());
        let s = Arc::new(service_with(&users).with_login_capacity(1, 0, Duration::from_secs(3)));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.login("slow", "bad", None, || T0).await
            }));
        }
        let mut busy = 0;
        let mut checked = 0;
        for t in tasks {
            let e = t.await.unwrap().unwrap_err();
            match e.code {
                Code::ServiceBusy => {
                    assert_eq!(e.retry_after, Some(1));
                    busy += 1;
                }
                Code::InvalidCredentials => checked += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(busy >= 1 && checked >= 1, "busy {busy}, checked {checked}");
        assert_eq!(
            attempts_counted(&*s.store, "user:slow").await,
            checked as u64
        );
    }

    /// Counts the throttle's store calls, and does what the in-process
    /// store does.
    #[derive(Default)]
    struct CountingStore {
        inner: MemoryStore,
        calls: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl OneTimeStore for CountingStore {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn claim_refresh(
            &self,
            sid: &str,
            jti: &str,
            issued_at: i64,
            record: &RefreshRecord,
            ttl: Millis,
        ) -> Result<Claim, StoreError> {
            self.inner
                .claim_refresh(sid, jti, issued_at, record, ttl)
                .await
        }
        async fn revoke_session(&self, sid: &str, ttl: Millis) -> Result<Revoked, StoreError> {
            self.inner.revoke_session(sid, ttl).await
        }
        async fn is_revoked(&self, sid: &str) -> Result<bool, StoreError> {
            self.inner.is_revoked(sid).await
        }
        async fn end_user_sessions(
            &self,
            user: &str,
            at: i64,
            ttl: Millis,
        ) -> Result<(), StoreError> {
            self.inner.end_user_sessions(user, at, ttl).await
        }
        async fn user_sessions_ended(&self, user: &str) -> Result<Option<i64>, StoreError> {
            self.inner.user_sessions_ended(user).await
        }
        async fn take_attempt(
            &self,
            key: &str,
            limit: u64,
            window: Millis,
        ) -> Result<Take, StoreError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.take_attempt(key, limit, window).await
        }
        async fn release_attempt(&self, key: &str) -> Result<(), StoreError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.release_attempt(key).await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
        async fn register_session(
            &self,
            user: &str,
            entry: &crate::service::store::SessionEntry,
            limit: crate::service::store::SessionLimit,
            now: Millis,
        ) -> Result<crate::service::store::Registered, StoreError> {
            self.inner.register_session(user, entry, limit, now).await
        }
        async fn list_sessions(
            &self,
            user: &str,
            now: Millis,
        ) -> Result<Vec<crate::service::store::SessionEntry>, StoreError> {
            self.inner.list_sessions(user, now).await
        }
        async fn remove_session(
            &self,
            user: &str,
            sid: &str,
        ) -> Result<Option<crate::service::store::SessionEntry>, StoreError> {
            self.inner.remove_session(user, sid).await
        }
        async fn remove_user_sessions(
            &self,
            user: &str,
        ) -> Result<Vec<crate::service::store::SessionEntry>, StoreError> {
            self.inner.remove_user_sessions(user).await
        }
        async fn set_session_owner(
            &self,
            sid: &str,
            owner: &str,
            ttl: Millis,
        ) -> Result<(), StoreError> {
            self.inner.set_session_owner(sid, owner, ttl).await
        }
        async fn session_owner(&self, sid: &str) -> Result<Option<String>, StoreError> {
            self.inner.session_owner(sid).await
        }
    }

    #[tokio::test]
    async fn a_login_turned_away_by_a_full_line_costs_no_store_call() {
        let store = Arc::new(CountingStore::default());
        let s = testing::service()
            .user("alice", "pw")
            .store(store.clone())
            .build()
            .with_login_capacity(1, 0, Duration::from_secs(3));
        // The one place in line is taken.
        let place = s.hashing.admit().unwrap();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let e = s.login("alice", "pw", Some(ip), || T0).await.unwrap_err();
        assert_eq!((e.code, e.retry_after), (Code::ServiceBusy, Some(1)));
        assert_eq!(store.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Once the place is free, a login takes and gives back its two
        // attempts (user and address), and takes one login of the user's.
        drop(place);
        s.login("alice", "pw", Some(ip), || T0).await.unwrap();
        assert_eq!(store.calls.load(std::sync::atomic::Ordering::SeqCst), 5);
    }
}
