//! Session activity in the store, for the idle timeout (rule 2): the
//! latest activity of each session, written by every replica at most once
//! per write slice (in the background, batched), and read by a replica
//! that has not itself seen the session active lately, before it ends it.
//!
//! With Redis, a session's activity is one key beside its registry entry,
//! under the user's hash tag (one Redis Cluster slot): `…:active:<sid>`,
//! holding the last activity (ms since the epoch) or `idle` once the
//! session ended for idleness, which no later write undoes. It expires with
//! the session. Each write also brings the registry entry's `last_active`
//! up to date, in the same script. In process, the same in a map.

use crate::clock::Millis;

/// One session's latest activity, as one replica writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// The registry's user (a digest the token service derives).
    pub user: String,
    pub sid: String,
    /// The activity (ms since the epoch).
    pub at: Millis,
    /// How long the record must be kept: until the session's end (ms).
    pub ttl: Millis,
}

/// The answer to [`super::OneTimeStore::check_idle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleCheck {
    /// Alive: this request's activity is recorded; `last` is the latest
    /// activity the store held before it (or the floor given).
    Active { last: Millis },
    /// Ended for idleness, for good: by this very check (`just_now`), or
    /// before it.
    Ended { just_now: bool },
}

/// Records activity: KEYS[1] the session's activity key, KEYS[2] its
/// registry entry; ARGV[1] the activity (ms), ARGV[2] ms to keep it. Never
/// moves it back, never undoes an idle end. Returns 1 if written.
pub(super) const RECORD_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == 'idle' then return 0 end
local at = tonumber(ARGV[1])
local n = tonumber(v or '')
if n ~= nil and n >= at then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local e = redis.call('GET', KEYS[2])
if e then
  local ok, t = pcall(cjson.decode, e)
  if ok and type(t) == 'table' and (tonumber(t.last_active) or 0) < at then
    t.last_active = at
    redis.call('SET', KEYS[2], cjson.encode(t), 'KEEPTTL')
  end
end
return 1
"#;

/// Checks a session for idleness and records this request, in one step:
/// KEYS[1] the activity key, KEYS[2] the registry entry, KEYS[3] the
/// user's registry index; ARGV[1] now (ms), ARGV[2] the floor (activity the
/// token itself proves), ARGV[3] the latest last activity that means idle
/// (now - timeout - slack), ARGV[4] ms to keep the record, ARGV[5] the sid.
/// Idle: marks it so for good and takes the registry entry out; returns
/// -1 (-2 when it was so already). Else records now and returns the last
/// activity before it.
pub(super) const CHECK_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == 'idle' then return -2 end
local last = tonumber(ARGV[2])
local n = tonumber(v or '')
if n ~= nil and n > last then last = n end
if last <= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], 'idle', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[5])
  return -1
end
local now = tonumber(ARGV[1])
if now > last then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
  local e = redis.call('GET', KEYS[2])
  if e then
    local ok, t = pcall(cjson.decode, e)
    if ok and type(t) == 'table' and (tonumber(t.last_active) or 0) < now then
      t.last_active = now
      redis.call('SET', KEYS[2], cjson.encode(t), 'KEEPTTL')
    end
  end
end
return last
"#;

/// The Redis side: keys are given by the store (the registry's, and the
/// activity key under the same hash tag).
pub(super) mod redis_side {
    use std::time::Duration;

    use super::{Activity, IdleCheck};
    use crate::clock::Millis;
    use crate::service::store::StoreError;
    use crate::service::store::redis::conn::RedisConn;

    static RECORD: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(super::RECORD_SCRIPT));
    static CHECK: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(super::CHECK_SCRIPT));

    /// Longest wait for one batch or check.
    const TIMEOUT: Duration = Duration::from_secs(2);
    /// Writes in flight at once: the connection pipelines them.
    const IN_FLIGHT: usize = 256;

    /// A session's keys: (activity, registry entry, registry index).
    pub struct Keys {
        pub activity: String,
        pub entry: String,
        pub index: String,
    }

    fn unavailable(e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }

    /// Writes a batch: the scripts are sent together on the one connection
    /// (pipelined by it; in a Cluster, to each session's node), at most
    /// [`IN_FLIGHT`] at a time.
    pub async fn record(
        conn: &RedisConn,
        batch: &[Activity],
        keys: impl Fn(&Activity) -> Keys,
    ) -> Result<(), StoreError> {
        for chunk in batch.chunks(IN_FLIGHT) {
            let calls = chunk.iter().map(|a| {
                let k = keys(a);
                let mut conn = conn.clone();
                async move {
                    let mut inv = RECORD.key(k.activity);
                    inv.key(k.entry).arg(a.at).arg(a.ttl.max(1));
                    inv.invoke_async::<i64>(&mut conn).await
                }
            });
            let answers = tokio::time::timeout(TIMEOUT, futures_util::future::join_all(calls))
                .await
                .map_err(|_| StoreError::Unavailable("Redis did not answer in time".into()))?;
            if let Some(e) = answers.into_iter().find_map(Result::err) {
                return Err(unavailable(e));
            }
        }
        Ok(())
    }

    pub async fn check(
        conn: &RedisConn,
        a: &Activity,
        keys: Keys,
        floor: Millis,
        idle_before: Millis,
    ) -> Result<IdleCheck, StoreError> {
        let mut conn = conn.clone();
        let mut inv = CHECK.key(keys.activity);
        inv.key(keys.entry)
            .key(keys.index)
            .arg(a.at)
            .arg(floor)
            .arg(idle_before)
            .arg(a.ttl.max(1))
            .arg(&a.sid);
        let last: i64 = tokio::time::timeout(TIMEOUT, inv.invoke_async(&mut conn))
            .await
            .map_err(|_| StoreError::Unavailable("Redis did not answer in time".into()))?
            .map_err(unavailable)?;
        Ok(match last {
            -1 => IdleCheck::Ended { just_now: true },
            l if l < 0 => IdleCheck::Ended { just_now: false },
            last => IdleCheck::Active { last },
        })
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The activity's behaviour, run against every store.
    use super::super::OneTimeStore;
    use super::*;
    use crate::service::store::registry::contract::entry;
    use crate::service::store::{LimitAction, SessionLimit};

    fn act(user: &str, sid: &str, at: Millis) -> Activity {
        Activity {
            user: user.into(),
            sid: sid.into(),
            at,
            ttl: 60_000,
        }
    }

    /// Activity written is what a check reads; an older write never moves
    /// it back; the floor counts when nothing newer is held; past the idle
    /// bound the session ends for good, its registry entry goes, and no
    /// later write brings it back.
    pub async fn activity_is_recorded_and_idle_ends_for_good(store: &dyn OneTimeStore, user: &str) {
        let t = crate::clock::now_millis();
        let none = SessionLimit {
            max: 0,
            action: LimitAction::RevokeOldest,
        };
        for sid in ["a", "b", "c"] {
            store
                .register_session(user, &entry(sid, t, t + 60_000), none, t)
                .await
                .unwrap();
        }
        // Nothing written: the floor answers, and the check records itself.
        assert_eq!(
            store
                .check_idle(&act(user, "a", t + 10), t, t - 1)
                .await
                .unwrap(),
            IdleCheck::Active { last: t }
        );
        assert_eq!(
            store
                .check_idle(&act(user, "a", t + 10), t, t - 1)
                .await
                .unwrap(),
            IdleCheck::Active { last: t + 10 }
        );
        // A batch over several sessions; an older write changes nothing.
        store
            .record_activity(&[act(user, "a", t + 500), act(user, "b", t + 700)])
            .await
            .unwrap();
        store
            .record_activity(&[act(user, "a", t + 100)])
            .await
            .unwrap();
        assert_eq!(
            store
                .check_idle(&act(user, "a", t + 500), t, t - 1)
                .await
                .unwrap(),
            IdleCheck::Active { last: t + 500 }
        );
        // The registry shows the last activity.
        let listed = store.list_sessions(user, t).await.unwrap();
        let last_of = |sid: &str| listed.iter().find(|e| e.sid == sid).map(|e| e.last_active);
        assert_eq!(last_of("a"), Some(t + 500));
        assert_eq!(last_of("b"), Some(t + 700));
        assert_eq!(last_of("c"), Some(t));
        // b's last activity (t + 700) is at or before the idle bound: it ends.
        assert_eq!(
            store
                .check_idle(&act(user, "b", t + 20_000), t, t + 700)
                .await
                .unwrap(),
            IdleCheck::Ended { just_now: true }
        );
        let listed = store.list_sessions(user, t).await.unwrap();
        assert_eq!(
            listed.iter().map(|e| e.sid.as_str()).collect::<Vec<_>>(),
            ["a", "c"]
        );
        // For good: a late write and a generous check change nothing.
        store
            .record_activity(&[act(user, "b", t + 30_000)])
            .await
            .unwrap();
        assert_eq!(
            store
                .check_idle(&act(user, "b", t + 30_000), t + 30_000, 0)
                .await
                .unwrap(),
            IdleCheck::Ended { just_now: false }
        );
        // Another session of the user is untouched.
        assert_eq!(
            store
                .check_idle(&act(user, "c", t + 20_000), t, t - 1)
                .await
                .unwrap(),
            IdleCheck::Active { last: t }
        );
        // A session with no registry entry is tracked all the same.
        store
            .record_activity(&[act(user, "unlisted", t + 900)])
            .await
            .unwrap();
        assert_eq!(
            store
                .check_idle(&act(user, "unlisted", t + 1_000), t, t - 1)
                .await
                .unwrap(),
            IdleCheck::Active { last: t + 900 }
        );
    }
}

#[cfg(test)]
mod cluster_tests {
    use std::sync::Arc;

    use crate::service::store::RedisStore;
    use crate::service::store::registry::contract as registry;

    /// The registry and activity contracts on a real Redis Cluster
    /// (`TOKENPOLICY_TEST_REDIS_CLUSTER`, a `redis+cluster://` URL; tests/run.sh
    /// starts one and runs this test): every key of a user's sessions shares
    /// the user's hash tag, so each script runs on one slot. Without a
    /// cluster it fails: it never passes untested.
    #[tokio::test]
    #[ignore = "needs a Redis Cluster in TOKENPOLICY_TEST_REDIS_CLUSTER; tests/run.sh runs it"]
    async fn redis_cluster_keeps_the_registry_contract() {
        let url = std::env::var("TOKENPOLICY_TEST_REDIS_CLUSTER")
            .expect("TOKENPOLICY_TEST_REDIS_CLUSTER names the Redis Cluster to test against");
        assert!(url.starts_with("redis+cluster://"), "{url}");
        let prefix = format!("cluster-{}", uuid::Uuid::new_v4().simple());
        let s = RedisStore::new(&url, &prefix).unwrap();
        registry::sessions_are_listed_and_removed(&s, "u-list").await;
        registry::the_limit_evicts_the_oldest_or_refuses(&s, "u-limit").await;
        registry::ended_sessions_are_not_listed(&s, "u-end").await;
        registry::the_limit_holds_under_a_race(
            Arc::new(RedisStore::new(&url, &prefix).unwrap()),
            "u-race",
        )
        .await;
        super::contract::activity_is_recorded_and_idle_ends_for_good(&s, "u-idle").await;
        // A batch across many users lands on many slots: written all the same.
        let t = crate::clock::now_millis();
        let batch: Vec<_> = (0..64)
            .map(|i| super::Activity {
                user: format!("u-spread-{i}"),
                sid: format!("s{i}"),
                at: t + i,
                ttl: 60_000,
            })
            .collect();
        use crate::service::store::OneTimeStore as _;
        s.record_activity(&batch).await.unwrap();
        for a in &batch {
            assert_eq!(
                s.check_idle(a, 0, t - 1).await.unwrap(),
                super::IdleCheck::Active { last: a.at },
                "{}",
                a.user
            );
        }
    }
}
