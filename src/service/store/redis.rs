//! The Redis store: one-time state shared by every replica.
//!
//! Keys are hash-tagged by session (`{prefix}:{<sid>}:…`) so that one
//! session's keys live on one Redis Cluster shard. A refresh is claimed by a
//! Lua script (check-and-set in one step, never read-then-write).
//!
//! Revocations are also published on a channel. Each replica keeps what it
//! has learnt about a session in memory, kept current by that channel, so a
//! verify of a session it has already seen needs no round trip. When the
//! subscription drops, later checks go back to Redis; when it is back, every
//! cached answer is checked once more, since revocations may have been
//! missed in between.
//!
//! That memory is bounded: at most `--session-cache-size` live sessions and
//! `--max-cached-revocations` revocations (about 170 and 150 bytes each;
//! defaults 50,000 and 50,000, about 16 MiB in all). Redis holds every revocation;
//! one the cache has no room for is asked of Redis on each check, never
//! taken for live. While one has been left out, no cached "live" answer is
//! trusted (it might belong to that session); once expired entries make
//! room again, a new epoch makes every cached "live" answer checked again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::activity::redis_side;
use super::redis_conn::{RedisConn, RedisTls};
use super::redis_url::RedisTarget;
use super::registry::{LIST_SCRIPT, REGISTER_SCRIPT, REMOVE_ALL_SCRIPT, REMOVE_SCRIPT};
use super::{
    Activity, Attempts, Claim, DEFAULT_MAX_REVOCATIONS, IdleCheck, LimitAction, OneTimeStore,
    RefreshRecord, Registered, Revoked, SessionEntry, SessionLimit, StoreError, Take,
};
use crate::clock::Millis;

mod health;
use health::Guard;

/// Longest wait for one Redis command before answering STORE_UNAVAILABLE.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A session known to be live is re-checked after this long idle, which also
/// bounds the cache to the sessions seen recently.
const LIVE_ENTRY_TTL: Duration = Duration::from_secs(600);
/// How many sessions known to be live are kept, unless the service says
/// otherwise ([`RedisStore::with_live_session_limit`]).
pub const DEFAULT_LIVE_SESSIONS: usize = 50_000;

const FAILURE_SCRIPT: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"#;

/// A login attempt, taken before the password is checked: count it only
/// while under the limit (ARGV[1]); the window (ARGV[2] ms) starts with the
/// first. Returns {allowed (1/0), ms until the counter resets}.
static TAKE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = redis.call('PTTL', KEYS[1])
if n >= tonumber(ARGV[1]) then
  if ttl < 0 then ttl = tonumber(ARGV[2]) end
  return {0, ttl}
end
n = redis.call('INCR', KEYS[1])
if n == 1 or ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, redis.call('PTTL', KEYS[1])}
"#,
    )
});

/// Ends a user's sessions up to ARGV[1] (seconds), kept ARGV[2] ms; an
/// earlier end never replaces a later one.
static END_USER_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local v = tonumber(redis.call('GET', KEYS[1]) or '')
if v == nil or tonumber(ARGV[1]) >= v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
"#,
    )
});

/// Gives one taken attempt back, never below zero, keeping the window.
static RELEASE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return 0
"#,
    )
});

static REGISTER: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REGISTER_SCRIPT));
static LIST: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(LIST_SCRIPT));
static REMOVE: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REMOVE_SCRIPT));
static REMOVE_ALL: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REMOVE_ALL_SCRIPT));

fn entries(raw: Vec<String>) -> Result<Vec<SessionEntry>, StoreError> {
    raw.iter()
        .map(|v| {
            serde_json::from_str(v)
                .map_err(|e| StoreError::Corrupt(format!("session registry entry: {e}")))
        })
        .collect()
}

#[derive(Clone, Copy)]
struct Known {
    revoked: bool,
    epoch: u64,
    until: Instant,
}

struct Cache {
    /// Sharded, so that verifies on different cores do not queue on one lock.
    entries: DashMap<String, Known>,
    /// Past this many entries, a session seen live is not remembered: it is
    /// asked of Redis again next time.
    max_live: AtomicUsize,
    /// Past `max_live + max_revoked` entries, a revocation of a session not
    /// held is not remembered: Redis answers for it.
    max_revoked: AtomicUsize,
    /// How many revocations learnt from this replica or the channel were
    /// left out, and how many of them a sweep has since dealt with (by a
    /// new epoch): while they differ, cached "live" answers are not trusted.
    left_out: AtomicU64,
    dealt_with: AtomicU64,
    /// Bumped each time the subscription is (re)established.
    epoch: AtomicU64,
    subscribed: AtomicBool,
}

impl Cache {
    fn new(max_live: usize, max_revoked: usize) -> Cache {
        Cache {
            entries: DashMap::new(),
            max_live: AtomicUsize::new(max_live),
            max_revoked: AtomicUsize::new(max_revoked),
            left_out: AtomicU64::new(0),
            dealt_with: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
        }
    }

    fn capacity(&self) -> usize {
        self.max_live
            .load(Ordering::Relaxed)
            .saturating_add(self.max_revoked.load(Ordering::Relaxed))
    }

    /// A revocation is never downgraded by a later "live" answer. A session
    /// held already is always updated in place; a new one only while there
    /// is room. Answers whether it is held.
    fn mark_revoked(&self, sid: &str, ttl: Millis) -> bool {
        let revoked = Known {
            revoked: true,
            epoch: u64::MAX,
            until: Instant::now() + Duration::from_millis(ttl.max(0) as u64),
        };
        if let Some(mut held) = self.entries.get_mut(sid) {
            *held = revoked;
            return true;
        }
        if self.entries.len() >= self.capacity() {
            return false;
        }
        self.entries.insert(sid.to_string(), revoked);
        true
    }

    /// A revocation that just happened (here or on another replica): when
    /// it cannot be held, cached "live" answers stop being trusted, since
    /// one might be this session's, written by a check that raced it.
    fn learn_revocation(&self, sid: &str, ttl: Millis) {
        if !self.mark_revoked(sid, ttl) {
            self.left_out.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether cached "live" answers may be used.
    fn trusts_live(&self) -> bool {
        self.left_out.load(Ordering::SeqCst) == self.dealt_with.load(Ordering::SeqCst)
    }

    fn mark_live(&self, sid: &str, epoch: u64) {
        let live = Known {
            revoked: false,
            epoch,
            until: Instant::now() + LIVE_ENTRY_TTL,
        };
        // Bounded memory whatever the number of sessions: a full cache only
        // costs the sessions it cannot hold one Redis round trip each.
        if self.entries.len() >= self.max_live.load(Ordering::Relaxed)
            && !self.entries.contains_key(sid)
        {
            return;
        }
        // Check and write under the one shard lock of this entry.
        self.entries
            .entry(sid.to_string())
            .and_modify(|k| {
                if !(k.revoked && k.until > Instant::now()) {
                    *k = live;
                }
            })
            .or_insert(live);
    }

    /// Revocations held now, with the time each has left (ms).
    fn revoked_now(&self) -> Vec<(String, Millis)> {
        let now = Instant::now();
        self.entries
            .iter()
            .filter(|e| e.revoked && e.until > now)
            .map(|e| {
                (
                    e.key().clone(),
                    e.until.duration_since(now).as_millis() as Millis,
                )
            })
            .collect()
    }

    /// Drops lapsed entries. If revocations were left out and there is room
    /// again, a new epoch starts (every "live" answer cached so far is
    /// checked in Redis once more) and cached answers are trusted again.
    /// Only those left out before the new epoch are dealt with: a "live"
    /// answer of the new epoch was read from Redis after they were written
    /// there. One left out meanwhile waits for the next sweep.
    fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, k| k.until > now);
        let left_out = self.left_out.load(Ordering::SeqCst);
        if left_out != self.dealt_with.load(Ordering::SeqCst)
            && self.entries.len() < self.capacity()
        {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.dealt_with.store(left_out, Ordering::SeqCst);
        }
    }
}

pub struct RedisStore {
    conn: RedisConn,
    prefix: String,
    channel: String,
    target: String,
    cache: Arc<Cache>,
    guard: Arc<Guard>,
    claim: redis::Script,
    failure: redis::Script,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects lazily: the service starts (and reports not-ready) while
    /// Redis is away, and reconnects by itself. Needs a Tokio runtime.
    /// `url` is one server, Sentinels or Cluster seeds (see `redis_url`).
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
        let channel = format!("{prefix}:revocations");
        let guard = Arc::new(Guard::new());
        tokio::spawn(follow_revocations(
            conn.clone(),
            channel.clone(),
            Arc::downgrade(&cache),
            Arc::downgrade(&guard),
        ));
        let owned_prefix = prefix.to_string();
        tokio::spawn(health::watch(
            conn.clone(),
            format!("{prefix}:epoch"),
            move |sid| format!("{owned_prefix}:{{{sid}}}:revoked"),
            channel.clone(),
            Arc::downgrade(&cache),
            Arc::downgrade(&guard),
        ));
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
            channel,
            target: target.describe(),
            cache,
            guard,
            claim: redis::Script::new(health::CLAIM_SCRIPT),
            failure: redis::Script::new(FAILURE_SCRIPT),
        })
    }

    /// Keeps at most `n` sessions known to be live in memory (at least 1).
    pub fn with_live_session_limit(self, n: usize) -> RedisStore {
        self.cache.max_live.store(n.max(1), Ordering::Relaxed);
        self
    }

    /// Keeps at most `n` revocations in memory (at least 1); Redis answers
    /// for the others.
    pub fn with_revocation_limit(self, n: usize) -> RedisStore {
        self.cache.max_revoked.store(n.max(1), Ordering::Relaxed);
        self
    }

    fn session_key(&self, sid: &str, what: &str) -> String {
        format!("{}:{{{sid}}}:{what}", self.prefix)
    }

    /// A user's registry keys: the index and the prefix of its entries, all
    /// under one hash tag (one Redis Cluster slot). `user` is a digest.
    fn registry_keys(&self, user: &str) -> (String, String) {
        let base = format!("{}:{{reg-{user}}}", self.prefix);
        (format!("{base}:sessions"), format!("{base}:session:"))
    }

    /// A session's activity key and its registry keys, under the user's
    /// hash tag (see `activity.rs`).
    fn activity_keys(&self, a: &Activity) -> redis_side::Keys {
        let (index, entries) = self.registry_keys(&a.user);
        redis_side::Keys {
            activity: format!("{}:{{reg-{}}}:active:{}", self.prefix, a.user, a.sid),
            entry: format!("{entries}{}", a.sid),
            index,
        }
    }

    /// Throttle keys hash what came from outside (user names, addresses).
    fn failure_key(&self, key: &str) -> String {
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:failures:{hex}", self.prefix)
    }

    async fn run<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(StoreError::Unavailable(
                "Redis did not answer in time".into(),
            )),
        }
    }
}

/// Keeps the revocation cache current: subscribes, and after every
/// (re)subscription starts a new epoch so that answers cached while the
/// channel was silent are checked again. A subscription that hears no
/// heartbeat for [`health::STALE_AFTER`] is dropped and made again.
async fn follow_revocations(
    conn: RedisConn,
    channel: String,
    cache: std::sync::Weak<Cache>,
    guard: std::sync::Weak<Guard>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut sweep_at = Instant::now() + LIVE_ENTRY_TTL;
    loop {
        let Some(c) = cache.upgrade() else { return };
        let attempt = async {
            let mut pubsub = conn.pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(pubsub)) => {
                c.epoch.fetch_add(1, Ordering::SeqCst);
                c.subscribed.store(true, Ordering::SeqCst);
                if let Some(g) = guard.upgrade() {
                    g.heard_now();
                }
                tracing::info!("following session revocations");
                backoff = Duration::from_millis(100);
                drop(c);
                let mut messages = pubsub.into_on_message();
                let silence = Duration::from_millis(health::STALE_AFTER as u64);
                while let Ok(Some(msg)) = tokio::time::timeout(silence, messages.next()).await {
                    let Some(c) = cache.upgrade() else { return };
                    if let Some(g) = guard.upgrade() {
                        g.heard_now();
                    }
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if let Some((ttl, sid)) = payload.split_once(' ')
                        && let Ok(ttl) = ttl.parse::<Millis>()
                    {
                        c.learn_revocation(sid, ttl);
                    }
                    if Instant::now() > sweep_at {
                        c.sweep();
                        sweep_at = Instant::now() + LIVE_ENTRY_TTL;
                    }
                }
                if let Some(c) = cache.upgrade() {
                    c.subscribed.store(false, Ordering::SeqCst);
                }
                tracing::warn!(
                    "revocation channel lost; checking sessions in Redis until it is back"
                );
            }
            Ok(Err(e)) => {
                c.subscribed.store(false, Ordering::SeqCst);
                tracing::debug!(error = %e, "cannot subscribe to revocations yet");
            }
            Err(_) => {
                c.subscribed.store(false, Ordering::SeqCst);
                tracing::debug!("subscribing to revocations timed out");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[async_trait]
impl OneTimeStore for RedisStore {
    fn describe(&self) -> String {
        format!("Redis store at {} (prefix {})", self.target, self.prefix)
    }

    async fn claim_refresh(
        &self,
        sid: &str,
        jti: &str,
        issued_at: i64,
        record: &RefreshRecord,
        ttl: Millis,
    ) -> Result<Claim, StoreError> {
        health::claim(
            &self.conn,
            &self.claim,
            &format!("{}:epoch", self.prefix),
            &self.session_key(sid, &format!("refresh:{jti}")),
            &self.guard,
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
        set.arg(self.session_key(sid, "revoked"))
            .arg(1)
            .arg("PX")
            .arg(ttl);
        self.run(set.query_async::<()>(&mut conn)).await?;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(&self.channel).arg(format!("{ttl} {sid}"));
        self.run(publish.query_async::<()>(&mut conn)).await?;
        self.cache.learn_revocation(sid, ttl);
        Ok(Revoked::Session)
    }

    async fn is_revoked(&self, sid: &str) -> Result<bool, StoreError> {
        let epoch = self.cache.epoch.load(Ordering::SeqCst);
        let known = self.cache.entries.get(sid).map(|k| *k);
        if let Some(k) = known {
            let fresh = k.until > Instant::now();
            if fresh && k.revoked {
                return Ok(true);
            }
        }
        // A "live" answer is used only while no revocation was left out.
        let known = known.filter(|_| self.cache.trusts_live());
        if let Some(k) = known {
            let fresh = k.until > Instant::now();
            // Redis is away (the watch task's last check failed), so nobody
            // can revoke anything meanwhile: answer without waiting for it.
            if fresh && self.guard.away.load(Ordering::SeqCst) {
                return Ok(false);
            }
            if fresh
                && k.epoch == epoch
                && self.cache.subscribed.load(Ordering::SeqCst)
                && self.guard.subscription_fresh()
            {
                return Ok(false);
            }
        }
        let mut conn = self.conn.clone();
        let key = self.session_key(sid, "revoked");
        // PTTL: -2 when there is no revocation; its time left otherwise, so
        // that the revocation can be written back after a data loss.
        let answer: Result<Millis, StoreError> = self
            .run(redis::cmd("PTTL").arg(key).query_async(&mut conn))
            .await;
        match answer {
            Ok(left) if left != -2 => {
                let left = if left > 0 {
                    left
                } else {
                    LIVE_ENTRY_TTL.as_millis() as Millis
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
            Err(_) if known.is_some_and(|k| !k.revoked) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn end_user_sessions(&self, user: &str, at: i64, ttl: Millis) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = END_USER_SCRIPT.key(self.session_key(user, "sessions-ended"));
        inv.arg(at).arg(ttl.max(1));
        self.run(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    async fn user_sessions_ended(&self, user: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.session_key(user, "sessions-ended");
        let value: Option<String> = self
            .run(redis::cmd("GET").arg(key).query_async(&mut conn))
            .await?;
        match value {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .map(Some)
                .map_err(|_| StoreError::Corrupt(format!("user sessions end {v:?}"))),
        }
    }

    async fn failures(&self, key: &str) -> Result<Attempts, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.failure_key(key);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let (count, pttl): (Option<u64>, i64) = self.run(pipe.query_async(&mut conn)).await?;
        Ok(Attempts {
            count: count.unwrap_or(0),
            resets_in: pttl.max(0),
        })
    }

    async fn add_failure(&self, key: &str, window: Millis) -> Result<Attempts, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.failure.key(self.failure_key(key));
        inv.arg(window.max(1));
        let (count, pttl): (u64, i64) = self.run(inv.invoke_async(&mut conn)).await?;
        Ok(Attempts {
            count,
            resets_in: pttl.max(0),
        })
    }

    async fn clear_failures(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let key = self.failure_key(key);
        self.run(redis::cmd("DEL").arg(key).query_async::<()>(&mut conn))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.run(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
    }

    async fn take_attempt(
        &self,
        key: &str,
        limit: u64,
        window: Millis,
    ) -> Result<Take, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = TAKE_SCRIPT.key(self.failure_key(key));
        inv.arg(limit).arg(window.max(1));
        let (allowed, pttl): (u8, i64) = self.run(inv.invoke_async(&mut conn)).await?;
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
        let inv = RELEASE_SCRIPT.key(self.failure_key(key));
        self.run(inv.invoke_async::<i64>(&mut conn))
            .await
            .map(|_| ())
    }

    async fn register_session(
        &self,
        user: &str,
        entry: &SessionEntry,
        limit: SessionLimit,
        now: Millis,
    ) -> Result<Registered, StoreError> {
        let (index, prefix) = self.registry_keys(user);
        let json = serde_json::to_string(entry)
            .map_err(|e| StoreError::Corrupt(format!("session registry entry: {e}")))?;
        let mut conn = self.conn.clone();
        let mut inv = REGISTER.key(index);
        inv.arg(&entry.sid)
            .arg(json)
            .arg(entry.started)
            .arg((entry.ends - now).max(1))
            .arg(limit.max)
            .arg(u8::from(limit.action == LimitAction::RefuseNew))
            .arg(prefix);
        let answer: Vec<redis::Value> = self.run(inv.invoke_async(&mut conn)).await?;
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
        let (index, prefix) = self.registry_keys(user);
        let mut conn = self.conn.clone();
        let mut inv = LIST.key(index);
        inv.arg(prefix);
        let raw: Vec<String> = self.run(inv.invoke_async(&mut conn)).await?;
        // An entry's key expires at its end; one in its last millisecond
        // may still be read.
        Ok(entries(raw)?.into_iter().filter(|e| e.ends > now).collect())
    }

    async fn remove_session(
        &self,
        user: &str,
        sid: &str,
    ) -> Result<Option<SessionEntry>, StoreError> {
        let (index, prefix) = self.registry_keys(user);
        let mut conn = self.conn.clone();
        let mut inv = REMOVE.key(index);
        inv.arg(prefix).arg(sid);
        let raw: Vec<String> = self.run(inv.invoke_async(&mut conn)).await?;
        Ok(entries(raw)?.into_iter().next())
    }

    async fn remove_user_sessions(&self, user: &str) -> Result<Vec<SessionEntry>, StoreError> {
        let (index, prefix) = self.registry_keys(user);
        let mut conn = self.conn.clone();
        let mut inv = REMOVE_ALL.key(index);
        inv.arg(prefix);
        let raw: Vec<String> = self.run(inv.invoke_async(&mut conn)).await?;
        entries(raw)
    }

    async fn record_activity(&self, batch: &[Activity]) -> Result<(), StoreError> {
        redis_side::record(&self.conn, batch, |a| self.activity_keys(a)).await
    }

    async fn check_idle(
        &self,
        a: &Activity,
        floor: Millis,
        idle_before: Millis,
    ) -> Result<IdleCheck, StoreError> {
        redis_side::check(&self.conn, a, self.activity_keys(a), floor, idle_before).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_revocation_is_never_downgraded_to_live() {
        let c = Cache::new(DEFAULT_LIVE_SESSIONS, DEFAULT_MAX_REVOCATIONS);
        c.epoch.store(1, Ordering::SeqCst);
        c.subscribed.store(true, Ordering::SeqCst);
        c.mark_live("s1", 1);
        assert!(c.entries.get("s1").is_some_and(|k| !k.revoked));
        c.mark_revoked("s1", 60_000);
        c.mark_live("s1", 2);
        assert!(c.entries.get("s1").is_some_and(|k| k.revoked));
        // A lapsed revocation may become live again.
        c.mark_revoked("s2", 0);
        c.mark_live("s2", 2);
        assert!(
            c.entries
                .get("s2")
                .is_some_and(|k| !k.revoked && k.epoch == 2)
        );
        c.sweep();
        assert_eq!(c.entries.len(), 2);
    }

    #[test]
    fn live_sessions_are_bounded_and_revocations_have_room_of_their_own() {
        let c = Cache::new(2, 10);
        c.epoch.store(1, Ordering::SeqCst);
        c.subscribed.store(true, Ordering::SeqCst);
        c.mark_live("s1", 1);
        c.mark_live("s2", 1);
        c.mark_live("s3", 1);
        assert_eq!(c.entries.len(), 2);
        assert!(c.entries.get("s3").is_none());
        // A session already held is still brought up to date when full.
        c.mark_live("s1", 2);
        assert!(c.entries.get("s1").is_some_and(|k| k.epoch == 2));
        // A revocation is kept past the bound of live sessions.
        c.mark_revoked("s4", 60_000);
        assert!(c.entries.get("s4").is_some_and(|k| k.revoked));
        assert_eq!(c.entries.len(), 3);
        // Once entries lapse and are swept, new sessions fit again.
        c.mark_revoked("s1", 0);
        c.mark_revoked("s2", 0);
        c.sweep();
        assert_eq!(c.entries.len(), 1);
        c.mark_live("s5", 2);
        assert!(c.entries.get("s5").is_some_and(|k| !k.revoked));
    }

    /// However many revocations are heard, the cache holds at most its
    /// bound; one left out makes no cached "live" answer trusted until a
    /// sweep finds room again and starts a new epoch.
    #[test]
    fn revocations_are_bounded_and_one_left_out_distrusts_live_answers() {
        let c = Cache::new(10, 1_000);
        c.mark_live("live", 0);
        for i in 0..100_000 {
            c.learn_revocation(&format!("r{i}"), 60_000);
        }
        assert_eq!(c.entries.len(), 1_010);
        assert!(!c.trusts_live());
        // A session held already is revoked in place, whatever the bound.
        assert!(c.mark_revoked("live", 60_000));
        assert!(c.entries.get("live").is_some_and(|k| k.revoked));
        assert_eq!(c.entries.len(), 1_010);
        // Room again: a new epoch, and live answers are trusted again.
        let c = Cache::new(1, 1);
        c.mark_live("a", 0);
        c.learn_revocation("b", 0);
        c.learn_revocation("c", 60_000);
        assert!(!c.trusts_live());
        c.sweep();
        assert!(c.trusts_live());
        assert_eq!(c.epoch.load(Ordering::SeqCst), 1);
    }

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
        let started = Instant::now();
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
        crate::service::store::contract::failures_count_and_clear(&s).await;
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
