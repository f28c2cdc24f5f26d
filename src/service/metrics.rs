//! Prometheus metrics of the token service.
//!
//! Every counter and histogram a request touches is resolved once, at
//! start: counting is an atomic add, with no lock and no allocation, so the
//! metrics cost forward-auth nothing it would have to share between cores.
//! (`prometheus_client`'s `Family` takes a process-wide read lock on every
//! lookup, and its `Histogram` a mutex on every observation.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::service::error::Code;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecheckResult {
    pub result: String,
}

/// `tokenpolicy_oidc_recheck_total{result}`: the renewal re-checks with the
/// identity provider (`ok`, `refused`, `unavailable`, `missing`). Counted
/// on the renewal path only.
pub struct Rechecks {
    family: Family<RecheckResult, Counter>,
}

impl Rechecks {
    const RESULTS: [&'static str; 4] = ["ok", "refused", "unavailable", "missing"];

    fn new() -> Rechecks {
        let family = Family::<RecheckResult, Counter>::default();
        for r in Self::RESULTS {
            let _ = family.get_or_create(&RecheckResult { result: r.into() });
        }
        Rechecks { family }
    }

    pub fn count(&self, result: &str) {
        self.family
            .get_or_create(&RecheckResult {
                result: result.to_string(),
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Route {
    pub route: String,
}

/// The route label of a request that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// The routes the router serves, and [`UNMATCHED`] for the rest; a route
/// missing here is counted as `other`.
pub const ROUTES: &[&str] = &[
    "/v1/login",
    "/v1/refresh",
    "/v1/logout",
    "/v1/verify",
    "/v1/verify/{*rest}",
    "/.well-known/jwks.json",
    "/healthz",
    "/readyz",
    "/metrics",
    UNMATCHED,
];

/// A counter by outcome. The outcomes named at start (and every rejection
/// code) are counted without a lock; any other still lands in the family.
pub struct Outcomes {
    family: Family<Outcome, Counter>,
    known: HashMap<&'static str, Counter>,
}

impl Outcomes {
    fn new(named: &[&'static str]) -> Outcomes {
        let family = Family::<Outcome, Counter>::default();
        let known = named
            .iter()
            .copied()
            .chain(Code::ALL.iter().map(|c| c.as_str()))
            .map(|name| {
                let counter = family
                    .get_or_create(&Outcome {
                        outcome: name.to_string(),
                    })
                    .clone();
                (name, counter)
            })
            .collect();
        Outcomes { family, known }
    }

    pub fn count(&self, outcome: &str) {
        match self.known.get(outcome) {
            Some(counter) => {
                counter.inc();
            }
            None => {
                self.family
                    .get_or_create(&Outcome {
                        outcome: outcome.to_string(),
                    })
                    .inc();
            }
        }
    }
}

/// Upper bounds (seconds) of the latency buckets: 100 µs × 2.5^i.
fn latency_bounds() -> Vec<f64> {
    (0..14).map(|i| 0.0001 * 2.5f64.powi(i)).collect()
}

/// A histogram of durations kept in atomics: an observation is two
/// relaxed atomic adds. The count is the buckets' total. A scrape may see a
/// count one observation ahead of the sum; Prometheus tolerates that, and
/// the next scrape is whole.
#[derive(Debug)]
struct AtomicHistogram {
    bounds: Arc<[f64]>,
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    fn new(bounds: Arc<[f64]>) -> AtomicHistogram {
        AtomicHistogram {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let count = buckets.iter().map(|(_, n)| n).sum();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

/// Request latency by route: one histogram per route of [`ROUTES`], plus
/// `other`, found by a lookup in a map that never changes.
#[derive(Clone, Debug)]
pub struct Latency {
    by_route: Arc<HashMap<&'static str, AtomicHistogram>>,
}

const OTHER_ROUTE: &str = "other";

impl Latency {
    fn new() -> Latency {
        let bounds: Arc<[f64]> = latency_bounds().into();
        let by_route = ROUTES
            .iter()
            .copied()
            .chain([OTHER_ROUTE])
            .map(|r| (r, AtomicHistogram::new(bounds.clone())))
            .collect();
        Latency {
            by_route: Arc::new(by_route),
        }
    }

    pub fn observe(&self, route: &str, elapsed: std::time::Duration) {
        let h = self
            .by_route
            .get(route)
            .or_else(|| self.by_route.get(OTHER_ROUTE));
        if let Some(h) = h {
            h.observe(elapsed);
        }
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // In a stable order, and only the routes that were used.
        let mut routes: Vec<_> = self
            .by_route
            .iter()
            .filter(|(_, h)| h.count() > 0)
            .collect();
        routes.sort_by_key(|(r, _)| **r);
        for (route, h) in routes {
            let labels = Route {
                route: route.to_string(),
            };
            h.encode(encoder.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub struct Metrics {
    registry: Registry,
    pub logins: Outcomes,
    pub refreshes: Outcomes,
    pub verify: Outcomes,
    pub revocations: Counter,
    pub latency: Latency,
    /// Requests whose last X-Forwarded-For hop was not an address (the peer
    /// address was used instead).
    pub forwarded_for_invalid: Counter,
    pub oidc_recheck: Rechecks,
    /// The audit trail's events (see `audit.rs`).
    pub audit: crate::service::audit::Counters,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenpolicy");
        let logins = Outcomes::new(&["success"]);
        let refreshes = Outcomes::new(&["issued", "grace"]);
        let verify = Outcomes::new(&["allowed", "renewed"]);
        let revocations = Counter::default();
        let latency = Latency::new();
        registry.register("logins", "Login attempts by outcome", logins.family.clone());
        registry.register(
            "refreshes",
            "Token refreshes by outcome (issued, grace, or the rejection code)",
            refreshes.family.clone(),
        );
        registry.register(
            "verify_decisions",
            "Forward-auth decisions (allowed, renewed, or the rejection code)",
            verify.family.clone(),
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
        let oidc_recheck = Rechecks::new();
        registry.register(
            "oidc_recheck",
            "Renewal re-checks with the OpenID Connect provider by result (ok, refused, unavailable, missing)",
            oidc_recheck.family.clone(),
        );
        let audit = crate::service::audit::Counters::register(&mut registry);
        Metrics {
            oidc_recheck,
            registry,
            audit,
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
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn line<'a>(text: &'a str, start: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn known_and_unknown_outcomes_are_counted() {
        let m = Metrics::default();
        m.verify.count("allowed");
        m.verify.count("allowed");
        m.verify.count(Code::RevokedSession.as_str());
        m.verify.count("something-new");
        let text = m.render();
        assert_eq!(
            line(
                &text,
                "tokenpolicy_verify_decisions_total{outcome=\"allowed\"}"
            ),
            Some("tokenpolicy_verify_decisions_total{outcome=\"allowed\"} 2")
        );
        assert_eq!(
            line(
                &text,
                "tokenpolicy_verify_decisions_total{outcome=\"REVOKED_SESSION\"}"
            ),
            Some("tokenpolicy_verify_decisions_total{outcome=\"REVOKED_SESSION\"} 1")
        );
        assert_eq!(
            line(
                &text,
                "tokenpolicy_verify_decisions_total{outcome=\"something-new\"}"
            ),
            Some("tokenpolicy_verify_decisions_total{outcome=\"something-new\"} 1")
        );
        // Known outcomes are there from the start, at zero.
        assert_eq!(
            line(&text, "tokenpolicy_refreshes_total{outcome=\"grace\"}"),
            Some("tokenpolicy_refreshes_total{outcome=\"grace\"} 0")
        );
        assert_eq!(
            line(&text, "tokenpolicy_logins_total{outcome=\"success\"}"),
            Some("tokenpolicy_logins_total{outcome=\"success\"} 0")
        );
    }

    #[test]
    fn latency_buckets_are_cumulative_with_count_and_sum() {
        let m = Metrics::default();
        m.latency.observe("/healthz", Duration::from_micros(50));
        m.latency.observe("/healthz", Duration::from_micros(200));
        m.latency.observe("/healthz", Duration::from_secs(100));
        m.latency.observe("/not-a-route", Duration::from_millis(1));
        let text = m.render();
        let h = |suffix: &str| {
            let start = format!("tokenpolicy_http_request_duration_seconds_{suffix}");
            line(&text, &start)
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        assert_eq!(h("count{route=\"/healthz\"}").as_deref(), Some("3"));
        let sum: f64 = h("sum{route=\"/healthz\"}").unwrap().parse().unwrap();
        assert!((sum - 100.00025).abs() < 1e-9, "{sum}");
        // 50 µs falls in the first bucket (le 0.0001), 200 µs in the second
        // (le 0.00025), 100 s only in +Inf.
        assert_eq!(
            h("bucket{le=\"0.0001\",route=\"/healthz\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            h("bucket{le=\"0.00025\",route=\"/healthz\"}").as_deref(),
            Some("2")
        );
        assert_eq!(
            h("bucket{le=\"+Inf\",route=\"/healthz\"}").as_deref(),
            Some("3")
        );
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("_bucket{") && l.contains("route=\"/healthz\""))
            .collect();
        assert_eq!(buckets.len(), 15, "14 bounds and +Inf");
        assert!(buckets[13].ends_with(" 2"), "{}", buckets[13]);
        // A route not listed is counted, as `other`; unused routes are left out.
        assert_eq!(h("count{route=\"other\"}").as_deref(), Some("1"));
        assert!(!text.contains("route=\"/v1/login\""), "{text}");
    }
}
