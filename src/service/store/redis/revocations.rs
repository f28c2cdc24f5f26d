//! Following the revocation channel: every replica publishes the sessions
//! it revokes there, and each keeps its cache current from it. A verify of
//! a session this replica has already seen then needs no round trip. When
//! the subscription drops, later checks go back to Redis; when it is back, a
//! new epoch makes every cached answer checked once more, since revocations
//! may have been missed in between.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::cache::{Cache, LIVE_ENTRY_TTL};
use super::conn::RedisConn;
use super::epoch::{RedisHealth, STALE_AFTER};
use crate::clock::Millis;

/// Keeps the revocation cache current: subscribes, and after every
/// (re)subscription starts a new epoch so that answers cached while the
/// channel was silent are checked again. A subscription that hears no
/// heartbeat for [`STALE_AFTER`] is dropped and made again.
pub(super) async fn follow(
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
