//! The session registry as the service uses it: a session is recorded when
//! it starts (claiming the policy's per-user limit in the same store step),
//! taken out when it ends, and the user may list and end their own.
//!
//! A registry user is a digest of the provider and the subject, so that a
//! password user and an OpenID Connect subject of the same name are never
//! one user, and any name fits a store key. What the registry answers is
//! checked against revocations and ended users before it is shown: a
//! revoked or ended session is never listed, even if taking its entry out
//! failed.

use sha2::{Digest, Sha256};

use super::{Client, ClientFn, TokenService, nobody};
use crate::policy::{Policy, SessionLimitPolicy};
use crate::service::audit::{By, Event, Reason, Who};
use crate::service::error::{ApiError, Code};
use crate::service::jwt::Claims;
use crate::service::rules::{self, Millis, Standing};
use crate::service::store::{LimitAction, Registered, Revoked, SessionEntry, SessionLimit};

/// The registry's key of a session's user: password users by name, OpenID
/// Connect users by (provider, subject).
pub fn registry_user(idp: Option<&str>, sub: &str) -> String {
    let input = match idp {
        None => format!("password\n{sub}"),
        Some(idp) => format!("oidc\n{}:{idp}\n{sub}", idp.len()),
    };
    let digest = Sha256::digest(format!("tokenpolicy session user\n{input}").as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn claims_user(c: &Claims) -> String {
    registry_user(c.idp.as_deref(), &c.sub)
}

fn limit_of(p: &Policy) -> SessionLimit {
    SessionLimit {
        max: u64::from(p.max_sessions_per_user),
        action: match p.session_limit_action {
            SessionLimitPolicy::RevokeOldest => LimitAction::RevokeOldest,
            SessionLimitPolicy::RefuseNew => LimitAction::RefuseNew,
        },
    }
}

/// The caller's live sessions, and which of them is the caller's.
#[derive(Debug, Clone)]
pub struct SessionList {
    pub current: String,
    pub sessions: Vec<SessionEntry>,
}

fn not_found() -> ApiError {
    ApiError::new(Code::SessionNotFound, "no such session")
}

impl TokenService {
    /// Records a session that is about to be issued, under the policy's
    /// limit; ends (on every replica) the sessions the limit takes out.
    pub(super) async fn register(
        &self,
        claims: &Claims,
        session_end: i64,
        client: &Client,
        policy: &Policy,
        now: Millis,
    ) -> Result<(), ApiError> {
        let entry = SessionEntry {
            sid: claims.sid.clone(),
            method: if claims.idp.is_some() {
                "oidc"
            } else {
                "password"
            }
            .into(),
            idp: claims.idp.clone(),
            // To the millisecond, so that "oldest" is the order of logins.
            started: now,
            ends: session_end.saturating_mul(1_000),
            last_active: now,
            addr: client.addr.map(|a| a.to_string()),
            user_agent: client.user_agent.clone(),
        };
        let user = claims_user(claims);
        self.end_idle_sessions(claims, &user, policy, now).await?;
        match self
            .store
            .register_session(&user, &entry, limit_of(policy), now)
            .await?
        {
            Registered::Refused => {
                tracing::info!(user = ?claims.sub, "login refused: session limit reached");
                Err(ApiError::new(
                    Code::SessionLimit,
                    "this account has as many sessions as the policy allows; sign out of one first",
                ))
            }
            Registered::Added { evicted } => {
                self.record_owner(claims, &user, &entry, now).await;
                for old in evicted {
                    if let Err(e) = self.end_entry(claims, &old, now).await {
                        // The new session must not outlive the limit it
                        // broke: it is taken out again and refused.
                        let _ = self.store.remove_session(&user, &claims.sid).await;
                        return Err(e);
                    }
                    self.audit.emit(Event::session_revoked(
                        now,
                        Who::of(claims).sid(&old.sid),
                        client,
                        By::SessionLimit,
                        Reason::MaxSessions,
                    ));
                    tracing::info!(user = ?claims.sub, sid = %old.sid, "session limit: oldest session ended");
                }
                Ok(())
            }
        }
    }

    /// Revokes a session known from the registry, on every replica. With
    /// no room for a revocation, the user's sessions up to that one's start
    /// end instead: more than was asked, never less.
    pub(super) async fn end_entry(
        &self,
        of: &Claims,
        e: &SessionEntry,
        now: Millis,
    ) -> Result<(), ApiError> {
        let key = super::user_key(&super::user_id(of.idp.as_deref(), &of.sub));
        self.end_entry_of(&key, e, now).await
    }

    /// [`Self::end_entry`], the user known by the key of their sessions' end.
    pub(super) async fn end_entry_of(
        &self,
        key: &str,
        e: &SessionEntry,
        now: Millis,
    ) -> Result<(), ApiError> {
        let ttl = (e.ends - now).max(1_000);
        if self.store.revoke_session(&e.sid, ttl).await? == Revoked::Session {
            self.metrics.revocations.inc();
            return Ok(());
        }
        let at = e.started.div_euclid(1_000);
        self.store
            .end_user_sessions(key, at, rules::user_end_ttl())
            .await?;
        super::merge_end(&self.user_ends, key, Some(at), std::time::Instant::now());
        self.metrics.revocations.inc();
        Ok(())
    }

    /// Best effort: a registry entry that cannot be taken out is still
    /// never listed (see the module docs) and expires with its session.
    pub(super) async fn unregister(&self, claims: &Claims) {
        if let Err(e) = self
            .store
            .remove_session(&claims_user(claims), &claims.sid)
            .await
        {
            tracing::warn!(error = %e, sid = %claims.sid, "could not take an ended session out of the registry");
        }
    }

    /// The caller, from a token valid now (a token past its expiry is
    /// refreshed first).
    async fn caller(
        &self,
        token: &str,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<std::sync::Arc<Claims>, ApiError> {
        let policy = self.policy.load_full();
        let (claims, standing) = self.judge(token, &policy, client, now).await?;
        if !matches!(standing, Standing::Valid { .. }) {
            return Err(ApiError::new(
                Code::ExpiredToken,
                "token expired; refresh it first",
            ));
        }
        Ok(claims)
    }

    /// The registry's entries for `claims`'s user that are live: not past
    /// their end, not revoked, not ended with their user.
    pub(super) async fn live_entries(
        &self,
        claims: &Claims,
        now: Millis,
    ) -> Result<Vec<SessionEntry>, ApiError> {
        let listed = self.store.list_sessions(&claims_user(claims), now).await?;
        let ended = self
            .user_end(&super::user_id(claims.idp.as_deref(), &claims.sub))
            .await?;
        // A policy shortened since login ends sessions sooner (rule 2).
        let policy = self.policy.load();
        let session = policy.session as i64;
        // An idle session is not listed (rule 2), as the registry shows it.
        let idle = |e: &SessionEntry| {
            policy
                .idle_timeout
                .is_some_and(|t| rules::idle_shared(e.last_active.max(e.started), t, now))
        };
        let mut live = Vec::with_capacity(listed.len());
        for e in listed {
            let auth_time = e.started.div_euclid(1_000);
            if e.ends <= now
                || auth_time.saturating_add(session).saturating_mul(1_000) <= now
                || ended.is_some_and(|end| auth_time <= end)
                || idle(&e)
            {
                continue;
            }
            if self.store.is_revoked(&e.sid).await? {
                continue;
            }
            live.push(e);
        }
        Ok(live)
    }

    /// `GET /v1/sessions`: the caller's live sessions.
    pub async fn sessions(&self, token: &str, now: Millis) -> Result<SessionList, ApiError> {
        let claims = self.caller(token, &nobody, now).await?;
        let sessions = self.live_entries(&claims, now).await?;
        Ok(SessionList {
            current: claims.sid.clone(),
            sessions,
        })
    }

    /// `DELETE /v1/sessions/{sid}`: ends one of the caller's sessions. A
    /// session of another user is answered exactly as one that does not exist.
    pub async fn end_session(&self, token: &str, sid: &str, now: Millis) -> Result<(), ApiError> {
        self.end_session_from(token, sid, &nobody, now).await
    }

    /// [`TokenService::end_session`] for `client` (for the audit trail).
    pub async fn end_session_from(
        &self,
        token: &str,
        sid: &str,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<(), ApiError> {
        let claims = self.caller(token, client, now).await?;
        let Some(entry) = self
            .live_entries(&claims, now)
            .await?
            .into_iter()
            .find(|e| e.sid == sid)
        else {
            return Err(not_found());
        };
        self.end_entry(&claims, &entry, now).await?;
        self.store
            .remove_session(&claims_user(&claims), sid)
            .await?;
        self.audit.emit(Event::session_revoked(
            now,
            Who::of(&claims).sid(sid),
            &client(),
            By::User,
            Reason::EndedByUser,
        ));
        tracing::info!(user = ?claims.sub, sid = %sid, "session ended by its user");
        Ok(())
    }

    /// `POST /v1/logout?everywhere=true`: ends every session of the
    /// caller's user, on every replica, the caller's own included.
    pub async fn logout_everywhere(&self, token: &str, now: Millis) -> Result<(), ApiError> {
        self.logout_everywhere_from(token, &nobody, now).await
    }

    /// [`TokenService::logout_everywhere`] for `client` (for the audit trail).
    pub async fn logout_everywhere_from(
        &self,
        token: &str,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<(), ApiError> {
        let policy = self.policy.load_full();
        // A token past its expiry but still renewable may sign out too.
        let (claims, _) = self.judge(token, &policy, client, now).await?;
        let entries = self
            .store
            .remove_user_sessions(&claims_user(&claims))
            .await?;
        let client = client();
        let mut others = 0;
        for e in entries.iter().filter(|e| e.sid != claims.sid) {
            self.end_entry(&claims, e, now).await?;
            if e.ends > now {
                others += 1;
                self.audit.emit(Event::session_revoked(
                    now,
                    Who::of(&claims).sid(&e.sid),
                    &client,
                    By::User,
                    Reason::LogoutEverywhere,
                ));
            }
        }
        self.revoke(&claims, now).await?;
        // Sessions the registry does not hold (its entry lost, or made
        // before it existed) end too: every session of the user started
        // before this second. Not this second's: the registry's removal
        // above is atomic, so a session of this second that it missed
        // started after it, and a replica that has not read this end yet
        // may be issuing it right now.
        let key = super::user_key(&super::user_id(claims.idp.as_deref(), &claims.sub));
        let at = now.div_euclid(1_000) - 1;
        self.store
            .end_user_sessions(&key, at, rules::user_end_ttl())
            .await?;
        super::merge_end(&self.user_ends, &key, Some(at), std::time::Instant::now());
        self.metrics.revocations.inc();
        self.audit
            .emit(Event::logout(now, Who::of(&claims), &client, Some(others)));
        tracing::info!(user = ?claims.sub, sessions = entries.len(), "logout everywhere");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    const T0: Millis = 1_800_000_000_000;

    fn service(policy: Policy) -> TokenService {
        let lines = testing::user_line("alice", "pw") + &testing::user_line("bob", "pw");
        testing::service()
            .policy(policy)
            .users(testing::users(&lines))
            .build()
    }

    fn client(ua: &str) -> Client {
        Client {
            addr: "203.0.113.9".parse().ok(),
            user_agent: Some(ua.into()),
        }
    }

    fn sids(l: &SessionList) -> Vec<&str> {
        l.sessions.iter().map(|e| e.sid.as_str()).collect()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    #[tokio::test]
    async fn a_user_lists_and_ends_their_own_sessions_only() {
        let s = service(Policy::default());
        let a1 = s
            .login("alice", "pw", client("laptop"), || T0)
            .await
            .unwrap();
        let a2 = s
            .login("alice", "pw", client("phone"), || T0 + 1_000)
            .await
            .unwrap();
        let b = s.login("bob", "pw", client("b"), || T0).await.unwrap();
        let now = T0 + 2_000;
        let l = s.sessions(&a2.token, now).await.unwrap();
        assert_eq!(sids(&l), [a1.claims.sid.as_str(), a2.claims.sid.as_str()]);
        assert_eq!(l.current, a2.claims.sid);
        let e = &l.sessions[0];
        assert_eq!(e.method, "password");
        assert_eq!(e.idp, None);
        assert_eq!(e.started, T0);
        assert_eq!(e.ends, a1.session_end * 1_000);
        assert_eq!(e.addr.as_deref(), Some("203.0.113.9"));
        assert_eq!(e.user_agent.as_deref(), Some("laptop"));
        // Bob's session is not Alice's to see or end: 404, as for none.
        assert_eq!(
            code(s.end_session(&a2.token, &b.claims.sid, now).await),
            "SESSION_NOT_FOUND"
        );
        assert_eq!(
            code(s.end_session(&a2.token, "no-such-sid", now).await),
            "SESSION_NOT_FOUND"
        );
        assert!(s.verify(&b.token, true, now).await.is_ok());
        // Alice ends her laptop's session from her phone.
        s.end_session(&a2.token, &a1.claims.sid, now).await.unwrap();
        assert_eq!(
            code(s.verify(&a1.token, true, now).await),
            "REVOKED_SESSION"
        );
        assert_eq!(
            sids(&s.sessions(&a2.token, now).await.unwrap()),
            [a2.claims.sid.as_str()]
        );
        // A revoked token lists nothing.
        assert_eq!(code(s.sessions(&a1.token, now).await), "REVOKED_SESSION");
        // A logout takes the session out of the registry.
        s.logout(&a2.token, now).await.unwrap();
        let a3 = s.login("alice", "pw", client("x"), || now).await.unwrap();
        assert_eq!(
            sids(&s.sessions(&a3.token, now).await.unwrap()),
            [a3.claims.sid.as_str()]
        );
    }

    #[tokio::test]
    async fn logout_everywhere_ends_a_session_the_registry_lost_but_not_one_of_the_same_second() {
        let s = service(Policy::default());
        let lost = s.login("alice", "pw", client("a"), || T0).await.unwrap();
        // Its entry is gone (Redis lost it, say): only the user's end can reach it.
        s.store()
            .remove_user_sessions(&claims_user(&lost.claims))
            .await
            .unwrap();
        let now = T0 + 5_000;
        let me = s.login("alice", "pw", client("b"), || now).await.unwrap();
        s.logout_everywhere(&me.token, now).await.unwrap();
        assert_eq!(
            code(s.verify(&lost.token, true, now).await),
            "REVOKED_SESSION"
        );
        assert_eq!(
            code(s.verify(&me.token, true, now).await),
            "REVOKED_SESSION"
        );
        // A login in that same second, on a replica that has not read the
        // end yet, is a new session and stays.
        let same_second = s
            .login("alice", "pw", client("c"), || now + 1)
            .await
            .unwrap();
        assert!(s.verify(&same_second.token, true, now + 1).await.is_ok());
    }

    #[tokio::test]
    async fn logout_everywhere_ends_every_session_of_the_user() {
        let s = service(Policy::default());
        let a: Vec<_> = futures_util::future::join_all(
            (0..3).map(|i| s.login("alice", "pw", client("a"), move || T0 + i)),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let b = s.login("bob", "pw", client("b"), || T0).await.unwrap();
        let now = T0 + 1_000;
        s.logout_everywhere(&a[1].token, now).await.unwrap();
        for t in &a {
            assert_eq!(code(s.verify(&t.token, true, now).await), "REVOKED_SESSION");
        }
        assert!(s.verify(&b.token, true, now).await.is_ok());
        // A revoked token cannot end anybody's sessions.
        assert_eq!(
            code(s.logout_everywhere(&a[0].token, now).await),
            "REVOKED_SESSION"
        );
        // Every session started until then is over, listed or not; later
        // ones are not.
        let later = now + 1_000;
        let fresh = s.login("alice", "pw", client("a"), || later).await.unwrap();
        assert_eq!(
            s.sessions(&fresh.token, later)
                .await
                .unwrap()
                .sessions
                .len(),
            1
        );
        // A policy shortened since login ends sessions sooner, in the list too.
        s.set_policy(Policy {
            session: 1,
            token: 1,
            renew_limit: 0,
            grace: 0,
            ..Policy::default()
        });
        let g = s
            .login("alice", "pw", client("a"), || later + 2_000)
            .await
            .unwrap();
        let listed = s.sessions(&g.token, later + 2_500).await.unwrap().sessions;
        assert_eq!(
            listed.len(),
            1,
            "the earlier session is past the new session time"
        );
        assert_eq!(listed[0].sid, g.claims.sid);
        assert_eq!(
            code(s.sessions(&g.token, later + 3_000).await),
            "EXPIRED_SESSION"
        );
    }

    #[tokio::test]
    async fn the_limit_ends_the_oldest_session_or_refuses_the_login() {
        let s = service(Policy {
            max_sessions_per_user: 2,
            ..Policy::default()
        });
        let t: Vec<_> = [0, 1_000, 2_000]
            .into_iter()
            .map(|at| (at, s.login("alice", "pw", client("a"), move || T0 + at)))
            .collect::<Vec<_>>();
        let mut issued = Vec::new();
        for (_, f) in t {
            issued.push(f.await.unwrap());
        }
        let now = T0 + 3_000;
        assert_eq!(
            code(s.verify(&issued[0].token, true, now).await),
            "REVOKED_SESSION"
        );
        assert!(s.verify(&issued[1].token, true, now).await.is_ok());
        assert!(s.verify(&issued[2].token, true, now).await.is_ok());
        assert_eq!(
            s.sessions(&issued[2].token, now)
                .await
                .unwrap()
                .sessions
                .len(),
            2
        );
        // Bob has a limit of his own.
        assert!(s.login("bob", "pw", client("b"), || now).await.is_ok());

        s.set_policy(Policy {
            max_sessions_per_user: 2,
            session_limit_action: crate::policy::SessionLimitPolicy::RefuseNew,
            ..Policy::default()
        });
        let e = s
            .login("alice", "pw", client("a"), || now)
            .await
            .unwrap_err();
        assert_eq!(
            (e.code.as_str(), e.code.status().as_u16()),
            ("SESSION_LIMIT", 409)
        );
        assert!(s.verify(&issued[1].token, true, now).await.is_ok());
        // Once one of them signs out, there is room again.
        s.logout(&issued[1].token, now).await.unwrap();
        assert!(s.login("alice", "pw", client("a"), || now).await.is_ok());
    }

    #[test]
    fn registry_users_keep_providers_apart() {
        let alice = registry_user(None, "alice");
        assert_eq!(alice.len(), 32);
        assert_eq!(alice, registry_user(None, "alice"));
        assert_ne!(alice, registry_user(Some("https://idp.example"), "alice"));
        assert_ne!(
            registry_user(Some("https://a.example"), "x"),
            registry_user(Some("https://b.example"), "x")
        );
        // The provider and the subject cannot be shifted into each other.
        assert_ne!(
            registry_user(Some("https://a"), "b\nc"),
            registry_user(Some("https://a\nb"), "c")
        );
    }
}
