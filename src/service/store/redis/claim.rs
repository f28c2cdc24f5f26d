//! The once-only refresh claim (rule 7) on Redis: a check-and-set in one
//! script, never read-then-write.
//!
//! A claim applied late (Redis paused, then resumed) could win after its
//! caller answered 503 and another replica refreshed the token. So the
//! script refuses to run past a deadline on the Redis clock, set before
//! the caller can give up, and the grace of a claim starts when the script
//! ran, on the Redis clock. A claim of a token issued before the current
//! epoch (Redis lost its data) is refused without asking Redis.

use std::sync::atomic::Ordering;

use super::conn::{RESPONSE_TIMEOUT, RedisConn};
use super::epoch::{RedisHealth, refresh_epoch};
use super::{COMMAND_TIMEOUT, scripts, timed};
use crate::clock::{Millis, now_millis};
use crate::service::store::{Claim, RefreshRecord, StoreError};

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
/// The claim of rule 7 with the data-loss and lateness checks above.
/// `issued_at` is the `iat` of the token being refreshed.
pub(super) async fn claim(
    conn: &RedisConn,
    epoch_key: &str,
    marker_key: &str,
    health: &RedisHealth,
    issued_at: i64,
    record: &RefreshRecord,
    ttl: Millis,
) -> Result<Claim, StoreError> {
    let value = record_head(record)?;
    for _ in 0..2 {
        let epoch = match health.current() {
            Some(e) => e,
            None => refresh_epoch(conn, epoch_key, health).await?.0,
        };
        let offset = health.offset.load(Ordering::SeqCst);
        if epoch.predates(issued_at, offset) {
            return Ok(Claim::Forgotten);
        }
        let sent = now_millis();
        let deadline = claim_deadline(sent, offset);
        let mut inv = scripts::CLAIM.key(marker_key);
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
                refresh_epoch(conn, epoch_key, health).await?;
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
}
