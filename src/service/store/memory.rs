//! The in-process store: the embedded default, for one replica.
//!
//! Memory is the only copy of its state, so it is bounded: at most
//! `max_revoked` revocations are held (each about 150 bytes: see
//! [`super::DEFAULT_MAX_REVOCATIONS`]). Past the bound, a revocation is not
//! recorded and [`Revoked::Full`] says so: the caller ends the user's
//! sessions instead, one entry per user. No revocation is ever evicted
//! before it expires, so a revoked session stays revoked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Activity, Claim, DEFAULT_MAX_REVOCATIONS, IdleCheck, LimitAction, OneTimeStore, RefreshRecord,
    Registered, Revoked, SessionEntry, SessionLimit, StoreError, Take,
};
use crate::clock::Millis;

#[derive(Default)]
struct Maps {
    refreshes: HashMap<(String, String), (RefreshRecord, Instant)>,
    revoked: HashMap<String, Instant>,
    /// User digest -> (sessions started at or before this second are over, until).
    user_ends: HashMap<String, (i64, Instant)>,
    failures: HashMap<String, (u64, Instant)>,
    writes: u64,
    /// When the revocations were last swept because they were at the bound.
    revoked_swept: Option<Instant>,
    /// The session registry: user digest -> sessions, oldest first.
    sessions: HashMap<String, Vec<SessionEntry>>,
    /// When the registry was last swept of sessions past their end.
    sessions_swept: Option<Instant>,
    /// Session id -> (its owner, until): see `set_session_owner`.
    owners: HashMap<String, (String, Instant)>,
    /// Session id -> (last activity in ms, or `None` once ended for
    /// idleness; kept until): see `activity.rs`.
    activity: HashMap<String, (Option<Millis>, Instant)>,
}

impl Maps {
    /// `user`'s live sessions (those past their end at `now` dropped), and
    /// at most once a second every user's.
    fn live_sessions(&mut self, user: &str, now: Millis) -> &mut Vec<SessionEntry> {
        let tick = Instant::now();
        if self
            .sessions_swept
            .is_none_or(|t| tick.duration_since(t) >= Duration::from_secs(1))
        {
            self.sessions.retain(|_, v| {
                v.retain(|e| e.ends > now);
                !v.is_empty()
            });
            self.sessions_swept = Some(tick);
        }
        let list = self.sessions.entry(user.to_string()).or_default();
        list.retain(|e| e.ends > now);
        list
    }

    /// Drops `user`'s entry when it holds no session.
    fn forget_if_empty(&mut self, user: &str) {
        if self.sessions.get(user).is_some_and(Vec::is_empty) {
            self.sessions.remove(user);
        }
    }

    /// Drops expired entries now and then, so memory follows live state.
    fn sweep(&mut self, now: Instant) {
        self.writes += 1;
        if self.writes.is_multiple_of(1_024) {
            self.refreshes.retain(|_, (_, until)| *until > now);
            self.revoked.retain(|_, until| *until > now);
            self.user_ends.retain(|_, (_, until)| *until > now);
            self.failures.retain(|_, (_, until)| *until > now);
            self.owners.retain(|_, (_, until)| *until > now);
            self.activity.retain(|_, (_, until)| *until > now);
        }
    }

    /// Brings `sid`'s registry entry's last activity up to `at`.
    fn touch_entry(&mut self, user: &str, sid: &str, at: Millis) {
        if let Some(e) = self
            .sessions
            .get_mut(user)
            .and_then(|l| l.iter_mut().find(|e| e.sid == sid))
        {
            e.last_active = e.last_active.max(at);
        }
    }

    /// Records `a` unless the session ended for idleness.
    fn record(&mut self, a: &Activity, now: Instant) {
        self.sweep(now);
        let until = after(now, a.ttl);
        match self.activity.get_mut(&a.sid) {
            Some((None, _)) => return,
            Some((Some(last), kept)) => {
                if *last >= a.at {
                    return;
                }
                *last = a.at;
                *kept = (*kept).max(until);
            }
            None => {
                self.activity.insert(a.sid.clone(), (Some(a.at), until));
            }
        }
        self.touch_entry(&a.user, &a.sid, a.at);
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

pub struct MemoryStore {
    maps: Mutex<Maps>,
    max_revoked: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            maps: Mutex::default(),
            max_revoked: DEFAULT_MAX_REVOCATIONS,
        }
    }
}

fn after(now: Instant, ttl: Millis) -> Instant {
    now + Duration::from_millis(ttl.max(0) as u64)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Holds at most `n` revocations (at least 1); see the module docs.
    pub fn with_revocation_limit(mut self, n: usize) -> Self {
        self.max_revoked = n.max(1);
        self
    }

    /// How many registry entries are held now (users and sessions).
    pub fn registry_held(&self) -> usize {
        let m = self.lock();
        m.sessions.len() + m.sessions.values().map(Vec::len).sum::<usize>()
    }

    /// How many revocations are held now, expired ones included.
    pub fn revocations_held(&self) -> usize {
        self.lock().revoked.len()
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

    async fn revoke_session(&self, sid: &str, ttl: Millis) -> Result<Revoked, StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        m.sweep(now);
        let until = after(now, ttl);
        if let Some(held) = m.revoked.get_mut(sid) {
            *held = (*held).max(until);
            return Ok(Revoked::Session);
        }
        if m.revoked.len() >= self.max_revoked {
            // Expired entries make room; looked for at most once a second,
            // so that a store at its bound costs no full scan per logout.
            if m.revoked_swept
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                m.revoked.retain(|_, until| *until > now);
                m.revoked_swept = Some(now);
            }
            if m.revoked.len() >= self.max_revoked {
                return Ok(Revoked::Full);
            }
        }
        m.revoked.insert(sid.to_string(), until);
        Ok(Revoked::Session)
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

    async fn register_session(
        &self,
        user: &str,
        entry: &SessionEntry,
        limit: SessionLimit,
        now: Millis,
    ) -> Result<Registered, StoreError> {
        let mut m = self.lock();
        let list = m.live_sessions(user, now);
        let mut evicted = Vec::new();
        if limit.max > 0 && list.len() as u64 >= limit.max {
            if limit.action == LimitAction::RefuseNew {
                m.forget_if_empty(user);
                return Ok(Registered::Refused);
            }
            list.sort_by_key(|e| e.started);
            let excess = list.len() + 1 - limit.max as usize;
            evicted = list.drain(..excess).collect();
        }
        if entry.ends > now {
            let at = list.partition_point(|e| e.started <= entry.started);
            list.insert(at, entry.clone());
        }
        m.forget_if_empty(user);
        Ok(Registered::Added { evicted })
    }

    async fn list_sessions(
        &self,
        user: &str,
        now: Millis,
    ) -> Result<Vec<SessionEntry>, StoreError> {
        let mut m = self.lock();
        let list = m.live_sessions(user, now).clone();
        m.forget_if_empty(user);
        Ok(list)
    }

    async fn remove_session(
        &self,
        user: &str,
        sid: &str,
    ) -> Result<Option<SessionEntry>, StoreError> {
        let mut m = self.lock();
        let Some(list) = m.sessions.get_mut(user) else {
            return Ok(None);
        };
        let found = list
            .iter()
            .position(|e| e.sid == sid)
            .map(|i| list.remove(i));
        m.forget_if_empty(user);
        Ok(found)
    }

    async fn remove_user_sessions(&self, user: &str) -> Result<Vec<SessionEntry>, StoreError> {
        Ok(self.lock().sessions.remove(user).unwrap_or_default())
    }

    async fn set_session_owner(
        &self,
        sid: &str,
        owner: &str,
        ttl: Millis,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        m.sweep(now);
        m.owners
            .insert(sid.to_string(), (owner.to_string(), after(now, ttl)));
        Ok(())
    }

    async fn session_owner(&self, sid: &str) -> Result<Option<String>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .owners
            .get(sid)
            .filter(|(_, until)| *until > now)
            .map(|(owner, _)| owner.clone()))
    }

    async fn record_activity(&self, batch: &[Activity]) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        for a in batch {
            m.record(a, now);
        }
        Ok(())
    }

    async fn check_idle(
        &self,
        a: &Activity,
        floor: Millis,
        idle_before: Millis,
    ) -> Result<IdleCheck, StoreError> {
        let now = Instant::now();
        let mut m = self.lock();
        let held = match m.activity.get(&a.sid) {
            Some((None, until)) if *until > now => {
                return Ok(IdleCheck::Ended { just_now: false });
            }
            Some((Some(last), until)) if *until > now => *last,
            _ => floor,
        };
        let last = held.max(floor);
        if last <= idle_before {
            m.sweep(now);
            m.activity
                .insert(a.sid.clone(), (None, after(now, a.ttl.max(1))));
            if let Some(list) = m.sessions.get_mut(&a.user) {
                list.retain(|e| e.sid != a.sid);
            }
            m.forget_if_empty(&a.user);
            return Ok(IdleCheck::Ended { just_now: true });
        }
        m.record(a, now);
        Ok(IdleCheck::Active { last })
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
        contract::entries_expire(&s).await;
        contract::take_window_expires(&s).await;
        contract::takes_are_atomic(std::sync::Arc::new(MemoryStore::new())).await;
        crate::service::store::registry::contract::sessions_are_listed_and_removed(&s, "u-list")
            .await;
        crate::service::store::registry::contract::the_limit_evicts_the_oldest_or_refuses(
            &s, "u-limit",
        )
        .await;
        crate::service::store::registry::contract::ended_sessions_are_not_listed(&s, "u-end").await;
        crate::service::store::registry::contract::owners_expire_with_their_session(&s, "owner")
            .await;
        crate::service::store::activity::contract::activity_is_recorded_and_idle_ends_for_good(
            &s, "u-idle",
        )
        .await;
        crate::service::store::registry::contract::the_limit_holds_under_a_race(
            std::sync::Arc::new(MemoryStore::new()),
            "u-race",
        )
        .await;
        let small = MemoryStore::new().with_revocation_limit(50);
        let refused = contract::revocations_past_the_memory_bound_stay_revoked(&small, 50).await;
        assert_eq!(refused, 50 * 3 + 7 - 50);
    }

    /// However many sessions are revoked, the store holds at most its bound,
    /// answers `Full` past it, and keeps every revocation it took.
    #[tokio::test]
    async fn revocations_are_bounded_and_never_evicted_early() {
        let s = MemoryStore::new().with_revocation_limit(1_000);
        for i in 0..100_000 {
            let r = s.revoke_session(&format!("s{i}"), 60_000).await.unwrap();
            assert_eq!(r == Revoked::Session, i < 1_000, "revocation {i}");
        }
        assert_eq!(s.revocations_held(), 1_000);
        assert!(s.is_revoked("s0").await.unwrap());
        assert!(s.is_revoked("s999").await.unwrap());
        // Revoking a session held already needs no room.
        assert_eq!(
            s.revoke_session("s5", 60_000).await.unwrap(),
            Revoked::Session
        );
        // Expired revocations make room again.
        let s = MemoryStore::new().with_revocation_limit(2);
        s.revoke_session("a", 30).await.unwrap();
        s.revoke_session("b", 30).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            s.revoke_session("c", 60_000).await.unwrap(),
            Revoked::Session
        );
        assert!(s.is_revoked("c").await.unwrap());
        assert_eq!(s.revocations_held(), 1);
    }

    /// 10,000 sessions that have ended leave nothing in the registry.
    #[tokio::test]
    async fn ended_sessions_leave_no_registry_entry() {
        let s = MemoryStore::new();
        crate::service::store::registry::contract::record_expiring_sessions(&s, "exp", 10_000)
            .await;
        assert!(s.registry_held() > 0, "the sessions were recorded");
        // Any registry call sweeps, at most once a second.
        s.list_sessions("someone-else", crate::clock::now_millis())
            .await
            .unwrap();
        assert_eq!(s.registry_held(), 0);
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
