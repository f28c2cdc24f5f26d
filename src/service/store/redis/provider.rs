//! The provider store on Redis (see `store/provider.rs`): a session's
//! sealed refresh token under the session's hash tag
//! (`{prefix}:{<sid>}:oidc-refresh`), a provider session's links in one set
//! under a tag of their own (`{prefix}:{psid-<digest>}:sessions`), so each
//! lives on one Redis Cluster slot.

use std::sync::LazyLock;

use async_trait::async_trait;
use redis::Script;

use super::{RedisStore, timed, unavailable};
use crate::clock::Millis;
use crate::service::store::StoreError;
use crate::service::store::provider::{Linked, ProviderStore};

/// Adds one link (ARGV[1], JSON) to KEYS[1], whose expiry is the latest
/// of its links' (ARGV[2] ms from now).
static LINK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('SADD', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"#,
    )
});

/// Takes every link of KEYS[1] out, in one step: one taker gets them.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
return v
"#,
    )
});

impl RedisStore {
    fn provider_links(&self, provider_sid: &str) -> String {
        format!("{}:{{psid-{provider_sid}}}:sessions", self.keys.prefix)
    }
}

#[async_trait]
impl ProviderStore for RedisStore {
    async fn put_refresh_token(
        &self,
        sid: &str,
        sealed: &str,
        ttl: Millis,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut set = redis::cmd("SET");
        set.arg(self.keys.session(sid, "oidc-refresh"))
            .arg(sealed)
            .arg("PX")
            .arg(ttl.max(1));
        timed(set.query_async::<()>(&mut conn)).await
    }

    async fn refresh_token(&self, sid: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.keys.session(sid, "oidc-refresh");
        timed(redis::cmd("GET").arg(key).query_async(&mut conn)).await
    }

    async fn link_provider_session(
        &self,
        provider_sid: &str,
        session: &Linked,
        now: Millis,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(session).map_err(unavailable)?;
        let mut conn = self.conn.clone();
        let mut inv = LINK.key(self.provider_links(provider_sid));
        inv.arg(json).arg((session.ends - now).max(1));
        timed(inv.invoke_async::<i64>(&mut conn)).await.map(|_| ())
    }

    async fn take_provider_session(
        &self,
        provider_sid: &str,
        now: Millis,
    ) -> Result<Vec<Linked>, StoreError> {
        let mut conn = self.conn.clone();
        let inv = TAKE.key(self.provider_links(provider_sid));
        let raw: Vec<String> = timed(inv.invoke_async(&mut conn)).await?;
        let mut out = Vec::with_capacity(raw.len());
        for v in raw {
            let l: Linked = serde_json::from_str(&v)
                .map_err(|e| StoreError::Corrupt(format!("provider session link: {e}")))?;
            if l.ends > now {
                out.push(l);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The provider store's contract against a real redis-server
    /// (`TOKENPOLICY_TEST_REDIS`, as the store's other Redis tests).
    #[tokio::test]
    #[ignore = "needs a redis-server in TOKENPOLICY_TEST_REDIS; tests/run.sh runs it"]
    async fn redis_provider_store_keeps_the_contract() {
        let url = std::env::var("TOKENPOLICY_TEST_REDIS")
            .expect("TOKENPOLICY_TEST_REDIS names the redis-server to test against");
        let prefix = format!("provider-{}", uuid::Uuid::new_v4().simple());
        let s = RedisStore::new(&url, &prefix).unwrap();
        use crate::service::store::provider::contract;
        contract::refresh_tokens_are_kept_replaced_and_expire(&s).await;
        contract::provider_sessions_are_taken_once(&s).await;
    }
}
