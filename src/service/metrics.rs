//! Prometheus metrics of the token service.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

pub struct Metrics {
    registry: Registry,
    pub logins: Family<Outcome, Counter>,
    pub refreshes: Family<Outcome, Counter>,
    pub verify: Family<Outcome, Counter>,
    pub revocations: Counter,
    pub latency: Family<Route, Histogram>,
    /// Requests whose last X-Forwarded-For hop was not an address (the peer
    /// address was used instead).
    pub forwarded_for_invalid: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenpolicy");
        let logins = Family::<Outcome, Counter>::default();
        let refreshes = Family::<Outcome, Counter>::default();
        let verify = Family::<Outcome, Counter>::default();
        let revocations = Counter::default();
        let latency = Family::<Route, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.5, 14))
        });
        registry.register("logins", "Login attempts by outcome", logins.clone());
        registry.register(
            "refreshes",
            "Token refreshes by outcome (issued, grace, or the rejection code)",
            refreshes.clone(),
        );
        registry.register(
            "verify_decisions",
            "Forward-auth decisions (allowed, renewed, or the rejection code)",
            verify.clone(),
        );
        registry.register(
            "session_revocations",
            "Sessions revoked",
            revocations.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        let forwarded_for_invalid = Counter::default();
        registry.register(
            "forwarded_for_invalid",
            "Requests whose last X-Forwarded-For hop was not an address; the peer address was used",
            forwarded_for_invalid.clone(),
        );
        Metrics {
            registry,
            forwarded_for_invalid,
            logins,
            refreshes,
            verify,
            revocations,
            latency,
        }
    }
}

impl Metrics {
    pub fn count(family: &Family<Outcome, Counter>, outcome: &str) {
        family
            .get_or_create(&Outcome {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
