//! Signing-key rotation for a TokenPolicy, as a plan over the key ring kept
//! in its Secret (no I/O here).
//!
//! Replicas read their keys when they start, so a new key must reach every
//! replica as a verifying key before any replica signs with it:
//!
//! 1. **add**: a changed rotate annotation adds `next.pem`, verify-only. The
//!    pods roll out with it.
//! 2. **promote**: once that rollout is complete (the applied Deployment's
//!    template carries the ring's kids and every replica runs it), `next` becomes the signing
//!    key and the old signing key becomes `previous.pem`. The pods roll out
//!    again; old pods already verify the new key.
//! 3. **drop**: `previous` is removed once no token it signed can still be
//!    used: `tokenExpirationTime + expiredTokenRenewLimit` after promotion.
//!
//! A rotation asked for while a `previous` key is still needed waits for
//! step 3, so the ring never holds more than three keys.
//!
//! [`plan`] is the only place that decides a step; the reconciler reads the
//! ring, applies the Deployment, asks the plan with the Deployment as
//! applied, and writes the ring the step gives. A changed ring reaches the
//! pods at the next reconcile.

use crate::operator::rollout::Rollout;
use crate::policy::Policy;

pub use crate::keyring::{KeyRing, NEXT, PREVIOUS, SIGNING, in_order};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Keep,
    AddNext,
    Promote,
    DropPrevious,
}

/// What to do now. `kids` are the ring's kids as the pod template carries
/// them; `rollout` is the Deployment as applied: a pending `next` is promoted
/// only once every replica runs the template carrying exactly `kids`.
pub fn plan(
    ring: &KeyRing,
    kids: &str,
    rotate: Option<&str>,
    rollout: &Rollout,
    policy: &Policy,
    now: i64,
) -> Step {
    if ring.next.is_some() {
        return if rollout.complete_with(kids) {
            Step::Promote
        } else {
            Step::Keep
        };
    }
    if ring.previous.is_some() {
        // Without a promotion time we cannot tell when it is safe: keep it.
        let dead = ring
            .promoted_at
            .is_some_and(|t| now >= t.saturating_add((policy.token + policy.renew_limit) as i64));
        return if dead { Step::DropPrevious } else { Step::Keep };
    }
    if rotate.is_some() && rotate != ring.rotated_for.as_deref() {
        return Step::AddNext;
    }
    Step::Keep
}

/// The ring after `step`; `fresh` makes a new private key (PEM).
pub fn apply(
    ring: &KeyRing,
    step: Step,
    rotate: Option<&str>,
    fresh: impl FnOnce() -> String,
    now: i64,
) -> KeyRing {
    let mut r = ring.clone();
    match step {
        Step::Keep => {}
        Step::AddNext => {
            r.next = Some(fresh());
            r.rotated_for = rotate.map(str::to_string);
        }
        Step::Promote => {
            if let Some(next) = r.next.take() {
                r.previous = Some(std::mem::replace(&mut r.signing, next));
                r.promoted_at = Some(now);
            }
        }
        Step::DropPrevious => r.previous = None,
    }
    r
}

/// Seconds until the previous key may be dropped (at least 1, at most
/// 300), if one is kept: when the operator should look again.
pub fn recheck_in(ring: &KeyRing, policy: &Policy, now: i64) -> Option<u64> {
    ring.previous.as_ref()?;
    let at = ring
        .promoted_at?
        .saturating_add((policy.token + policy.renew_limit) as i64);
    Some(at.saturating_sub(now).clamp(1, 300) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::rollout::tests::done;

    fn policy() -> Policy {
        Policy {
            token: 600,
            renew_limit: 300,
            ..Policy::default()
        }
    }

    fn ring() -> KeyRing {
        KeyRing {
            signing: "A".into(),
            ..Default::default()
        }
    }

    /// The ring's "kids" (here the stand-in key strings), first signs.
    fn kids(r: &KeyRing) -> String {
        let v: Vec<_> = in_order(r).into_iter().map(|(_, k)| k).collect();
        v.join(",")
    }

    /// Plans with every replica running the template of `r` itself.
    fn settled(r: &KeyRing, rotate: Option<&str>, p: &Policy, now: i64) -> Step {
        plan(r, &kids(r), rotate, &done(&kids(r), 2), p, now)
    }

    #[test]
    fn a_full_rotation_adds_then_promotes_then_drops() {
        let p = policy();
        let r0 = ring();
        assert_eq!(settled(&r0, None, &p, 0), Step::Keep);
        assert_eq!(settled(&r0, Some("v1"), &p, 0), Step::AddNext);
        let r1 = apply(&r0, Step::AddNext, Some("v1"), || "B".into(), 0);
        assert_eq!(in_order(&r1), [(SIGNING, "A"), (NEXT, "B")]);
        // B is not promoted while a replica may not know it yet: the pods
        // still run the template without it, or its rollout is not done.
        let old_template = done(&kids(&r0), 2);
        assert_eq!(
            plan(&r1, &kids(&r1), Some("v1"), &old_template, &p, 10),
            Step::Keep
        );
        let half = Rollout {
            updated: 1,
            ..done(&kids(&r1), 2)
        };
        assert_eq!(plan(&r1, &kids(&r1), Some("v1"), &half, &p, 10), Step::Keep);
        assert_eq!(settled(&r1, Some("v1"), &p, 10), Step::Promote);
        let r2 = apply(&r1, Step::Promote, Some("v1"), || unreachable!(), 100);
        assert_eq!(in_order(&r2), [(SIGNING, "B"), (PREVIOUS, "A")]);
        // A verifies until the longest token it signed is dead: token + renew limit.
        assert_eq!(settled(&r2, Some("v1"), &p, 100 + 899), Step::Keep);
        assert_eq!(settled(&r2, Some("v1"), &p, 100 + 900), Step::DropPrevious);
        let r3 = apply(
            &r2,
            Step::DropPrevious,
            Some("v1"),
            || unreachable!(),
            1_000,
        );
        assert_eq!(in_order(&r3), [(SIGNING, "B")]);
        assert_eq!(settled(&r3, Some("v1"), &p, 2_000), Step::Keep);
    }

    #[test]
    fn a_rotation_waits_while_the_previous_key_is_needed() {
        let p = policy();
        let r = KeyRing {
            signing: "B".into(),
            previous: Some("A".into()),
            rotated_for: Some("v1".into()),
            promoted_at: Some(100),
            ..Default::default()
        };
        assert_eq!(settled(&r, Some("v2"), &p, 200), Step::Keep);
        assert_eq!(settled(&r, Some("v2"), &p, 1_000), Step::DropPrevious);
        let r = apply(&r, Step::DropPrevious, Some("v2"), || unreachable!(), 1_000);
        assert_eq!(settled(&r, Some("v2"), &p, 1_000), Step::AddNext);
    }

    #[test]
    fn the_operator_comes_back_when_the_previous_key_dies() {
        let p = policy();
        let r = KeyRing {
            signing: "B".into(),
            previous: Some("A".into()),
            promoted_at: Some(100),
            ..Default::default()
        };
        assert_eq!(recheck_in(&r, &p, 100), Some(300));
        assert_eq!(recheck_in(&r, &p, 900), Some(100));
        assert_eq!(recheck_in(&r, &p, 5_000), Some(1));
        assert_eq!(recheck_in(&ring(), &p, 100), None);
    }

    #[test]
    fn a_previous_key_without_promotion_time_is_kept() {
        let r = KeyRing {
            signing: "B".into(),
            previous: Some("A".into()),
            ..Default::default()
        };
        assert_eq!(settled(&r, None, &policy(), i64::MAX), Step::Keep);
    }
}
