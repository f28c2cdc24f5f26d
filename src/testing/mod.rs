//! Builders shared by the unit tests, the benches and the fuzz seeds: one
//! way to make a token service, its keys and users, and a token's claims.
//! The crate's own tests always have them; `benches/` and `fuzz/` turn on
//! the `testing` feature. The mock API server the operator's tests talk to
//! ([`api_server`]) is for the unit tests alone.

#[cfg(test)]
pub mod api_server;

use std::sync::Arc;

use crate::clock::Millis;
use crate::policy::Policy;
use crate::service::jwt::{Claims, Key, KeySet};
use crate::service::session::{Throttle, TokenService};
use crate::service::store::{MemoryStore, OneTimeStore};
use crate::service::users::Users;

/// The issuer and audience of the test keys.
pub const ISSUER: &str = "tokenpolicy";
pub const AUDIENCE: &str = "tokenpolicy";
/// A fixed moment (seconds since the epoch) for tests that pick their clock.
pub const T0: i64 = 1_800_000_000;

/// The claims of a token of `alice`'s session `sid-1`, issued at `t`
/// (seconds) at login and valid for 60 s. Change a field with
/// `Claims { sid: …, ..claims_at(t) }`.
pub fn claims_at(t: i64) -> Claims {
    Claims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: "alice".into(),
        sid: "sid-1".into(),
        jti: "jti-1".into(),
        iat: t,
        exp: t + 60,
        auth_time: t,
        pwv: None,
        ..Default::default()
    }
}

/// [`claims_at`] at [`T0`].
pub fn claims() -> Claims {
    claims_at(T0)
}

/// A key set of one fresh Ed25519 key, for [`ISSUER`] and [`AUDIENCE`].
pub fn keys() -> KeySet {
    keys_of(vec![Key::generate()])
}

/// A key set of these keys, for [`ISSUER`] and [`AUDIENCE`].
pub fn keys_of(keys: Vec<Key>) -> KeySet {
    KeySet::new(keys, ISSUER, AUDIENCE).expect("test keys make a key set")
}

/// A users-file line for `name` with `password`, hashed with bcrypt at its
/// cheapest cost (tests only).
pub fn user_line(name: &str, password: &str) -> String {
    let hash = bcrypt::hash(password, 4).expect("bcrypt hashes a test password");
    format!("{name}:{hash}\n")
}

/// A users file of these lines.
pub fn users(lines: &str) -> Users {
    Users::parse(lines, "test users").expect("test users parse")
}

/// A token service with the defaults below, changed one at a time:
/// `service().user("alice", "pw").policy(p).build()`.
pub fn service() -> ServiceBuilder {
    ServiceBuilder {
        policy: Policy::default(),
        users: Users::default(),
        keys: None,
        store: Arc::new(MemoryStore::new()),
        leeway: 0,
        throttle: Throttle::default(),
    }
}

/// See [`service`]. Defaults: the default policy, no users, one fresh key,
/// an in-process store, no leeway, the default throttle.
pub struct ServiceBuilder {
    policy: Policy,
    users: Users,
    keys: Option<KeySet>,
    store: Arc<dyn OneTimeStore>,
    leeway: Millis,
    throttle: Throttle,
}

impl ServiceBuilder {
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    pub fn users(mut self, users: Users) -> Self {
        self.users = users;
        self
    }

    /// The users file holds `name` with `password` alone.
    pub fn user(self, name: &str, password: &str) -> Self {
        self.users(users(&user_line(name, password)))
    }

    pub fn keys(mut self, keys: KeySet) -> Self {
        self.keys = Some(keys);
        self
    }

    pub fn store(mut self, store: Arc<dyn OneTimeStore>) -> Self {
        self.store = store;
        self
    }

    pub fn leeway(mut self, leeway: Millis) -> Self {
        self.leeway = leeway;
        self
    }

    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = throttle;
        self
    }

    pub fn build(self) -> TokenService {
        TokenService::new(
            self.policy,
            self.users,
            self.keys.unwrap_or_else(keys),
            self.store,
            self.leeway,
            self.throttle,
        )
    }
}
