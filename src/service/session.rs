//! The token service: login, refresh, verify and logout, tying together the
//! rules (pure), the keys (signing) and the one-time store (shared state).
//! HTTP lives in `http.rs`; this module knows nothing of it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use crate::policy::Policy;
use crate::service::audit::{self, Audit, AuditLog, Event, Via, Who};
use crate::service::error::{ApiError, Code};
use crate::service::hashing::HashPool;
use crate::service::jwt::{Claims, KeySet, TokenError};
use crate::service::metrics::Metrics;
use crate::service::rules::{self, LateRefresh, Millis, Standing};
use crate::service::store::{Claim, OneTimeStore, RefreshRecord, Revoked};
use crate::service::users::Users;

pub mod admin;
mod audited;
mod idle;
mod login;
pub mod provider;
pub mod registry;
use crate::service::verified_cache::Verified;
pub use audited::{ClientFn, nobody};

/// Login throttling: at most `max_per_user` failures per user name and
/// `max_per_address` per client address within `window`; and at most
/// `max_logins_per_user` successful logins per user within `login_window`,
/// so that one account cannot mint sessions (and their revocations) at the
/// rate of the network.
#[derive(Debug, Clone, Copy)]
pub struct Throttle {
    pub max_per_user: u64,
    pub max_per_address: u64,
    pub window: Millis,
    pub max_logins_per_user: u64,
    pub login_window: Millis,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            max_per_user: 5,
            max_per_address: 20,
            window: 15 * 60 * 1_000,
            max_logins_per_user: 30,
            login_window: 15 * 60 * 1_000,
        }
    }
}

/// A token just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub claims: Claims,
    pub session_end: i64,
}

pub use crate::service::client::Client;

/// Who a new session is for, as the way in established it (see
/// [`TokenService::start_session`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStart {
    /// The token's `sub`: the user's name for a password login, the
    /// provider's subject for an OpenID Connect one.
    pub sub: String,
    /// Password version (password logins).
    pub pwv: Option<String>,
    /// The provider's issuer URL (OpenID Connect logins).
    pub idp: Option<String>,
    /// The display name, when it is not `sub`.
    pub name: Option<String>,
    pub email: Option<String>,
    pub groups: Vec<String>,
}

/// Who a verified request belongs to; `renewed` when verify refreshed on the fly.
#[derive(Debug, Clone)]
pub struct Identity {
    pub claims: Arc<Claims>,
    pub renewed: Option<Issued>,
}

/// What this replica knows of the end of a user's sessions (see
/// [`TokenService::set_users`]): when it was last asked of the store.
#[derive(Debug, Clone, Copy)]
struct UserEnd {
    at: Option<i64>,
    checked: Instant,
}

/// A known end of a user's sessions is asked of the store again after this
/// long (in the background: the answer in hand counts meanwhile), for ends
/// that other replicas recorded and this one never saw happen.
const USER_END_RECHECK: Duration = Duration::from_secs(30);

/// The user of a session, for per-user keys (sessions' end, logins
/// throttle): a password user's name; for a provider's user, the pair of
/// issuer and subject, joined by a line break that no user name holds, so
/// that no password user and no other provider's user shares its keys.
pub(crate) fn user_id(idp: Option<&str>, sub: &str) -> String {
    match idp {
        None => sub.to_string(),
        Some(idp) => format!("{idp}\n{sub}"),
    }
}

/// The store key of a user's sessions' end: a digest, so that any name fits.
fn user_key(name: &str) -> String {
    let digest = Sha256::digest(format!("tokenpolicy user\n{name}").as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("user-{hex}")
}

fn merge_end(
    ends: &DashMap<String, UserEnd>,
    key: &str,
    at: Option<i64>,
    checked: Instant,
) -> Option<i64> {
    let mut e = ends
        .entry(key.to_string())
        .or_insert(UserEnd { at, checked });
    e.at = e.at.max(at);
    e.checked = checked;
    e.at
}

pub struct TokenService {
    policy: ArcSwap<Policy>,
    users: ArcSwap<Users>,
    /// Users whose sessions ended (removed, or their password changed), by
    /// [`user_key`]; the store holds the same for every replica.
    user_ends: Arc<DashMap<String, UserEnd>>,
    keys: KeySet,
    store: Arc<dyn OneTimeStore>,
    leeway: Millis,
    throttle: Throttle,
    /// Password hashing is slow and memory-hungry on purpose: it runs on a
    /// few threads of its own, behind a bounded waiting line.
    hashing: HashPool,
    /// Tokens whose signature verified already (see `verified_cache.rs`).
    verified: Verified,
    /// Session activity, for the idle timeout (see `session/idle.rs`).
    idle: idle::IdleTracker,
    pub metrics: Metrics,
    /// Asks the identity provider at each renewal of its sessions
    /// (`recheckOnRenew`; see `session/provider.rs`).
    provider_check: Option<Arc<dyn provider::ProviderCheck>>,
    /// The audit trail (`--audit-log`) and its counters.
    audit: Audit,
}

fn invalid(e: TokenError) -> ApiError {
    ApiError::new(Code::InvalidToken, e.to_string())
}

impl TokenService {
    pub fn new(
        policy: Policy,
        users: Users,
        keys: KeySet,
        store: Arc<dyn OneTimeStore>,
        leeway: Millis,
        throttle: Throttle,
    ) -> Self {
        let threads = HashPool::default_threads();
        let metrics = Metrics::default();
        TokenService {
            audit: Audit::new(metrics.audit.clone(), AuditLog::default()),
            policy: ArcSwap::from_pointee(policy),
            users: ArcSwap::from_pointee(users),
            user_ends: Arc::new(DashMap::new()),
            keys,
            idle: idle::IdleTracker::new(store.clone()),
            store,
            leeway,
            throttle,
            hashing: HashPool::new(
                threads,
                HashPool::default_queue(threads),
                crate::service::hashing::DEFAULT_MAX_WAIT,
            ),
            verified: Verified::default(),
            metrics,
            provider_check: None,
        }
    }

    /// Remember up to `entries` verified tokens (0: check every signature).
    pub fn with_verified_cache(mut self, entries: usize) -> Self {
        self.verified = Verified::new(entries);
        self
    }

    /// Writes the audit trail to `log` (the counters count either way).
    pub fn with_audit_log(mut self, log: AuditLog) -> Self {
        self.audit = Audit::new(self.metrics.audit.clone(), log);
        self
    }

    /// The audit trail's writer (to flush it, or reopen it on SIGHUP).
    pub fn audit_log(&self) -> &AuditLog {
        self.audit.log()
    }

    /// Whether the users file names anyone.
    pub fn has_users(&self) -> bool {
        !self.users.load().is_empty()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Applies a changed policy to every later decision, including tokens
    /// and sessions that exist already (rules 1 and 2).
    pub fn set_policy(&self, policy: Policy) {
        self.set_policy_at(policy, crate::clock::now_millis());
    }

    /// [`TokenService::set_policy`], the change seen at `now`.
    pub fn set_policy_at(&self, policy: Policy, now: Millis) {
        let old = self.policy.swap(Arc::new(policy));
        self.idle.policy_changed(&old, &self.policy.load(), now);
    }

    /// A removed user or a changed password ends that user's sessions at
    /// their next check, for good: the end is recorded (here at once, and in
    /// the store for every replica), so that adding the user back, or the
    /// old password, does not bring those sessions back.
    pub fn set_users(&self, users: Users) {
        self.set_users_at(users, crate::clock::now_millis());
    }

    /// [`TokenService::set_users`], the change seen at `now`.
    pub fn set_users_at(&self, users: Users, now: Millis) {
        let old = self.users.swap(Arc::new(users));
        let new = self.users.load();
        // A file being rewritten in place reads empty for an instant: no
        // users at all refuses every session, but ends none for good.
        if new.is_empty() {
            return;
        }
        let ended: Vec<(String, audit::Reason)> = old
            .iter()
            .filter_map(|u| match new.get(&u.name) {
                None => Some((u.name.clone(), audit::Reason::UserRemoved)),
                Some(n) if n.password_version != u.password_version => {
                    Some((u.name.clone(), audit::Reason::PasswordChanged))
                }
                Some(_) => None,
            })
            .collect();
        let at = now.div_euclid(1_000);
        for (name, why) in ended {
            let key = user_key(&name);
            merge_end(&self.user_ends, &key, Some(at), Instant::now());
            self.record_end(name, key, at, why);
        }
    }

    /// Writes a user's sessions' end to the store, retrying for a while if
    /// the store is away (this replica refuses those sessions meanwhile).
    fn record_end(&self, name: String, key: String, at: i64, why: audit::Reason) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(user = ?name, "user's sessions ended on this replica only: no runtime to tell the store");
            return;
        };
        let store = self.store.clone();
        let audit = self.audit.clone();
        let registered = registry::registry_user(None, &name);
        runtime.spawn(async move {
            let mut wait = Duration::from_secs(1);
            for _ in 0..8 {
                match store.end_user_sessions(&key, at, rules::user_end_ttl()).await {
                    Ok(()) => {
                        // Never listed again either way (the end is
                        // checked); this only frees the entries early.
                        // The replica that takes the entries out reports
                        // them: once, however many replicas saw the change.
                        match store.remove_user_sessions(&registered).await {
                            Ok(entries) => audited::report_user_end(&audit, &name, &entries, why),
                            Err(e) => {
                                tracing::warn!(user = ?name, error = %e, "ended sessions stay in the registry until they expire");
                            }
                        }
                        tracing::info!(user = ?name, "user removed or password changed: sessions ended");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(user = ?name, error = %e, "cannot record the end of a user's sessions yet");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
            }
            tracing::error!(user = ?name, "the end of a user's sessions is known to this replica only: the store stayed away");
        });
    }

    /// The second up to which `name`'s sessions are over, if any: from what
    /// this replica saw or last read, else from the store.
    async fn user_end(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let key = user_key(name);
        let now = Instant::now();
        let known = self.user_ends.get_mut(&key).map(|mut e| {
            let stale = now.duration_since(e.checked) >= USER_END_RECHECK;
            if stale {
                e.checked = now;
            }
            (e.at, stale)
        });
        match known {
            Some((at, stale)) => {
                if stale && let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (store, ends) = (self.store.clone(), self.user_ends.clone());
                    runtime.spawn(async move {
                        if let Ok(fetched) = store.user_sessions_ended(&key).await {
                            merge_end(&ends, &key, fetched, Instant::now());
                        }
                    });
                }
                Ok(at)
            }
            None => {
                let fetched = self.store.user_sessions_ended(&key).await?;
                Ok(merge_end(&self.user_ends, &key, fetched, now))
            }
        }
    }

    /// Before a login issues a session: reads `name`'s sessions' end if
    /// this replica does not know it yet (so that checking the new token
    /// needs no store while the store is away), and, when that end is this
    /// very second (a password changed just now), waits for the next one:
    /// sessions started at or before the end are over.
    async fn wait_past_user_end(&self, name: &str, now: Millis) {
        let key = user_key(name);
        if !self.user_ends.contains_key(&key) {
            let _ = self.user_end(name).await;
        }
        if let Some(end) = self.user_ends.get(&key).and_then(|e| e.at) {
            let wait = end
                .saturating_add(1)
                .saturating_mul(1_000)
                .saturating_sub(now);
            if (1..=1_000).contains(&wait) {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
        }
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    pub fn store(&self) -> &dyn OneTimeStore {
        self.store.as_ref()
    }

    fn sign(&self, claims: Claims, session_end: i64) -> Issued {
        Issued {
            token: self.keys.sign(&claims),
            claims,
            session_end,
        }
    }

    /// Signature, rules 1-4, the user, and revocation: what a token is worth now.
    async fn judge(
        &self,
        token: &str,
        policy: &Policy,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<(Arc<Claims>, Standing), ApiError> {
        if token.is_empty() {
            return Err(ApiError::new(Code::EmptyToken, "no token in the request"));
        }
        // The signature of a token seen before is not checked again; what
        // its claims are worth is, below, on every request.
        let (claims, cached) = match self.verified.get(token, now) {
            Some(c) => (c, true),
            None => (Arc::new(self.keys.verify(token).map_err(invalid)?), false),
        };
        let standing = rules::standing(&claims, policy, now, self.leeway);
        match standing {
            Standing::Malformed => {
                return Err(ApiError::new(
                    Code::InvalidToken,
                    "token timestamps are inconsistent",
                ));
            }
            Standing::SessionExpired => {
                self.report_ended(audit::Kind::SessionExpired, &claims, client, now);
                return Err(ApiError::new(
                    Code::ExpiredSession,
                    "session expired; log in again",
                ));
            }
            Standing::Expired => {
                return Err(ApiError::new(
                    Code::ExpiredToken,
                    "token expired past the renew limit; log in again",
                ));
            }
            Standing::Valid { .. } | Standing::Renewable { .. } => {}
        }
        if !cached {
            self.verified.insert(token, claims.clone(), policy, now);
        }
        match &claims.idp {
            // A provider's user is not in the users file; their session
            // lasts while the policy still names that provider.
            Some(idp) => {
                if policy.oidc.as_ref().is_none_or(|o| &o.issuer_url != idp) {
                    return Err(ApiError::new(
                        Code::RevokedSession,
                        "the session's identity provider is no longer configured",
                    ));
                }
            }
            None => {
                let users = self.users.load();
                match users.get(&claims.sub) {
                    None => {
                        return Err(ApiError::new(Code::RevokedSession, "user no longer exists"));
                    }
                    Some(u) if claims.pwv.as_deref() != Some(u.password_version.as_str()) => {
                        return Err(ApiError::new(
                            Code::RevokedSession,
                            "password changed since login",
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        if self
            .user_end(&user_id(claims.idp.as_deref(), &claims.sub))
            .await?
            .is_some_and(|end| claims.auth_time <= end)
        {
            return Err(ApiError::new(
                Code::RevokedSession,
                "user removed or password changed since login",
            ));
        }
        if self.store.is_revoked(&claims.sid).await? {
            return Err(ApiError::new(Code::RevokedSession, "session was revoked"));
        }
        self.idle_end(&claims, policy, now).await?;
        Ok((claims, standing))
    }

    /// Rules 3, 5 and 7: exchange `old` for a new token, once.
    async fn renew(
        &self,
        old: &Claims,
        session_end: i64,
        policy: &Policy,
        (client, via): (ClientFn<'_>, Via),
        now: Millis,
    ) -> Result<(Issued, &'static str), ApiError> {
        let (iat, exp) = rules::issue_times(policy, now, session_end);
        let mine = RefreshRecord {
            jti: uuid::Uuid::new_v4().to_string(),
            iat,
            exp,
            at: now,
        };
        let ttl = rules::refresh_marker_ttl(old, policy, now);
        let (record, outcome) = match self
            .store
            .claim_refresh(&old.sid, &old.jti, old.iat, &mine, ttl)
            .await?
        {
            Claim::Won => (mine, "issued"),
            Claim::Forgotten => {
                tracing::warn!(user = ?old.sub, sid = %old.sid, "refresh refused: the store lost its state since this token was issued");
                return Err(ApiError::new(
                    Code::RevokedSession,
                    "the session store lost its state since this token was issued; log in again",
                ));
            }
            Claim::Lost(first) => match rules::late_refresh(policy, first.at, now) {
                LateRefresh::SameToken => (first, "grace"),
                LateRefresh::Reuse { revoke_session } => {
                    self.audit.emit(Event::refresh_reuse_detected(
                        now,
                        Who::of(old),
                        &client(),
                        via,
                        revoke_session,
                    ));
                    if revoke_session {
                        self.revoke(old, now).await?;
                        self.metrics.revocations.inc();
                        tracing::warn!(user = ?old.sub, sid = %old.sid, "spent token presented again: session revoked");
                    }
                    return Err(ApiError::new(
                        Code::TokenAlreadyRefreshed,
                        "token was already refreshed",
                    ));
                }
            },
        };
        if outcome == "issued" {
            // Once per renewal, by the renewal that won the claim.
            self.recheck_with_provider(old, session_end, policy, now)
                .await?;
        }
        let claims = Claims {
            jti: record.jti,
            iat: record.iat,
            exp: record.exp,
            ..old.clone()
        };
        self.store.note_issued(&claims.sid);
        if outcome == "issued" {
            self.audit
                .emit(Event::token_renewed(now, Who::of(&claims), &client(), via));
        }
        let issued = self.sign(claims, session_end);
        self.remember(&issued, policy, now);
        Ok((issued, outcome))
    }

    /// A token we just signed needs no signature check when it comes back.
    fn remember(&self, issued: &Issued, policy: &Policy, now: Millis) {
        self.verified
            .insert(&issued.token, Arc::new(issued.claims.clone()), policy, now);
    }

    /// Whether `token` is one a request could be answered with now (valid
    /// or renewable, its user and session still there), without renewing
    /// it or counting a decision: to choose among several cookies.
    pub async fn holds(&self, token: &str, now: Millis) -> bool {
        let policy = self.policy.load_full();
        self.judge(token, &policy, &nobody, now).await.is_ok()
    }

    /// `POST /v1/refresh`: a valid or renewable token for a new one.
    #[tracing::instrument(name = "refresh", skip_all, fields(token_len = token.len()))]
    pub async fn refresh(&self, token: &str, now: Millis) -> Result<Issued, ApiError> {
        self.refresh_from(token, &nobody, now).await
    }

    /// [`TokenService::refresh`] for `client` (for the audit trail).
    pub async fn refresh_from(
        &self,
        token: &str,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<Issued, ApiError> {
        let policy = self.policy.load_full();
        let result = async {
            let (claims, standing) = self.judge(token, &policy, client, now).await?;
            // Past `exp`, only the renew limit makes a token exchangeable:
            // the clock-skew leeway lets it verify, never refresh.
            let session_end = rules::refreshable(standing, &policy, now).ok_or_else(|| {
                ApiError::new(
                    Code::ExpiredToken,
                    "token expired past the renew limit; log in again",
                )
            })?;
            self.renew(&claims, session_end, &policy, (client, Via::Refresh), now)
                .await
        }
        .await;
        match result {
            Ok((issued, outcome)) => {
                self.metrics.refreshes.count(outcome);
                Ok(issued)
            }
            Err(e) => {
                self.metrics.refreshes.count(e.code.as_str());
                Err(e)
            }
        }
    }

    /// Forward-auth: who holds this token. An expired-but-renewable token is
    /// renewed on the fly when `may_renew`.
    #[tracing::instrument(
        name = "verify",
        skip_all,
        fields(token_len = token.len(), may_renew = may_renew)
    )]
    pub async fn verify(
        &self,
        token: &str,
        may_renew: bool,
        now: Millis,
    ) -> Result<Identity, ApiError> {
        self.verify_from(token, may_renew, &nobody, now).await
    }

    /// [`TokenService::verify`] for `client`, asked only when an event is
    /// audited (so that a plain verify costs nothing more).
    pub async fn verify_from(
        &self,
        token: &str,
        may_renew: bool,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<Identity, ApiError> {
        let policy = self.policy.load_full();
        let result = async {
            let (claims, standing) = self.judge(token, &policy, client, now).await?;
            match standing {
                Standing::Valid { .. } => Ok(Identity {
                    claims,
                    renewed: None,
                }),
                Standing::Renewable { session_end } if may_renew => {
                    let (issued, _) = self
                        .renew(&claims, session_end, &policy, (client, Via::Verify), now)
                        .await?;
                    Ok(Identity {
                        claims: Arc::new(issued.claims.clone()),
                        renewed: Some(issued),
                    })
                }
                _ => Err(ApiError::new(
                    Code::ExpiredToken,
                    "token expired; refresh it (streaming requests are not renewed on the fly)",
                )),
            }
        }
        .await;
        let decision = match &result {
            Ok(Identity {
                renewed: Some(_), ..
            }) => "renewed",
            Ok(_) => "allowed",
            Err(e) => e.code.as_str(),
        };
        self.metrics.verify.count(decision);
        result
    }

    /// Revokes the token's session on every replica (rule 6). Logging out of
    /// a session that is already over or revoked succeeds.
    #[tracing::instrument(name = "logout", skip_all, fields(token_len = token.len()))]
    pub async fn logout(&self, token: &str, now: Millis) -> Result<(), ApiError> {
        self.logout_from(token, &nobody, now).await
    }

    /// [`TokenService::logout`] for `client` (for the audit trail).
    pub async fn logout_from(
        &self,
        token: &str,
        client: ClientFn<'_>,
        now: Millis,
    ) -> Result<(), ApiError> {
        if token.is_empty() {
            return Err(ApiError::new(Code::EmptyToken, "no token in the request"));
        }
        let claims = self.keys.verify(token).map_err(invalid)?;
        let policy = self.policy.load();
        if rules::standing(&claims, &policy, now, self.leeway) == Standing::Malformed {
            return Err(ApiError::new(
                Code::InvalidToken,
                "token timestamps are inconsistent",
            ));
        }
        if now >= rules::session_end(&claims, &policy) * 1_000 {
            return Ok(());
        }
        self.revoke(&claims, now).await?;
        self.metrics.revocations.inc();
        self.audit
            .emit(Event::logout(now, Who::of(&claims), &client(), None));
        tracing::info!(user = ?claims.sub, sid = %claims.sid, "logout");
        Ok(())
    }

    /// Revokes the session of `claims`. A store with no room for one more
    /// revocation (the in-process store at its bound) records nothing; then
    /// every session of that user started until now ends instead (one entry
    /// per user): more than was asked, never less, so that no revoked
    /// session is ever live again.
    async fn revoke(&self, claims: &Claims, now: Millis) -> Result<(), ApiError> {
        let ttl = rules::revocation_ttl(claims, now);
        if self.store.revoke_session(&claims.sid, ttl).await? == Revoked::Session {
            self.unregister(claims).await;
            return Ok(());
        }
        self.unregister(claims).await;
        let key = user_key(&user_id(claims.idp.as_deref(), &claims.sub));
        let at = now.div_euclid(1_000).max(claims.auth_time);
        self.store
            .end_user_sessions(&key, at, rules::user_end_ttl())
            .await?;
        merge_end(&self.user_ends, &key, Some(at), Instant::now());
        tracing::warn!(
            user = ?claims.sub,
            "revocations at their bound (--max-cached-revocations): all of this user's sessions so far ended"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::jwt::Key;
    use crate::service::store::MemoryStore;
    use crate::testing;

    const T0: Millis = 1_800_000_000_000;

    fn service(policy: Policy) -> (TokenService, String) {
        service_with_leeway(policy, 0)
    }

    fn service_with_leeway(policy: Policy, leeway: Millis) -> (TokenService, String) {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let s = testing::service()
            .policy(policy)
            .users(testing::users(&format!("alice:{hash}\n")))
            .leeway(leeway)
            .build();
        (s, hash)
    }

    fn short() -> Policy {
        Policy {
            session: 8,
            token: 2,
            renew_limit: 3,
            grace: 1,
            ..Policy::default()
        }
    }

    fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
        r.unwrap_err().code.as_str()
    }

    /// The leeway tolerates clock skew on verify; it never makes a token
    /// refreshable that the renew limit does not (here `0s`: none).
    #[tokio::test]
    async fn leeway_lets_a_token_verify_but_never_refresh_past_the_renew_limit() {
        let policy = Policy {
            session: 3_600,
            token: 60,
            renew_limit: 0,
            grace: 0,
            ..Policy::default()
        };
        let (s, _) = service_with_leeway(policy, 60_000);
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        let past_exp = T0 + 62_500;
        assert!(s.verify(&t.token, true, past_exp).await.is_ok());
        assert_eq!(code(s.refresh(&t.token, past_exp).await), "EXPIRED_TOKEN");
        // Inside its validity the same token refreshes.
        let (s, _) = service_with_leeway(short(), 60_000);
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        assert!(s.refresh(&t.token, T0 + 1_000).await.is_ok());
    }

    #[tokio::test]
    async fn login_verify_refresh_once_then_reuse_revokes() {
        let (s, _) = service(short());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        assert_eq!(t.claims.exp - t.claims.iat, 2);
        assert!(s.verify(&t.token, false, T0 + 1_000).await.is_ok());
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 2_000).await),
            "EXPIRED_TOKEN"
        );

        let new = s.refresh(&t.token, T0 + 2_500).await.unwrap();
        assert_eq!(new.claims.sid, t.claims.sid);
        assert_eq!(new.claims.auth_time, t.claims.auth_time);
        assert_ne!(new.claims.jti, t.claims.jti);
        // Inside the grace: the very same token.
        let again = s.refresh(&t.token, T0 + 3_000).await.unwrap();
        assert_eq!(again.token, new.token);
        // After the grace: reuse, and the session is gone.
        assert_eq!(
            code(s.refresh(&t.token, T0 + 3_600).await),
            "TOKEN_ALREADY_REFRESHED"
        );
        assert_eq!(
            code(s.verify(&new.token, false, T0 + 3_700).await),
            "REVOKED_SESSION"
        );
    }

    #[tokio::test]
    async fn renew_limit_and_session_end() {
        let (s, _) = service(short());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        assert_eq!(code(s.refresh(&t.token, T0 + 5_000).await), "EXPIRED_TOKEN");
        // A chain of refreshes ends at the session end, never later.
        let mut cur = s.login("alice", "pw", None, || T0).await.unwrap();
        let mut now = T0;
        while let Ok(next) = s.refresh(&cur.token, now + 2_100).await {
            now += 2_100;
            assert!(next.claims.exp <= T0 / 1_000 + 8);
            cur = next;
        }
        assert_eq!(cur.claims.exp, T0 / 1_000 + 8);
        assert_eq!(
            code(s.verify(&cur.token, true, T0 + 8_000).await),
            "EXPIRED_SESSION"
        );
    }

    #[tokio::test]
    async fn verify_renews_on_the_fly_unless_streaming() {
        let (s, _) = service(short());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 2_100).await),
            "EXPIRED_TOKEN"
        );
        let id = s.verify(&t.token, true, T0 + 2_100).await.unwrap();
        let renewed = id.renewed.unwrap();
        assert!(s.verify(&renewed.token, false, T0 + 2_200).await.is_ok());
    }

    #[tokio::test]
    async fn logout_revokes_and_is_idempotent() {
        let (s, _) = service(short());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        s.logout(&t.token, T0 + 100).await.unwrap();
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 200).await),
            "REVOKED_SESSION"
        );
        assert_eq!(
            code(s.refresh(&t.token, T0 + 2_100).await),
            "REVOKED_SESSION"
        );
        s.logout(&t.token, T0 + 300).await.unwrap();
        assert_eq!(code(s.logout("", T0).await), "EMPTY_TOKEN");
        assert_eq!(code(s.logout("x.y.z", T0).await), "INVALID_TOKEN");
    }

    /// Logging out again and again with the in-process store at a bound of
    /// 3 revocations: the store never holds more, and every session logged
    /// out stays revoked (past the bound, by ending the user's sessions so
    /// far); a login after that works.
    #[tokio::test]
    async fn logouts_past_the_revocation_bound_stay_revoked() {
        let lines = testing::user_line("alice", "pw") + &testing::user_line("bob", "pw");
        let store = Arc::new(MemoryStore::new().with_revocation_limit(3));
        let s = testing::service()
            .users(testing::users(&lines))
            .store(store.clone())
            .build();
        let bob = s.login("bob", "pw", None, || T0).await.unwrap();
        let mut out = Vec::new();
        for i in 0..12 {
            let at = T0 + i * 2_000;
            let t = s.login("alice", "pw", None, || at).await.unwrap();
            assert!(
                s.verify(&t.token, false, at + 100).await.is_ok(),
                "login {i}"
            );
            s.logout(&t.token, at + 500).await.unwrap();
            out.push(t);
            for (j, old) in out.iter().enumerate() {
                assert_eq!(
                    code(s.verify(&old.token, false, at + 600).await),
                    "REVOKED_SESSION",
                    "session {j} after logout {i}"
                );
            }
            assert!(
                store.revocations_held() <= 3,
                "{}",
                store.revocations_held()
            );
        }
        assert_eq!(store.revocations_held(), 3);
        // Another user's session is not touched, and alice may log in again.
        assert!(s.verify(&bob.token, false, T0 + 30_000).await.is_ok());
        let again = s.login("alice", "pw", None, || T0 + 40_000).await.unwrap();
        assert!(s.verify(&again.token, false, T0 + 40_100).await.is_ok());
    }

    fn with_oidc(mut p: Policy) -> Policy {
        let doc = "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\nspec:\n  externalURL: https://auth.example.com\n  oidc:\n    issuerURL: https://idp.example.com\n    clientID: c\n    clientSecretRef: {name: s, key: k}\n";
        let o = Policy::from_yaml(doc).unwrap();
        p.oidc = o.oidc;
        p.external_url = o.external_url;
        p
    }

    fn provider_user(sub: &str) -> SessionStart {
        SessionStart {
            sub: sub.into(),
            idp: Some("https://idp.example.com".into()),
            name: Some("Alice A.".into()),
            email: Some("alice@example.com".into()),
            groups: vec!["staff".into()],
            ..SessionStart::default()
        }
    }

    /// A provider's user is not in the users file, and the end of a
    /// password user's sessions of the same name is not theirs.
    #[tokio::test]
    async fn provider_users_are_keyed_by_issuer_and_subject() {
        let users = |text: String| Users::parse(&text, "t").unwrap();
        let (s, hash) = service(with_oidc(short()));
        let client = Client::from(None);
        let oidc = s
            .start_session(provider_user("alice"), &client, || T0)
            .await
            .unwrap();
        let pw = s.login("alice", "pw", None, || T0).await.unwrap();
        let id = s.verify(&oidc.token, false, T0 + 100).await.unwrap();
        assert_eq!(id.claims.user_name(), "Alice A.");
        assert_eq!(id.claims.groups, ["staff"]);
        // alice's password changes: her password session ends, the
        // provider's "alice" keeps hers.
        let other = bcrypt::hash("new", 4).unwrap();
        s.set_users_at(users(format!("alice:{other}\n")), T0 + 50);
        assert_eq!(
            code(s.verify(&pw.token, false, T0 + 100).await),
            "REVOKED_SESSION"
        );
        assert!(s.verify(&oidc.token, false, T0 + 100).await.is_ok());
        // No users at all: provider sessions go on.
        s.set_users_at(users(format!("bob:{hash}\n")), T0 + 60);
        assert!(s.verify(&oidc.token, false, T0 + 100).await.is_ok());
        // The policy no longer names the provider: its sessions end.
        s.set_policy(short());
        assert_eq!(
            code(s.verify(&oidc.token, false, T0 + 100).await),
            "REVOKED_SESSION"
        );
        assert_eq!(user_id(None, "alice"), "alice");
        assert_ne!(user_id(Some("https://idp.example.com"), "alice"), "alice");
    }

    #[tokio::test]
    async fn removed_user_or_changed_password_ends_sessions_for_good() {
        let users = |text: String| Users::parse(&text, "t").unwrap();
        let (s, hash) = service(short());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        let other = bcrypt::hash("new", 4).unwrap();
        s.set_users_at(users(format!("alice:{other}\n")), T0 + 50);
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 100).await),
            "REVOKED_SESSION"
        );
        s.set_users_at(users(format!("bob:{hash}\n")), T0 + 60);
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 100).await),
            "REVOKED_SESSION"
        );
        // Added back with the very same hash: the old session stays over.
        s.set_users_at(users(format!("alice:{hash}\n")), T0 + 70);
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 100).await),
            "REVOKED_SESSION"
        );
        assert_eq!(
            code(s.refresh(&t.token, T0 + 2_100).await),
            "REVOKED_SESSION"
        );
        // A session started afterwards is fine.
        let t2 = s.login("alice", "pw", None, || T0 + 1_100).await.unwrap();
        assert!(s.verify(&t2.token, false, T0 + 1_200).await.is_ok());
        // An empty file (one being rewritten reads so for an instant)
        // refuses every session while it lasts, and ends none for good.
        let (s, hash) = service(short());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        s.set_users_at(users(String::new()), T0 + 50);
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 100).await),
            "REVOKED_SESSION"
        );
        s.set_users_at(users(format!("alice:{hash}\n")), T0 + 60);
        assert!(s.verify(&t.token, false, T0 + 100).await.is_ok());
        // And another user's session is untouched by the change.
        let (s, hash) = service(short());
        s.set_users_at(users(format!("alice:{hash}\nbob:{hash}\n")), T0);
        let t = s.login("alice", "pw", None, || T0 + 1_000).await.unwrap();
        s.set_users_at(users(format!("alice:{hash}\n")), T0 + 1_500);
        assert!(s.verify(&t.token, false, T0 + 1_600).await.is_ok());
    }

    /// A replica that never saw the user go (it started after, or its copy
    /// of the users file skipped that version) learns it from the store.
    #[tokio::test]
    async fn the_end_of_a_users_sessions_reaches_every_replica() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = |text: String| Users::parse(&text, "t").unwrap();
        let key = Key::generate().to_pem();
        let store: Arc<dyn OneTimeStore> = Arc::new(MemoryStore::new());
        let replica = || {
            testing::service()
                .policy(short())
                .users(users(format!("alice:{hash}\n")))
                .keys(testing::keys_of(vec![Key::from_pem(&key, "k").unwrap()]))
                .store(store.clone())
                .build()
        };
        let (a, b) = (replica(), replica());
        let t = a.login("alice", "pw", None, || T0).await.unwrap();
        a.set_users_at(users(format!("bob:{hash}\n")), T0 + 100);
        a.set_users_at(users(format!("alice:{hash}\n")), T0 + 200);
        // The store hears of it in the background.
        let mut recorded = false;
        for _ in 0..100 {
            if store
                .user_sessions_ended(&user_key("alice"))
                .await
                .unwrap()
                .is_some()
            {
                recorded = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(recorded);
        assert_eq!(
            code(b.verify(&t.token, false, T0 + 300).await),
            "REVOKED_SESSION"
        );
        assert_eq!(
            code(a.verify(&t.token, false, T0 + 300).await),
            "REVOKED_SESSION"
        );
    }

    #[tokio::test]
    async fn shortened_policy_applies_to_live_sessions() {
        let (s, _) = service(Policy::default());
        let t = s.login("alice", "pw", None, || T0).await.unwrap();
        assert!(s.verify(&t.token, false, T0 + 60_000).await.is_ok());
        s.set_policy(Policy {
            session: 30,
            token: 30,
            renew_limit: 0,
            ..Policy::default()
        });
        assert_eq!(
            code(s.verify(&t.token, false, T0 + 60_000).await),
            "EXPIRED_SESSION"
        );
    }
}

#[cfg(test)]
#[path = "session/cached_tests.rs"]
mod cached_tests;

#[cfg(test)]
mod spans;
