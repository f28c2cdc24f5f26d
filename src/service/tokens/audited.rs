//! What the token service writes to the audit trail that is more than one
//! line at the place it happens: the client of a request, asked for only
//! when an event is written; ended sessions reported once.

use std::time::Duration;

use super::{Client, TokenService};
use crate::clock::Millis;
use crate::service::audit::{Audit, By, Event, Kind, Method, Reason, Who};
use crate::service::store::{SessionEntry, Take};
use crate::service::token::Claims;

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
