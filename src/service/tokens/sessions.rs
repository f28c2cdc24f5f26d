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

use super::{Client, TokenService};
use crate::policy::{Policy, SessionLimitPolicy};
use crate::service::error::{ApiError, Code};
use crate::service::rules::{self, Millis, Standing};
use crate::service::store::{LimitAction, Registered, Revoked, SessionEntry, SessionLimit};
use crate::service::token::Claims;

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

fn claims_user(c: &Claims) -> String {
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
            started: claims.auth_time.saturating_mul(1_000),
            ends: session_end.saturating_mul(1_000),
            last_active: now,
            addr: client.addr.map(|a| a.to_string()),
            user_agent: client.user_agent.clone(),
        };
        let user = claims_user(claims);
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
                for old in evicted {
                    if let Err(e) = self.end_entry(&claims.sub, &old, now).await {
                        // The new session must not outlive the limit it
                        // broke: it is taken out again and refused.
                        let _ = self.store.remove_session(&user, &claims.sid).await;
                        return Err(e);
                    }
                    tracing::info!(user = ?claims.sub, sid = %old.sid, "session limit: oldest session ended");
                }
                Ok(())
            }
        }
    }

    /// Revokes a session known from the registry, on every replica. With
    /// no room for a revocation, the user's sessions up to that one's start
    /// end instead: more than was asked, never less.
    async fn end_entry(&self, sub: &str, e: &SessionEntry, now: Millis) -> Result<(), ApiError> {
        let ttl = (e.ends - now).max(1_000);
        if self.store.revoke_session(&e.sid, ttl).await? == Revoked::Session {
            self.metrics.revocations.inc();
            return Ok(());
        }
        let key = super::user_key(sub);
        let at = e.started.div_euclid(1_000);
        self.store
            .end_user_sessions(&key, at, rules::user_end_ttl())
            .await?;
        super::merge_end(&self.user_ends, &key, Some(at), std::time::Instant::now());
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
    async fn caller(&self, token: &str, now: Millis) -> Result<std::sync::Arc<Claims>, ApiError> {
        let policy = self.policy.load_full();
        let (claims, standing) = self.judge(token, &policy, now).await?;
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
    async fn live_entries(
        &self,
        claims: &Claims,
        now: Millis,
    ) -> Result<Vec<SessionEntry>, ApiError> {
        let listed = self.store.list_sessions(&claims_user(claims), now).await?;
        let ended = self.user_end(&claims.sub).await?;
        let mut live = Vec::with_capacity(listed.len());
        for e in listed {
            if e.ends <= now || ended.is_some_and(|end| e.started.div_euclid(1_000) <= end) {
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
        let claims = self.caller(token, now).await?;
        let sessions = self.live_entries(&claims, now).await?;
        Ok(SessionList {
            current: claims.sid.clone(),
            sessions,
        })
    }

    /// `DELETE /v1/sessions/{sid}`: ends one of the caller's sessions. A
    /// session of another user is answered exactly as one that does not exist.
    pub async fn end_session(&self, token: &str, sid: &str, now: Millis) -> Result<(), ApiError> {
        let claims = self.caller(token, now).await?;
        let Some(entry) = self
            .live_entries(&claims, now)
            .await?
            .into_iter()
            .find(|e| e.sid == sid)
        else {
            return Err(not_found());
        };
        self.end_entry(&claims.sub, &entry, now).await?;
        self.store
            .remove_session(&claims_user(&claims), sid)
            .await?;
        tracing::info!(user = ?claims.sub, sid = %sid, "session ended by its user");
        Ok(())
    }

    /// `POST /v1/logout?everywhere=true`: ends every session of the
    /// caller's user, on every replica, the caller's own included.
    pub async fn logout_everywhere(&self, token: &str, now: Millis) -> Result<(), ApiError> {
        let policy = self.policy.load_full();
        // A token past its expiry but still renewable may sign out too.
        let (claims, _) = self.judge(token, &policy, now).await?;
        let entries = self
            .store
            .remove_user_sessions(&claims_user(&claims))
            .await?;
        for e in entries.iter().filter(|e| e.sid != claims.sid) {
            self.end_entry(&claims.sub, e, now).await?;
        }
        self.revoke(&claims, now).await?;
        self.metrics.revocations.inc();
        tracing::info!(user = ?claims.sub, sessions = entries.len(), "logout everywhere");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
