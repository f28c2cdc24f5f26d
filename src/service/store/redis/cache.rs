//! What a replica remembers of sessions: live or revoked, kept current by
//! the revocation channel, and bounded in memory.
//!
//! A verify of a session this replica has already seen needs no round trip
//! while the channel is followed. When the subscription drops, later checks
//! go back to Redis; when it is back, a new epoch makes every cached answer
//! checked once more, since revocations may have been missed in between.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures_util::StreamExt;

use super::conn::RedisConn;
use super::epoch::{RedisHealth, STALE_AFTER};
use crate::clock::Millis;

/// A session known to be live is re-checked after this long idle, which also
/// bounds the cache to the sessions seen recently.
pub(super) const LIVE_ENTRY_TTL: Duration = Duration::from_secs(600);

/// One session's cached answer: revoked or live, as of which epoch, until when.
#[derive(Clone, Copy)]
pub(super) struct CachedAnswer {
    pub(super) revoked: bool,
    pub(super) epoch: u64,
    pub(super) until: Instant,
}

pub(super) struct Cache {
    /// Sharded, so that verifies on different cores do not queue on one lock.
    pub(super) entries: DashMap<String, CachedAnswer>,
    /// Past this many entries, a session seen live is not remembered: it is
    /// asked of Redis again next time.
    pub(super) max_live: AtomicUsize,
    /// Past `max_live + max_revoked` entries, a revocation of a session not
    /// held is not remembered: Redis answers for it.
    pub(super) max_revoked: AtomicUsize,
    /// How many revocations learnt from this replica or the channel were
    /// left out, and how many of them a sweep has since dealt with (by a
    /// new epoch): while they differ, cached "live" answers are not trusted.
    pub(super) left_out: AtomicU64,
    pub(super) dealt_with: AtomicU64,
    /// Bumped each time the subscription is (re)established.
    pub(super) epoch: AtomicU64,
    pub(super) subscribed: AtomicBool,
}

impl Cache {
    pub(super) fn new(max_live: usize, max_revoked: usize) -> Cache {
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
    pub(super) fn mark_revoked(&self, sid: &str, ttl: Millis) -> bool {
        let revoked = CachedAnswer {
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
    pub(super) fn learn_revocation(&self, sid: &str, ttl: Millis) {
        if !self.mark_revoked(sid, ttl) {
            self.left_out.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Whether cached "live" answers may be used.
    pub(super) fn trusts_live(&self) -> bool {
        self.left_out.load(Ordering::SeqCst) == self.dealt_with.load(Ordering::SeqCst)
    }

    pub(super) fn mark_live(&self, sid: &str, epoch: u64) {
        let live = CachedAnswer {
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
    pub(super) fn revoked_now(&self) -> Vec<(String, Millis)> {
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
    pub(super) fn sweep(&self) {
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

/// Keeps the revocation cache current: subscribes, and after every
/// (re)subscription starts a new epoch so that answers cached while the
/// channel was silent are checked again. A subscription that hears no
/// heartbeat for [`STALE_AFTER`] is dropped and made again.
pub(super) async fn follow_revocations(
    conn: RedisConn,
    channel: String,
    cache: std::sync::Weak<Cache>,
    health: std::sync::Weak<RedisHealth>,
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
                if let Some(g) = health.upgrade() {
                    g.heard_now();
                }
                tracing::info!("following session revocations");
                backoff = Duration::from_millis(100);
                drop(c);
                let mut messages = pubsub.into_on_message();
                let silence = Duration::from_millis(STALE_AFTER as u64);
                while let Ok(Some(msg)) = tokio::time::timeout(silence, messages.next()).await {
                    let Some(c) = cache.upgrade() else { return };
                    if let Some(g) = health.upgrade() {
                        g.heard_now();
                        g.contact.heard(&c);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::store::DEFAULT_MAX_REVOCATIONS;
    use crate::service::store::redis::DEFAULT_LIVE_SESSIONS;

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
}
