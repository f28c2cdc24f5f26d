//! What every reconcile shares: the client, the event recorder, the
//! operator-wide settings, and the one error type (kept at the root, as
//! controller-rs does, so that the reconciler's parts never import it from
//! each other).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::crd::TokenPolicy;
use crate::operator::images::AllowedImages;
use crate::operator::metrics::OperatorMetrics;
use crate::operator::names::MANAGER;
use crate::operator::resources::NetworkPolicyConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("TokenPolicy has no namespace")]
    NoNamespace,
    #[error("signing-key Secret {0} is unusable: {1}")]
    KeySecret(String, String),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "kube_client",
            Error::NoNamespace => "no_namespace",
            Error::KeySecret(..) => "key_secret",
        }
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// The token service image when a TokenPolicy does not name one.
    pub image: String,
    /// The images a TokenPolicy's `spec.image` may name.
    pub allowed_images: AllowedImages,
    /// The NetworkPolicy made for each token service; `None`: none is made
    /// (and one made earlier is removed).
    pub network_policy: Option<NetworkPolicyConfig>,
    /// The token services' trusted proxies when a TokenPolicy names none.
    pub trusted_proxies: Vec<String>,
    /// Every token service writes its audit trail to standard output.
    pub audit_log: bool,
    pub metrics: Arc<OperatorMetrics>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, image: String, metrics: Arc<OperatorMetrics>) -> Self {
        let allowed_images = AllowedImages::new(&[], &image);
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Context {
            client,
            recorder,
            image,
            allowed_images,
            network_policy: None,
            trusted_proxies: Vec::new(),
            audit_log: false,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// With the operator's allow-list of images (see `images.rs`).
    pub fn with_allowed_images(mut self, allowed: AllowedImages) -> Self {
        self.allowed_images = allowed;
        self
    }

    /// With the trusted proxies of token services whose TokenPolicy names none.
    pub fn with_trusted_proxies(mut self, trusted: Vec<String>) -> Self {
        self.trusted_proxies = trusted;
        self
    }

    /// With every token service's audit trail on its standard output.
    pub fn with_audit_log(mut self, on: bool) -> Self {
        self.audit_log = on;
        self
    }

    /// With a NetworkPolicy for each token service.
    pub fn with_network_policy(mut self, config: Option<NetworkPolicyConfig>) -> Self {
        self.network_policy = config;
        self
    }

    pub(crate) fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) async fn publish(
    ctx: &Context,
    tp: &TokenPolicy,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    match ctx.recorder.publish(&event, &tp.object_ref(&())).await {
        Ok(()) => {}
        Err(e) if namespace_terminating(&e) => {}
        Err(e) => tracing::warn!(error = %e, "could not publish event"),
    }
}

/// The API server refuses anything new in a namespace being deleted (403,
/// cause `NamespaceTerminating`): the namespace takes the TokenPolicy and
/// everything made for it along, so there is nothing to reconcile or report.
pub(crate) fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403
        && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")))
}
