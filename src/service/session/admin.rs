//! Ending anyone's sessions: the admin API's side of the token service
//! (who may call it is `service::admin`'s business, not this module's).
//!
//! An admin names a user as the registry keys them: a password user by
//! name; an OpenID Connect user by the provider's issuer and the subject
//! (`sub`), never by the display name, which the provider may give to
//! several people and change at will. A session is found by its id
//! alone through the owner recorded at login (digests only).

use super::TokenService;
use super::registry::claims_user;
use crate::service::audit::{Event, Reason, Who};
use crate::service::error::{ApiError, Code};
use crate::service::jwt::Claims;
use crate::service::rules::{self, Millis};
use crate::service::store::{SessionEntry, StoreError};

/// A user as an admin names them (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedUser {
    /// A password user's name, or an OpenID Connect user's subject.
    pub name: String,
    /// The provider's issuer URL, for an OpenID Connect user.
    pub provider: Option<String>,
}

impl NamedUser {
    fn claims(&self) -> Claims {
        Claims {
            sub: self.name.clone(),
            idp: self.provider.clone(),
            ..Claims::default()
        }
    }
}

fn not_found() -> ApiError {
    ApiError::new(Code::SessionNotFound, "no such live session")
}

/// The key of the user's sessions' end, for `claims`'s user.
fn end_key(c: &Claims) -> String {
    super::user_key(&super::user_id(c.idp.as_deref(), &c.sub))
}

impl TokenService {
    /// Records whose session a new one is (registry user and end key, both
    /// digests), so that an admin can end it by its id. Best effort: without
    /// it, the session can still be ended with its user's.
    pub(super) async fn record_owner(
        &self,
        claims: &Claims,
        registry_user: &str,
        entry: &SessionEntry,
        now: Millis,
    ) {
        let owner = format!("{registry_user} {}", end_key(claims));
        if let Err(e) = self
            .store
            .set_session_owner(&claims.sid, &owner, (entry.ends - now).max(1))
            .await
        {
            tracing::warn!(error = %e, sid = %claims.sid, "could not record the session's owner: an admin can end it only with all of its user's");
        }
    }

    /// The provider an admin names must be the policy's: a session of
    /// another provider is over anyway.
    fn check_provider(&self, user: &NamedUser) -> Result<(), ApiError> {
        if user.name.is_empty() {
            return Err(ApiError::new(
                Code::InvalidRequest,
                "user must not be empty",
            ));
        }
        if let Some(p) = &user.provider {
            let policy = self.policy.load();
            if policy.oidc.as_ref().is_none_or(|o| &o.issuer_url != p) {
                return Err(ApiError::new(
                    Code::InvalidRequest,
                    "provider is not the policy's OpenID Connect issuer (spec.oidc.issuerURL)",
                ));
            }
        }
        Ok(())
    }

    /// `GET /v1/admin/sessions?user=NAME`: the user's live sessions, oldest
    /// first (none for a user nobody signed in as).
    pub async fn admin_sessions(
        &self,
        user: &NamedUser,
        now: Millis,
    ) -> Result<Vec<SessionEntry>, ApiError> {
        self.check_provider(user)?;
        self.live_entries(&user.claims(), now).await
    }

    /// `DELETE /v1/admin/sessions/{sid}`: ends one session of anybody's, on
    /// every replica. One that is not live (ended, revoked, unknown) is
    /// `SESSION_NOT_FOUND`.
    pub async fn admin_end_session(
        &self,
        sid: &str,
        admin: &str,
        now: Millis,
    ) -> Result<(), ApiError> {
        let Some(owner) = self.store.session_owner(sid).await? else {
            return Err(not_found());
        };
        let Some((user, key)) = owner.split_once(' ') else {
            return Err(StoreError::Corrupt(format!("owner of session {sid}")).into());
        };
        let Some(entry) = self
            .store
            .list_sessions(user, now)
            .await?
            .into_iter()
            .find(|e| e.sid == sid)
        else {
            return Err(not_found());
        };
        if self.store.is_revoked(sid).await? {
            return Err(not_found());
        }
        self.end_entry_of(key, &entry, now).await?;
        self.store.remove_session(user, sid).await?;
        self.admin_revoked(admin, &entry, Reason::AdminSession, now);
        Ok(())
    }

    /// `DELETE /v1/admin/sessions?user=NAME`: ends every session of the
    /// user, on every replica; answers how many were live. Sessions the
    /// registry does not hold (an entry lost) end too, as with
    /// `POST /v1/logout?everywhere=true`: every one started before this second.
    pub async fn admin_end_user(
        &self,
        user: &NamedUser,
        admin: &str,
        now: Millis,
    ) -> Result<usize, ApiError> {
        self.check_provider(user)?;
        let claims = user.claims();
        let key = end_key(&claims);
        let at = now.div_euclid(1_000) - 1;
        self.store
            .end_user_sessions(&key, at, rules::user_end_ttl())
            .await?;
        super::merge_end(&self.user_ends, &key, Some(at), std::time::Instant::now());
        // Each live one is revoked too: other replicas hear of a revocation
        // at once, of a user's end only when they next read it.
        let entries = self
            .store
            .remove_user_sessions(&claims_user(&claims))
            .await?;
        let mut ended = 0;
        for e in entries.iter().filter(|e| e.ends > now) {
            if self.store.is_revoked(&e.sid).await? {
                continue;
            }
            self.end_entry_of(&key, e, now).await?;
            self.admin_revoked(admin, e, Reason::AdminUser, now);
            ended += 1;
        }
        Ok(ended)
    }

    /// Where an admin's revocation of one session happens, once per
    /// session: `admin` is who did it (their Kubernetes user name, or
    /// `admin-token` for `--admin-token-file`).
    fn admin_revoked(&self, admin: &str, entry: &SessionEntry, why: Reason, now: Millis) {
        tracing::info!(admin = ?admin, sid = %entry.sid, method = %entry.method, "session ended by an admin");
        let who = Who {
            provider: entry.idp.as_deref(),
            ..Who::default().sid(&entry.sid)
        };
        self.audit.emit(Event::session_revoked_by_admin(
            now,
            who,
            &super::nobody(),
            admin,
            why,
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::Policy;
    use crate::service::session::{Client, SessionStart};
    use crate::service::store::MemoryStore;

    const T0: Millis = 1_800_000_000_000;
    const IDP: &str = "https://idp.example.com";

    fn with_oidc(mut p: Policy) -> Policy {
        let doc = "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nspec:\n  externalURL: https://auth.example.com\n  oidc:\n    issuerURL: https://idp.example.com\n    clientID: c\n    clientSecretRef: {name: s, key: k}\n";
        let o = Policy::from_yaml(doc).unwrap();
        p.oidc = o.oidc;
        p.external_url = o.external_url;
        p
    }

    fn service(store: MemoryStore) -> TokenService {
        use crate::testing::{user_line, users};
        crate::testing::service()
            .policy(with_oidc(Policy::default()))
            .users(users(&(user_line("alice", "pw") + &user_line("bob", "pw"))))
            .store(Arc::new(store))
            .build()
    }

    fn password(name: &str) -> NamedUser {
        NamedUser {
            name: name.into(),
            provider: None,
        }
    }

    fn oidc(sub: &str) -> NamedUser {
        NamedUser {
            name: sub.into(),
            provider: Some(IDP.into()),
        }
    }

    fn client() -> Client {
        Client {
            addr: "203.0.113.7".parse().ok(),
            user_agent: Some("ua".into()),
        }
    }

    async fn provider_login(
        s: &TokenService,
        sub: &str,
        at: Millis,
    ) -> crate::service::session::Issued {
        let start = SessionStart {
            sub: sub.into(),
            idp: Some(IDP.into()),
            name: Some("alice".into()),
            ..SessionStart::default()
        };
        s.start_session(start, &client(), || at).await.unwrap()
    }

    fn sids(v: &[SessionEntry]) -> Vec<&str> {
        v.iter().map(|e| e.sid.as_str()).collect()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    /// A password user and a provider's subject of the same name (and the
    /// same display name) are two users: an admin names each exactly.
    #[tokio::test]
    async fn an_admin_names_password_and_provider_users_apart() {
        let s = service(MemoryStore::new());
        let a = s.login("alice", "pw", client(), || T0).await.unwrap();
        let o = provider_login(&s, "alice", T0 + 1).await;
        let now = T0 + 1_000;
        let listed = s.admin_sessions(&password("alice"), now).await.unwrap();
        assert_eq!(sids(&listed), [a.claims.sid.as_str()]);
        assert_eq!(listed[0].addr.as_deref(), Some("203.0.113.7"));
        let listed = s.admin_sessions(&oidc("alice"), now).await.unwrap();
        assert_eq!(sids(&listed), [o.claims.sid.as_str()]);
        assert_eq!(listed[0].method, "oidc");
        // Nobody signed in as carol: an empty list.
        assert!(
            s.admin_sessions(&password("carol"), now)
                .await
                .unwrap()
                .is_empty()
        );
        // A provider the policy does not name is refused, not guessed at.
        let other = NamedUser {
            name: "alice".into(),
            provider: Some("https://other.example".into()),
        };
        assert_eq!(code(s.admin_sessions(&other, now).await), "INVALID_REQUEST");
        assert_eq!(
            code(s.admin_sessions(&password(""), now).await),
            "INVALID_REQUEST"
        );

        // Ending all of the provider's alice leaves the password alice alone.
        assert_eq!(
            s.admin_end_user(&oidc("alice"), "root", now).await.unwrap(),
            1
        );
        assert_eq!(code(s.verify(&o.token, true, now).await), "REVOKED_SESSION");
        assert!(s.verify(&a.token, true, now).await.is_ok());
        assert!(
            s.admin_sessions(&oidc("alice"), now)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A session known by its id alone ends, whoever's it is; one not live
    /// (unknown, ended already) is SESSION_NOT_FOUND.
    #[tokio::test]
    async fn an_admin_ends_a_session_by_its_id() {
        let s = service(MemoryStore::new());
        let a1 = s.login("alice", "pw", client(), || T0).await.unwrap();
        let a2 = s.login("alice", "pw", client(), || T0 + 1).await.unwrap();
        let b = s.login("bob", "pw", client(), || T0 + 2).await.unwrap();
        let o = provider_login(&s, "sub-1", T0 + 3).await;
        let now = T0 + 1_000;
        s.admin_end_session(&a1.claims.sid, "root", now)
            .await
            .unwrap();
        s.admin_end_session(&o.claims.sid, "root", now)
            .await
            .unwrap();
        assert_eq!(
            code(s.verify(&a1.token, true, now).await),
            "REVOKED_SESSION"
        );
        assert_eq!(code(s.verify(&o.token, true, now).await), "REVOKED_SESSION");
        assert!(s.verify(&a2.token, true, now).await.is_ok());
        assert!(s.verify(&b.token, true, now).await.is_ok());
        assert_eq!(
            sids(&s.admin_sessions(&password("alice"), now).await.unwrap()),
            [a2.claims.sid.as_str()]
        );
        for sid in [a1.claims.sid.as_str(), "no-such-session"] {
            assert_eq!(
                code(s.admin_end_session(sid, "root", now).await),
                "SESSION_NOT_FOUND",
                "{sid}"
            );
        }
        // A session logged out is over: nothing for the admin to end.
        s.logout(&b.token, now).await.unwrap();
        assert_eq!(
            code(s.admin_end_session(&b.claims.sid, "root", now).await),
            "SESSION_NOT_FOUND"
        );
    }

    /// Ending all of a user's sessions reaches one the registry lost too,
    /// and the user may sign in again afterwards.
    #[tokio::test]
    async fn an_admin_ends_every_session_of_a_user() {
        let s = service(MemoryStore::new());
        let t: Vec<_> = [0, 1, 2]
            .into_iter()
            .map(|i| s.login("alice", "pw", client(), move || T0 + i))
            .collect();
        let mut issued = Vec::new();
        for f in t {
            issued.push(f.await.unwrap());
        }
        let b = s.login("bob", "pw", client(), || T0).await.unwrap();
        // One entry lost (Redis forgot it, say).
        s.store()
            .remove_session(&claims_user(&issued[0].claims), &issued[0].claims.sid)
            .await
            .unwrap();
        let now = T0 + 5_000;
        assert_eq!(
            s.admin_end_user(&password("alice"), "root", now)
                .await
                .unwrap(),
            2
        );
        for t in &issued {
            assert_eq!(code(s.verify(&t.token, true, now).await), "REVOKED_SESSION");
        }
        assert!(s.verify(&b.token, true, now).await.is_ok());
        assert_eq!(
            s.admin_end_user(&password("alice"), "root", now)
                .await
                .unwrap(),
            0
        );
        let again = s
            .login("alice", "pw", client(), || now + 1_000)
            .await
            .unwrap();
        assert!(s.verify(&again.token, true, now + 1_000).await.is_ok());
    }

    /// With the in-process store at its revocation bound, a session an
    /// admin ends still ends (by its user's sessions up to its start).
    #[tokio::test]
    async fn a_session_ended_by_id_stays_ended_past_the_revocation_bound() {
        let s = service(MemoryStore::new().with_revocation_limit(1));
        let filler = s.login("bob", "pw", client(), || T0).await.unwrap();
        s.logout(&filler.token, T0 + 1).await.unwrap();
        let a = s
            .login("alice", "pw", client(), || T0 + 1_000)
            .await
            .unwrap();
        let now = T0 + 2_000;
        s.admin_end_session(&a.claims.sid, "root", now)
            .await
            .unwrap();
        assert_eq!(code(s.verify(&a.token, true, now).await), "REVOKED_SESSION");
    }
}
