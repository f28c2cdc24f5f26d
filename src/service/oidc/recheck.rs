//! What we keep of the provider's side of a session, and the renewal
//! re-check that uses it.
//!
//! At the callback: the provider's refresh token, sealed (`vault.rs`), in
//! the store under our session id until our session's end (only with
//! `recheckOnRenew`), and the link from the provider's session id (the ID
//! token's `sid`) to our session, for back-channel logout. The refresh
//! token is never in our token, a cookie or a log line.
//!
//! At a renewal: the refresh_token grant with the kept token. A rotated
//! token replaces it; a token sealed under a key that no longer signs is
//! sealed again under the current one. A refusal is kept in its place
//! ([`REFUSED`]), so that every replica refuses that session's renewals
//! from then on, whatever it has in memory.

use std::sync::Arc;

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};

use super::vault::Vault;
use super::{ExchangeError, Provider};
use crate::clock::Millis;
use crate::service::session::provider::{ProviderCheck, Recheck};
use crate::service::store::StoreError;
use crate::service::store::provider::{Linked, ProviderStore, REFUSED};

/// The store's name of a provider session: a digest of the issuer and the
/// provider's `sid`, so that any value fits a key and two providers' ids
/// never meet.
pub fn provider_session_key(issuer: &str, provider_sid: &str) -> String {
    let d = Sha256::digest(
        format!(
            "tokenpolicy provider session\n{}:{issuer}\n{provider_sid}",
            issuer.len()
        )
        .as_bytes(),
    );
    d[..16].iter().map(|b| format!("{b:02x}")).collect()
}

pub struct ProviderSessions {
    pub provider: Arc<Provider>,
    vault: Vault,
    store: Arc<dyn ProviderStore>,
}

impl std::fmt::Debug for ProviderSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSessions")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// One session just started through the provider.
#[derive(Debug, Clone)]
pub struct Started<'a> {
    pub sid: &'a str,
    pub sub: &'a str,
    pub auth_time: i64,
    /// Our session's absolute end (seconds).
    pub session_end: i64,
    /// The ID token's `sid`, if it had one.
    pub provider_sid: Option<&'a str>,
}

impl ProviderSessions {
    pub fn new(provider: Arc<Provider>, vault: Vault, store: Arc<dyn ProviderStore>) -> Self {
        ProviderSessions {
            provider,
            vault,
            store,
        }
    }

    /// Keeps what a later renewal and a back-channel logout need of a
    /// session that has just started.
    pub async fn remember(
        &self,
        started: &Started<'_>,
        refresh_token: Option<&str>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let ends = started.session_end.saturating_mul(1_000);
        let ttl = (ends - now).max(1_000);
        let recheck = self.provider.config.recheck_on_renew;
        match refresh_token {
            Some(rt) if recheck => {
                let sealed = self.vault.seal(started.sid, rt).ok_or_else(|| {
                    StoreError::Unavailable("cannot seal the refresh token".into())
                })?;
                self.store
                    .put_refresh_token(started.sid, &sealed, ttl)
                    .await?;
            }
            None if recheck => {
                tracing::warn!(sid = %started.sid, "the provider gave no refresh token: this session's renewals cannot be re-checked");
            }
            _ => {}
        }
        if let Some(psid) = started.provider_sid {
            let link = Linked {
                sid: started.sid.to_string(),
                sub: started.sub.to_string(),
                auth_time: started.auth_time,
                ends,
            };
            let key = provider_session_key(&self.provider.config.issuer_url, psid);
            self.store.link_provider_session(&key, &link, now).await?;
        }
        Ok(())
    }

    /// Our sessions that the provider session `provider_sid` started,
    /// taken out (a second logout of it finds none).
    pub async fn take_provider_session(
        &self,
        provider_sid: &str,
        now: Millis,
    ) -> Result<Vec<Linked>, StoreError> {
        let key = provider_session_key(&self.provider.config.issuer_url, provider_sid);
        self.store.take_provider_session(&key, now).await
    }
}

#[async_trait]
impl ProviderCheck for ProviderSessions {
    async fn recheck(&self, sid: &str, session_end: i64, now: Millis) -> Recheck {
        let ttl = (session_end.saturating_mul(1_000) - now).max(1_000);
        let kept = match self.store.refresh_token(sid).await {
            Ok(Some(kept)) => kept,
            Ok(None) => return Recheck::Missing,
            Err(e) => return Recheck::Unavailable(e.to_string()),
        };
        if kept == REFUSED {
            return Recheck::Refused;
        }
        let Some(token) = self.vault.open(sid, &kept) else {
            tracing::warn!(sid = %sid, "the kept refresh token does not open with any signing key of this replica");
            return Recheck::Missing;
        };
        match self.provider.refresh(&token).await {
            Ok(rotated) => {
                let reseal = match rotated.as_deref() {
                    Some(new) if new != token => Some(new),
                    _ if !self.vault.is_current(&kept) => Some(token.as_str()),
                    _ => None,
                };
                if let Some(t) = reseal {
                    let sealed = self.vault.seal(sid, t);
                    let put = match sealed {
                        Some(s) => self.store.put_refresh_token(sid, &s, ttl).await,
                        None => Err(StoreError::Unavailable("cannot seal".into())),
                    };
                    if let Err(e) = put {
                        // The provider has moved on to the new token: the
                        // next renewal's check may fail for it. Said loudly.
                        tracing::warn!(sid = %sid, error = %e, "the rotated refresh token could not be kept");
                    }
                }
                Recheck::Ok
            }
            Err(ExchangeError::Refused(_)) => {
                if let Err(e) = self.store.put_refresh_token(sid, REFUSED, ttl).await {
                    tracing::warn!(sid = %sid, error = %e, "the provider's refusal could not be kept");
                }
                Recheck::Refused
            }
            Err(ExchangeError::Unavailable(why)) => Recheck::Unavailable(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_session_keys_keep_providers_apart() {
        let k = provider_session_key("https://a.example", "s1");
        assert_eq!(k.len(), 32);
        assert_eq!(k, provider_session_key("https://a.example", "s1"));
        assert_ne!(k, provider_session_key("https://b.example", "s1"));
        assert_ne!(k, provider_session_key("https://a.example", "s2"));
        assert_ne!(
            provider_session_key("https://a", "b\nc"),
            provider_session_key("https://a\nb", "c")
        );
    }
}
