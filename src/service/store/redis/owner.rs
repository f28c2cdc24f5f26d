//! Whose session a `sid` is: one key under the session's own hash tag
//! (`{prefix}:{<sid>}:owner`), written at login and expiring with the
//! session, so that the admin API can end a session known by its id alone.
//! It holds the digests the service derives from the user, never a name.

use super::{RedisConn, timed};
use crate::clock::Millis;
use crate::service::store::StoreError;

pub(super) async fn set(
    conn: &RedisConn,
    key: &str,
    owner: &str,
    ttl: Millis,
) -> Result<(), StoreError> {
    let mut conn = conn.clone();
    let mut set = redis::cmd("SET");
    set.arg(key).arg(owner).arg("PX").arg(ttl.max(1));
    timed(set.query_async::<()>(&mut conn)).await
}

pub(super) async fn get(conn: &RedisConn, key: &str) -> Result<Option<String>, StoreError> {
    let mut conn = conn.clone();
    let mut get = redis::cmd("GET");
    get.arg(key);
    timed(get.query_async::<Option<String>>(&mut conn)).await
}
