//! tokenpolicy: a token service that enforces a TokenPolicy (session
//! validity, token validity, a one-time expired-token refresh window), and
//! the operator that runs it on Kubernetes.
//!
//! - [`service`]: the token service (`tokenpolicy serve`): rules, tokens,
//!   the one-time store, users and the HTTP API.
//! - [`operator`]: the operator (`tokenpolicy operator`): TokenPolicy to
//!   Deployment, signing keys and their rotation, leader election.
//! - [`sessions_cli`]: `tokenpolicy sessions`, a client of the admin API.
//! - Shared by both: the [`crd`], the [`policy`] it describes, [`duration`]s,
//!   the [`clock`], the [`signing_key`]s, the [`keyring`]'s files and the
//!   [`trusted_proxies`].
//! - For tests, benches and fuzz seeds (the `testing` feature): `testing`.

pub mod clock;
pub mod crd;
pub mod duration;
pub mod keyring;
pub mod logging;
pub mod operator;
pub mod policy;
pub mod service;
pub mod sessions_cli;
pub mod signing_key;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod trusted_proxies;
