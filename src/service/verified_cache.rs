//! Tokens whose signature has been checked already: the decoded claims of a
//! token, keyed by the whole token text, so that a token seen before skips
//! the signature check (~50 µs for Ed25519) and the JSON decode.
//!
//! Only what cannot change for a given token text is kept here: that its
//! signature verifies under our keys and what its claims say. Everything
//! that can change — the policy's verdict on its times, the user and the
//! password version, revocation — is still decided on every request.
//!
//! Bounded in entries (S3-FIFO eviction, `quick_cache`); an entry is kept no
//! later than the end of the token's usefulness (validity plus renew limit,
//! capped by the session end) under the policy in force when it was stored,
//! and every use re-judges the claims under the policy in force now.

use std::sync::Arc;

use quick_cache::sync::Cache;

use crate::clock::Millis;
use crate::policy::Policy;
use crate::service::jwt::Claims;
use crate::service::rules;

/// Default number of tokens remembered. With the default session bound,
/// a replica that has seen 1,000,000 distinct tokens holds about 75 MiB
/// (bench/memory.sh): room under the operator's 128 MiB pod limit.
pub const DEFAULT_ENTRIES: usize = 50_000;

#[derive(Clone)]
struct Entry {
    claims: Arc<Claims>,
    /// After this instant (ms) the entry is never used.
    until: Millis,
}

pub struct Verified {
    cache: Option<Cache<Box<str>, Entry>>,
}

/// When a token stops being of any use under `policy`: the end of its
/// validity plus the renew limit, never past the session end (ms).
pub fn useful_until(c: &Claims, policy: &Policy) -> Millis {
    let renewable = rules::token_end(c, policy).saturating_add(policy.renew_limit as i64);
    renewable
        .min(rules::session_end(c, policy))
        .saturating_mul(1_000)
}

impl Verified {
    /// `entries == 0` turns the cache off: every token is checked in full.
    pub fn new(entries: usize) -> Verified {
        Verified {
            cache: (entries > 0).then(|| Cache::new(entries)),
        }
    }

    /// The claims of `token` if it was stored and is not past its end.
    pub fn get(&self, token: &str, now: Millis) -> Option<Arc<Claims>> {
        let cache = self.cache.as_ref()?;
        let entry = cache.get(token)?;
        if now >= entry.until {
            cache.remove(token);
            return None;
        }
        Some(entry.claims)
    }

    /// Remembers a token whose signature verified and which the rules let
    /// through at `now` under `policy`.
    pub fn insert(&self, token: &str, claims: Arc<Claims>, policy: &Policy, now: Millis) {
        let Some(cache) = &self.cache else { return };
        let until = useful_until(&claims, policy);
        if until > now {
            cache.insert(token.into(), Entry { claims, until });
        }
    }

    pub fn len(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Verified {
    fn default() -> Self {
        Verified::new(DEFAULT_ENTRIES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000;

    fn claims() -> Claims {
        crate::testing::claims_at(T0)
    }

    fn policy() -> Policy {
        Policy {
            session: 100,
            token: 60,
            renew_limit: 20,
            ..Policy::default()
        }
    }

    #[test]
    fn keeps_a_token_until_its_renew_limit_then_forgets_it() {
        let v = Verified::new(10);
        v.insert("tok", Arc::new(claims()), &policy(), T0 * 1_000);
        assert_eq!((v.len(), v.is_empty()), (1, false));
        assert_eq!(
            v.get("tok", T0 * 1_000 + 79_999).as_deref(),
            Some(&claims())
        );
        assert!(v.get("tok", (T0 + 80) * 1_000).is_none());
        // An expired entry is dropped, not only hidden.
        assert_eq!(v.len(), 0);
    }

    #[test]
    fn never_past_the_session_end() {
        let v = Verified::new(10);
        let p = Policy {
            session: 70,
            ..policy()
        };
        assert_eq!(useful_until(&claims(), &p), (T0 + 70) * 1_000);
        v.insert("tok", Arc::new(claims()), &p, T0 * 1_000);
        assert!(v.get("tok", (T0 + 70) * 1_000).is_none());
    }

    #[test]
    fn the_whole_token_is_the_key() {
        let v = Verified::new(10);
        v.insert("a.b.c", Arc::new(claims()), &policy(), T0 * 1_000);
        assert!(v.get("a.b.c", T0 * 1_000).is_some());
        assert!(v.get("a.b.", T0 * 1_000).is_none());
        assert!(v.get("a.b.cd", T0 * 1_000).is_none());
        assert!(v.get("A.b.c", T0 * 1_000).is_none());
    }

    #[test]
    fn a_token_already_useless_is_not_stored() {
        let v = Verified::new(10);
        v.insert("tok", Arc::new(claims()), &policy(), (T0 + 80) * 1_000);
        assert!(v.is_empty());
    }

    #[test]
    fn bounded_and_can_be_turned_off() {
        let v = Verified::new(100);
        for i in 0..10_000 {
            v.insert(&format!("t{i}"), Arc::new(claims()), &policy(), T0 * 1_000);
        }
        assert!((1..=100).contains(&v.len()), "{}", v.len());
        let off = Verified::new(0);
        off.insert("tok", Arc::new(claims()), &policy(), T0 * 1_000);
        assert!(off.get("tok", T0 * 1_000).is_none());
    }
}
