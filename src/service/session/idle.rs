//! Rule 2's idle clause (`sessionIdleTimeout`) in the service: a session
//! with no activity for the timeout ends, `401 IDLE_SESSION`.
//!
//! Activity is every request that [`TokenService::judge`] accepts: a
//! verify, a refresh, a sessions call. It costs no store round trip on the
//! hot path:
//!
//! - Each replica remembers the sessions it saw lately ([`IdleTracker`]):
//!   one that saw a session active within the timeout answers at once.
//! - Each replica writes a session's activity to the store at most once
//!   per write slice ([`rules::idle_write_slice`]: the slack less
//!   [`rules::IDLE_ALLOWANCE`]), in the background: a flush every
//!   [`FLUSH_TICK`] sends every session due in one batch.
//! - A replica whose own view says "idle" (it saw no activity for the
//!   timeout, or never saw the session) asks the store once, in one atomic
//!   step that also records this request ([`OneTimeStore::check_idle`]):
//!   the session is over only if the shared last activity is the timeout
//!   plus the slack old; then it is over for good, on every replica.
//!
//! [`TokenService::idle_decision`] is where an idle end is decided (and
//! told, once, by the replica that made it).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dashmap::DashMap;

use super::TokenService;
use crate::policy::Policy;
use crate::service::audit::{Event, Who};
use crate::service::error::{ApiError, Code};
use crate::service::jwt::Claims;
use crate::service::rules::{self, Millis};
use crate::service::store::{Activity, IdleCheck, OneTimeStore};

/// How often the background writer sends the activity that is due.
pub const FLUSH_TICK: Duration = Duration::from_millis(250);
/// Sessions a replica remembers at most; past it, a session it does not
/// hold is asked of the store at each request (correct, only dearer).
const MAX_TRACKED: usize = 200_000;
/// How often sessions not seen for longer than their horizon are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What this replica knows of one session's activity.
#[derive(Debug, Clone)]
struct Seen {
    /// The registry's user, for the store's keys.
    user: String,
    /// The latest activity this replica saw or read (ms).
    last: Millis,
    /// The latest activity it has written (or that the login covers).
    written: Millis,
    /// Queued for the next flush.
    dirty: bool,
    /// Ended for idleness (for good).
    ended: bool,
    /// The session's end (ms): how long the store keeps its record.
    ends: Millis,
    /// Forgotten after this (ms): its last activity plus timeout and slack.
    horizon: Millis,
}

#[derive(Default)]
struct Inner {
    seen: DashMap<String, Seen>,
    /// Sessions queued for the next flush, each once.
    due: Mutex<Vec<String>>,
    /// When the idle timeout was turned on while this replica ran (ms;
    /// 0: it was on from the start, or is off): sessions count as active
    /// from then, so that turning it on ends none at once.
    on_since: AtomicI64,
    writer: AtomicBool,
}

/// One replica's view of session activity, and its background writer.
pub(crate) struct IdleTracker {
    inner: Arc<Inner>,
    store: Arc<dyn OneTimeStore>,
}

/// What this replica's own view says.
enum Local {
    Alive,
    Ended,
    /// Only the store can tell.
    Ask,
}

fn idle_error() -> ApiError {
    ApiError::new(
        Code::IdleSession,
        "session ended after inactivity; log in again",
    )
}

impl IdleTracker {
    pub(super) fn new(store: Arc<dyn OneTimeStore>) -> IdleTracker {
        IdleTracker {
            inner: Arc::default(),
            store,
        }
    }

    /// No background writer: the test flushes ([`IdleTracker::flush_now`]).
    #[cfg(test)]
    pub(super) fn without_writer(&self) {
        self.inner.writer.store(true, Ordering::SeqCst);
    }

    /// A policy change: the idle timeout turned on (or not) at `now`.
    pub(super) fn policy_changed(&self, before: &Policy, after: &Policy, now: Millis) {
        if before.idle_timeout.is_none() && after.idle_timeout.is_some() {
            self.inner.on_since.store(now, Ordering::Relaxed);
        }
    }

    fn on_since(&self) -> Millis {
        self.inner.on_since.load(Ordering::Relaxed)
    }

    fn queue(&self, sid: &str) {
        let mut due = self.inner.due.lock().unwrap_or_else(|e| e.into_inner());
        due.push(sid.to_string());
    }

    /// The hot path: no store, a map lookup.
    fn local(&self, c: &Claims, t: u64, floor: Millis, ends: Millis, now: Millis) -> Local {
        let slice = rules::idle_write_slice(t);
        let horizon = now
            .saturating_add(rules::idle_slack(t))
            .saturating_add((t as Millis).saturating_mul(1_000));
        if let Some(mut s) = self.inner.seen.get_mut(&c.sid) {
            if s.ended {
                return Local::Ended;
            }
            if rules::idle_locally(s.last.max(floor), t, now) {
                return Local::Ask;
            }
            if now > s.last {
                s.last = now;
                s.horizon = horizon;
            }
            if !s.dirty && s.last >= s.written.saturating_add(slice) {
                s.dirty = true;
                drop(s);
                self.queue(&c.sid);
            }
            return Local::Alive;
        }
        if rules::idle_locally(floor, t, now) || self.inner.seen.len() >= MAX_TRACKED {
            return Local::Ask;
        }
        // The login is every replica's floor (`auth_time`, in every token
        // of the session); anything since is this replica's to write.
        let written = c.auth_time.saturating_mul(1_000);
        let dirty = now >= written.saturating_add(slice);
        self.inner.seen.insert(
            c.sid.clone(),
            Seen {
                user: super::registry::registry_user(c.idp.as_deref(), &c.sub),
                last: now,
                written,
                dirty,
                ended: false,
                ends,
                horizon,
            },
        );
        if dirty {
            self.queue(&c.sid);
        }
        self.start_writer();
        Local::Alive
    }

    /// The store answered: alive, with this request recorded there.
    fn checked(&self, c: &Claims, user: String, t: u64, ends: Millis, now: Millis) {
        let horizon = now
            .saturating_add(rules::idle_slack(t))
            .saturating_add((t as Millis).saturating_mul(1_000));
        if self.inner.seen.len() >= MAX_TRACKED && !self.inner.seen.contains_key(&c.sid) {
            return;
        }
        let mut s = self.inner.seen.entry(c.sid.clone()).or_insert(Seen {
            user,
            last: now,
            written: now,
            dirty: false,
            ended: false,
            ends,
            horizon,
        });
        s.last = s.last.max(now);
        s.written = s.written.max(now);
        s.horizon = s.horizon.max(horizon);
        drop(s);
        self.start_writer();
    }

    fn ended(&self, c: &Claims, user: String, ends: Millis) {
        if self.inner.seen.len() >= MAX_TRACKED && !self.inner.seen.contains_key(&c.sid) {
            return;
        }
        let mut s = self.inner.seen.entry(c.sid.clone()).or_insert(Seen {
            user,
            last: 0,
            written: 0,
            dirty: false,
            ended: true,
            ends,
            horizon: ends,
        });
        s.ended = true;
        s.dirty = false;
        s.horizon = s.horizon.max(ends);
    }

    /// Starts the background writer once, on the runtime at hand.
    fn start_writer(&self) {
        if self.inner.writer.load(Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.writer.swap(true, Ordering::SeqCst) {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let store = self.store.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut swept = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                // The service is gone: so is the writer.
                let Some(inner) = Weak::upgrade(&inner) else {
                    return;
                };
                flush(&inner, store.as_ref(), crate::clock::now_millis()).await;
                if swept.elapsed() >= SWEEP_EVERY {
                    sweep(&inner, crate::clock::now_millis());
                    swept = tokio::time::Instant::now();
                }
            }
        });
    }

    /// Sends the activity that is due now (what the background writer does
    /// every [`FLUSH_TICK`]).
    #[cfg(test)]
    pub(super) async fn flush_now(&self, now: Millis) {
        flush(&self.inner, self.store.as_ref(), now).await;
    }
}

/// One batch: every queued session's latest activity. What a failed write
/// leaves is queued again.
async fn flush(inner: &Inner, store: &dyn OneTimeStore, now: Millis) {
    let sids = std::mem::take(&mut *inner.due.lock().unwrap_or_else(|e| e.into_inner()));
    if sids.is_empty() {
        return;
    }
    let mut batch = Vec::with_capacity(sids.len());
    let mut before = Vec::with_capacity(sids.len());
    for sid in sids {
        let Some(mut s) = inner.seen.get_mut(&sid) else {
            continue;
        };
        if !s.dirty || s.ended {
            continue;
        }
        s.dirty = false;
        before.push(s.written);
        s.written = s.last;
        batch.push(Activity {
            user: s.user.clone(),
            sid: sid.clone(),
            at: s.last,
            ttl: s.ends.saturating_sub(now).max(1_000),
        });
    }
    if batch.is_empty() {
        return;
    }
    if let Err(e) = store.record_activity(&batch).await {
        tracing::warn!(error = %e, sessions = batch.len(), "session activity not written yet; retrying");
        let mut due = inner.due.lock().unwrap_or_else(|e| e.into_inner());
        for (a, written) in batch.into_iter().zip(before) {
            if let Some(mut s) = inner.seen.get_mut(&a.sid)
                && !s.ended
            {
                s.written = s.written.min(written);
                if !s.dirty {
                    s.dirty = true;
                    due.push(a.sid);
                }
            }
        }
    }
}

/// Forgets sessions past their horizon (their activity is in the store,
/// or they are idle), and ended ones past their end.
fn sweep(inner: &Inner, now: Millis) {
    inner
        .seen
        .retain(|_, s| s.dirty || (if s.ended { s.ends } else { s.horizon }) > now);
}

impl TokenService {
    /// Rule 2's idle clause: whether the session of `c` ended for
    /// inactivity (`IDLE_SESSION`); if not, this request is its activity.
    pub(super) async fn idle_end(
        &self,
        c: &Claims,
        policy: &Policy,
        now: Millis,
    ) -> Result<(), ApiError> {
        let Some(t) = policy.idle_timeout else {
            return Ok(());
        };
        let floor = rules::token_activity(c).max(self.idle.on_since());
        let ends = rules::session_end(c, policy).saturating_mul(1_000);
        match self.idle.local(c, t, floor, ends, now) {
            Local::Alive => return Ok(()),
            Local::Ended => return Err(idle_error()),
            Local::Ask => {}
        }
        let user = super::registry::registry_user(c.idp.as_deref(), &c.sub);
        let a = Activity {
            user: user.clone(),
            sid: c.sid.clone(),
            at: now,
            ttl: ends.saturating_sub(now).max(1_000),
        };
        match self.idle_decision(&c.sub, &a, floor, t, now).await? {
            IdleCheck::Active { .. } => {
                self.idle.checked(c, user, t, ends, now);
                Ok(())
            }
            IdleCheck::Ended { .. } => {
                self.idle.ended(c, user, ends);
                Err(idle_error())
            }
        }
    }

    /// Where an idle end is decided, in one atomic store step (see
    /// [`OneTimeStore::check_idle`]): the session of `a` (of user `sub`)
    /// ends if its shared last activity, at least `floor`, is the timeout
    /// `t` plus the slack old at `now`; else `a` is its activity. An end
    /// is told once, by the replica whose check made it (`just_now`).
    async fn idle_decision(
        &self,
        sub: &str,
        a: &Activity,
        floor: Millis,
        t: u64,
        now: Millis,
    ) -> Result<IdleCheck, ApiError> {
        let answer = self
            .store
            .check_idle(a, floor, rules::idle_bound(t, now))
            .await?;
        if answer == (IdleCheck::Ended { just_now: true }) {
            tracing::info!(user = ?sub, sid = %a.sid, "session ended after inactivity");
            self.audit.emit(Event::session_idle(
                now,
                Who::named(sub).sid(&a.sid),
                &super::nobody(),
            ));
        }
        Ok(answer)
    }

    /// Before a login claims the per-user limit: the user's sessions that
    /// the registry shows idle past the timeout and the slack are ended
    /// (checked in the store, which has the last word), so that sessions
    /// nobody uses any more do not hold the user's places.
    pub(super) async fn end_idle_sessions(
        &self,
        of: &Claims,
        user: &str,
        policy: &Policy,
        now: Millis,
    ) -> Result<(), ApiError> {
        let Some(t) = policy.idle_timeout else {
            return Ok(());
        };
        if policy.max_sessions_per_user == 0 {
            return Ok(());
        }
        for e in self.store.list_sessions(user, now).await? {
            if !rules::idle_shared(e.last_active.max(e.started), t, now) {
                continue;
            }
            let a = Activity {
                user: user.to_string(),
                sid: e.sid.clone(),
                at: now,
                ttl: e.ends.saturating_sub(now).max(1_000),
            };
            self.idle_decision(&of.sub, &a, e.started, t, now).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::service::jwt::Key;
    use crate::service::session::Client;
    use crate::service::store::MemoryStore;

    const T0: Millis = 1_800_000_000_000;

    fn idle_policy(t: u64) -> Policy {
        Policy {
            session: 3_600,
            token: 600,
            renew_limit: 600,
            grace: 10,
            idle_timeout: Some(t),
            ..Policy::default()
        }
    }

    /// One hash for every replica: the same users file.
    static HASH: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| bcrypt::hash("pw", 4).unwrap());

    fn replica(store: Arc<dyn OneTimeStore>, key: &str, policy: Policy) -> TokenService {
        let s = crate::testing::service()
            .policy(policy)
            .users(crate::testing::users(&format!("alice:{}\n", *HASH)))
            .keys(crate::testing::keys_of(vec![
                Key::from_pem(key, "k").unwrap(),
            ]))
            .store(store)
            .build();
        s.idle.without_writer();
        s
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    /// One replica, the in-process store, a clock in the test's hand:
    /// activity keeps the session alive; none for the timeout ends it, not
    /// before the timeout and by the timeout plus the slack; then for good.
    #[tokio::test]
    async fn no_activity_for_the_timeout_ends_the_session() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let s = replica(store.clone(), &Key::generate().to_pem(), idle_policy(10));
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        // Activity every 9 s for a minute keeps it.
        let mut now = T0;
        for _ in 0..7 {
            now += 9_000;
            assert!(s.verify(&t.token, true, now).await.is_ok(), "at {now}");
        }
        // Then nothing: alive until the timeout (this check is activity too).
        let last = now + 9_999;
        assert!(s.verify(&t.token, true, last).await.is_ok());
        // Ended by the timeout plus the slack (5 s).
        assert_eq!(
            code(s.verify(&t.token, true, last + 15_000).await),
            "IDLE_SESSION"
        );
        // For good, for every use of its tokens.
        assert_eq!(
            code(s.refresh(&t.token, last + 16_000).await),
            "IDLE_SESSION"
        );
        assert_eq!(
            code(s.sessions(&t.token, last + 16_000).await),
            "IDLE_SESSION"
        );
        // Another session of the user is its own.
        let other = s
            .login("alice", "pw", None, || last + 16_000)
            .await
            .unwrap();
        assert!(s.verify(&other.token, true, last + 17_000).await.is_ok());
    }

    /// An idle end is written to the audit trail once, by the replica whose
    /// check ended it: later refusals of the same session write nothing.
    #[tokio::test]
    async fn an_idle_end_is_audited_once() {
        let path = std::env::temp_dir().join(format!("tp-idle-{}.jsonl", uuid::Uuid::new_v4()));
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let s = replica(store, &Key::generate().to_pem(), idle_policy(10));
        let log = crate::service::audit::AuditLog::open(path.to_str().unwrap(), &s.metrics.audit)
            .unwrap();
        let s = s.with_audit_log(log);
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        for at in [T0 + 30_000, T0 + 31_000, T0 + 32_000] {
            assert_eq!(code(s.verify(&t.token, true, at).await), "IDLE_SESSION");
        }
        s.audit_log().flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        let idle: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"] == "session_idle")
            .collect();
        std::fs::remove_file(&path).ok();
        assert_eq!(idle.len(), 1, "{text}");
        assert_eq!(idle[0]["sid"], t.claims.sid.as_str());
        assert_eq!(idle[0]["user"], "alice");
    }

    /// Off (no `sessionIdleTimeout`): nothing ends for inactivity, and no
    /// activity is recorded.
    #[tokio::test]
    async fn without_the_timeout_sessions_never_idle() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let s = replica(
            store,
            &Key::generate().to_pem(),
            Policy {
                idle_timeout: None,
                ..idle_policy(10)
            },
        );
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        assert!(s.verify(&t.token, true, T0 + 500_000).await.is_ok());
        assert_eq!(s.idle.inner.seen.len(), 0);
    }

    /// Two replicas on one store: activity on A keeps the session alive on
    /// B, which has not seen it for longer than the timeout; with none
    /// anywhere, both end it.
    #[tokio::test]
    async fn activity_on_one_replica_keeps_the_session_on_another() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let key = Key::generate().to_pem();
        let a = replica(store.clone(), &key, idle_policy(10));
        let b = replica(store.clone(), &key, idle_policy(10));
        let t = a.login("alice", "pw", None, || T0).await.unwrap();
        b.verify(&t.token, true, T0 + 1_000).await.unwrap();
        let mut now = T0 + 1_000;
        for _ in 0..10 {
            now += 4_000;
            assert!(a.verify(&t.token, true, now).await.is_ok());
            a.idle.flush_now(now).await;
        }
        // B last saw it 40 s ago; A wrote its activity: alive on B.
        assert!(b.verify(&t.token, true, now + 1_000).await.is_ok());
        // Without the writes B would have ended it: the flush is what counts.
        let c = replica(store.clone(), &key, idle_policy(10));
        let t2 = a.login("alice", "pw", None, || now).await.unwrap();
        let mut n2 = now;
        for _ in 0..10 {
            n2 += 4_000;
            assert!(a.verify(&t2.token, true, n2).await.is_ok());
        }
        assert_eq!(
            code(c.verify(&t2.token, true, n2 + 1_000).await),
            "IDLE_SESSION",
            "unwritten activity on A is unknown to C"
        );
        // No activity anywhere: both end the first session, by the slack.
        let last = now + 1_000;
        a.idle.flush_now(last).await;
        b.idle.flush_now(last).await;
        assert!(a.verify(&t.token, true, last + 9_000).await.is_ok());
        let end = last + 9_000 + 15_000;
        assert_eq!(code(b.verify(&t.token, true, end).await), "IDLE_SESSION");
        assert_eq!(code(a.verify(&t.token, true, end).await), "IDLE_SESSION");
    }

    /// A replica writes a busy session's activity at most once per write
    /// slice, however many requests it answers.
    #[tokio::test]
    async fn activity_is_written_once_per_slice() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let s = replica(store.clone(), &Key::generate().to_pem(), idle_policy(10));
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        let slice = rules::idle_write_slice(10);
        let mut queued = 0;
        let mut now = T0;
        // A request every 10 ms for 60 s: 6,000 requests.
        for _ in 0..6_000 {
            now += 10;
            assert!(s.verify(&t.token, true, now).await.is_ok());
            let due = s.idle.inner.due.lock().unwrap().len();
            if due > 0 {
                queued += 1;
                s.idle.flush_now(now).await;
            }
        }
        let most = (60_000 / slice + 1) as usize;
        assert!(
            queued <= most && queued >= most - 2,
            "{queued} writes, at most {most}"
        );
    }

    /// Turning the idle timeout on while running ends no session at once:
    /// their inactivity counts from then.
    #[tokio::test]
    async fn turning_the_timeout_on_counts_from_then() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let s = replica(
            store,
            &Key::generate().to_pem(),
            Policy {
                idle_timeout: None,
                ..idle_policy(10)
            },
        );
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        s.set_policy_at(idle_policy(10), T0 + 100_000);
        assert!(s.verify(&t.token, true, T0 + 105_000).await.is_ok());
        let u = s.login("alice", "pw", None, || T0).await.unwrap();
        assert_eq!(
            code(s.verify(&u.token, true, T0 + 115_000).await),
            "IDLE_SESSION"
        );
    }

    /// An idle session holds no place under the per-user limit: a login
    /// that would be refused takes its place instead.
    #[tokio::test]
    async fn idle_sessions_free_their_places_under_the_limit() {
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let policy = Policy {
            max_sessions_per_user: 1,
            session_limit_action: crate::policy::SessionLimitPolicy::RefuseNew,
            ..idle_policy(10)
        };
        let s = replica(store, &Key::generate().to_pem(), policy);
        let client = Client::default();
        let first = s.login("alice", "pw", client.clone(), || T0).await.unwrap();
        assert_eq!(
            code(s.login("alice", "pw", client.clone(), || T0 + 5_000).await),
            "SESSION_LIMIT"
        );
        let second = s
            .login("alice", "pw", client, || T0 + 15_000)
            .await
            .unwrap();
        assert!(s.verify(&second.token, true, T0 + 15_500).await.is_ok());
        assert_eq!(
            code(s.verify(&first.token, true, T0 + 15_500).await),
            "IDLE_SESSION"
        );
    }
}
