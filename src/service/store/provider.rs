//! What the service keeps of an OpenID Connect provider's sessions: for
//! each of our sessions, the provider's refresh token, sealed (see
//! `oidc/vault.rs`: the store only ever sees ciphertext), and for each
//! provider session id, which of our sessions it started, so that a
//! back-channel logout finds them. Both live until our session's absolute
//! end and no longer.
//!
//! Two implementations: in process (one replica) here, and Redis
//! (`redis/provider.rs`), where a session's sealed token shares the
//! session's hash tag and a provider session's links share one of their own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::clock::Millis;

/// What is kept for one of our sessions in place of a refresh token once
/// the provider refused it: every later renewal is refused at once.
pub const REFUSED: &str = "refused";

/// One of our sessions, as a provider session's link holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Linked {
    pub sid: String,
    /// The provider's subject (the user, with the provider's issuer).
    pub sub: String,
    /// Our login (seconds).
    pub auth_time: i64,
    /// Its absolute end (ms).
    pub ends: Millis,
}

#[async_trait]
pub trait ProviderStore: Send + Sync + 'static {
    /// Keeps `sealed` (a sealed refresh token, or [`REFUSED`]) for our
    /// session `sid`, for `ttl` ms, in place of what was there.
    async fn put_refresh_token(
        &self,
        sid: &str,
        sealed: &str,
        ttl: Millis,
    ) -> Result<(), StoreError>;

    /// What [`ProviderStore::put_refresh_token`] kept for `sid`, while it is kept.
    async fn refresh_token(&self, sid: &str) -> Result<Option<String>, StoreError>;

    /// Links our session to the provider session `provider_sid` (a digest
    /// of the issuer and the provider's `sid`), until `session.ends`.
    async fn link_provider_session(
        &self,
        provider_sid: &str,
        session: &Linked,
        now: Millis,
    ) -> Result<(), StoreError>;

    /// Takes every link of `provider_sid` out; answers those not past their end.
    async fn take_provider_session(
        &self,
        provider_sid: &str,
        now: Millis,
    ) -> Result<Vec<Linked>, StoreError>;
}

#[derive(Default)]
struct Maps {
    tokens: HashMap<String, (String, Instant)>,
    links: HashMap<String, Vec<Linked>>,
    writes: u64,
}

/// The in-process provider store, for one replica.
#[derive(Default)]
pub struct MemoryProviderStore {
    maps: Mutex<Maps>,
}

impl MemoryProviderStore {
    pub fn new() -> MemoryProviderStore {
        MemoryProviderStore::default()
    }

    fn maps(&self) -> Result<std::sync::MutexGuard<'_, Maps>, StoreError> {
        self.maps
            .lock()
            .map_err(|_| StoreError::Unavailable("the in-process store is poisoned".into()))
    }
}

fn ms(ttl: Millis) -> Duration {
    Duration::from_millis(ttl.max(1) as u64)
}

#[async_trait]
impl ProviderStore for MemoryProviderStore {
    async fn put_refresh_token(
        &self,
        sid: &str,
        sealed: &str,
        ttl: Millis,
    ) -> Result<(), StoreError> {
        let mut m = self.maps()?;
        let now = Instant::now();
        m.writes += 1;
        if m.writes.is_multiple_of(1_024) {
            m.tokens.retain(|_, (_, until)| *until > now);
        }
        m.tokens
            .insert(sid.to_string(), (sealed.to_string(), now + ms(ttl)));
        Ok(())
    }

    async fn refresh_token(&self, sid: &str) -> Result<Option<String>, StoreError> {
        let m = self.maps()?;
        Ok(m.tokens
            .get(sid)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(v, _)| v.clone()))
    }

    async fn link_provider_session(
        &self,
        provider_sid: &str,
        session: &Linked,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut m = self.maps()?;
        m.writes += 1;
        if m.writes.is_multiple_of(1_024) {
            m.links.retain(|_, v| {
                v.retain(|l| l.ends > now);
                !v.is_empty()
            });
        }
        let list = m.links.entry(provider_sid.to_string()).or_default();
        list.retain(|l| l.ends > now && l.sid != session.sid);
        list.push(session.clone());
        Ok(())
    }

    async fn take_provider_session(
        &self,
        provider_sid: &str,
        now: Millis,
    ) -> Result<Vec<Linked>, StoreError> {
        let mut m = self.maps()?;
        let mut taken = m.links.remove(provider_sid).unwrap_or_default();
        taken.retain(|l| l.ends > now);
        Ok(taken)
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every provider store must show.
    use super::*;

    fn linked(sid: &str, ends: Millis) -> Linked {
        Linked {
            sid: sid.into(),
            sub: "u".into(),
            auth_time: 1,
            ends,
        }
    }

    pub async fn refresh_tokens_are_kept_replaced_and_expire(s: &dyn ProviderStore) {
        let sid = format!("s-{}", uuid::Uuid::new_v4());
        assert_eq!(s.refresh_token(&sid).await.unwrap(), None);
        s.put_refresh_token(&sid, "v1.k.one", 60_000).await.unwrap();
        assert_eq!(
            s.refresh_token(&sid).await.unwrap().as_deref(),
            Some("v1.k.one")
        );
        s.put_refresh_token(&sid, REFUSED, 150).await.unwrap();
        assert_eq!(
            s.refresh_token(&sid).await.unwrap().as_deref(),
            Some(REFUSED)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(s.refresh_token(&sid).await.unwrap(), None);
    }

    pub async fn provider_sessions_are_taken_once(s: &dyn ProviderStore) {
        let now = crate::clock::now_millis();
        let p = format!("p-{}", uuid::Uuid::new_v4());
        s.link_provider_session(&p, &linked("a", now + 60_000), now)
            .await
            .unwrap();
        s.link_provider_session(&p, &linked("b", now + 60_000), now)
            .await
            .unwrap();
        // Ended already: never answered.
        s.link_provider_session(&p, &linked("old", now - 1), now - 10)
            .await
            .unwrap();
        let other = format!("p-{}", uuid::Uuid::new_v4());
        s.link_provider_session(&other, &linked("c", now + 60_000), now)
            .await
            .unwrap();
        let mut got: Vec<String> = s
            .take_provider_session(&p, now)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.sid)
            .collect();
        got.sort();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(s.take_provider_session(&p, now).await.unwrap(), []);
        assert_eq!(
            s.take_provider_session(&other, now).await.unwrap(),
            [linked("c", now + 60_000)]
        );
    }

    #[tokio::test]
    async fn the_memory_store_keeps_the_contract() {
        let s = MemoryProviderStore::new();
        refresh_tokens_are_kept_replaced_and_expire(&s).await;
        provider_sessions_are_taken_once(&s).await;
    }
}
