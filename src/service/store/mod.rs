//! The one-time store: where a refresh is claimed (exactly once, across all
//! replicas), where sessions are revoked, and where failed logins are
//! counted. One small trait, two implementations: in-process (one replica)
//! and Redis (any number of replicas).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::clock::Millis;

pub mod activity;
pub mod memory;
pub mod provider;
pub mod redis;
pub mod registry;

pub use activity::{Activity, IdleCheck};
pub use memory::MemoryStore;
pub use redis::RedisStore;
pub use registry::{LimitAction, Registered, SessionEntry, SessionLimit};

/// What the winner of a refresh claim wrote: enough to re-sign the very same
/// new token for requests that raced with it (rule 5 in docs/src/concepts.md), and nothing
/// that is itself a usable credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRecord {
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    /// When the claim was made (ms since the epoch).
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This caller's record is now the one.
    Won,
    /// Somebody claimed first; their record, `at` on this replica's clock.
    Lost(RefreshRecord),
    /// The store lost its data since the token was issued, so whether it
    /// was refreshed already cannot be known: it is not refreshed again.
    Forgotten,
}

/// The answer to [`OneTimeStore::take_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The attempt is counted; the caller may check the password.
    Allowed,
    /// The counter is at its limit; nothing was counted. `retry_in` ms
    /// until it resets.
    Refused { retry_in: Millis },
}

/// How many revocations a store keeps in this process's memory, unless the
/// service says otherwise (`--max-cached-revocations`). An entry costs about
/// 150 bytes (the session id, 36 bytes, in its own allocation; its expiry;
/// the hash table's slot and spare capacity; 138 bytes measured for
/// 1,000,000 entries in the in-process store, 131 in the Redis store's
/// cache), so the default bound holds about 7.5 MiB per replica, however
/// many logouts there are.
pub const DEFAULT_MAX_REVOCATIONS: usize = 50_000;

/// The answer to [`OneTimeStore::revoke_session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The session is revoked, on every replica the store reaches.
    Session,
    /// Nothing was recorded: the store holds as many revocations as it may
    /// (the in-process store at its bound, where memory is the only copy).
    /// The caller must end the session another way: by ending its user's
    /// sessions ([`OneTimeStore::end_user_sessions`]), one entry per user
    /// however many sessions.
    Full,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store holds an unreadable record: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait OneTimeStore: Send + Sync + 'static {
    /// For the log: what this store is and how far it reaches.
    fn describe(&self) -> String;

    /// Claims the one refresh of token `jti` (issued at `issued_at`, in
    /// seconds) atomically (rule 7): writes `record` if nobody did, else
    /// returns what the first claimer wrote.
    async fn claim_refresh(
        &self,
        sid: &str,
        jti: &str,
        issued_at: i64,
        record: &RefreshRecord,
        ttl: Millis,
    ) -> Result<Claim, StoreError>;

    /// A token of session `sid` was just issued here: it is live, and this
    /// replica may vouch for it while the store is away.
    fn note_issued(&self, _sid: &str) {}

    /// Revokes a session on every replica (rule 6), or answers
    /// [`Revoked::Full`] having recorded nothing. A session once revoked
    /// stays revoked for `ttl`, whatever is revoked after it.
    async fn revoke_session(&self, sid: &str, ttl: Millis) -> Result<Revoked, StoreError>;

    /// Whether a session is revoked. Implementations answer sessions they
    /// have already seen without a network round trip.
    async fn is_revoked(&self, sid: &str) -> Result<bool, StoreError>;

    /// Ends, on every replica, the sessions of one user (`user`: a digest
    /// of the name) that started at or before `at` (seconds): the user was
    /// removed or their password changed. Kept `ttl` ms; an earlier `at`
    /// never replaces a later one.
    async fn end_user_sessions(&self, user: &str, at: i64, ttl: Millis) -> Result<(), StoreError>;

    /// The latest `at` given to [`OneTimeStore::end_user_sessions`] for
    /// `user`, while it is kept.
    async fn user_sessions_ended(&self, user: &str) -> Result<Option<i64>, StoreError>;

    /// Counts one login attempt on `key` in one atomic step, before the
    /// password is checked: if fewer than `limit` are counted in the current
    /// `window` (which starts with the first), counts it and answers
    /// `Allowed`; else counts nothing and answers `Refused`. However many
    /// callers race, on however many replicas, at most `limit` are allowed
    /// per window.
    async fn take_attempt(&self, key: &str, limit: u64, window: Millis)
    -> Result<Take, StoreError>;

    /// Gives back one attempt taken with `take_attempt` (a login that
    /// succeeded, or one that was never checked). Never goes below zero.
    async fn release_attempt(&self, key: &str) -> Result<(), StoreError>;

    /// Readiness: the store answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Records a session of `user` (a digest the service derives) in the
    /// registry until `entry.ends`, claiming `limit` in the same atomic
    /// step: at the limit, the oldest entries are taken out (and answered,
    /// for the caller to revoke) or nothing is recorded
    /// ([`Registered::Refused`]). Entries past their end at `now` do not count.
    async fn register_session(
        &self,
        user: &str,
        entry: &SessionEntry,
        limit: SessionLimit,
        now: Millis,
    ) -> Result<Registered, StoreError>;

    /// `user`'s sessions recorded and not past their end at `now`, oldest first.
    async fn list_sessions(&self, user: &str, now: Millis)
    -> Result<Vec<SessionEntry>, StoreError>;

    /// Takes one session of `user` out of the registry; answers it if it was there.
    async fn remove_session(
        &self,
        user: &str,
        sid: &str,
    ) -> Result<Option<SessionEntry>, StoreError>;

    /// Takes every session of `user` out of the registry; answers them.
    async fn remove_user_sessions(&self, user: &str) -> Result<Vec<SessionEntry>, StoreError>;

    /// Remembers whose session `sid` is for `ttl` ms (its life): `owner` is
    /// what the service derives from the user, digests only, never a name.
    /// For ending a session known by its id alone (the admin API).
    async fn set_session_owner(
        &self,
        sid: &str,
        owner: &str,
        ttl: Millis,
    ) -> Result<(), StoreError>;

    /// What [`OneTimeStore::set_session_owner`] recorded for `sid`, while kept.
    async fn session_owner(&self, sid: &str) -> Result<Option<String>, StoreError>;
    /// Records sessions' latest activity (the idle timeout, see
    /// `activity.rs`): never moves one back, never undoes an idle end.
    async fn record_activity(&self, _batch: &[Activity]) -> Result<(), StoreError> {
        Ok(())
    }

    /// In one atomic step: the session of `a` is idle if its latest
    /// activity (at least `floor`) is at or before `idle_before`; then it
    /// ends for good (and leaves the registry). Else `a` is recorded.
    async fn check_idle(
        &self,
        _a: &Activity,
        _floor: Millis,
        _idle_before: Millis,
    ) -> Result<IdleCheck, StoreError> {
        Err(StoreError::Unavailable(
            "this store keeps no session activity".into(),
        ))
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every store must show; run against each implementation.
    use super::*;

    fn record(jti: &str, at: Millis) -> RefreshRecord {
        RefreshRecord {
            jti: jti.into(),
            iat: 10,
            exp: 20,
            at,
        }
    }

    /// A token issued just now (s): after any epoch the store started.
    fn fresh() -> i64 {
        crate::clock::now_millis() / 1_000 + 5
    }

    /// What the first claimer wrote, but `at`, which a store may re-time.
    fn lost_to(c: Claim) -> (String, i64, i64) {
        match c {
            Claim::Lost(r) => (r.jti, r.iat, r.exp),
            other => panic!("expected a lost claim, got {other:?}"),
        }
    }

    pub async fn claim_is_once(store: &dyn OneTimeStore) {
        let first = record("new-1", 1);
        assert_eq!(
            store
                .claim_refresh("s1", "old", fresh(), &first, 60_000)
                .await
                .unwrap(),
            Claim::Won
        );
        let second = record("new-2", 2);
        assert_eq!(
            lost_to(
                store
                    .claim_refresh("s1", "old", fresh(), &second, 60_000)
                    .await
                    .unwrap()
            ),
            (first.jti.clone(), first.iat, first.exp)
        );
        // Another token of the same session is its own claim.
        assert_eq!(
            store
                .claim_refresh("s1", "other", fresh(), &second, 60_000)
                .await
                .unwrap(),
            Claim::Won
        );
    }

    pub async fn revocation_sticks(store: &dyn OneTimeStore) {
        assert!(!store.is_revoked("s2").await.unwrap());
        assert_eq!(
            store.revoke_session("s2", 60_000).await.unwrap(),
            Revoked::Session
        );
        assert!(store.is_revoked("s2").await.unwrap());
        assert!(!store.is_revoked("s3").await.unwrap());
    }

    /// Many more revocations than the store keeps in memory (`limit`): every
    /// one it accepted stays revoked, and any it refused is said so
    /// (`Full`), never silently dropped. Answers how many were refused.
    pub async fn revocations_past_the_memory_bound_stay_revoked(
        store: &dyn OneTimeStore,
        limit: usize,
    ) -> usize {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let n = limit * 3 + 7;
        let mut refused = Vec::new();
        for i in 0..n {
            let sid = format!("bound-{tag}-{i}");
            if store.revoke_session(&sid, 60_000).await.unwrap() == Revoked::Full {
                refused.push(sid);
            }
        }
        for i in 0..n {
            let sid = format!("bound-{tag}-{i}");
            if !refused.contains(&sid) {
                assert!(
                    store.is_revoked(&sid).await.unwrap(),
                    "revocation {i} of {n} was forgotten"
                );
            }
        }
        assert!(
            !store
                .is_revoked(&format!("bound-{tag}-none"))
                .await
                .unwrap()
        );
        refused.len()
    }

    pub async fn user_sessions_end_for_good(store: &dyn OneTimeStore) {
        assert_eq!(store.user_sessions_ended("u-1").await.unwrap(), None);
        store.end_user_sessions("u-1", 1_000, 60_000).await.unwrap();
        assert_eq!(store.user_sessions_ended("u-1").await.unwrap(), Some(1_000));
        // A later end moves it on; an earlier one (a replica that saw the
        // change late) does not move it back.
        store.end_user_sessions("u-1", 2_000, 60_000).await.unwrap();
        store.end_user_sessions("u-1", 1_500, 60_000).await.unwrap();
        assert_eq!(store.user_sessions_ended("u-1").await.unwrap(), Some(2_000));
        assert_eq!(store.user_sessions_ended("u-2").await.unwrap(), None);
    }

    /// How many attempts are counted on `key` now, read through the
    /// contract alone: a take under a limit of n is allowed only when fewer
    /// than n are counted, and the one probe that is allowed is given back.
    pub async fn attempts_counted(store: &dyn OneTimeStore, key: &str) -> u64 {
        for n in 1..=10_000 {
            if store.take_attempt(key, n, 60_000).await.unwrap() == Take::Allowed {
                store.release_attempt(key).await.unwrap();
                return n - 1;
            }
        }
        panic!("more than 10,000 attempts counted on {key}");
    }

    /// 64 racing takes against a limit of 5: exactly 5 allowed, the
    /// refusals carry the time to the reset, and a release frees one slot.
    pub async fn takes_are_atomic(store: std::sync::Arc<dyn OneTimeStore>) {
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.take_attempt("u:race", 5, 60_000).await.unwrap()
            }));
        }
        let mut allowed = 0;
        for t in tasks {
            match t.await.unwrap() {
                Take::Allowed => allowed += 1,
                Take::Refused { retry_in } => assert!(retry_in > 0 && retry_in <= 60_000),
            }
        }
        assert_eq!(allowed, 5);
        // Refusals were not counted: one release makes room for exactly one.
        assert_eq!(attempts_counted(&*store, "u:race").await, 5);
        store.release_attempt("u:race").await.unwrap();
        assert_eq!(attempts_counted(&*store, "u:race").await, 4);
        assert_eq!(
            store.take_attempt("u:race", 5, 60_000).await.unwrap(),
            Take::Allowed
        );
        assert!(matches!(
            store.take_attempt("u:race", 5, 60_000).await.unwrap(),
            Take::Refused { .. }
        ));
        // A release never goes below zero.
        store.release_attempt("u:none").await.unwrap();
        store.release_attempt("u:none").await.unwrap();
        assert_eq!(attempts_counted(&*store, "u:none").await, 0);
        assert_eq!(
            store.take_attempt("u:none", 1, 60_000).await.unwrap(),
            Take::Allowed
        );
        assert!(matches!(
            store.take_attempt("u:none", 1, 60_000).await.unwrap(),
            Take::Refused { .. }
        ));
        // A limit of zero allows nothing.
        assert!(matches!(
            store.take_attempt("u:zero", 0, 60_000).await.unwrap(),
            Take::Refused { .. }
        ));
    }

    /// The window starts at the first take and is not extended by later ones.
    pub async fn take_window_expires(store: &dyn OneTimeStore) {
        assert_eq!(
            store.take_attempt("u:w", 1, 150).await.unwrap(),
            Take::Allowed
        );
        tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        assert!(matches!(
            store.take_attempt("u:w", 1, 150).await.unwrap(),
            Take::Refused { retry_in } if retry_in <= 150
        ));
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        assert_eq!(
            store.take_attempt("u:w", 1, 150).await.unwrap(),
            Take::Allowed
        );
    }

    pub async fn entries_expire(store: &dyn OneTimeStore) {
        store
            .claim_refresh("s4", "old", fresh(), &record("n", 1), 50)
            .await
            .unwrap();
        assert_eq!(
            store.take_attempt("u:y", 1, 50).await.unwrap(),
            Take::Allowed
        );
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        assert_eq!(
            store
                .claim_refresh("s4", "old", fresh(), &record("m", 2), 50)
                .await
                .unwrap(),
            Claim::Won
        );
        assert_eq!(
            store.take_attempt("u:y", 1, 50).await.unwrap(),
            Take::Allowed
        );
    }
}
