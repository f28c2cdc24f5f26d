//! The token service: `tokenpolicy serve`.
//!
//! - [`rules`]: the policy arithmetic, pure;
//! - [`audit`]: the audit trail (`--audit-log`) and its counters;
//! - [`jwt`]: signing and verifying tokens, the key ring;
//! - [`store`]: the one-time refresh claims and revocations (in-process or Redis);
//! - [`users`]: the users file and password hashes; [`hashing`]: the threads
//!   that check passwords;
//! - [`verified_cache`]: the cache of tokens whose signature verified;
//! - [`session`]: login, refresh, logout and verify, tying the above together;
//! - [`http`]: the HTTP API and forward-auth;
//! - [`listen`]: connections: timeouts, the connection cap, graceful shutdown;
//! - [`admin`]: who may call the admin API (an admin token, or the
//!   cluster's TokenReview and SubjectAccessReview);
//! - [`serve`]: the command that wires it up; [`policy_watch`] follows a
//!   TokenPolicy in the cluster.

pub mod admin;
pub mod audit;
pub mod client;
pub mod error;
pub mod hashing;
pub mod http;
pub mod jwt;
pub mod listen;
pub mod metrics;
pub mod oidc;
pub mod policy_watch;
pub mod rules;
pub mod serve;
pub mod session;
pub mod store;
pub mod users;
pub mod verified_cache;
