//! The identity provider's say over an OpenID Connect session: asked at
//! each renewal (`recheckOnRenew`), and heard when it ends a session
//! itself (back-channel logout). [`TokenService::end_by_provider`] is the
//! one place where a session ends because the provider said so.
//!
//! The re-check runs on the renewal path only, after this renewal has won
//! the once-only refresh claim and before the new token is signed: a plain
//! verify never reaches it. Because each token can be renewed once and a
//! session's tokens form one chain (a new token exists only once its
//! predecessor's renewal is over), at most one re-check of a session runs
//! at any time, across all replicas: a rotating refresh token is never
//! presented twice.

use std::sync::Arc;

use async_trait::async_trait;

use super::{TokenService, merge_end, user_id, user_key};
use crate::policy::Policy;
use crate::service::audit::{By, Event, Reason, Who};
use crate::service::error::{ApiError, Code};
use crate::service::jwt::Claims;
use crate::service::rules::{self, Millis};
use crate::service::store::Revoked;
use crate::service::store::provider::Linked;

/// What the provider said of a session at a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// It still stands by it.
    Ok,
    /// A definite refusal (`invalid_grant`): the session ends.
    Refused,
    /// It could not be asked (unreachable, 5xx, a timeout, the store away):
    /// the renewal goes ahead, the next one asks again.
    Unavailable(String),
    /// Nothing to ask with: no refresh token is kept for this session (the
    /// provider gave none, or it was kept by no store that is still there).
    Missing,
}

impl Recheck {
    /// The `result` label of `tokenpolicy_oidc_recheck_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Recheck::Ok => "ok",
            Recheck::Refused => "refused",
            Recheck::Unavailable(_) => "unavailable",
            Recheck::Missing => "missing",
        }
    }
}

/// Asks the provider about one of our sessions (see `oidc/recheck.rs`).
#[async_trait]
pub trait ProviderCheck: Send + Sync {
    /// `session_end`: our session's absolute end (seconds), how long a
    /// rotated refresh token is kept.
    async fn recheck(&self, sid: &str, session_end: i64, now: Millis) -> Recheck;
}

/// Which sessions the provider ended.
#[derive(Debug, Clone)]
pub enum ProviderEnd<'a> {
    /// It refused this session's renewal.
    Refused(&'a Claims),
    /// A back-channel logout of one provider session: the sessions of ours
    /// it started.
    ProviderSession {
        issuer: &'a str,
        sessions: Vec<Linked>,
    },
    /// A back-channel logout of a user: every session of (issuer, sub).
    Subject { issuer: &'a str, sub: &'a str },
}

impl TokenService {
    /// Asks `check` at each renewal of an OpenID Connect session whose
    /// policy has `recheckOnRenew`.
    pub fn with_provider_check(mut self, check: Arc<dyn ProviderCheck>) -> Self {
        self.provider_check = Some(check);
        self
    }

    /// The re-check of a renewal that has just won its claim: refused, the
    /// session ends on every replica (401 `REVOKED_SESSION`); anything else
    /// lets the renewal go ahead.
    pub(super) async fn recheck_with_provider(
        &self,
        old: &Claims,
        session_end: i64,
        policy: &Policy,
        now: Millis,
    ) -> Result<(), ApiError> {
        let Some(check) = &self.provider_check else {
            return Ok(());
        };
        let Some(idp) = old.idp.as_deref() else {
            return Ok(());
        };
        if !policy
            .oidc
            .as_ref()
            .is_some_and(|o| o.recheck_on_renew && o.issuer_url == idp)
        {
            return Ok(());
        }
        let answer = check.recheck(&old.sid, session_end, now).await;
        self.metrics.oidc_recheck.count(answer.label());
        match answer {
            Recheck::Ok | Recheck::Missing => Ok(()),
            Recheck::Unavailable(why) => {
                tracing::warn!(user = ?old.sub, sid = %old.sid, reason = %why, "renewal re-check with the identity provider not possible: the renewal goes ahead");
                Ok(())
            }
            Recheck::Refused => {
                self.end_by_provider(ProviderEnd::Refused(old), now).await?;
                Err(ApiError::new(
                    Code::RevokedSession,
                    "the identity provider ended this session; sign in again",
                ))
            }
        }
    }

    /// Ends, on every replica, the sessions the identity provider ended:
    /// the one whose renewal it refused, those a provider session started,
    /// or every session of one of its users. Answers how many were ended.
    /// The audit line of a session the provider's back-channel logout ended.
    fn provider_revoked(&self, issuer: &str, sub: &str, sid: &str, now: Millis) {
        let who = Who {
            user: Some(sub),
            provider: Some(issuer),
            sid: Some(sid),
        };
        self.audit.emit(Event::session_revoked(
            now,
            who,
            &super::nobody(),
            By::Provider,
            Reason::BackchannelLogout,
        ));
    }

    pub async fn end_by_provider(
        &self,
        end: ProviderEnd<'_>,
        now: Millis,
    ) -> Result<usize, ApiError> {
        match end {
            ProviderEnd::Refused(claims) => {
                self.revoke(claims, now).await?;
                self.metrics.revocations.inc();
                tracing::warn!(user = ?claims.sub, sid = %claims.sid, "the identity provider refused the renewal: session revoked");
                self.audit.emit(Event::session_revoked(
                    now,
                    Who::of(claims),
                    &super::nobody(),
                    By::Provider,
                    Reason::RenewalRefused,
                ));
                Ok(1)
            }
            ProviderEnd::ProviderSession { issuer, sessions } => {
                for s in &sessions {
                    self.revoke_for_provider(issuer, &s.sub, &s.sid, s.auth_time, now)
                        .await?;
                    tracing::info!(user = ?s.sub, sid = %s.sid, "back-channel logout: session revoked");
                    self.provider_revoked(issuer, &s.sub, &s.sid, now);
                }
                Ok(sessions.len())
            }
            ProviderEnd::Subject { issuer, sub } => {
                let registered = super::registry::registry_user(Some(issuer), sub);
                let entries = self.store.remove_user_sessions(&registered).await?;
                for e in &entries {
                    self.revoke_for_provider(issuer, sub, &e.sid, e.started.div_euclid(1_000), now)
                        .await?;
                    self.provider_revoked(issuer, sub, &e.sid, now);
                }
                // Sessions the registry does not hold end too: every session
                // of the user started before this second (a login of this
                // very second came after the provider's logout).
                let key = user_key(&user_id(Some(issuer), sub));
                let at = now.div_euclid(1_000) - 1;
                self.store
                    .end_user_sessions(&key, at, rules::user_end_ttl())
                    .await?;
                merge_end(&self.user_ends, &key, Some(at), std::time::Instant::now());
                tracing::info!(user = ?sub, sessions = entries.len(), "back-channel logout: every session of the user ended");
                Ok(entries.len())
            }
        }
    }

    /// Revokes one session of the provider's user `sub`; with no room for
    /// a revocation, the user's sessions so far end instead (more than was
    /// asked, never less).
    async fn revoke_for_provider(
        &self,
        issuer: &str,
        sub: &str,
        sid: &str,
        auth_time: i64,
        now: Millis,
    ) -> Result<(), ApiError> {
        let ttl = rules::revocation_ttl_since(auth_time, now);
        if self.store.revoke_session(sid, ttl).await? == Revoked::Full {
            let key = user_key(&user_id(Some(issuer), sub));
            let at = now.div_euclid(1_000).max(auth_time);
            self.store
                .end_user_sessions(&key, at, rules::user_end_ttl())
                .await?;
            merge_end(&self.user_ends, &key, Some(at), std::time::Instant::now());
        }
        self.metrics.revocations.inc();
        let registered = super::registry::registry_user(Some(issuer), sub);
        if let Err(e) = self.store.remove_session(&registered, sid).await {
            tracing::warn!(error = %e, sid = %sid, "could not take an ended session out of the registry");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::service::jwt::Key;
    use crate::service::session::{Client, SessionStart};
    use crate::service::store::{MemoryStore, OneTimeStore};

    const T0: Millis = 1_800_000_000_000;
    const IDP: &str = "https://idp.example.com";

    /// A provider that answers what it is told, and counts the questions.
    struct Told {
        answer: Mutex<Recheck>,
        asked: Mutex<Vec<String>>,
        delay: std::time::Duration,
    }

    #[async_trait]
    impl ProviderCheck for Told {
        async fn recheck(&self, sid: &str, _end: i64, _now: Millis) -> Recheck {
            self.asked.lock().unwrap().push(sid.to_string());
            tokio::time::sleep(self.delay).await;
            self.answer.lock().unwrap().clone()
        }
    }

    fn told(answer: Recheck) -> Arc<Told> {
        Arc::new(Told {
            answer: Mutex::new(answer),
            asked: Mutex::new(Vec::new()),
            delay: std::time::Duration::ZERO,
        })
    }

    fn policy(recheck: bool) -> Policy {
        let doc = format!(
            "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nspec:\n  sessionExpirationTime: 60s\n  tokenExpirationTime: 2s\n  expiredTokenRenewLimit: 10s\n  refreshGracePeriod: 1s\n  externalURL: https://auth.example.com\n  oidc:\n    issuerURL: {IDP}\n    clientID: c\n    clientSecretRef: {{name: s, key: k}}\n    recheckOnRenew: {recheck}\n"
        );
        Policy::from_yaml(&doc).unwrap()
    }

    fn service(
        store: Arc<dyn OneTimeStore>,
        key: &str,
        p: Policy,
        check: Arc<Told>,
    ) -> TokenService {
        crate::testing::service()
            .policy(p)
            .user("alice", "pw")
            .keys(crate::testing::keys_of(vec![
                Key::from_pem(key, "k").unwrap(),
            ]))
            .store(store)
            .build()
            .with_provider_check(check)
    }

    fn user(sub: &str) -> SessionStart {
        SessionStart {
            sub: sub.into(),
            idp: Some(IDP.into()),
            ..SessionStart::default()
        }
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    fn counted(s: &TokenService, result: &str) -> String {
        let text = s.metrics.render();
        let start = format!("tokenpolicy_oidc_recheck_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(start.as_str()))
            .unwrap_or("absent")
            .to_string()
    }

    #[tokio::test]
    async fn a_refused_renewal_revokes_the_session_and_a_plain_verify_never_asks() {
        let check = told(Recheck::Ok);
        let s = service(
            Arc::new(MemoryStore::new()),
            &Key::generate().to_pem(),
            policy(true),
            check.clone(),
        );
        let client = Client::default();
        let t = s.start_session(user("u1"), &client, || T0).await.unwrap();
        let pw = s.login("alice", "pw", None, || T0).await.unwrap();
        for at in [T0 + 100, T0 + 1_000, T0 + 1_900] {
            assert!(s.verify(&t.token, true, at).await.is_ok());
        }
        assert!(
            check.asked.lock().unwrap().is_empty(),
            "a plain verify asked"
        );
        // Renewal on verify asks once; so does /v1/refresh.
        let r1 = s.verify(&t.token, true, T0 + 2_100).await.unwrap();
        let r1 = r1.renewed.unwrap();
        assert_eq!(check.asked.lock().unwrap().len(), 1);
        let r2 = s.refresh(&r1.token, T0 + 2_500).await.unwrap();
        assert_eq!(check.asked.lock().unwrap().len(), 2);
        // Within the grace, the same new token, without asking again.
        assert_eq!(
            s.refresh(&r1.token, T0 + 2_600).await.unwrap().token,
            r2.token
        );
        assert_eq!(check.asked.lock().unwrap().len(), 2);
        // A password session's renewal never asks.
        assert!(s.refresh(&pw.token, T0 + 2_700).await.is_ok());
        assert_eq!(check.asked.lock().unwrap().len(), 2);
        assert_eq!(counted(&s, "ok"), "2");
        // The provider refuses: the renewal fails and the session is over.
        *check.answer.lock().unwrap() = Recheck::Refused;
        assert_eq!(
            code(s.refresh(&r2.token, T0 + 3_000).await),
            "REVOKED_SESSION"
        );
        assert_eq!(
            code(s.verify(&r2.token, true, T0 + 3_100).await),
            "REVOKED_SESSION"
        );
        assert_eq!(counted(&s, "refused"), "1");
        assert_eq!(check.asked.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn an_unreachable_provider_ends_no_session() {
        let check = told(Recheck::Unavailable("connection refused".into()));
        let s = service(
            Arc::new(MemoryStore::new()),
            &Key::generate().to_pem(),
            policy(true),
            check.clone(),
        );
        let mut t = s
            .start_session(user("u1"), &Client::default(), || T0)
            .await
            .unwrap();
        let mut now = T0;
        for _ in 0..3 {
            now += 2_100;
            t = s.refresh(&t.token, now).await.unwrap();
        }
        assert!(s.verify(&t.token, false, now + 100).await.is_ok());
        assert_eq!(counted(&s, "unavailable"), "3");
        // Missing a refresh token is no refusal either.
        *check.answer.lock().unwrap() = Recheck::Missing;
        assert!(s.refresh(&t.token, now + 2_100).await.is_ok());
        assert_eq!(counted(&s, "missing"), "1");
    }

    #[tokio::test]
    async fn recheck_off_never_asks() {
        let check = told(Recheck::Refused);
        let s = service(
            Arc::new(MemoryStore::new()),
            &Key::generate().to_pem(),
            policy(false),
            check.clone(),
        );
        let t = s
            .start_session(user("u1"), &Client::default(), || T0)
            .await
            .unwrap();
        assert!(s.refresh(&t.token, T0 + 2_100).await.is_ok());
        assert!(check.asked.lock().unwrap().is_empty());
    }

    /// Two replicas renew the same token at once: one wins the claim and
    /// asks the provider; the other gets the same new token within the
    /// grace without asking. The refresh token is presented once.
    #[tokio::test]
    async fn racing_renewals_on_two_replicas_ask_the_provider_once() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let key = Key::generate().to_pem();
        let check = Arc::new(Told {
            answer: Mutex::new(Recheck::Ok),
            asked: Mutex::new(Vec::new()),
            delay: std::time::Duration::from_millis(50),
        });
        let a = Arc::new(service(store.clone(), &key, policy(true), check.clone()));
        let b = Arc::new(service(store.clone(), &key, policy(true), check.clone()));
        let t = a
            .start_session(user("u1"), &Client::default(), || T0)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..16 {
            let (s, token) = (
                if i % 2 == 0 { a.clone() } else { b.clone() },
                t.token.clone(),
            );
            tasks.push(tokio::spawn(async move {
                s.refresh(&token, T0 + 2_100).await.map(|i| i.token)
            }));
        }
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.push(task.await.unwrap().unwrap());
        }
        tokens.dedup();
        assert_eq!(tokens.len(), 1, "one new token");
        assert_eq!(check.asked.lock().unwrap().len(), 1, "one grant");
    }

    #[tokio::test]
    async fn the_provider_ends_a_provider_session_or_every_session_of_a_user() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let key = Key::generate().to_pem();
        let a = service(store.clone(), &key, policy(true), told(Recheck::Ok));
        let b = service(store.clone(), &key, policy(true), told(Recheck::Ok));
        let c = Client::default();
        let one = a.start_session(user("u1"), &c, || T0).await.unwrap();
        let two = a.start_session(user("u1"), &c, || T0 + 10).await.unwrap();
        let other = a.start_session(user("u2"), &c, || T0).await.unwrap();
        let pw = a.login("alice", "pw", None, || T0).await.unwrap();
        let linked = Linked {
            sid: one.claims.sid.clone(),
            sub: "u1".into(),
            auth_time: one.claims.auth_time,
            ends: one.session_end * 1_000,
        };
        let now = T0 + 1_000;
        let n = b
            .end_by_provider(
                ProviderEnd::ProviderSession {
                    issuer: IDP,
                    sessions: vec![linked],
                },
                now,
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
        for s in [&a, &b] {
            assert_eq!(
                code(s.verify(&one.token, true, now).await),
                "REVOKED_SESSION"
            );
            assert!(s.verify(&two.token, true, now).await.is_ok());
        }
        // The whole user, later: u2 and the password user stay.
        let later = T0 + 1_500;
        b.end_by_provider(
            ProviderEnd::Subject {
                issuer: IDP,
                sub: "u1",
            },
            later,
        )
        .await
        .unwrap();
        for s in [&a, &b] {
            assert_eq!(
                code(s.verify(&two.token, true, later).await),
                "REVOKED_SESSION"
            );
            assert!(s.verify(&other.token, false, later).await.is_ok());
        }
        // (Each test replica hashed its own password: only `a` knows this one.)
        assert!(a.verify(&pw.token, false, later).await.is_ok());
        // A password user of the same name is another user.
        b.end_by_provider(
            ProviderEnd::Subject {
                issuer: IDP,
                sub: "alice",
            },
            later,
        )
        .await
        .unwrap();
        assert!(a.verify(&pw.token, false, later).await.is_ok());
    }
}
