//! The bounded revocation lag (`--max-revocation-lag`): how long a replica
//! that hears nothing from Redis keeps vouching for sessions from memory.
//!
//! While Redis answers, a logout reaches every replica within 1 s (the
//! revocation channel, and its heartbeat: see `epoch.rs`). When every
//! connection of a replica goes silently dead (packets dropped, no reset),
//! it can learn of no logout at all. It keeps answering what it knows for
//! at most the lag bound, so that a failover or a restart stays invisible;
//! past it, a session it cannot check gets `503 STORE_UNAVAILABLE` (never a
//! `401`: the user is not logged out for the store's absence).
//!
//! Redis is *heard* when a command is answered or the subscription receives
//! anything (every replica publishes a heartbeat four times a second). Heard
//! again after a silence long enough to have missed revocations, the cached
//! "live" answers are distrusted (a new cache epoch): each is read from
//! Redis once more before it is used, never taken from pub/sub replays.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::cache::Cache;
use crate::clock::Millis;

/// A subscription silent for this long is treated as lost.
pub(super) const STALE_AFTER: Millis = 1_000;

/// Default of `--max-revocation-lag`.
pub const DEFAULT_MAX_REVOCATION_LAG: Duration = Duration::from_secs(10);

/// What a replica may do with a session it holds as live in memory, given
/// how long Redis has been silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Vouch {
    /// Redis was heard within the heartbeat's staleness bound: the usual
    /// checks apply (cached answers of the current epoch, else Redis).
    Heard,
    /// Silent, but for no longer than the lag bound: the cached answer
    /// stands (nobody can be told of a logout meanwhile either, except
    /// through Redis).
    Static,
    /// Silent for longer than the lag bound: no cached "live" answer.
    Refuse,
}

/// The lag decision itself.
pub(super) fn decide(silent: Duration, max_lag: Duration) -> Vouch {
    if silent > max_lag {
        Vouch::Refuse
    } else if silent < Duration::from_millis(STALE_AFTER as u64) {
        Vouch::Heard
    } else {
        Vouch::Static
    }
}

/// When Redis was last heard, on a monotonic clock (a wall-clock step can
/// neither lengthen nor shorten the bound).
pub(super) struct Contact {
    origin: Instant,
    /// Milliseconds after `origin` at which Redis was last heard.
    heard: AtomicI64,
    max_lag_ms: AtomicU64,
}

impl Contact {
    /// Counts as heard at creation: nothing is cached yet, and a store
    /// that never reached Redis has no session to vouch for.
    pub(super) fn new() -> Contact {
        Contact {
            origin: Instant::now(),
            heard: AtomicI64::new(0),
            max_lag_ms: AtomicU64::new(DEFAULT_MAX_REVOCATION_LAG.as_millis() as u64),
        }
    }

    pub(super) fn set_max_lag(&self, lag: Duration) {
        self.max_lag_ms.store(
            lag.as_millis().min(u64::MAX as u128) as u64,
            Ordering::SeqCst,
        );
    }

    pub(super) fn max_lag(&self) -> Duration {
        Duration::from_millis(self.max_lag_ms.load(Ordering::SeqCst))
    }

    fn since_origin(&self, at: Instant) -> i64 {
        at.saturating_duration_since(self.origin)
            .as_millis()
            .min(i64::MAX as u128) as i64
    }

    /// How long Redis has been silent at `at`.
    pub(super) fn silent_at(&self, at: Instant) -> Duration {
        let silent = self
            .since_origin(at)
            .saturating_sub(self.heard.load(Ordering::SeqCst));
        Duration::from_millis(silent.max(0) as u64)
    }

    pub(super) fn vouch(&self) -> Vouch {
        decide(self.silent_at(Instant::now()), self.max_lag())
    }

    /// Pretends Redis was last heard `ago` (tests).
    #[cfg(test)]
    pub(super) fn heard_ago(&self, ago: Duration) {
        let now = self.since_origin(Instant::now());
        self.heard
            .store(now.saturating_sub(ago.as_millis() as i64), Ordering::SeqCst);
    }

    /// Redis answered at `at`. Answers whether the silence before was long
    /// enough to have missed a revocation.
    pub(super) fn heard_at(&self, at: Instant) -> bool {
        let now = self.since_origin(at);
        let before = self.heard.fetch_max(now, Ordering::SeqCst);
        now.saturating_sub(before) >= STALE_AFTER
    }

    /// Redis answered just now. After a silence that may have hidden a
    /// revocation, starts a new cache epoch: every cached "live" answer is
    /// read from Redis again before it is trusted.
    pub(super) fn heard(&self, cache: &Cache) {
        if self.heard_at(Instant::now()) {
            cache.epoch.fetch_add(1, Ordering::SeqCst);
            tracing::info!(
                "Redis heard again after a silence: cached sessions are checked in Redis once more"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAG: Duration = Duration::from_secs(10);

    #[test]
    fn within_the_heartbeat_the_usual_checks_apply() {
        assert_eq!(decide(Duration::ZERO, LAG), Vouch::Heard);
        assert_eq!(decide(Duration::from_millis(999), LAG), Vouch::Heard);
    }

    #[test]
    fn a_silent_store_is_vouched_for_up_to_the_lag_and_not_after() {
        assert_eq!(decide(Duration::from_secs(1), LAG), Vouch::Static);
        assert_eq!(decide(LAG, LAG), Vouch::Static);
        assert_eq!(decide(LAG + Duration::from_millis(1), LAG), Vouch::Refuse);
        assert_eq!(decide(Duration::from_secs(3600), LAG), Vouch::Refuse);
        // A bound shorter than the heartbeat's: refused as soon as silent.
        let short = Duration::from_millis(500);
        assert_eq!(decide(Duration::from_millis(600), short), Vouch::Refuse);
    }

    #[test]
    fn silence_is_counted_from_the_last_answer() {
        let c = Contact::new();
        c.set_max_lag(LAG);
        let t0 = c.origin;
        assert_eq!(
            c.silent_at(t0 + Duration::from_secs(4)),
            Duration::from_secs(4)
        );
        assert!(c.heard_at(t0 + Duration::from_secs(4)));
        assert_eq!(
            c.silent_at(t0 + Duration::from_secs(5)),
            Duration::from_secs(1)
        );
        assert_eq!(
            decide(c.silent_at(t0 + Duration::from_secs(15)), c.max_lag()),
            Vouch::Refuse
        );
        // An answer timed before the last one never moves it back.
        c.heard_at(t0 + Duration::from_secs(2));
        assert_eq!(
            c.silent_at(t0 + Duration::from_secs(5)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn heard_again_after_a_silence_distrusts_the_cache() {
        let c = Contact::new();
        let t0 = c.origin;
        // Heartbeats 250 ms apart: nothing can have been missed.
        assert!(!c.heard_at(t0 + Duration::from_millis(250)));
        assert!(!c.heard_at(t0 + Duration::from_millis(500)));
        // Two seconds of silence: the next answer starts a new epoch.
        assert!(c.heard_at(t0 + Duration::from_millis(2_500)));
        let cache = Cache::new(10, 10);
        let before = cache.epoch.load(Ordering::SeqCst);
        // Silent since `origin + 2.5 s`, far in the past by now.
        c.heard.store(0, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(STALE_AFTER as u64 + 10));
        c.heard(&cache);
        assert_eq!(cache.epoch.load(Ordering::SeqCst), before + 1);
        c.heard(&cache);
        assert_eq!(cache.epoch.load(Ordering::SeqCst), before + 1);
    }
}
