//! How the Redis store stays safe when Redis misbehaves.
//!
//! * **Data loss** (restart without persistence, failover to an empty
//!   replica, `FLUSHALL`): an epoch key, `{prefix}:epoch` =
//!   `<random>:<ms on the Redis clock>`, is written when the store is first
//!   used. Every refresh claim checks it inside its script, and a watch task
//!   reads it four times a second. A missing or different epoch means the
//!   refresh markers and revocations written before are gone: a new epoch is
//!   started, tokens issued before it can no longer be refreshed, and every
//!   revocation this replica still holds in memory is written and published
//!   again.
//! * **A dead subscription**: every replica publishes a heartbeat on the
//!   revocation channel; a subscription that hears nothing for
//!   [`STALE_AFTER`] no longer vouches for cached answers (each verify asks
//!   Redis again) and is rebuilt.
//! * **A claim applied late** (Redis paused, then resumed): the claim script
//!   refuses to run past a deadline on the Redis clock, and the grace of a
//!   claim starts when the script ran, on the Redis clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::RedisConn;

use super::{COMMAND_TIMEOUT, Cache, unavailable};
use crate::clock::{Millis, now_millis};
use crate::service::store::redis_conn::RESPONSE_TIMEOUT;
use crate::service::store::{Claim, RefreshRecord, StoreError};

/// How often the watch task checks the epoch and publishes a heartbeat.
pub(super) const BEAT: Duration = Duration::from_millis(250);
/// A subscription silent for this long is treated as lost.
pub(super) const STALE_AFTER: Millis = 1_000;
/// Heartbeat payload prefix on the revocation channel (revocations start
/// with a number, so older replicas ignore heartbeats).
pub(super) const HEARTBEAT: &str = "hb";
/// A claim must run on Redis this much before the caller gives up on it, so
/// that a claim the caller reported as failed is not applied afterwards.
const CLAIM_MARGIN: Millis = 200;
/// The soonest a caller gives up on a command: the connection's own
/// response timeout or the store's bound, whichever is shorter.
const GIVES_UP_AFTER: Millis = {
    let (conn, store) = (RESPONSE_TIMEOUT.as_millis(), COMMAND_TIMEOUT.as_millis());
    (if conn < store { conn } else { store }) as Millis
};

/// The last moment (Redis clock) a claim sent at `sent` (replica clock)
/// may run: before its caller can have answered STORE_UNAVAILABLE.
fn claim_deadline(sent: Millis, offset: Millis) -> Millis {
    sent + offset + GIVES_UP_AFTER - CLAIM_MARGIN
}
/// Creates the epoch if it is missing; returns it and the Redis clock.
pub(super) const EPOCH_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = redis.call('GET', KEYS[1])
if not e then
  e = ARGV[1] .. ':' .. string.format('%d', now)
  redis.call('SET', KEYS[1], e)
end
return {e, string.format('%d', now)}
"#;

/// KEYS: marker, epoch. ARGV: the record's JSON up to its `at` value
/// ([`record_head`]), ttl ms, expected epoch, deadline (ms, Redis clock). The
/// script appends `at`, the Redis clock at the moment of the claim, and the
/// closing brace: no JSON decoding or encoding inside Redis. On a Redis Cluster the epoch key lives on another
/// shard than the session's keys, and a script may touch one shard only:
/// there the script gets the marker alone, and the epoch is checked by
/// [`watch`] (every [`BEAT`]) instead of inside the claim.
pub(super) const CLAIM_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if KEYS[2] then
  local e = redis.call('GET', KEYS[2])
  if e ~= ARGV[3] then return {'epoch', e or '', string.format('%d', now)} end
end
if now > tonumber(ARGV[4]) then return {'late', '', string.format('%d', now)} end
local v = redis.call('GET', KEYS[1])
if v then return {'lost', v, string.format('%d', now)} end
redis.call('SET', KEYS[1], ARGV[1] .. string.format('%d', now) .. '}', 'PX', ARGV[2])
return {'won', '', string.format('%d', now)}
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Epoch {
    /// The whole value of the epoch key.
    pub id: String,
    /// When it started, on the Redis clock (ms).
    pub start: Millis,
}

impl Epoch {
    pub fn parse(v: &str) -> Option<Epoch> {
        let (_, start) = v.rsplit_once(':')?;
        Some(Epoch {
            id: v.to_string(),
            start: start.parse().ok()?,
        })
    }

    /// Whether a token issued at `iat` (s, replica clock) was issued in a
    /// second before the one this epoch started in; `offset` is the Redis
    /// clock minus the replica clock. Every claim of the old epoch ran
    /// before the data was lost, hence before the new epoch started, so a
    /// token refreshed then has an earlier `iat`. (A token issued and
    /// refreshed within the very second of the loss is not told apart.)
    pub fn predates(&self, iat: i64, offset: Millis) -> bool {
        iat < (self.start - offset).div_euclid(1_000)
    }
}

/// What the store knows about Redis's health.
pub(super) struct Guard {
    pub epoch: Mutex<Option<Epoch>>,
    /// Redis clock minus this replica's clock (ms), last measured.
    pub offset: AtomicI64,
    /// When the subscription last heard anything (replica clock, ms).
    pub heard: AtomicI64,
    /// Random tag of this replica's new epochs and heartbeats.
    pub nonce: String,
    /// The last epoch check failed: Redis is away.
    pub away: std::sync::atomic::AtomicBool,
}

impl Guard {
    pub fn new() -> Guard {
        Guard {
            epoch: Mutex::new(None),
            offset: AtomicI64::new(0),
            heard: AtomicI64::new(0),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            away: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn current(&self) -> Option<Epoch> {
        self.epoch.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn heard_now(&self) {
        self.heard.store(now_millis(), Ordering::SeqCst);
    }

    /// Whether the subscription heard a heartbeat recently enough to vouch
    /// for cached answers.
    pub fn subscription_fresh(&self) -> bool {
        now_millis().saturating_sub(self.heard.load(Ordering::SeqCst)) < STALE_AFTER
    }

    /// Records the epoch read from Redis; true when it replaced another
    /// (the data behind the old one is gone).
    fn learn(&self, e: Epoch) -> bool {
        let mut cur = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        let changed = cur.as_ref().is_some_and(|c| c.id != e.id);
        *cur = Some(e);
        changed
    }
}

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

/// Reads (or starts) the epoch and measures the clock offset. Returns the
/// epoch and whether it replaced a known one.
pub(super) async fn refresh_epoch(
    conn: &RedisConn,
    key: &str,
    guard: &Guard,
) -> Result<(Epoch, bool), StoreError> {
    let mut conn = conn.clone();
    let sent = now_millis();
    let script = redis::Script::new(EPOCH_SCRIPT);
    let mut inv = script.key(key);
    inv.arg(&guard.nonce);
    let (value, now): (String, String) = timed(inv.invoke_async(&mut conn)).await?;
    let received = now_millis();
    if let Ok(now) = now.parse::<Millis>() {
        guard
            .offset
            .store(now - (sent + received) / 2, Ordering::SeqCst);
    }
    let epoch = Epoch::parse(&value)
        .ok_or_else(|| StoreError::Corrupt(format!("unreadable epoch key {key}")))?;
    let changed = guard.learn(epoch.clone());
    Ok((epoch, changed))
}

/// The claim of rule 7 with the data-loss and lateness checks above.
/// `issued_at` is the `iat` of the token being refreshed.
#[allow(clippy::too_many_arguments)]
pub(super) async fn claim(
    conn: &RedisConn,
    script: &redis::Script,
    epoch_key: &str,
    marker_key: &str,
    guard: &Guard,
    issued_at: i64,
    record: &RefreshRecord,
    ttl: Millis,
) -> Result<Claim, StoreError> {
    let value = record_head(record)?;
    for _ in 0..2 {
        let epoch = match guard.current() {
            Some(e) => e,
            None => refresh_epoch(conn, epoch_key, guard).await?.0,
        };
        let offset = guard.offset.load(Ordering::SeqCst);
        if epoch.predates(issued_at, offset) {
            return Ok(Claim::Forgotten);
        }
        let sent = now_millis();
        let deadline = claim_deadline(sent, offset);
        let mut inv = script.key(marker_key);
        if !conn.is_cluster() {
            inv.key(epoch_key);
        }
        inv.arg(&value).arg(ttl.max(1)).arg(&epoch.id).arg(deadline);
        let mut c = conn.clone();
        let (outcome, found, _store_now): (String, String, String) =
            timed(inv.invoke_async(&mut c)).await?;
        match outcome.as_str() {
            "won" => return Ok(Claim::Won),
            "lost" => {
                let mut first: RefreshRecord =
                    serde_json::from_str(&found).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                // When the first claim ran, on our clock: the caller measures
                // the grace from it to when its own request arrived, so
                // requests that arrived together share the new token however
                // long Redis took to run their claims.
                first.at -= offset;
                return Ok(Claim::Lost(first));
            }
            "late" => {
                return Err(StoreError::Unavailable(
                    "Redis ran the claim too late; not applied".into(),
                ));
            }
            _ => {
                // The epoch changed under us: learn the new one and decide again.
                refresh_epoch(conn, epoch_key, guard).await?;
            }
        }
    }
    Err(StoreError::Unavailable(
        "the store's epoch keeps changing".into(),
    ))
}

/// The JSON of `record` without its `at` value and closing brace, which the
/// claim script appends: the marker it stores is `record` as serde writes it,
/// with Redis's clock for `at`.
fn record_head(record: &RefreshRecord) -> Result<String, StoreError> {
    let jti = serde_json::to_string(&record.jti).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(format!(
        r#"{{"jti":{jti},"iat":{},"exp":{},"at":"#,
        record.iat, record.exp
    ))
}

/// Every [`BEAT`]: checks the epoch (data loss), publishes a heartbeat for
/// the subscriptions of every replica, and after a data loss writes back the
/// revocations this replica holds.
pub(super) async fn watch(
    conn: RedisConn,
    epoch_key: String,
    revoked_key: impl Fn(&str) -> String + Send + 'static,
    channel: String,
    cache: Weak<Cache>,
    guard: Weak<Guard>,
) {
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(c), Some(g)) = (cache.upgrade(), guard.upgrade()) else {
            return;
        };
        let checked = refresh_epoch(&conn, &epoch_key, &g).await;
        let was_away = g.away.swap(checked.is_err(), Ordering::SeqCst);
        match (&checked, was_away) {
            // Said once per outage, with its cause (refused, timed out, a
            // certificate not trusted...), at the level operators read.
            (Err(e), false) => tracing::warn!(
                error = %e,
                "Redis unavailable: not ready, and what needs Redis answers 503 \
                 STORE_UNAVAILABLE, until it answers again"
            ),
            (Ok(_), true) => tracing::info!("Redis available again"),
            _ => {}
        }
        match checked {
            Ok((epoch, true)) => {
                tracing::warn!(
                    "Redis lost its data (new epoch {}): tokens issued before now cannot be \
                     refreshed; writing back the revocations this replica holds",
                    epoch.start
                );
                // Cached "live" answers predate the loss: check them again.
                c.epoch.fetch_add(1, Ordering::SeqCst);
                let revoked = c.revoked_now();
                if revoked.is_empty() {
                    continue;
                }
                let mut pipe = redis::pipe();
                for (sid, ttl) in &revoked {
                    pipe.cmd("SET")
                        .arg(revoked_key(sid))
                        .arg(1)
                        .arg("PX")
                        .arg(*ttl)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(&channel)
                        .arg(format!("{ttl} {sid}"))
                        .ignore();
                }
                let mut w = conn.clone();
                match timed(pipe.query_async::<()>(&mut w)).await {
                    Ok(()) => tracing::info!(count = revoked.len(), "revocations written back"),
                    Err(e) => tracing::warn!(error = %e, "writing back revocations failed"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "epoch check failed"),
        }
        let mut w = conn.clone();
        let beat = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(format!("{HEARTBEAT} {}", g.nonce))
            .to_owned();
        let _ = timed(beat.query_async::<i64>(&mut w)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A claim may not run once its caller could have answered 503: the
    /// connection's response timeout (1.5 s) ends the wait before the
    /// store's own bound (2 s) does.
    #[test]
    fn a_claim_must_run_before_the_first_timeout_can_fire() {
        let first = RESPONSE_TIMEOUT.min(COMMAND_TIMEOUT).as_millis() as Millis;
        assert_eq!(GIVES_UP_AFTER, first);
        let (sent, offset) = (1_000_000, -250);
        assert_eq!(
            claim_deadline(sent, offset),
            sent + offset + first - CLAIM_MARGIN
        );
        assert!(
            claim_deadline(sent, offset) < sent + offset + RESPONSE_TIMEOUT.as_millis() as Millis
        );
    }

    /// What the claim script stores (the head, Redis's clock, `}`) reads
    /// back as the record with that clock, quotes and escapes included.
    #[test]
    fn the_stored_marker_is_the_record_with_the_redis_clock() {
        for jti in ["0b7e-11", "with \"quotes\" and \\ and \u{e9}", ""] {
            let record = RefreshRecord {
                jti: jti.into(),
                iat: 1_800_000_000,
                exp: -5,
                at: 1,
            };
            let stored = format!(
                "{}{}}}",
                record_head(&record).unwrap(),
                1_800_000_000_123i64
            );
            let back: RefreshRecord = serde_json::from_str(&stored).unwrap();
            assert_eq!(
                back,
                RefreshRecord {
                    at: 1_800_000_000_123,
                    ..record
                }
            );
        }
    }

    #[test]
    fn epoch_parses_and_dates_tokens() {
        let e = Epoch::parse("abc:1800000000500").unwrap();
        assert_eq!(e.start, 1_800_000_000_500);
        // Issued well before: refused; well after: fine.
        assert!(e.predates(1_799_999_990, 0));
        assert!(!e.predates(1_800_000_005, 0));
        assert!(e.predates(1_799_999_999, 0));
        // The epoch's own second: issued after the epoch started (first start).
        assert!(!e.predates(1_800_000_000, 0));
        // A Redis clock 10 s ahead moves the replica's iat forward.
        assert!(!e.predates(1_799_999_991, 10_000));
        assert!(e.predates(1_799_999_989, 10_000));
        assert!(Epoch::parse("no-colon").is_none());
        assert!(Epoch::parse("x:notanumber").is_none());
    }

    #[test]
    fn subscription_freshness_follows_heartbeats() {
        let g = Guard::new();
        assert!(!g.subscription_fresh());
        g.heard_now();
        assert!(g.subscription_fresh());
        g.heard
            .store(now_millis() - STALE_AFTER - 1, Ordering::SeqCst);
        assert!(!g.subscription_fresh());
    }

    #[test]
    fn a_new_epoch_replacing_a_known_one_is_a_loss() {
        let g = Guard::new();
        assert!(!g.learn(Epoch::parse("a:1").unwrap()));
        assert!(!g.learn(Epoch::parse("a:1").unwrap()));
        assert!(g.learn(Epoch::parse("b:2").unwrap()));
        assert_eq!(g.current().unwrap().id, "b:2");
    }
}
