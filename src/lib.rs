//! tokenpolicy: a token service that enforces a TokenPolicy (session
//! validity, token validity, a one-time expired-token refresh window), and
//! the operator that runs it on Kubernetes.

pub mod controller;
pub mod crd;
pub mod duration;
pub mod error;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod policy;
pub mod policy_watch;
pub mod resources;
pub mod rotation;
pub mod rules;
pub mod serve;
pub mod service;
pub mod store;
pub mod token;
pub mod users;
