//! How the Redis store notices that Redis misbehaved: the epoch (data
//! loss), the heartbeat (a dead subscription) and the clock offset that the
//! refresh claim's deadline is measured with.
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
//! * **A claim applied late** (Redis paused, then resumed): see `claim.rs`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::cache::Cache;
use super::conn::RedisConn;
pub(super) use super::lag::STALE_AFTER;
use super::{Keys, scripts, timed};
use crate::clock::{Millis, now_millis};
use crate::service::store::StoreError;

/// How often the watch task checks the epoch and publishes a heartbeat.
pub(super) const BEAT: Duration = Duration::from_millis(250);
/// Heartbeat payload prefix on the revocation channel (revocations start
/// with a number, so older replicas ignore heartbeats).
pub(super) const HEARTBEAT: &str = "hb";

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

/// What the store knows about Redis's health: the epoch, the clock offset,
/// when the subscription last heard anything, and whether Redis is away.
pub(super) struct RedisHealth {
    pub epoch: Mutex<Option<Epoch>>,
    /// Redis clock minus this replica's clock (ms), last measured.
    pub offset: AtomicI64,
    /// When the subscription last heard anything (replica clock, ms).
    pub heard: AtomicI64,
    /// Random tag of this replica's new epochs and heartbeats.
    pub nonce: String,
    /// The last epoch check failed: Redis is away.
    pub away: std::sync::atomic::AtomicBool,
    /// When Redis was last heard, for the revocation lag (`lag.rs`).
    pub contact: super::lag::Contact,
}

impl RedisHealth {
    pub fn new() -> RedisHealth {
        RedisHealth {
            epoch: Mutex::new(None),
            offset: AtomicI64::new(0),
            heard: AtomicI64::new(0),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            away: std::sync::atomic::AtomicBool::new(false),
            contact: super::lag::Contact::new(),
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
    pub(super) fn learn(&self, e: Epoch) -> bool {
        let mut cur = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        let changed = cur.as_ref().is_some_and(|c| c.id != e.id);
        *cur = Some(e);
        changed
    }
}

/// Reads (or starts) the epoch and measures the clock offset. Returns the
/// epoch and whether it replaced a known one.
pub(super) async fn refresh_epoch(
    conn: &RedisConn,
    key: &str,
    health: &RedisHealth,
) -> Result<(Epoch, bool), StoreError> {
    let mut conn = conn.clone();
    let sent = now_millis();
    let mut inv = scripts::EPOCH.key(key);
    inv.arg(&health.nonce);
    let (value, now): (String, String) = timed(inv.invoke_async(&mut conn)).await?;
    let received = now_millis();
    if let Ok(now) = now.parse::<Millis>() {
        health
            .offset
            .store(now - (sent + received) / 2, Ordering::SeqCst);
    }
    let epoch = Epoch::parse(&value)
        .ok_or_else(|| StoreError::Corrupt(format!("unreadable epoch key {key}")))?;
    let changed = health.learn(epoch.clone());
    Ok((epoch, changed))
}

/// Every [`BEAT`]: checks the epoch (data loss), publishes a heartbeat for
/// the subscriptions of every replica, and after a data loss writes back the
/// revocations this replica holds.
pub(super) async fn watch(
    conn: RedisConn,
    keys: Keys,
    cache: Weak<Cache>,
    health: Weak<RedisHealth>,
) {
    let mut tick = tokio::time::interval(BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(c), Some(g)) = (cache.upgrade(), health.upgrade()) else {
            return;
        };
        let checked = refresh_epoch(&conn, &keys.epoch(), &g).await;
        if checked.is_ok() {
            g.contact.heard(&c);
        }
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
                        .arg(keys.revoked(sid))
                        .arg(1)
                        .arg("PX")
                        .arg(*ttl)
                        .ignore()
                        .cmd("PUBLISH")
                        .arg(keys.channel())
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
            .arg(keys.channel())
            .arg(format!("{HEARTBEAT} {}", g.nonce))
            .to_owned();
        let _ = timed(beat.query_async::<i64>(&mut w)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let g = RedisHealth::new();
        assert!(!g.subscription_fresh());
        g.heard_now();
        assert!(g.subscription_fresh());
        g.heard
            .store(now_millis() - STALE_AFTER - 1, Ordering::SeqCst);
        assert!(!g.subscription_fresh());
    }

    #[test]
    fn a_new_epoch_replacing_a_known_one_is_a_loss() {
        let g = RedisHealth::new();
        assert!(!g.learn(Epoch::parse("a:1").unwrap()));
        assert!(!g.learn(Epoch::parse("a:1").unwrap()));
        assert!(g.learn(Epoch::parse("b:2").unwrap()));
        assert_eq!(g.current().unwrap().id, "b:2");
    }
}
