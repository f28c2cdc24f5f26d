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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};

use super::{Attempts, Claim, OneTimeStore, RefreshRecord, StoreError};
use crate::clock::Millis;

/// Longest wait for one Redis command before answering STORE_UNAVAILABLE.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// A session known to be live is re-checked after this long idle, which also
/// bounds the cache to the sessions seen recently.
const LIVE_ENTRY_TTL: Duration = Duration::from_secs(600);

const CLAIM_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"#;

const FAILURE_SCRIPT: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"#;

#[derive(Clone, Copy)]
struct Known {
    revoked: bool,
    epoch: u64,
    until: Instant,
}

struct Cache {
    /// Sharded, so that verifies on different cores do not queue on one lock.
    entries: DashMap<String, Known>,
    /// Bumped each time the subscription is (re)established.
    epoch: AtomicU64,
    subscribed: AtomicBool,
}

impl Cache {
    /// A revocation is never downgraded by a later "live" answer.
    fn mark_revoked(&self, sid: &str, ttl: Millis) {
        let until = Instant::now() + Duration::from_millis(ttl.max(0) as u64);
        self.entries.insert(
            sid.to_string(),
            Known {
                revoked: true,
                epoch: u64::MAX,
                until,
            },
        );
    }

    fn mark_live(&self, sid: &str, epoch: u64) {
        let live = Known {
            revoked: false,
            epoch,
            until: Instant::now() + LIVE_ENTRY_TTL,
        };
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

    fn sweep(&self) {
        let now = Instant::now();
        self.entries.retain(|_, k| k.until > now);
    }
}

pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    channel: String,
    target: String,
    cache: Arc<Cache>,
    claim: redis::Script,
    failure: redis::Script,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// The address without credentials, for logs.
fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://{host}")
        }
        None => "redis".into(),
    }
}

impl RedisStore {
    /// Connects lazily: the service starts (and reports not-ready) while
    /// Redis is away, and reconnects by itself. Needs a Tokio runtime.
    pub fn new(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            StoreError::Unavailable(format!("invalid Redis URL {}: {e}", redacted(url)))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        let cache = Arc::new(Cache {
            entries: DashMap::new(),
            epoch: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
        });
        let channel = format!("{prefix}:revocations");
        tokio::spawn(follow_revocations(
            client,
            channel.clone(),
            Arc::downgrade(&cache),
        ));
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
            channel,
            target: redacted(url),
            cache,
            claim: redis::Script::new(CLAIM_SCRIPT),
            failure: redis::Script::new(FAILURE_SCRIPT),
        })
    }

    fn session_key(&self, sid: &str, what: &str) -> String {
        format!("{}:{{{sid}}}:{what}", self.prefix)
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
/// channel was silent are checked again.
async fn follow_revocations(client: redis::Client, channel: String, cache: std::sync::Weak<Cache>) {
    let mut backoff = Duration::from_millis(100);
    let mut sweep_at = Instant::now() + LIVE_ENTRY_TTL;
    loop {
        let Some(c) = cache.upgrade() else { return };
        let attempt = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(pubsub)) => {
                c.epoch.fetch_add(1, Ordering::SeqCst);
                c.subscribed.store(true, Ordering::SeqCst);
                tracing::info!("following session revocations");
                backoff = Duration::from_millis(100);
                drop(c);
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Some(c) = cache.upgrade() else { return };
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if let Some((ttl, sid)) = payload.split_once(' ')
                        && let Ok(ttl) = ttl.parse::<Millis>()
                    {
                        c.mark_revoked(sid, ttl);
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
        record: &RefreshRecord,
        ttl: Millis,
    ) -> Result<Claim, StoreError> {
        let value =
            serde_json::to_string(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn.clone();
        let key = self.session_key(sid, &format!("refresh:{jti}"));
        let mut inv = self.claim.key(key);
        inv.arg(value).arg(ttl.max(1));
        let existing: Option<String> = self.run(inv.invoke_async(&mut conn)).await?;
        match existing {
            None => Ok(Claim::Won),
            Some(v) => serde_json::from_str(&v)
                .map(Claim::Lost)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }

    async fn revoke_session(&self, sid: &str, ttl: Millis) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let ttl = ttl.max(1);
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.session_key(sid, "revoked"))
            .arg(1)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("PUBLISH")
            .arg(&self.channel)
            .arg(format!("{ttl} {sid}"))
            .ignore();
        self.run(pipe.query_async::<()>(&mut conn)).await?;
        self.cache.mark_revoked(sid, ttl);
        Ok(())
    }

    async fn is_revoked(&self, sid: &str) -> Result<bool, StoreError> {
        let epoch = self.cache.epoch.load(Ordering::SeqCst);
        let known = self.cache.entries.get(sid).map(|k| *k);
        if let Some(k) = known {
            let fresh = k.until > Instant::now();
            if fresh && k.revoked {
                return Ok(true);
            }
            if fresh && k.epoch == epoch && self.cache.subscribed.load(Ordering::SeqCst) {
                return Ok(false);
            }
        }
        let mut conn = self.conn.clone();
        let key = self.session_key(sid, "revoked");
        let answer: Result<bool, StoreError> = self
            .run(redis::cmd("EXISTS").arg(key).query_async(&mut conn))
            .await;
        match answer {
            Ok(true) => {
                self.cache
                    .mark_revoked(sid, LIVE_ENTRY_TTL.as_millis() as Millis);
                Ok(true)
            }
            Ok(false) => {
                self.cache.mark_live(sid, epoch);
                Ok(false)
            }
            // Redis is away, so nobody can revoke anything meanwhile: a
            // session seen live before stays live (fail-static).
            Err(_) if known.is_some_and(|k| !k.revoked) => Ok(false),
            Err(e) => Err(e),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_the_log() {
        assert_eq!(
            redacted("redis://:s3cret@10.0.0.1:6379/0"),
            "redis://10.0.0.1:6379/0"
        );
        assert_eq!(redacted("rediss://user:pw@host"), "rediss://host");
        assert_eq!(redacted("garbage"), "redis");
    }

    #[test]
    fn a_cached_revocation_is_never_downgraded_to_live() {
        let c = Cache {
            entries: DashMap::new(),
            epoch: AtomicU64::new(1),
            subscribed: AtomicBool::new(true),
        };
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

    #[tokio::test]
    async fn bad_url_is_a_clear_error() {
        let err = RedisStore::new("http://nope", "p").err().unwrap();
        assert!(err.to_string().contains("invalid Redis URL"), "{err}");
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

    /// Runs the store contract against a real redis-server when the test
    /// harness provides one (`TOKENPOLICY_TEST_REDIS`).
    #[tokio::test]
    async fn redis_store_keeps_the_contract() {
        let Ok(url) = std::env::var("TOKENPOLICY_TEST_REDIS") else {
            eprintln!("TOKENPOLICY_TEST_REDIS not set; the Python suite covers Redis");
            return;
        };
        let prefix = format!("contract-{}", uuid::Uuid::new_v4());
        let s = RedisStore::new(&url, &prefix).unwrap();
        crate::service::store::contract::claim_is_once(&s).await;
        crate::service::store::contract::revocation_sticks(&s).await;
        crate::service::store::contract::failures_count_and_clear(&s).await;
        crate::service::store::contract::entries_expire(&s).await;
    }
}
