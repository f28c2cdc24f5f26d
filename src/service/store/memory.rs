//! The in-process store: the embedded default, for one replica.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Attempts, Claim, OneTimeStore, RefreshRecord, StoreError, Take};
use crate::clock::Millis;

#[derive(Default)]
struct Maps {
    refreshes: HashMap<(String, String), (RefreshRecord, Instant)>,
    revoked: HashMap<String, Instant>,
    /// User digest -> (sessions started at or before this second are over, until).
    user_ends: HashMap<String, (i64, Instant)>,
    failures: HashMap<String, (u64, Instant)>,
    writes: u64,
}

impl Maps {
    /// Drops expired entries now and then, so memory follows live state.
    fn sweep(&mut self, now: Instant) {
        self.writes += 1;
        if self.writes.is_multiple_of(1_024) {
            self.refreshes.retain(|_, (_, until)| *until > now);
            self.revoked.retain(|_, until| *until > now);
            self.user_ends.retain(|_, (_, until)| *until > now);
            self.failures.retain(|_, (_, until)| *until > now);
        }
    }

    /// The failure counter of `key` (count, window end), started afresh
    /// when missing or when its window has passed. Counts as a write.
    fn failure_window(&mut self, key: &str, now: Instant, window: Millis) -> &mut (u64, Instant) {
        self.sweep(now);
        let entry = self
            .failures
            .entry(key.to_string())
            .or_insert((0, after(now, window)));
        if entry.1 <= now {
            *entry = (0, after(now, window));
        }
        entry
    }
}

#[derive(Default)]
pub struct MemoryStore {
    maps: Mutex<Maps>,
}

fn after(now: Instant, ttl: Millis) -> Instant {
    now + Duration::from_millis(ttl.max(0) as u64)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps half-written
        // (every update is one insert), so a poisoned lock is still usable.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl OneTimeStore for MemoryStore {
    fn describe(&self) -> String {
        "in-process store (one replica only: refresh and logout state is not shared)".into()
    }

    async fn claim_refresh(
        &self,
        sid: &str,
        jti: &str,
        _issued_at: i64,
        record: &RefreshRecord,
        ttl: Millis,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        m.sweep(now);
        let key = (sid.to_string(), jti.to_string());
        if let Some((existing, until)) = m.refreshes.get(&key)
            && *until > now
        {
            return Ok(Claim::Lost(existing.clone()));
        }
        m.refreshes.insert(key, (record.clone(), after(now, ttl)));
        Ok(Claim::Won)
    }

    async fn revoke_session(&self, sid: &str, ttl: Millis) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        m.sweep(now);
        m.revoked.insert(sid.to_string(), after(now, ttl));
        Ok(())
    }

    async fn is_revoked(&self, sid: &str) -> Result<bool, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .revoked
            .get(sid)
            .is_some_and(|until| *until > now))
    }

    async fn end_user_sessions(&self, user: &str, at: i64, ttl: Millis) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        m.sweep(now);
        let until = after(now, ttl);
        let entry = m.user_ends.entry(user.to_string()).or_insert((at, until));
        if entry.1 <= now || at >= entry.0 {
            *entry = (at, until);
        }
        Ok(())
    }

    async fn user_sessions_ended(&self, user: &str) -> Result<Option<i64>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .user_ends
            .get(user)
            .filter(|(_, until)| *until > now)
            .map(|(at, _)| *at))
    }

    async fn failures(&self, key: &str) -> Result<Attempts, StoreError> {
        let now = Instant::now();
        Ok(match self.lock().failures.get(key) {
            Some((count, until)) if *until > now => Attempts {
                count: *count,
                resets_in: until.duration_since(now).as_millis() as Millis,
            },
            _ => Attempts::default(),
        })
    }

    async fn add_failure(&self, key: &str, window: Millis) -> Result<Attempts, StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        let entry = m.failure_window(key, now, window);
        entry.0 += 1;
        Ok(Attempts {
            count: entry.0,
            resets_in: entry.1.duration_since(now).as_millis() as Millis,
        })
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        self.lock().failures.remove(key);
        Ok(())
    }

    async fn take_attempt(
        &self,
        key: &str,
        limit: u64,
        window: Millis,
    ) -> Result<Take, StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        let entry = m.failure_window(key, now, window);
        if entry.0 >= limit {
            return Ok(Take::Refused {
                retry_in: (entry.1.duration_since(now).as_millis() as Millis).max(1),
            });
        }
        entry.0 += 1;
        Ok(Take::Allowed)
    }

    async fn release_attempt(&self, key: &str) -> Result<(), StoreError> {
        let now = Instant::now();
        if let Some(entry) = self.lock().failures.get_mut(key)
            && entry.1 > now
        {
            entry.0 = entry.0.saturating_sub(1);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::store::contract;

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        let s = MemoryStore::new();
        contract::claim_is_once(&s).await;
        contract::revocation_sticks(&s).await;
        contract::user_sessions_end_for_good(&s).await;
        contract::failures_count_and_clear(&s).await;
        contract::entries_expire(&s).await;
        contract::take_window_expires(&s).await;
        contract::takes_are_atomic(std::sync::Arc::new(MemoryStore::new())).await;
    }

    #[tokio::test]
    async fn concurrent_claims_have_one_winner() {
        let s = std::sync::Arc::new(MemoryStore::new());
        let mut tasks = Vec::new();
        for i in 0..64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let r = RefreshRecord {
                    jti: format!("n{i}"),
                    iat: 0,
                    exp: 1,
                    at: i,
                };
                s.claim_refresh("s", "j", 0, &r, 60_000).await.unwrap()
            }));
        }
        let mut won = 0;
        for t in tasks {
            if t.await.unwrap() == Claim::Won {
                won += 1;
            }
        }
        assert_eq!(won, 1);
    }
}
