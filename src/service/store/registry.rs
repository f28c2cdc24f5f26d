//! The session registry: which sessions of a user are live, recorded when a
//! session starts and removed when it ends (expiry, logout, revocation).
//!
//! A user is a key the token service derives (a digest of the provider and
//! the subject); the store never sees a name. An entry lives until the
//! session's absolute end and no longer: with Redis its key expires then,
//! and the user's index expires with the last of them; in process, entries
//! past their end are dropped on access and swept once a second.
//!
//! A per-user limit is claimed in the same atomic step that records the
//! session (count, then evict the oldest or refuse, then insert): however
//! many logins race on however many replicas, no more than the limit are
//! ever recorded at once.

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// One session as the registry holds it. Never a token or a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub sid: String,
    /// `password` or `oidc`.
    pub method: String,
    /// The provider's issuer, for an OpenID Connect session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
    /// When the session started (ms since the epoch).
    pub started: Millis,
    /// Its absolute end under the policy in force at login (ms).
    pub ends: Millis,
    /// The last activity recorded (ms).
    pub last_active: Millis,
    /// The client address seen at login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// The `User-Agent` seen at login (cut to a few hundred bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// What happens to a login past the per-user limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitAction {
    /// The login succeeds; the oldest sessions end to make room.
    #[default]
    RevokeOldest,
    /// The login is refused.
    RefuseNew,
}

/// At most `max` live sessions per user (0: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionLimit {
    pub max: u64,
    pub action: LimitAction,
}

/// The answer to [`super::OneTimeStore::register_session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// Recorded; these sessions were taken out of the registry to make room
    /// (the caller revokes them).
    Added { evicted: Vec<SessionEntry> },
    /// The user is at the limit and the policy refuses new sessions:
    /// nothing was recorded.
    Refused,
}

/// Records `entry` for a user and claims the limit, all in one step.
/// KEYS[1]: the user's index (a sorted set, score: start). ARGV: 1 sid,
/// 2 entry (JSON), 3 start (ms), 4 ms until its end, 5 limit (0: none),
/// 6 refuse (1) or evict (0), 7 the prefix of the user's entry keys.
/// Every key is the user's: one hash tag, one Cluster slot.
/// Returns {1, evicted entries...} or {0}.
pub(super) const REGISTER_SCRIPT: &str = r#"
local prefix = ARGV[7]
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('EXISTS', prefix .. sid) == 0 then redis.call('ZREM', KEYS[1], sid) end
end
local limit = tonumber(ARGV[5])
local evicted = {1}
if limit > 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= limit then
    if ARGV[6] == '1' then return {0} end
    for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, n - limit)) do
      local v = redis.call('GET', prefix .. sid)
      if v then table.insert(evicted, v) end
      redis.call('DEL', prefix .. sid)
      redis.call('ZREM', KEYS[1], sid)
    end
  end
end
local ttl = tonumber(ARGV[4])
redis.call('SET', prefix .. ARGV[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return evicted
"#;

/// The user's live entries (KEYS[1] the index, ARGV[1] the entry prefix),
/// oldest first; index members whose entry expired are dropped.
pub(super) const LIST_SCRIPT: &str = r#"
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('GET', ARGV[1] .. sid)
  if v then table.insert(out, v) else redis.call('ZREM', KEYS[1], sid) end
end
return out
"#;

/// Removes one entry (ARGV[2] the sid); returns it, or nothing.
pub(super) const REMOVE_SCRIPT: &str = r#"
local key = ARGV[1] .. ARGV[2]
local v = redis.call('GET', key)
redis.call('DEL', key)
redis.call('ZREM', KEYS[1], ARGV[2])
if v then return {v} end
return {}
"#;

/// Removes every entry of the user; returns those that were live.
pub(super) const REMOVE_ALL_SCRIPT: &str = r#"
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('GET', ARGV[1] .. sid)
  if v then table.insert(out, v) end
  redis.call('DEL', ARGV[1] .. sid)
end
redis.call('DEL', KEYS[1])
return out
"#;

#[cfg(test)]
pub(crate) mod contract {
    //! The registry's behaviour, run against every store.
    use super::super::OneTimeStore;
    use super::*;

    pub fn entry(sid: &str, started: Millis, ends: Millis) -> SessionEntry {
        SessionEntry {
            sid: sid.into(),
            method: "password".into(),
            idp: None,
            started,
            ends,
            last_active: started,
            addr: Some("127.0.0.1".into()),
            user_agent: Some("test".into()),
        }
    }

    fn now() -> Millis {
        crate::clock::now_millis()
    }

    fn sids(v: &[SessionEntry]) -> Vec<&str> {
        v.iter().map(|e| e.sid.as_str()).collect()
    }

    const NONE: SessionLimit = SessionLimit {
        max: 0,
        action: LimitAction::RevokeOldest,
    };

    fn added(r: Registered) -> Vec<SessionEntry> {
        match r {
            Registered::Added { evicted } => evicted,
            Registered::Refused => panic!("expected the session recorded"),
        }
    }

    /// Record, list (oldest first, one user's only), remove one, remove all.
    pub async fn sessions_are_listed_and_removed(store: &dyn OneTimeStore, user: &str) {
        let t = now();
        let other = format!("{user}-other");
        for (i, sid) in ["a", "b", "c"].iter().enumerate() {
            let e = entry(sid, t + i as i64, t + 60_000);
            assert!(added(store.register_session(user, &e, NONE, t).await.unwrap()).is_empty());
        }
        store
            .register_session(&other, &entry("x", t, t + 60_000), NONE, t)
            .await
            .unwrap();
        let listed = store.list_sessions(user, t).await.unwrap();
        assert_eq!(sids(&listed), ["a", "b", "c"]);
        assert_eq!(listed[0], entry("a", t, t + 60_000));
        // Another user's sid is not this user's to remove.
        assert_eq!(store.remove_session(user, "x").await.unwrap(), None);
        assert_eq!(
            store
                .remove_session(user, "b")
                .await
                .unwrap()
                .map(|e| e.sid),
            Some("b".to_string())
        );
        assert_eq!(store.remove_session(user, "b").await.unwrap(), None);
        assert_eq!(
            sids(&store.list_sessions(user, t).await.unwrap()),
            ["a", "c"]
        );
        let all = store.remove_user_sessions(user).await.unwrap();
        assert_eq!(sids(&all), ["a", "c"]);
        assert!(store.list_sessions(user, t).await.unwrap().is_empty());
        assert_eq!(sids(&store.list_sessions(&other, t).await.unwrap()), ["x"]);
    }

    /// At the limit, `RevokeOldest` takes the oldest out (and says which),
    /// `RefuseNew` records nothing.
    pub async fn the_limit_evicts_the_oldest_or_refuses(store: &dyn OneTimeStore, user: &str) {
        let t = now();
        let evict = SessionLimit {
            max: 2,
            action: LimitAction::RevokeOldest,
        };
        for (i, sid) in ["a", "b"].iter().enumerate() {
            let e = entry(sid, t + i as i64, t + 60_000);
            assert!(added(store.register_session(user, &e, evict, t).await.unwrap()).is_empty());
        }
        let evicted = added(
            store
                .register_session(user, &entry("c", t + 2, t + 60_000), evict, t)
                .await
                .unwrap(),
        );
        assert_eq!(sids(&evicted), ["a"]);
        assert_eq!(
            sids(&store.list_sessions(user, t).await.unwrap()),
            ["b", "c"]
        );
        let refuse = SessionLimit {
            max: 2,
            action: LimitAction::RefuseNew,
        };
        assert_eq!(
            store
                .register_session(user, &entry("d", t + 3, t + 60_000), refuse, t)
                .await
                .unwrap(),
            Registered::Refused
        );
        assert_eq!(
            sids(&store.list_sessions(user, t).await.unwrap()),
            ["b", "c"]
        );
        // A lower limit (the policy changed) evicts down to it at once.
        let one = SessionLimit {
            max: 1,
            action: LimitAction::RevokeOldest,
        };
        let evicted = added(
            store
                .register_session(user, &entry("e", t + 4, t + 60_000), one, t)
                .await
                .unwrap(),
        );
        assert_eq!(sids(&evicted), ["b", "c"]);
        assert_eq!(sids(&store.list_sessions(user, t).await.unwrap()), ["e"]);
    }

    /// 50 racing registrations against a limit of 3: never more than 3
    /// recorded, and with `RefuseNew` exactly 3 accepted.
    pub async fn the_limit_holds_under_a_race(store: std::sync::Arc<dyn OneTimeStore>, user: &str) {
        for action in [LimitAction::RefuseNew, LimitAction::RevokeOldest] {
            let user = format!("{user}-{action:?}");
            let limit = SessionLimit { max: 3, action };
            let t = now();
            let mut tasks = Vec::new();
            for i in 0..50 {
                let (s, user) = (store.clone(), user.clone());
                tasks.push(tokio::spawn(async move {
                    let e = entry(&format!("r{i}"), t + i, t + 60_000);
                    s.register_session(&user, &e, limit, t).await.unwrap()
                }));
            }
            let mut accepted = 0;
            let mut evicted = 0;
            for task in tasks {
                match task.await.unwrap() {
                    Registered::Added { evicted: e } => {
                        accepted += 1;
                        evicted += e.len();
                    }
                    Registered::Refused => {}
                }
            }
            let live = store.list_sessions(&user, t).await.unwrap().len();
            assert_eq!(live, 3, "{action:?}");
            assert_eq!(accepted - evicted, 3, "{action:?}");
            if action == LimitAction::RefuseNew {
                assert_eq!(accepted, 3);
            }
        }
    }

    /// A session past its end is not listed, and is no longer counted.
    pub async fn ended_sessions_are_not_listed(store: &dyn OneTimeStore, user: &str) {
        let t = now();
        let e = entry("short", t, t + 100);
        store.register_session(user, &e, NONE, t).await.unwrap();
        assert_eq!(store.list_sessions(user, t).await.unwrap().len(), 1);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let t = now();
        assert!(store.list_sessions(user, t).await.unwrap().is_empty());
        let one = SessionLimit {
            max: 1,
            action: LimitAction::RefuseNew,
        };
        assert!(matches!(
            store
                .register_session(user, &entry("next", t, t + 60_000), one, t)
                .await
                .unwrap(),
            Registered::Added { .. }
        ));
    }

    /// A session's owner is kept for its life, then gone; each sid its own.
    pub async fn owners_expire_with_their_session(store: &dyn OneTimeStore, tag: &str) {
        let (a, b) = (format!("{tag}-a"), format!("{tag}-b"));
        assert_eq!(store.session_owner(&a).await.unwrap(), None);
        store
            .set_session_owner(&a, "user-a key-a", 300)
            .await
            .unwrap();
        store
            .set_session_owner(&b, "user-b key-b", 60_000)
            .await
            .unwrap();
        assert_eq!(
            store.session_owner(&a).await.unwrap().as_deref(),
            Some("user-a key-a")
        );
        assert_eq!(
            store.session_owner(&b).await.unwrap().as_deref(),
            Some("user-b key-b")
        );
        tokio::time::sleep(std::time::Duration::from_millis(450)).await;
        assert_eq!(store.session_owner(&a).await.unwrap(), None);
        assert_eq!(
            store.session_owner(&b).await.unwrap().as_deref(),
            Some("user-b key-b")
        );
    }

    /// Records `n` sessions of many users that end within a second, and
    /// waits until they have: the caller then counts what the store holds.
    pub async fn record_expiring_sessions(store: &dyn OneTimeStore, tag: &str, n: usize) {
        let t = now();
        for i in 0..n {
            let user = format!("{tag}-u{}", i % 97);
            let e = entry(&format!("s{i}"), t, t + 500);
            store.register_session(&user, &e, NONE, t).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(1_600)).await;
    }
}
