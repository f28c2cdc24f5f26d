//! The rules 1-7 of docs/src/concepts.md, as pure functions of (claims, policy, now).
//!
//! No I/O here. Token timestamps are whole seconds (JWT NumericDate); `now`
//! is milliseconds since the Unix epoch, so that "at `exp`" is exact.
//! The one-time claim itself (rule 7) is the store's job; this module decides
//! what a claim's outcome means.

use crate::policy::Policy;
use crate::service::jwt::Claims;

pub use crate::clock::Millis;

fn ms(secs: i64) -> Millis {
    secs.saturating_mul(1_000)
}

/// Rule 2: when the session ends, under the policy in force now.
pub fn session_end(c: &Claims, p: &Policy) -> i64 {
    c.auth_time.saturating_add(p.session as i64)
}

/// Rule 2, the idle clause: how late an idle end may come, at most, past
/// the timeout `t` (seconds): the larger of 5 s and `t / 20`.
pub fn idle_slack(t: u64) -> Millis {
    (ms(t as i64) / 20).max(5_000)
}

/// What a replica's view of the shared last activity may lag behind the
/// truth, beside its write slice: one flush tick of the background writer,
/// the write's own way to the store, replica clocks a little apart, and
/// activity counted from a token's whole-second `iat`.
pub const IDLE_ALLOWANCE: Millis = 1_250;

/// How often one replica writes one session's activity to the store at
/// most: the slack minus the allowance (so that the shared last activity
/// lags the true one by less than the slack).
pub fn idle_write_slice(t: u64) -> Millis {
    idle_slack(t) - IDLE_ALLOWANCE
}

/// Rule 2, the idle clause, as one replica sees it first: activity it saw
/// itself at `known` (ms) keeps the session alive until `known + t`.
/// Past that, only the shared last activity can tell ([`idle_shared`]).
pub fn idle_locally(known: Millis, t: u64, now: Millis) -> bool {
    now >= known.saturating_add(ms(t as i64))
}

/// Rule 2, the idle clause, from the shared last activity `last` (ms, the
/// latest that every replica has written, each at most one write slice
/// plus the allowance behind its own): the session is over once
/// `now >= last + t + slack`. Never before the timeout, since no activity
/// can be newer than `last` by the slack or more; never later than the
/// timeout plus the slack after the true last activity.
pub fn idle_shared(last: Millis, t: u64, now: Millis) -> bool {
    last <= idle_bound(t, now)
}

/// [`idle_shared`] as the store applies it: the latest shared last activity
/// (ms) that means the session is over at `now`.
pub fn idle_bound(t: u64, now: Millis) -> Millis {
    now.saturating_sub(ms(t as i64))
        .saturating_sub(idle_slack(t))
}

/// The latest moment the token itself proves activity at: its session's
/// login and its own issue (a refresh), both whole seconds.
pub fn token_activity(c: &Claims) -> Millis {
    ms(c.auth_time.max(c.iat))
}

/// Rule 1: when the token stops being valid, under the policy in force now.
pub fn token_end(c: &Claims, p: &Policy) -> i64 {
    c.exp.min(c.iat.saturating_add(p.token as i64))
}

/// What a token is worth at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Rule 1: valid; `until` is the end of validity (seconds).
    Valid { until: i64, session_end: i64 },
    /// Rule 3: expired, but may be exchanged once for a new token.
    Renewable { session_end: i64 },
    /// Rule 4: expired past the renew limit.
    Expired,
    /// Rule 2: the session is over, whatever the token.
    SessionExpired,
    /// Timestamps that no token of ours carries (issued in the future, expiry before issue).
    Malformed,
}

/// Rules 1-4. `leeway` (ms) tolerates clock skew between replicas on `iat`
/// and `exp`; the session end is never stretched.
pub fn standing(c: &Claims, p: &Policy, now: Millis, leeway: Millis) -> Standing {
    if c.exp <= c.iat || c.auth_time > c.iat || ms(c.iat) > now.saturating_add(leeway) {
        return Standing::Malformed;
    }
    let session_end = session_end(c, p);
    if now >= ms(session_end) {
        return Standing::SessionExpired;
    }
    let until = token_end(c, p);
    if now < ms(until).saturating_add(leeway) {
        return Standing::Valid { until, session_end };
    }
    if now < ms(until.saturating_add(p.renew_limit as i64)) {
        return Standing::Renewable { session_end };
    }
    Standing::Expired
}

/// Rules 1 and 3 for an explicit refresh: the session end that the new
/// token keeps, or `None` when this token may not be exchanged. A token
/// inside its validity, or expired within the renew limit, may be; one past
/// its end that only the clock-skew leeway keeps valid may not, so the
/// leeway never stretches the renew limit (a limit of `0s` stays none).
pub fn refreshable(s: Standing, p: &Policy, now: Millis) -> Option<i64> {
    match s {
        Standing::Valid { until, session_end }
            if now < ms(until.saturating_add(p.renew_limit as i64)) =>
        {
            Some(session_end)
        }
        Standing::Renewable { session_end } => Some(session_end),
        _ => None,
    }
}

/// The `iat`/`exp` of a token issued at `now` in a session that ends at
/// `session_end` (rule 3: `exp = min(now + tokenExpirationTime, session end)`).
pub fn issue_times(p: &Policy, now: Millis, session_end: i64) -> (i64, i64) {
    let iat = now.div_euclid(1_000);
    (iat, iat.saturating_add(p.token as i64).min(session_end))
}

/// Times of a fresh login: `(auth_time, iat, exp)`.
pub fn login_times(p: &Policy, now: Millis) -> (i64, i64, i64) {
    let auth_time = now.div_euclid(1_000);
    let (iat, exp) = issue_times(p, now, auth_time.saturating_add(p.session as i64));
    (auth_time, iat, exp)
}

/// Rule 5: what a refresh that lost the one-time claim gets, given when the
/// winner claimed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateRefresh {
    /// Raced with the first refresh inside the grace: the same new token.
    SameToken,
    /// Reuse of a spent token: `TOKEN_ALREADY_REFRESHED`, and revoke the session if the policy says so.
    Reuse { revoke_session: bool },
}

pub fn late_refresh(p: &Policy, claimed_at: Millis, now: Millis) -> LateRefresh {
    if now.saturating_sub(claimed_at) <= ms(p.grace as i64) {
        LateRefresh::SameToken
    } else {
        LateRefresh::Reuse {
            revoke_session: p.revoke_session_on_reuse,
        }
    }
}

/// How long the one-time marker of a refreshed token must be kept: until no
/// policy within the bounds could make the token renewable again, and at
/// least the grace. A token's validity never outlasts its own `exp` (rule 1)
/// nor its session's longest bound, so its last renewable moment under any
/// policy is `min(exp + longest renew limit, auth_time + longest session)`:
/// restoring a longer policy later cannot reopen a refreshed token.
pub fn refresh_marker_ttl(c: &Claims, p: &Policy, now: Millis) -> Millis {
    use crate::policy::{RENEW_LIMIT_BOUNDS, SESSION_BOUNDS};
    let renewable_until = ms(c
        .exp
        .saturating_add(RENEW_LIMIT_BOUNDS.1 as i64)
        .min(c.auth_time.saturating_add(SESSION_BOUNDS.1 as i64)));
    let grace = ms(p.grace as i64);
    renewable_until.saturating_sub(now).max(grace) + 60_000
}

/// How long a revocation must be kept (rule 6): a revoked session's tokens
/// were all issued with `exp <= now + 7d` (the token bound) and are usable
/// at most 7d (the renew-limit bound) past `exp`, whatever the policy
/// becomes later. Shorter when the session, under the bounds, ends sooner.
pub fn revocation_ttl(c: &Claims, now: Millis) -> Millis {
    revocation_ttl_since(c.auth_time, now)
}

/// [`revocation_ttl`] of a session that started at `auth_time` (seconds).
pub fn revocation_ttl_since(auth_time: i64, now: Millis) -> Millis {
    use crate::policy::{RENEW_LIMIT_BOUNDS, SESSION_BOUNDS, TOKEN_BOUNDS};
    let by_tokens = ms((TOKEN_BOUNDS.1 + RENEW_LIMIT_BOUNDS.1) as i64);
    let by_session = ms(auth_time.saturating_add(SESSION_BOUNDS.1 as i64)).saturating_sub(now);
    by_tokens.min(by_session).max(1_000)
}

/// How long the end of a user's sessions must be kept: every token of a
/// session that started before it was issued before it, so with
/// `exp <= then + 7d` (the token bound), and is usable at most 7d (the
/// renew-limit bound) past `exp`, and never past the session bound.
pub fn user_end_ttl() -> Millis {
    use crate::policy::{RENEW_LIMIT_BOUNDS, SESSION_BOUNDS, TOKEN_BOUNDS};
    ms(((TOKEN_BOUNDS.1 + RENEW_LIMIT_BOUNDS.1).min(SESSION_BOUNDS.1)) as i64) + 60_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: i64 = 1_800_000_000;

    fn policy(session: u64, token: u64, renew: u64) -> Policy {
        Policy {
            session,
            token,
            renew_limit: renew,
            grace: 10,
            ..Policy::default()
        }
    }

    fn claims(auth_time: i64, iat: i64, exp: i64) -> Claims {
        Claims {
            iat,
            exp,
            auth_time,
            ..crate::testing::claims()
        }
    }

    #[test]
    fn rule1_valid_until_exp_exclusive() {
        let p = policy(3_600, 60, 30);
        let c = claims(T0, T0, T0 + 60);
        assert!(
            matches!(standing(&c, &p, ms(T0), 0), Standing::Valid { until, .. } if until == T0 + 60)
        );
        assert!(matches!(
            standing(&c, &p, ms(T0 + 60) - 1, 0),
            Standing::Valid { .. }
        ));
        assert!(matches!(
            standing(&c, &p, ms(T0 + 60), 0),
            Standing::Renewable { .. }
        ));
    }

    #[test]
    fn rule1_shortened_token_policy_shortens_issued_tokens() {
        let c = claims(T0, T0, T0 + 60);
        let shorter = policy(3_600, 20, 30);
        assert!(matches!(
            standing(&c, &shorter, ms(T0 + 20), 0),
            Standing::Renewable { .. }
        ));
        assert!(matches!(
            standing(&c, &shorter, ms(T0 + 50), 0),
            Standing::Expired
        ));
        // A longer policy never lengthens a token past its own exp.
        let longer = policy(3_600, 600, 30);
        assert!(matches!(
            standing(&c, &longer, ms(T0 + 60), 0),
            Standing::Renewable { .. }
        ));
    }

    #[test]
    fn rule1_leeway_applies_to_exp_and_iat() {
        let p = policy(3_600, 60, 0);
        let c = claims(T0, T0, T0 + 60);
        assert!(matches!(
            standing(&c, &p, ms(T0 + 60), 2_000),
            Standing::Valid { .. }
        ));
        assert_eq!(standing(&c, &p, ms(T0 + 62), 2_000), Standing::Expired);
        // Issued one second "in the future" by a replica with a fast clock.
        let ahead = claims(T0, T0 + 1, T0 + 61);
        assert_eq!(standing(&ahead, &p, ms(T0), 0), Standing::Malformed);
        assert!(matches!(
            standing(&ahead, &p, ms(T0), 1_000),
            Standing::Valid { .. }
        ));
    }

    #[test]
    fn rule3_leeway_alone_never_makes_a_token_refreshable() {
        let c = claims(T0, T0, T0 + 60);
        let leeway = 60_000;
        // No renew limit: inside its validity a token may be refreshed; past
        // `exp` the leeway keeps it valid for verify, but not refreshable.
        let none = policy(3_600, 60, 0);
        let s = standing(&c, &none, ms(T0 + 59), leeway);
        assert_eq!(refreshable(s, &none, ms(T0 + 59)), Some(T0 + 3_600));
        let s = standing(&c, &none, ms(T0 + 60), leeway);
        assert!(matches!(s, Standing::Valid { .. }));
        assert_eq!(refreshable(s, &none, ms(T0 + 60)), None);
        let s = standing(&c, &none, ms(T0 + 62) + 500, leeway);
        assert_eq!(refreshable(s, &none, ms(T0 + 62) + 500), None);
        // A renew limit shorter than the leeway ends where the limit does.
        let short = policy(3_600, 60, 5);
        let s = standing(&c, &short, ms(T0 + 65) - 1, leeway);
        assert_eq!(refreshable(s, &short, ms(T0 + 65) - 1), Some(T0 + 3_600));
        let s = standing(&c, &short, ms(T0 + 65), leeway);
        assert!(matches!(s, Standing::Valid { .. }));
        assert_eq!(refreshable(s, &short, ms(T0 + 65)), None);
        // Renewable, and what is never exchanged.
        let s = standing(&c, &short, ms(T0 + 62), 0);
        assert_eq!(refreshable(s, &short, ms(T0 + 62)), Some(T0 + 3_600));
        for s in [
            Standing::Expired,
            Standing::SessionExpired,
            Standing::Malformed,
        ] {
            assert_eq!(refreshable(s, &short, ms(T0)), None);
        }
    }

    #[test]
    fn rule2_session_end_is_exclusive_and_beats_any_token() {
        let p = policy(100, 60, 30);
        let c = claims(T0, T0 + 90, T0 + 100);
        assert!(matches!(
            standing(&c, &p, ms(T0 + 100) - 1, 0),
            Standing::Valid { .. }
        ));
        assert_eq!(standing(&c, &p, ms(T0 + 100), 0), Standing::SessionExpired);
        // Even a token whose exp lies beyond the session end.
        let forged_long = claims(T0, T0 + 90, T0 + 150);
        assert_eq!(
            standing(&forged_long, &p, ms(T0 + 100), 0),
            Standing::SessionExpired
        );
    }

    #[test]
    fn rule2_shortened_session_policy_shortens_live_sessions() {
        let c = claims(T0, T0, T0 + 60);
        assert_eq!(
            standing(&c, &policy(30, 30, 0), ms(T0 + 30), 0),
            Standing::SessionExpired
        );
        assert!(matches!(
            standing(&c, &policy(3_600, 60, 0), ms(T0 + 30), 0),
            Standing::Valid { .. }
        ));
    }

    #[test]
    fn rule3_window_from_exp_to_exp_plus_limit() {
        let p = policy(3_600, 60, 30);
        let c = claims(T0, T0, T0 + 60);
        assert!(
            matches!(standing(&c, &p, ms(T0 + 60), 0), Standing::Renewable { session_end } if session_end == T0 + 3_600)
        );
        assert!(matches!(
            standing(&c, &p, ms(T0 + 90) - 1, 0),
            Standing::Renewable { .. }
        ));
    }

    #[test]
    fn rule3_new_token_keeps_session_end() {
        let p = policy(3_600, 60, 30);
        let (auth, iat, exp) = login_times(&p, ms(T0) + 999);
        assert_eq!((auth, iat, exp), (T0, T0, T0 + 60));
        // A refresh long before the session end gets a full token.
        assert_eq!(
            issue_times(&p, ms(T0 + 100) + 500, T0 + 3_600),
            (T0 + 100, T0 + 160)
        );
        // A refresh just before the session end gets exp = session end.
        assert_eq!(
            issue_times(&p, ms(T0 + 3_599) + 999, T0 + 3_600),
            (T0 + 3_599, T0 + 3_600)
        );
    }

    #[test]
    fn rule3_zero_renew_limit_never_renews() {
        let p = policy(3_600, 60, 0);
        let c = claims(T0, T0, T0 + 60);
        assert_eq!(standing(&c, &p, ms(T0 + 60), 0), Standing::Expired);
    }

    #[test]
    fn rule4_at_exp_plus_limit_is_expired() {
        let p = policy(3_600, 60, 30);
        let c = claims(T0, T0, T0 + 60);
        assert_eq!(standing(&c, &p, ms(T0 + 90), 0), Standing::Expired);
        assert_eq!(standing(&c, &p, ms(T0 + 1_000), 0), Standing::Expired);
    }

    #[test]
    fn rule4_renew_window_is_cut_by_session_end() {
        let p = policy(100, 60, 60);
        let c = claims(T0, T0 + 30, T0 + 90);
        assert!(matches!(
            standing(&c, &p, ms(T0 + 95), 0),
            Standing::Renewable { .. }
        ));
        assert_eq!(standing(&c, &p, ms(T0 + 100), 0), Standing::SessionExpired);
    }

    #[test]
    fn rule5_same_token_inside_grace_reuse_after() {
        let p = policy(3_600, 60, 30);
        assert_eq!(late_refresh(&p, ms(T0), ms(T0)), LateRefresh::SameToken);
        assert_eq!(
            late_refresh(&p, ms(T0), ms(T0 + 10)),
            LateRefresh::SameToken
        );
        assert_eq!(
            late_refresh(&p, ms(T0), ms(T0 + 10) + 1),
            LateRefresh::Reuse {
                revoke_session: true
            }
        );
        let lenient = Policy {
            revoke_session_on_reuse: false,
            ..p
        };
        assert_eq!(
            late_refresh(&lenient, ms(T0), ms(T0 + 60)),
            LateRefresh::Reuse {
                revoke_session: false
            }
        );
    }

    #[test]
    fn rule5_marker_outlives_the_renew_window() {
        let p = policy(3_600, 60, 30);
        let c = claims(T0, T0, T0 + 60);
        let now = ms(T0 + 61);
        assert!(now + refresh_marker_ttl(&c, &p, now) > ms(T0 + 90));
        let no_renew = policy(3_600, 60, 0);
        assert!(refresh_marker_ttl(&c, &no_renew, ms(T0 + 1_000)) >= ms(10));
    }

    #[test]
    fn rule5_marker_outlives_a_restored_longer_policy() {
        use crate::policy::{RENEW_LIMIT_BOUNDS, SESSION_BOUNDS, TOKEN_BOUNDS};
        // Issued for an hour, refreshed while tokenExpirationTime was cut to
        // 1 s and the renew limit to 10 s.
        let c = claims(T0, T0, T0 + 3_600);
        let shortened = policy(86_400, 1, 10);
        let now = ms(T0 + 2);
        let gone = now + refresh_marker_ttl(&c, &shortened, now);
        // Whatever policy within the bounds is restored, the token is past
        // its renew window by the time its marker is dropped.
        let widest = policy(SESSION_BOUNDS.1, TOKEN_BOUNDS.1, RENEW_LIMIT_BOUNDS.1);
        for p in [policy(86_400, 3_600, 30), widest] {
            assert!(
                !matches!(
                    standing(&c, &p, gone, 0),
                    Standing::Renewable { .. } | Standing::Valid { .. }
                ),
                "marker dropped at {gone} while {:?}",
                standing(&c, &p, gone, 0)
            );
        }
    }

    #[test]
    fn rule6_revocation_outlives_every_token_of_the_session() {
        let c = claims(T0, T0, T0 + 60);
        let now = ms(T0 + 10);
        let ttl = revocation_ttl(&c, now);
        // Any token of this session has exp <= now + 7d and is dead 7d after that.
        assert!(now + ttl >= now + ms(14 * 86_400));
    }

    #[test]
    fn malformed_timestamps() {
        let p = policy(3_600, 60, 30);
        assert_eq!(
            standing(&claims(T0, T0, T0), &p, ms(T0), 0),
            Standing::Malformed
        );
        assert_eq!(
            standing(&claims(T0 + 5, T0, T0 + 60), &p, ms(T0 + 10), 0),
            Standing::Malformed
        );
        let extreme = claims(i64::MIN, i64::MIN, i64::MAX);
        let _ = standing(&extreme, &p, ms(T0), i64::MAX);
    }

    #[test]
    fn rule2_idle_slack_is_5s_or_a_twentieth() {
        assert_eq!(idle_slack(10), 5_000);
        assert_eq!(idle_slack(100), 5_000);
        assert_eq!(idle_slack(101), 5_050);
        assert_eq!(idle_slack(3_600), 180_000);
        assert_eq!(idle_write_slice(10), 3_750);
        assert!(idle_write_slice(10) + IDLE_ALLOWANCE <= idle_slack(10));
    }

    #[test]
    fn rule2_idle_locally_until_known_plus_timeout() {
        let known = ms(T0);
        assert!(!idle_locally(known, 10, known + 9_999));
        assert!(idle_locally(known, 10, known + 10_000));
        assert!(!idle_locally(i64::MAX, 10, 0));
    }

    #[test]
    fn rule2_idle_shared_at_timeout_plus_slack() {
        let last = ms(T0);
        assert!(!idle_shared(last, 10, last + 10_000));
        assert!(!idle_shared(last, 10, last + 14_999));
        assert!(idle_shared(last, 10, last + 15_000));
        assert!(!idle_shared(last, 3_600, last + 3_779_999));
        assert!(idle_shared(last, 3_600, last + 3_780_000));
        let _ = idle_shared(i64::MAX, u64::MAX, i64::MIN);
    }

    #[test]
    fn rule2_token_activity_is_the_later_of_login_and_issue() {
        assert_eq!(token_activity(&claims(T0, T0 + 5, T0 + 60)), ms(T0 + 5));
        assert_eq!(token_activity(&claims(T0, T0, T0 + 60)), ms(T0));
    }

    /// Two replicas, each deciding as the token service does: accept on
    /// its own recent activity; else read the shared last activity (a
    /// check that also records this request, or ends the session for good);
    /// write its own activity at most once per write slice, the write
    /// landing up to a flush tick and a write's way later.
    #[derive(Debug, Default, Clone, Copy)]
    struct Replica {
        known: Millis,
        written: Millis,
        pending: Option<(Millis, Millis)>, // (value, lands at)
    }

    fn simulate(t: u64, login: Millis, events: &[(bool, Millis, Millis)]) -> Result<(), String> {
        let slice = idle_write_slice(t);
        let slack = idle_slack(t);
        let mut replicas = [
            Replica {
                known: login,
                written: login,
                pending: None,
            },
            Replica::default(),
        ];
        let mut shared: Option<Millis> = None; // None: nothing written yet
        let mut ended = false;
        let mut truth = login; // the last accepted activity
        let mut now = login;
        let floor = login.div_euclid(1_000) * 1_000;
        for &(on_b, wait, delay) in events {
            now += wait;
            // Writes that have landed by now.
            for r in replicas.iter_mut() {
                if let Some((v, at)) = r.pending
                    && at <= now
                {
                    if !ended {
                        shared = Some(shared.unwrap_or(v).max(v));
                    }
                    r.pending = None;
                }
            }
            let r = &mut replicas[usize::from(on_b)];
            let known = r.known.max(floor);
            let accepted = if !idle_locally(known, t, now) {
                true
            } else if ended {
                false
            } else {
                let last = shared.unwrap_or(floor).max(floor);
                if idle_shared(last, t, now) {
                    ended = true;
                    false
                } else {
                    shared = Some(now.max(last));
                    r.written = now;
                    true
                }
            };
            if accepted {
                if now >= truth + ms(t as i64) + slack {
                    return Err(format!(
                        "alive at {now}, {} ms after the last activity",
                        now - truth
                    ));
                }
                r.known = r.known.max(now);
                if r.pending.is_none() && r.known >= r.written + slice {
                    r.written = r.known;
                    r.pending = Some((r.known, now + delay));
                }
                truth = now;
            } else if now < truth + ms(t as i64) {
                return Err(format!(
                    "ended at {now}, {} ms after the last activity",
                    now - truth
                ));
            }
        }
        Ok(())
    }

    #[test]
    fn rule2_idle_simulation_catches_a_missing_margin() {
        // Activity on A only, then B asks just past the timeout: B must
        // not end it (A's last writes may not have landed yet).
        let t = 10;
        let login = ms(T0);
        let mut events = Vec::new();
        for _ in 0..20 {
            events.push((false, 900, 1_000));
        }
        events.push((true, 9_000, 0));
        assert_eq!(simulate(t, login, &events), Ok(()));
    }

    proptest! {
        /// Rule 2's idle clause across two replicas: no session ends
        /// before the timeout after its last activity, and none is still
        /// alive the timeout plus the slack after it.
        #[test]
        fn rule2_idle_ends_never_early_and_within_the_slack(
            t in prop_oneof![Just(10u64), 10u64..400, Just(3_600u64)],
            events in proptest::collection::vec(
                (any::<bool>(), 0i64..30_000, 0i64..1_000), 1..120),
            login_ms in 0i64..1_000,
        ) {
            let scaled: Vec<_> = events
                .iter()
                .map(|&(b, w, d)| (b, w * (t as i64) / 10, d))
                .collect();
            prop_assert_eq!(simulate(t, ms(T0) + login_ms, &scaled), Ok(()));
        }
    }

    proptest! {
        /// A refresh never extends a session: any token issued inside it ends by its end.
        #[test]
        fn refresh_never_extends_session(
            session in 1u64..100_000, token in 1u64..10_000, offset in 0i64..200_000_000
        ) {
            let token = token.min(session);
            let p = policy(session, token, 0);
            let session_end = T0 + session as i64;
            let now = (ms(T0) + offset).min(ms(session_end) - 1);
            let (iat, exp) = issue_times(&p, now, session_end);
            prop_assert!(exp <= session_end);
            prop_assert!(exp > iat);
        }

        /// No sequence of refreshes outlives the session.
        #[test]
        fn no_refresh_chain_outlives_session(
            session in 1u64..5_000, token in 1u64..600, renew in 0u64..600,
            waits in proptest::collection::vec(0i64..2_000_000, 1..40)
        ) {
            let token = token.min(session);
            let renew = renew.min(session);
            let p = policy(session, token, renew);
            let (auth, iat, exp) = login_times(&p, ms(T0));
            let mut c = claims(auth, iat, exp);
            let mut now = ms(T0);
            for w in waits {
                now += w;
                match standing(&c, &p, now, 0) {
                    Standing::Valid { until, session_end } => {
                        prop_assert!(now < ms(T0 + session as i64));
                        prop_assert!(until <= session_end);
                    }
                    Standing::Renewable { session_end } => {
                        prop_assert!(now < ms(T0 + session as i64));
                        let (iat, exp) = issue_times(&p, now, session_end);
                        prop_assert!(exp <= T0 + session as i64);
                        c = claims(auth, iat, exp);
                    }
                    Standing::SessionExpired => prop_assert!(now >= ms(T0 + session as i64)),
                    Standing::Expired => {}
                    Standing::Malformed => prop_assert!(false, "issued token judged malformed"),
                }
            }
        }
    }
}
