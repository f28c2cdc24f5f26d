//! Every Lua script the Redis store runs, each built once. `EVALSHA` is
//! tried first and the script's text sent only when Redis does not have it
//! yet (after a restart or a failover).

use std::sync::LazyLock;

use redis::Script;

use crate::service::store::registry;

/// Creates the epoch if it is missing; returns it and the Redis clock.
pub(super) static EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = redis.call('GET', KEYS[1])
if not e then
  e = ARGV[1] .. ':' .. string.format('%d', now)
  redis.call('SET', KEYS[1], e)
end
return {e, string.format('%d', now)}
"#,
    )
});

/// The once-only refresh claim (rule 7). KEYS: marker, epoch. ARGV: the
/// record's JSON up to its `at` value (see `claim::record_head`), ttl ms,
/// expected epoch, deadline (ms, Redis clock). The script appends `at`, the
/// Redis clock at the moment of the claim, and the closing brace: no JSON
/// decoding or encoding inside Redis. On a Redis Cluster the epoch key lives
/// on another shard than the session's keys, and a script may touch one
/// shard only: there the script gets the marker alone, and the epoch is
/// checked by the watch task (every `epoch::BEAT`) instead of inside the claim.
pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if KEYS[2] then
  local e = redis.call('GET', KEYS[2])
  if e ~= ARGV[3] then return {'epoch', e or '', string.format('%d', now)} end
end
if now > tonumber(ARGV[4]) then return {'late', '', string.format('%d', now)} end
local v = redis.call('GET', KEYS[1])
if v then return {'lost', v, string.format('%d', now)} end
redis.call('SET', KEYS[1], ARGV[1] .. string.format('%d', now) .. '}', 'PX', ARGV[2])
return {'won', '', string.format('%d', now)}
"#,
    )
});

/// A login attempt, taken before the password is checked: count it only
/// while under the limit (ARGV[1]); the window (ARGV[2] ms) starts with the
/// first. Returns {allowed (1/0), ms until the counter resets}.
pub(super) static TAKE_ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttl = redis.call('PTTL', KEYS[1])
if n >= tonumber(ARGV[1]) then
  if ttl < 0 then ttl = tonumber(ARGV[2]) end
  return {0, ttl}
end
n = redis.call('INCR', KEYS[1])
if n == 1 or ttl < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, redis.call('PTTL', KEYS[1])}
"#,
    )
});

/// Gives one taken attempt back, never below zero, keeping the window.
pub(super) static RELEASE_ATTEMPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n > 0 then redis.call('DECR', KEYS[1]) end
return 0
"#,
    )
});

/// Ends a user's sessions up to ARGV[1] (seconds), kept ARGV[2] ms; an
/// earlier end never replaces a later one.
pub(super) static END_USER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local v = tonumber(redis.call('GET', KEYS[1]) or '')
if v == nil or tonumber(ARGV[1]) >= v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
"#,
    )
});

/// The session registry's steps; their text and contract are in
/// [`registry`], beside the in-process implementation they mirror.
pub(super) static REGISTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(registry::REGISTER_SCRIPT));
pub(super) static LIST: LazyLock<Script> = LazyLock::new(|| Script::new(registry::LIST_SCRIPT));
pub(super) static REMOVE: LazyLock<Script> = LazyLock::new(|| Script::new(registry::REMOVE_SCRIPT));
pub(super) static REMOVE_ALL: LazyLock<Script> =
    LazyLock::new(|| Script::new(registry::REMOVE_ALL_SCRIPT));
