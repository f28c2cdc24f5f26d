//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does
//! it, so that two operator replicas never both reconcile.
//!
//! Not `kube-lease-manager` (0.13.1, which does depend on kube 5 and
//! k8s-openapi 0.29): read from its source, a holder whose renewal fails
//! logs the error and backs off while its watch channel still says
//! "leader", past the Lease's expiry; it has no renew deadline and puts no
//! time bound on its Lease requests or its release. Our safety tests below
//! (stop at the renew deadline, bounded requests, release on exit) ask for
//! exactly those.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// How long a leader goes on without a successful renewal: ⅔ of the
    /// lease, so it has stopped before anyone may take the lease over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    pub fn new(namespace: String, identity: String) -> Self {
        LeaseConfig {
            namespace,
            name: "tokenpolicy-operator".into(),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// `POD_NAME` (or the host name) plus a random suffix, so that a restarted
/// pod with the same name is a new candidate.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "tokenpolicy-operator".into());
    let mut suffix = [0u8; 4];
    let _ = getrandom::fill(&mut suffix);
    format!(
        "{base}-{}",
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn lease(cfg: &LeaseConfig, spec: LeaseSpec, resource_version: Option<String>) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(cfg.name.clone()),
            namespace: Some(cfg.namespace.clone()),
            resource_version,
            ..Default::default()
        },
        spec: Some(spec),
    }
}

/// One round: takes the lease if it is free or expired, renews it if ours.
/// `Ok(true)`: we lead until `now + lease_duration`.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let duration = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let pp = PostParams::default();
    let Some(current) = api.get_opt(&cfg.name).await? else {
        let spec = LeaseSpec {
            holder_identity: Some(cfg.identity.clone()),
            lease_duration_seconds: Some(duration),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        };
        return match api.create(&pp, &lease(cfg, spec, None)).await {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let mut next = spec.clone();
    if holder == cfg.identity {
        next.renew_time = Some(MicroTime(now));
        next.lease_duration_seconds = Some(duration);
    } else {
        let held_for = SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(0).into());
        let live = !holder.is_empty()
            && spec
                .renew_time
                .as_ref()
                .is_some_and(|t| t.0.checked_add(held_for).is_ok_and(|end| end > now));
        if live {
            return Ok(false);
        }
        next.holder_identity = Some(cfg.identity.clone());
        next.lease_duration_seconds = Some(duration);
        next.acquire_time = Some(MicroTime(now));
        next.renew_time = Some(MicroTime(now));
        next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    match api
        .replace(
            &cfg.name,
            &pp,
            &lease(cfg, next, current.metadata.resource_version.clone()),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up at a clean shutdown, so the next leader need not wait
/// for it to expire (best effort).
async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
    let Ok(Some(current)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let mut spec = current.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    let _ = api
        .replace(
            &cfg.name,
            &PostParams::default(),
            &lease(cfg, spec, current.metadata.resource_version.clone()),
        )
        .await;
}

/// One acquire-or-renew round that gives up after `limit`: a hung request
/// must not keep a leader acting past its deadline.
async fn round_within(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    limit: Duration,
) -> Result<bool, String> {
    match tokio::time::timeout(limit, try_acquire_or_renew(api, cfg, Timestamp::now())).await {
        Ok(Ok(led)) => Ok(led),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Waits to lead, then runs `work` while renewing the lease. Returns an
/// error when leadership is lost, so the process exits and restarts clean.
///
/// Two leaders never act at once: another replica may take the lease at
/// `renewTime + lease_duration`, and we stop at the renew deadline, ⅔ of
/// that, counted from when our last successful renewal *started* (as
/// client-go does). Every request is bounded by the time left.
pub async fn run_as_leader<F>(client: Client, cfg: LeaseConfig, work: F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let deadline = cfg.renew_deadline();
    let retry = cfg.renew_every.min(Duration::from_secs(1));
    let mut waiting_logged = false;
    let mut valid_from;
    loop {
        let started = tokio::time::Instant::now();
        match round_within(&api, &cfg, deadline).await {
            Ok(true) => {
                valid_from = started;
                break;
            }
            Ok(false) if !waiting_logged => {
                tracing::info!(lease = %cfg.name, "another replica leads; waiting");
                waiting_logged = true;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the lease"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
    tracing::info!(identity = %cfg.identity, lease = %cfg.name, "leading");
    let mut work = tokio::spawn(work);
    let mut wait = cfg.renew_every;
    loop {
        let left = deadline.saturating_sub(valid_from.elapsed());
        tokio::select! {
            done = &mut work => {
                // Bounded like every other lease request: a hung API server
                // must not hold up the exit.
                let _ = tokio::time::timeout(deadline, release(&api, &cfg)).await;
                return done?;
            }
            _ = tokio::time::sleep(wait.min(left)) => {
                let started = tokio::time::Instant::now();
                let left = deadline.saturating_sub(valid_from.elapsed());
                match round_within(&api, &cfg, left).await {
                    Ok(true) => {
                        valid_from = started;
                        wait = cfg.renew_every;
                    }
                    Ok(false) => {
                        work.abort();
                        anyhow::bail!("lost leadership to another replica");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease renewal failed; retrying");
                        wait = retry;
                    }
                }
                if valid_from.elapsed() >= deadline {
                    work.abort();
                    anyhow::bail!("could not renew the lease within {deadline:?}; stopping before another replica may lead");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::api_server::{ApiServer, api_status, mock_client};
    use serde_json::{Value, json};
    const URI: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/tokenpolicy-operator";

    fn cfg() -> LeaseConfig {
        LeaseConfig::new("ops".into(), "me".into())
    }

    fn now() -> Timestamp {
        "2026-11-22T12:00:00Z".parse().unwrap()
    }

    fn held(by: &str, renewed: &str, transitions: i32) -> Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "tokenpolicy-operator", "namespace": "ops", "resourceVersion": "42"},
               "spec": {"holderIdentity": by, "leaseDurationSeconds": 15, "renewTime": renewed,
                        "acquireTime": "2026-11-22T11:00:00Z", "leaseTransitions": transitions}})
    }

    fn status(code: u16, reason: &str) -> Value {
        api_status(code, reason, reason)
    }

    /// Runs one round against a scripted API server; asserts no extra call.
    async fn round<S, Fut>(script: S) -> bool
    where
        S: FnOnce(ApiServer) -> Fut + Send + 'static,
        Fut: Future<Output = ApiServer> + Send,
    {
        let (client, server) = mock_client();
        let api: Api<Lease> = Api::namespaced(client, "ops");
        let server = tokio::spawn(async move { script(server).await.no_more_calls(100).await });
        let led = try_acquire_or_renew(&api, &cfg(), now()).await.unwrap();
        drop(api);
        tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("missing call")
            .unwrap();
        led
    }

    #[tokio::test]
    async fn no_lease_creates_it_and_leads() {
        let led = round(|mut h| async move {
            h.expect("GET", URI, 404, status(404, "NotFound")).await;
            let sent = h
                .expect(
                    "POST",
                    "/apis/coordination.k8s.io/v1/namespaces/ops/leases?",
                    201,
                    held("me", "2026-11-22T12:00:00Z", 0),
                )
                .await;
            assert_eq!(sent["spec"]["holderIdentity"], "me");
            assert_eq!(sent["spec"]["leaseDurationSeconds"], 15);
            assert_eq!(sent["spec"]["leaseTransitions"], 0);
            assert_eq!(sent["spec"]["renewTime"], "2026-11-22T12:00:00.000000Z");
            h
        })
        .await;
        assert!(led);
    }

    #[tokio::test]
    async fn a_fresh_lease_of_another_is_left_alone() {
        // Renewed 10 s ago, held for 15 s: still theirs. No write at all.
        let led = round(|mut h| async move {
            h.expect("GET", URI, 200, held("other", "2026-11-22T11:59:50Z", 3))
                .await;
            h
        })
        .await;
        assert!(!led);
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over() {
        let led = round(|mut h| async move {
            h.expect("GET", URI, 200, held("other", "2026-11-22T11:59:40Z", 3))
                .await;
            let sent = h
                .expect(
                    "PUT",
                    &format!("{URI}?"),
                    200,
                    held("me", "2026-11-22T12:00:00Z", 4),
                )
                .await;
            assert_eq!(sent["metadata"]["resourceVersion"], "42");
            assert_eq!(sent["spec"]["holderIdentity"], "me");
            assert_eq!(sent["spec"]["leaseTransitions"], 4);
            assert_eq!(sent["spec"]["acquireTime"], "2026-11-22T12:00:00.000000Z");
            h
        })
        .await;
        assert!(led);
    }

    #[tokio::test]
    async fn our_lease_is_renewed() {
        let led = round(|mut h| async move {
            h.expect("GET", URI, 200, held("me", "2026-11-22T11:59:55Z", 2))
                .await;
            let sent = h
                .expect(
                    "PUT",
                    &format!("{URI}?"),
                    200,
                    held("me", "2026-11-22T12:00:00Z", 2),
                )
                .await;
            assert_eq!(sent["spec"]["renewTime"], "2026-11-22T12:00:00.000000Z");
            // A renewal is not a transition, and keeps the acquire time.
            assert_eq!(sent["spec"]["leaseTransitions"], 2);
            assert_eq!(sent["spec"]["acquireTime"], "2026-11-22T11:00:00.000000Z");
            h
        })
        .await;
        assert!(led);
    }

    #[tokio::test]
    async fn losing_the_race_is_not_leading() {
        let led = round(|mut h| async move {
            h.expect("GET", URI, 200, held("other", "2026-11-22T11:00:00Z", 3))
                .await;
            h.expect("PUT", &format!("{URI}?"), 409, status(409, "Conflict"))
                .await;
            h
        })
        .await;
        assert!(!led);
    }

    #[test]
    fn identities_differ_per_start() {
        assert_ne!(identity(), identity());
    }

    fn quick() -> LeaseConfig {
        LeaseConfig {
            lease_duration: Duration::from_millis(1_500),
            renew_every: Duration::from_millis(200),
            ..cfg()
        }
    }

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases?";

    /// Answers the first acquisition (no lease, create), then hands the server on.
    async fn acquired(mut api: ApiServer) -> ApiServer {
        api.expect("GET", URI, 404, status(404, "NotFound")).await;
        api.expect("POST", LEASES, 201, held("me", "2026-11-22T12:00:00Z", 0))
            .await;
        api
    }

    #[tokio::test]
    async fn failing_renewals_stop_the_leader_before_the_lease_expires() {
        let (client, api) = mock_client();
        let server = tokio::spawn(async move {
            let mut api = acquired(api).await;
            while let Some((_, send)) = api.0.next_request().await {
                crate::testing::api_server::respond(send, 500, &status(500, "InternalError"));
            }
        });
        let started = std::time::Instant::now();
        let err = run_as_leader(client, quick(), std::future::pending())
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(err.to_string().contains("could not renew"), "{err}");
        // Stopped at the renew deadline (1 s), before another replica may lead (1.5 s).
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(1_500),
            "{took:?}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_hung_renewal_does_not_extend_the_leadership() {
        let (client, api) = mock_client();
        let server = tokio::spawn(async move {
            let mut api = acquired(api).await;
            // Take every renewal and never answer it.
            let mut held_open = Vec::new();
            while let Some(pending) = api.0.next_request().await {
                held_open.push(pending);
            }
        });
        let started = std::time::Instant::now();
        let err = run_as_leader(client, quick(), std::future::pending())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("could not renew"), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            started.elapsed()
        );
        server.abort();
    }

    #[tokio::test]
    async fn another_holder_seen_at_renewal_stops_the_work() {
        let (client, api) = mock_client();
        let server = tokio::spawn(async move {
            let mut api = acquired(api).await;
            // Renewed just now by another replica: a fresh lease, not ours.
            let fresh = Timestamp::now().to_string();
            api.expect("GET", URI, 200, held("other", &fresh, 1)).await;
            api.no_more_calls(300).await;
        });
        let err = run_as_leader(client, quick(), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "lost leadership to another replica");
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_clean_end_releases_the_lease() {
        let (client, api) = mock_client();
        let server = tokio::spawn(async move {
            let mut api = acquired(api).await;
            api.expect("GET", URI, 200, held("me", "2026-11-22T12:00:00Z", 0))
                .await;
            let sent = api
                .expect(
                    "PUT",
                    &format!("{URI}?"),
                    200,
                    held("", "2026-11-22T12:00:00Z", 0),
                )
                .await;
            assert!(
                sent["spec"].get("holderIdentity").is_none_or(|h| h == ""),
                "{sent}"
            );
            assert_eq!(sent["spec"]["leaseDurationSeconds"], 1);
            api.no_more_calls(100).await;
        });
        run_as_leader(client, quick(), async { Ok(()) })
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn an_unanswered_release_does_not_hold_up_the_exit() {
        let (client, api) = mock_client();
        let server = tokio::spawn(async move {
            let mut api = acquired(api).await;
            // Take the release's GET and never answer it.
            let _pending = api.0.next_request().await;
            std::future::pending::<()>().await;
        });
        let started = std::time::Instant::now();
        run_as_leader(client, quick(), async { Ok(()) })
            .await
            .unwrap();
        // Done within the renew deadline (1 s), not kube's 295 s read timeout.
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            started.elapsed()
        );
        server.abort();
    }
}
