//! What the token service writes to the audit trail that is more than one
//! line at the place it happens: the client of a request, asked for only
//! when an event is written; ended sessions reported once.

use std::time::Duration;

use super::{Client, TokenService};
use crate::clock::Millis;
use crate::service::audit::{Audit, By, Event, Kind, Method, Reason, Who};
use crate::service::jwt::Claims;
use crate::service::store::{SessionEntry, Take};

/// Who made the request, computed only if an event is written: verify
/// reads no address or user agent of its own.
pub type ClientFn<'a> = &'a (dyn Fn() -> Client + Sync);

/// No client known (a call that is no request: a test, a background task).
pub fn nobody() -> Client {
    Client::default()
}

/// How long the store remembers that a session was reported ended, so
/// that the replicas report it once between them.
const REPORTED_FOR: Millis = 24 * 3_600 * 1_000;

impl TokenService {
    /// An OpenID Connect sign-in refused before it came to a session (a
    /// bad state, a refusal of the provider, an ID token that fails its
    /// checks): `login_failed`, with no user (none was established).
    pub fn audit_oidc_refusal(
        &self,
        client: &Client,
        code: crate::service::error::Code,
        now: Millis,
    ) {
        let idp = self
            .policy
            .load()
            .oidc
            .as_ref()
            .map(|o| o.issuer_url.clone());
        let who = Who {
            provider: idp.as_deref(),
            ..Who::default()
        };
        self.audit
            .emit(Event::login_failed(now, who, Method::Oidc, client, code));
    }

    /// A request refused because its session ended (`kind`:
    /// `session_expired` or `session_idle`): reported once per session. A
    /// replica remembers the sessions it reported (a bounded set: the
    /// refused requests that follow cost nothing); the first report of a
    /// session on a replica claims it in the store (in the background,
    /// never delaying the answer), and only the replica that wins the claim
    /// writes the event. With the store away, the event is written anyway:
    /// twice is better than never.
    pub(crate) fn report_ended(
        &self,
        kind: Kind,
        claims: &Claims,
        client: ClientFn<'_>,
        now: Millis,
    ) {
        if !self.audit.first_report(kind, &claims.sid) {
            return;
        }
        let event = match kind {
            Kind::SessionIdle => Event::session_idle(now, Who::of(claims), &client()),
            _ => Event::session_expired(now, Who::of(claims), &client()),
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.audit.emit(event);
            return;
        };
        let (store, audit) = (self.store.clone(), self.audit.clone());
        let key = format!("audit-{}:{}", kind.as_str(), claims.sid);
        runtime.spawn(async move {
            let claim = tokio::time::timeout(
                Duration::from_secs(5),
                store.take_attempt(&key, 1, REPORTED_FOR),
            )
            .await;
            if !matches!(claim, Ok(Ok(Take::Refused { .. }))) {
                audit.emit(event);
            }
        });
    }
}

/// A user's sessions ended by a change of the users file: one
/// `session_revoked` per session the registry held (those past their end
/// are not reported).
pub(super) fn report_user_end(audit: &Audit, name: &str, entries: &[SessionEntry], why: Reason) {
    let now = crate::clock::now_millis();
    for e in entries.iter().filter(|e| e.ends > now) {
        audit.emit(Event::session_revoked(
            now,
            Who::named(name).sid(&e.sid),
            &nobody(),
            By::PasswordChange,
            why,
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::Policy;
    use crate::service::audit::AuditLog;
    use crate::service::jwt::Key;
    use crate::service::store::{MemoryStore, OneTimeStore};

    const T0: Millis = 1_800_000_000_000;

    fn short() -> Policy {
        Policy {
            session: 8,
            token: 2,
            renew_limit: 3,
            grace: 1,
            ..Policy::default()
        }
    }

    /// Two replicas sharing one store and one key, each with its own log.
    fn replicas(dir: &std::path::Path) -> Vec<(TokenService, std::path::PathBuf)> {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let pem = Key::generate().to_pem();
        ["a", "b"]
            .into_iter()
            .map(|name| {
                let s = crate::testing::service()
                    .policy(short())
                    .users(crate::testing::users(&format!("alice:{hash}\n")))
                    .keys(crate::testing::keys_of(vec![
                        Key::from_pem(&pem, "k").unwrap(),
                    ]))
                    .store(store.clone())
                    .build();
                let path = dir.join(format!("{name}.jsonl"));
                let log = AuditLog::open(path.to_str().unwrap(), &s.metrics.audit).unwrap();
                (s.with_audit_log(log), path)
            })
            .collect()
    }

    fn events(s: &TokenService, path: &std::path::Path) -> Vec<serde_json::Value> {
        s.audit_log().flush(Duration::from_secs(5));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn named<'a>(v: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
        v.iter().filter(|e| e["event"] == event).collect()
    }

    #[tokio::test]
    async fn an_expired_session_is_reported_once_across_replicas_and_a_valid_verify_writes_nothing()
    {
        let dir = std::env::temp_dir().join(format!("tp-audited-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = replicas(&dir);
        let ((a, pa), (b, pb)) = (&r[0], &r[1]);
        let t = a.login("alice", "pw", None, || T0).await.unwrap();
        for _ in 0..5 {
            a.verify(&t.token, false, T0 + 1_000).await.unwrap();
        }
        let before = (events(a, pa).len(), events(b, pb).len());
        assert_eq!(before, (1, 0), "a valid verify writes nothing");
        let client = || Client {
            addr: "192.0.2.1".parse().ok(),
            user_agent: Some("ua".into()),
        };
        for s in [a, b, a, b] {
            let e = s
                .verify_from(&t.token, true, &client, T0 + 9_000)
                .await
                .unwrap_err();
            assert_eq!(e.code.as_str(), "EXPIRED_SESSION");
        }
        // The claim in the store runs in the background.
        let mut total = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            total = named(&events(a, pa), "session_expired").len()
                + named(&events(b, pb), "session_expired").len();
            if total > 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (ea, eb) = (events(a, pa), events(b, pb));
        let expired: Vec<_> = named(&ea, "session_expired")
            .into_iter()
            .chain(named(&eb, "session_expired"))
            .collect();
        assert_eq!((total, expired.len()), (1, 1), "{expired:?}");
        assert_eq!(expired[0]["sid"], t.claims.sid.as_str());
        assert_eq!(expired[0]["client_address"], "192.0.2.1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_reused_token_is_reported_by_the_replica_that_saw_it() {
        let dir = std::env::temp_dir().join(format!("tp-audited-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = replicas(&dir);
        let ((a, pa), (b, pb)) = (&r[0], &r[1]);
        let t = a.login("alice", "pw", None, || T0).await.unwrap();
        a.refresh(&t.token, T0 + 1_000).await.unwrap();
        // Within the grace: the same new token, no second renewal.
        b.refresh(&t.token, T0 + 1_500).await.unwrap();
        let e = b.refresh(&t.token, T0 + 2_500).await.unwrap_err();
        assert_eq!(e.code.as_str(), "TOKEN_ALREADY_REFRESHED");
        let (ea, eb) = (events(a, pa), events(b, pb));
        assert_eq!(named(&ea, "token_renewed").len(), 1);
        assert_eq!(named(&eb, "token_renewed").len(), 0);
        assert!(named(&ea, "refresh_reuse_detected").is_empty());
        let reuse = named(&eb, "refresh_reuse_detected");
        assert_eq!(reuse.len(), 1);
        assert_eq!(
            (&reuse[0]["result"], &reuse[0]["via"]),
            (&"revoked".into(), &"refresh".into())
        );
        // The counters count what each replica wrote.
        assert!(
            b.metrics
                .render()
                .contains("tokenpolicy_audit_events_total{event=\"refresh_reuse_detected\"} 1")
        );
        assert!(
            a.metrics
                .render()
                .contains("tokenpolicy_audit_events_total{event=\"refresh_reuse_detected\"} 0")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
