//! `tokenpolicy operator`: the controller, its metrics and health endpoints.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;

pub mod context;
pub mod images;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod ownership;
pub mod reconcile;
pub mod render;
pub mod resources;
pub mod review;
pub mod rollout;
pub mod rotation;
pub mod status;

use context::Context;
use images::AllowedImages;
use leader::LeaseConfig;
use metrics::OperatorMetrics;
use resources::NetworkPolicyConfig;

fn parse_network_policy(json: &str) -> Result<NetworkPolicyConfig, String> {
    serde_json::from_str(json).map_err(|e| format!("not a token service NetworkPolicy: {e}"))
}

#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Token service image for TokenPolicies that do not name one.
    #[arg(long, env = "TOKENPOLICY_IMAGE", default_value = concat!("tokenpolicy:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Image repositories a TokenPolicy's `spec.image` may name (comma
    /// separated; `registry/path/*` for every repository under a path).
    /// Default: the repository of --image.
    #[arg(long, env = "TOKENPOLICY_ALLOWED_IMAGES", value_delimiter = ',')]
    pub allowed_images: Vec<String>,
    /// A NetworkPolicy for every token service, as JSON:
    /// `{"from": [NetworkPolicyPeer...], "metricsFrom": [NetworkPolicyPeer...]}`
    /// (ingress controllers, and the metrics scraper). Unset: none.
    #[arg(long, env = "TOKENPOLICY_NETWORK_POLICY", value_parser = parse_network_policy)]
    pub token_service_network_policy: Option<NetworkPolicyConfig>,
    /// Trusted proxies of the token services whose TokenPolicy names none
    /// (`spec.trustedProxies`): address ranges or addresses, comma
    /// separated. Default: none (the connection's address counts).
    #[arg(
        long,
        env = "TOKENPOLICY_TOKEN_SERVICE_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub token_service_trusted_proxies: Vec<String>,
    /// Run every token service with `--audit-log -`: its audit trail on
    /// the container's standard output (the diagnostic log is on standard
    /// error).
    #[arg(long, env = "TOKENPOLICY_TOKEN_SERVICE_AUDIT_LOG")]
    pub token_service_audit_log: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "TOKENPOLICY_METRICS_LISTEN",
        default_value = "0.0.0.0:8081"
    )]
    pub metrics_listen: SocketAddr,
    /// Reconcile without taking the Lease (only ever with one replica).
    #[arg(long, env = "TOKENPOLICY_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Namespace of the `tokenpolicy-operator` Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// A ClusterRole granting `create` on `tokenreviews` and
    /// `subjectaccessreviews` (the chart's): the operator binds it, by a
    /// ClusterRoleBinding of the same name, to every token service's
    /// ServiceAccount, for the admin API. Unset: no token service may
    /// review tokens, and their admin API answers 503.
    #[arg(long, env = "TOKENPOLICY_TOKEN_REVIEW_CLUSTER_ROLE")]
    pub token_review_cluster_role: Option<String>,
}

pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(OperatorMetrics::default());
    crate::trusted_proxies::TrustedProxies::parse(&args.token_service_trusted_proxies)
        .map_err(|e| anyhow::anyhow!("--token-service-trusted-proxies: {e}"))?;
    let allowed = AllowedImages::new(&args.allowed_images, &args.image);
    tracing::info!(allowed = ?allowed.entries(), "images a TokenPolicy may run");
    let ctx = Arc::new(
        Context::new(client, args.image.clone(), metrics.clone())
            .with_allowed_images(allowed)
            .with_network_policy(args.token_service_network_policy.clone())
            .with_trusted_proxies(args.token_service_trusted_proxies.clone())
            .with_audit_log(args.token_service_audit_log),
    );

    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("listening on {}", args.metrics_listen))?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(image = %args.image, metrics = %args.metrics_listen, "starting operator");
    let client = ctx.client.clone();
    let review_role = args.token_review_cluster_role.clone();
    let work = async move {
        let Some(role) = review_role else {
            tracing::info!(
                "no --token-review-cluster-role: token services cannot review tokens (admin API)"
            );
            return reconcile::run(ctx).await;
        };
        tokio::select! {
            done = reconcile::run(ctx) => done,
            () = review::run(client, role) => Ok(()),
        }
    };
    if args.no_leader_election {
        return work.await;
    }
    let lease = LeaseConfig::new(args.lease_namespace.clone(), leader::identity());
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    leader::run_as_leader(client, lease, work).await
}
