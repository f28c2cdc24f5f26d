//! The Redis store: one-time state shared by every replica.
//!
//! Keys are hash-tagged by session (`{prefix}:{<sid>}:…`) so that one
//! session's keys live on one Redis Cluster shard. A refresh is claimed by a
//! Lua script (check-and-set in one step, never read-then-write).
//!
//! Revocations are also published on a channel. Each replica keeps what it
//! has learnt about a session in memory, kept current by that channel
//! (`cache.rs`), so a verify of a session it has already seen needs no round
//! trip.
//!
//! That memory is bounded: at most `--session-cache-size` live sessions and
//! `--max-cached-revocations` revocations (about 170 and 150 bytes each;
//! defaults 50,000 and 50,000, about 16 MiB in all). Redis holds every revocation;
//! one the cache has no room for is asked of Redis on each check, never
//! taken for live. While one has been left out, no cached "live" answer is
//! trusted (it might belong to that session); once expired entries make
//! room again, a new epoch makes every cached "live" answer checked again.

//!
//! The parts: `url.rs` reads the Redis URL (one server, Sentinels, Cluster);
//! `conn.rs` dials it; `cache.rs` remembers sessions, `revocations.rs` keeps it current; `epoch.rs` notices data
//! loss and dead subscriptions; `claim.rs` is the once-only refresh claim;
//! `scripts.rs` holds every Lua script. Every key is built by [`Keys`] and
//! every command is bounded by [`timed`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use super::activity::redis_side;
use super::{
    Activity, Claim, DEFAULT_MAX_REVOCATIONS, IdleCheck, LimitAction, OneTimeStore, RefreshRecord,
    Registered, Revoked, SessionEntry, SessionLimit, StoreError, Take,
};
use crate::clock::Millis;

mod cache;
mod claim;
pub mod conn;
mod epoch;
mod lag;
mod owner;
mod provider;
mod revocations;
mod scripts;
pub mod url;

use cache::Cache;
use conn::RedisConn;
pub use conn::RedisTls;
use epoch::RedisHealth;
pub use lag::DEFAULT_MAX_REVOCATION_LAG;
use lag::Vouch;
use url::RedisTarget;

/// Longest wait for one Redis command before answering STORE_UNAVAILABLE.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How many sessions known to be live are kept, unless the service says
/// otherwise ([`RedisStore::with_live_session_limit`]).
pub const DEFAULT_LIVE_SESSIONS: usize = 50_000;

/// Every key and channel the store uses, under its prefix. A session's keys
/// share its hash tag (`{prefix}:{<sid>}:…`), a user's registry keys the
/// user's (`{prefix}:{reg-<user>}:…`): each lives on one Redis Cluster slot.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn session(&self, sid: &str, what: &str) -> String {
        format!("{}:{{{sid}}}:{what}", self.prefix)
    }

    fn revoked(&self, sid: &str) -> String {
        self.session(sid, "revoked")
    }

    fn refresh_marker(&self, sid: &str, jti: &str) -> String {
        self.session(sid, &format!("refresh:{jti}"))
    }

    /// Where the end of a user's sessions is kept (`user` is a digest).
    fn user_end(&self, user: &str) -> String {
        self.session(user, "sessions-ended")
    }

    /// Whose session `sid` is (see `owner.rs`).
    fn owner(&self, sid: &str) -> String {
        self.session(sid, "owner")
    }

    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:revocations", self.prefix)
    }

    /// A user's registry keys: the index and the prefix of its entries, all
    /// under one hash tag (one Redis Cluster slot). `user` is a digest.
    fn registry(&self, user: &str) -> (String, String) {
        let base = format!("{}:{{reg-{user}}}", self.prefix);
        (format!("{base}:sessions"), format!("{base}:session:"))
    }

    /// A session's activity key and its registry keys, under the user's
    /// hash tag (see `activity.rs`).
    fn activity(&self, a: &Activity) -> redis_side::Keys {
        let (index, entries) = self.registry(&a.user);
        redis_side::Keys {
            activity: format!("{}:{{reg-{}}}:active:{}", self.prefix, a.user, a.sid),
            entry: format!("{entries}{}", a.sid),
            index,
        }
    }

    /// Login attempt counters hash what came from outside (user names,
    /// addresses).
    fn attempts(&self, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:failures:{hex}", self.prefix)
    }
}

fn entries(raw: Vec<String>) -> Result<Vec<SessionEntry>, StoreError> {
    raw.iter()
        .map(|v| {
            serde_json::from_str(v)
                .map_err(|e| StoreError::Corrupt(format!("session registry entry: {e}")))
        })
        .collect()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Runs one Redis command, pipeline or script within [`COMMAND_TIMEOUT`]:
/// a Redis that does not answer is STORE_UNAVAILABLE, never a hang.
async fn timed<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(StoreError::Unavailable(
            "Redis did not answer in time".into(),
        )),
    }
}

pub struct RedisStore {
    conn: RedisConn,
    keys: Keys,
    target: String,
    cache: Arc<Cache>,
    health: Arc<RedisHealth>,
}

impl RedisStore {
    /// Connects lazily: the service starts (and reports not-ready) while
    /// Redis is away, and reconnects by itself. Needs a Tokio runtime.
    /// `url` is one server, Sentinels or Cluster seeds (see `url.rs`).
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        RedisStore::with_tls(url, prefix, &RedisTls::default())
    }

    /// [`RedisStore::new`] with the certificates a `rediss` target is
    /// dialled with: refused for a target without TLS, which would ignore them.
    pub fn with_tls(url: &str, prefix: &str, tls: &RedisTls) -> Result<RedisStore, StoreError> {
        let target = RedisTarget::parse(url).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if tls.is_set() && !target.is_tls() {
            return Err(StoreError::Unavailable(format!(
                "Redis {} is not TLS: certificates (--redis-ca-file, --redis-client-cert) \
                 need a rediss:// URL (rediss+sentinel://, rediss+cluster://)",
                target.describe()
            )));
        }
        let conn = RedisConn::new(&target, tls).map_err(|e| {
            StoreError::Unavailable(format!("cannot use Redis {}: {e}", target.describe()))
        })?;
        let cache = Arc::new(Cache::new(DEFAULT_LIVE_SESSIONS, DEFAULT_MAX_REVOCATIONS));
        let keys = Keys {
            prefix: prefix.to_string(),
        };
        let health = Arc::new(RedisHealth::new());
        tokio::spawn(revocations::follow(
            conn.clone(),
            keys.channel(),
            Arc::downgrade(&cache),
            Arc::downgrade(&health),
        ));
        tokio::spawn(epoch::watch(
            conn.clone(),
            keys.clone(),
            Arc::downgrade(&cache),
            Arc::downgrade(&health),
        ));
        Ok(RedisStore {
            conn,
            keys,
            target: target.describe(),
            cache,
            health,
        })
    }

    /// Keeps at most `n` sessions known to be live in memory (at least 1).
    pub fn with_live_session_limit(self, n: usize) -> RedisStore {
        self.cache.max_live.store(n.max(1), Ordering::Relaxed);
        self
    }

    /// Vouches for sessions from memory for at most `lag` after Redis was
    /// last heard (`--max-revocation-lag`, see `lag.rs`).
    pub fn with_max_revocation_lag(self, lag: Duration) -> RedisStore {
        self.health.contact.set_max_lag(lag);
        self
    }

    /// Keeps at most `n` revocations in memory (at least 1); Redis answers
    /// for the others.
    pub fn with_revocation_limit(self, n: usize) -> RedisStore {
        self.cache.max_revoked.store(n.max(1), Ordering::Relaxed);
        self
    }
}

impl RedisStore {
    /// Why a session held as live is no longer vouched for.
    fn past_the_lag(&self) -> StoreError {
        StoreError::Unavailable(format!(
            "Redis not heard for over {}s (--max-revocation-lag): sessions are not vouched \
             for from memory",
            self.health.contact.max_lag().as_secs()
        ))
    }
}

#[async_trait]
impl OneTimeStore for RedisStore {
    fn describe(&self) -> String {
        format!(
            "Redis store at {} (prefix {})",
            self.target, self.keys.prefix
        )
    }

    async fn claim_refresh(
        &self,
        sid: &str,
        jti: &str,
        issued_at: i64,
        record: &RefreshRecord,
        ttl: Millis,
    ) -> Result<Claim, StoreError> {
        claim::claim(
            &self.conn,
            &self.keys.epoch(),
            &self.keys.refresh_marker(sid, jti),
            &self.health,
            issued_at,
            record,
            ttl,
        )
        .await
    }

    fn note_issued(&self, sid: &str) {
        self.cache
            .mark_live(sid, self.cache.epoch.load(Ordering::SeqCst));
    }

    async fn revoke_session(&self, sid: &str, ttl: Millis) -> Result<Revoked, StoreError> {
        let mut conn = self.conn.clone();
        let ttl = ttl.max(1);
        // Two commands, not one pipeline: in a Redis Cluster the key and
        // the channel belong to different slots.
        let mut set = redis::cmd("SET");
        set.arg(self.keys.revoked(sid)).arg(1).arg("PX").arg(ttl);
        timed(set.query_async::<()>(&mut conn)).await?;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.keys.channel()).arg(format!("{ttl} {sid}"));
        timed(publish.query_async::<()>(&mut conn)).await?;
        self.cache.learn_revocation(sid, ttl);
        Ok(Revoked::Session)
    }

    async fn is_revoked(&self, sid: &str) -> Result<bool, StoreError> {
        let epoch = self.cache.epoch.load(Ordering::SeqCst);
        let known = self.cache.entries.get(sid).map(|k| *k);
        if let Some(k) = known {
            let fresh = k.until > std::time::Instant::now();
            if fresh && k.revoked {
                return Ok(true);
            }
        }
        // A "live" answer is used only while no revocation was left out.
        let known = known.filter(|_| self.cache.trusts_live());
        let vouch = self.health.contact.vouch();
        if let Some(k) = known {
            let fresh = k.until > std::time::Instant::now();
            // Redis is away (the watch task's last check failed), so nobody
            // can revoke anything meanwhile: answer without waiting for it,
            // for as long as the revocation lag allows.
            if fresh && self.health.away.load(Ordering::SeqCst) {
                match vouch {
                    Vouch::Static => return Ok(false),
                    Vouch::Refuse => return Err(self.past_the_lag()),
                    Vouch::Heard => {}
                }
            }
            if fresh
                && k.epoch == epoch
                && self.cache.subscribed.load(Ordering::SeqCst)
                && self.health.subscription_fresh()
            {
                return Ok(false);
            }
        }
        let mut conn = self.conn.clone();
        let key = self.keys.revoked(sid);
        // PTTL: -2 when there is no revocation; its time left otherwise, so
        // that the revocation can be written back after a data loss.
        let answer: Result<Millis, StoreError> =
            timed(redis::cmd("PTTL").arg(key).query_async(&mut conn)).await;
        if answer.is_ok() {
            self.health.contact.heard(&self.cache);
        }
        match answer {
            Ok(left) if left != -2 => {
                let left = if left > 0 {
                    left
                } else {
                    cache::LIVE_ENTRY_TTL.as_millis() as Millis
                };
                self.cache.mark_revoked(sid, left);
                Ok(true)
            }
            Ok(_) => {
                self.cache.mark_live(sid, epoch);
                Ok(false)
            }
            // Redis is away, so nobody can revoke anything meanwhile: a
            // session seen live before stays live (fail-static).
            Err(_) if known.is_some_and(|k| !k.revoked) => match vouch {
                Vouch::Refuse => Err(self.past_the_lag()),
                Vouch::Heard | Vouch::Static => Ok(false),
            },
            Err(e) => Err(e),
        }
    }

    async fn end_user_sessions(&self, user: &str, at: i64, ttl: Millis) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = scripts::END_USER.key(self.keys.user_end(user));
        inv.arg(at).arg(ttl.max(1));
        timed(inv.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn user_sessions_ended(&self, user: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.keys.user_end(user);
        let value: Option<String> =
            timed(redis::cmd("GET").arg(key).query_async(&mut conn)).await?;
        match value {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .map(Some)
                .map_err(|_| StoreError::Corrupt(format!("user sessions end {v:?}"))),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        timed(redis::cmd("PING").query_async::<()>(&mut conn)).await
    }

    async fn take_attempt(
        &self,
        key: &str,
        limit: u64,
        window: Millis,
    ) -> Result<Take, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = scripts::TAKE_ATTEMPT.key(self.keys.attempts(key));
        inv.arg(limit).arg(window.max(1));
        let (allowed, pttl): (u8, i64) = timed(inv.invoke_async(&mut conn)).await?;
        Ok(if allowed == 1 {
            Take::Allowed
        } else {
            Take::Refused {
                retry_in: pttl.max(1),
            }
        })
    }

    async fn release_attempt(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let inv = scripts::RELEASE_ATTEMPT.key(self.keys.attempts(key));
        timed(inv.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn register_session(
        &self,
        user: &str,
        entry: &SessionEntry,
        limit: SessionLimit,
        now: Millis,
    ) -> Result<Registered, StoreError> {
        let (index, prefix) = self.keys.registry(user);
        let json = serde_json::to_string(entry)
            .map_err(|e| StoreError::Corrupt(format!("session registry entry: {e}")))?;
        let mut conn = self.conn.clone();
        let mut inv = scripts::REGISTER.key(index);
        inv.arg(&entry.sid)
            .arg(json)
            .arg(entry.started)
            .arg((entry.ends - now).max(1))
            .arg(limit.max)
            .arg(u8::from(limit.action == LimitAction::RefuseNew))
            .arg(prefix);
        let answer: Vec<redis::Value> = timed(inv.invoke_async(&mut conn)).await?;
        let mut answer = answer.into_iter();
        let accepted: i64 = match answer.next() {
            Some(v) => redis::from_redis_value(v).map_err(unavailable)?,
            None => return Err(StoreError::Corrupt("empty registry answer".into())),
        };
        if accepted == 0 {
            return Ok(Registered::Refused);
        }
        let rest: Vec<String> = answer
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(unavailable)?;
        Ok(Registered::Added {
            evicted: entries(rest)?,
        })
    }

    async fn list_sessions(
        &self,
        user: &str,
        now: Millis,
    ) -> Result<Vec<SessionEntry>, StoreError> {
        let (index, prefix) = self.keys.registry(user);
        let mut conn = self.conn.clone();
        let mut inv = scripts::LIST.key(index);
        inv.arg(prefix);
        let raw: Vec<String> = timed(inv.invoke_async(&mut conn)).await?;
        // An entry's key expires at its end; one in its last millisecond
        // may still be read.
        Ok(entries(raw)?.into_iter().filter(|e| e.ends > now).collect())
    }

    async fn remove_session(
        &self,
        user: &str,
        sid: &str,
    ) -> Result<Option<SessionEntry>, StoreError> {
        let (index, prefix) = self.keys.registry(user);
        let mut conn = self.conn.clone();
        let mut inv = scripts::REMOVE.key(index);
        inv.arg(prefix).arg(sid);
        let raw: Vec<String> = timed(inv.invoke_async(&mut conn)).await?;
        Ok(entries(raw)?.into_iter().next())
    }

    async fn remove_user_sessions(&self, user: &str) -> Result<Vec<SessionEntry>, StoreError> {
        let (index, prefix) = self.keys.registry(user);
        let mut conn = self.conn.clone();
        let mut inv = scripts::REMOVE_ALL.key(index);
        inv.arg(prefix);
        let raw: Vec<String> = timed(inv.invoke_async(&mut conn)).await?;
        entries(raw)
    }

    async fn set_session_owner(
        &self,
        sid: &str,
        owner: &str,
        ttl: Millis,
    ) -> Result<(), StoreError> {
        owner::set(&self.conn, &self.keys.owner(sid), owner, ttl).await
    }

    async fn session_owner(&self, sid: &str) -> Result<Option<String>, StoreError> {
        owner::get(&self.conn, &self.keys.owner(sid)).await
    }

    async fn record_activity(&self, batch: &[Activity]) -> Result<(), StoreError> {
        redis_side::record(&self.conn, batch, |a| self.keys.activity(a)).await
    }

    async fn check_idle(
        &self,
        a: &Activity,
        floor: Millis,
        idle_before: Millis,
    ) -> Result<IdleCheck, StoreError> {
        redis_side::check(&self.conn, a, self.keys.activity(a), floor, idle_before).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a revocation left out of memory, a session cached as live is
    /// no longer vouched for while Redis is away: it might be that one.
    #[tokio::test]
    async fn a_left_out_revocation_is_never_answered_as_live() {
        let s = RedisStore::new("redis://127.0.0.1:1/", "p")
            .unwrap()
            .with_live_session_limit(1)
            .with_revocation_limit(1);
        s.note_issued("a");
        // Room for one more; the next revocation (it might be of "a", heard
        // while a check of "a" raced it) finds none.
        s.cache.learn_revocation("x", 60_000);
        s.cache.learn_revocation("y", 60_000);
        assert_eq!(s.cache.entries.len(), 2);
        assert!(matches!(
            s.is_revoked("a").await,
            Err(StoreError::Unavailable(_))
        ));
    }

    /// A replica cut off from Redis vouches for a session it saw live for
    /// at most the revocation lag after Redis was last heard; past it, the
    /// session is unavailable (503), never revoked (401).
    #[tokio::test]
    async fn a_session_seen_live_is_vouched_for_up_to_the_lag_and_not_after() {
        // Port 1 on loopback refuses connections: Redis is away.
        let s = RedisStore::new("redis://127.0.0.1:1/", "p")
            .unwrap()
            .with_max_revocation_lag(Duration::from_secs(10));
        s.note_issued("a");
        s.health.away.store(true, Ordering::SeqCst);
        // Silent for 5 s: within the bound, answered from memory.
        s.health.contact.heard_ago(Duration::from_secs(5));
        assert!(!s.is_revoked("a").await.unwrap());
        // Silent for 11 s: past it.
        s.health.contact.heard_ago(Duration::from_secs(11));
        let err = s.is_revoked("a").await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("--max-revocation-lag"), "{err}");
        // Also when the watch task has not yet noticed that Redis is away
        // and the check goes to Redis (refused) first.
        s.health.away.store(false, Ordering::SeqCst);
        assert!(matches!(
            s.is_revoked("a").await,
            Err(StoreError::Unavailable(_))
        ));
        s.health.contact.heard_ago(Duration::from_secs(5));
        assert!(!s.is_revoked("a").await.unwrap());
        // A revocation held in memory stays a revocation, whatever the lag.
        s.cache.learn_revocation("r", 60_000);
        s.health.contact.heard_ago(Duration::from_secs(60));
        assert!(s.is_revoked("r").await.unwrap());
    }

    #[tokio::test]
    async fn bad_url_is_a_clear_error() {
        let err = RedisStore::new("http://nope", "p").err().unwrap();
        assert!(err.to_string().contains("invalid Redis URL"), "{err}");
    }

    #[tokio::test]
    async fn certificates_need_a_tls_url() {
        let tls = RedisTls {
            ca: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            client: None,
        };
        for url in [
            "redis://127.0.0.1:1/",
            "redis+sentinel://127.0.0.1:1/m",
            "redis+cluster://127.0.0.1:1",
        ] {
            let err = RedisStore::with_tls(url, "p", &tls).err().unwrap();
            assert!(err.to_string().contains("need a rediss:// URL"), "{err}");
        }
        assert!(RedisStore::with_tls("redis://127.0.0.1:1/", "p", &RedisTls::default()).is_ok());
    }

    #[tokio::test]
    async fn unreachable_redis_is_unavailable_not_a_hang() {
        // Port 1 on loopback refuses connections.
        let s = RedisStore::new("redis://127.0.0.1:1/", "p").unwrap();
        let started = std::time::Instant::now();
        assert!(matches!(s.ping().await, Err(StoreError::Unavailable(_))));
        assert!(matches!(
            s.is_revoked("x").await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Runs the store contract against a real redis-server, which the test
    /// harness starts (`TOKENPOLICY_TEST_REDIS`; tests/run.sh runs this
    /// test explicitly). Without one it fails: it never passes untested.
    #[tokio::test]
    #[ignore = "needs a redis-server in TOKENPOLICY_TEST_REDIS; tests/run.sh runs it"]
    async fn redis_store_keeps_the_contract() {
        let url = std::env::var("TOKENPOLICY_TEST_REDIS")
            .expect("TOKENPOLICY_TEST_REDIS names the redis-server to test against");
        let prefix = format!("contract-{}", uuid::Uuid::new_v4());
        let s = RedisStore::new(&url, &prefix).unwrap();
        crate::service::store::contract::claim_is_once(&s).await;
        crate::service::store::contract::revocation_sticks(&s).await;
        crate::service::store::contract::user_sessions_end_for_good(&s).await;
        crate::service::store::contract::entries_expire(&s).await;
        crate::service::store::contract::take_window_expires(&s).await;
        let other = format!("contract-{}", uuid::Uuid::new_v4());
        let fresh = std::sync::Arc::new(RedisStore::new(&url, &other).unwrap());
        crate::service::store::contract::takes_are_atomic(fresh).await;
        // Past the memory bound Redis answers, and every revocation holds.
        let small = RedisStore::new(&url, &format!("contract-{}", uuid::Uuid::new_v4()))
            .unwrap()
            .with_live_session_limit(1)
            .with_revocation_limit(20);
        let refused =
            crate::service::store::contract::revocations_past_the_memory_bound_stay_revoked(
                &small, 20,
            )
            .await;
        assert_eq!(refused, 0);
        assert!(small.cache.entries.len() <= 21);
        use crate::service::store::registry::contract as registry;
        registry::sessions_are_listed_and_removed(&s, "u-list").await;
        registry::owners_expire_with_their_session(&s, "owner").await;
        registry::the_limit_evicts_the_oldest_or_refuses(&s, "u-limit").await;
        registry::ended_sessions_are_not_listed(&s, "u-end").await;
        let racing = std::sync::Arc::new(RedisStore::new(&url, &prefix).unwrap());
        registry::the_limit_holds_under_a_race(racing, "u-race").await;
        crate::service::store::activity::contract::activity_is_recorded_and_idle_ends_for_good(
            &s, "u-idle",
        )
        .await;
    }

    /// 10,000 sessions that have ended leave no key behind in Redis: every
    /// entry expires at its session's end, and each user's index with the
    /// last of them. Needs a redis-server, as above.
    #[tokio::test]
    #[ignore = "needs a redis-server in TOKENPOLICY_TEST_REDIS; tests/run.sh runs it"]
    async fn redis_registry_leaves_no_key_after_sessions_end() {
        let url = std::env::var("TOKENPOLICY_TEST_REDIS")
            .expect("TOKENPOLICY_TEST_REDIS names the redis-server to test against");
        let prefix = format!("registry-{}", uuid::Uuid::new_v4().simple());
        let s = RedisStore::new(&url, &prefix).unwrap();
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let count = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            let pattern = format!("{prefix}:{{reg-*");
            async move {
                let mut n = 0usize;
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1_000)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    n += keys.len();
                    if next == 0 {
                        return n;
                    }
                    cursor = next;
                }
            }
        };
        let t = crate::clock::now_millis();
        s.register_session(
            "probe",
            &crate::service::store::registry::contract::entry("p", t, t + 60_000),
            SessionLimit::default(),
            t,
        )
        .await
        .unwrap();
        assert_eq!(count(&mut conn).await, 2, "an entry and its user's index");
        s.remove_user_sessions("probe").await.unwrap();
        crate::service::store::registry::contract::record_expiring_sessions(&s, "exp", 10_000)
            .await;
        // Redis reclaims expired keys by itself, a little at a time.
        let mut left = count(&mut conn).await;
        for _ in 0..50 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = count(&mut conn).await;
        }
        assert_eq!(left, 0, "keys left after every session ended");
    }
}
