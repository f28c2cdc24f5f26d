//! `tokenpolicy operator`: the controller that turns each TokenPolicy into a
//! running token service (DESIGN.md §3). The objects themselves are built in
//! `resources.rs`; this module decides what to apply and reports status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::crd::{SecretKeyRef, TokenPolicy, TokenPolicyStatus};
use crate::policy::Policy;
use crate::resources::{self, MANAGER};
use crate::rotation::{self, KeyRing, Step};
use crate::token::Key;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

pub struct OperatorMetrics {
    pub registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<Reason, Counter>,
    pub duration: Histogram,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenpolicy_operator");
        let reconciles = Counter::default();
        let failures = Family::<Reason, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed reconciliations by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            duration.clone(),
        );
        OperatorMetrics {
            registry,
            reconciles,
            failures,
            duration,
        }
    }
}

impl OperatorMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    /// The token service image when a TokenPolicy does not name one.
    pub image: String,
    pub metrics: Arc<OperatorMetrics>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, image: String, metrics: Arc<OperatorMetrics>) -> Self {
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
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The conditions, reasons and counters that a reconciliation reports.
#[derive(Debug, Clone, PartialEq)]
struct Report {
    ready: (bool, &'static str, String),
    progressing: (bool, &'static str, String),
    degraded: (bool, &'static str, String),
    ready_replicas: Option<i32>,
}

fn condition(
    kind: &str,
    (ok, reason, message): &(bool, &'static str, String),
    old: &[Condition],
    generation: Option<i64>,
    now: &Timestamp,
) -> Condition {
    let status = if *ok { "True" } else { "False" };
    // lastTransitionTime changes only when the status does.
    let since = old
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(*now));
    Condition {
        type_: kind.into(),
        status: status.into(),
        reason: (*reason).into(),
        message: message.clone(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusPatch {
    api_version: &'static str,
    kind: &'static str,
    status: TokenPolicyStatus,
}

async fn write_status(
    tp: &TokenPolicy,
    api: &Api<TokenPolicy>,
    report: &Report,
) -> Result<(), Error> {
    let old = tp
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let now = Timestamp::now();
    let generation = tp.metadata.generation;
    let status = TokenPolicyStatus {
        observed_generation: generation,
        conditions: vec![
            condition("Ready", &report.ready, old, generation, &now),
            condition("Progressing", &report.progressing, old, generation, &now),
            condition("Degraded", &report.degraded, old, generation, &now),
        ],
        ready_replicas: report.ready_replicas,
        endpoint: Some(resources::endpoint(tp)),
    };
    let patch = StatusPatch {
        api_version: "auth.tokenpolicy.io/v1alpha1",
        kind: "TokenPolicy",
        status,
    };
    api.patch_status(
        &tp.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

fn degraded_reason(tp: &TokenPolicy) -> Option<String> {
    tp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.clone())
}

/// A Secret's value for `key`, from `data` or (not yet converted) `stringData`.
fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
}

/// A referenced Secret key that must exist before the service can run.
async fn check_secret(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<Option<String>, Error> {
    match secrets.get_opt(&r.name).await? {
        None => Ok(Some(format!("Secret {} not found", r.name))),
        Some(s) => Ok(secret_value(&s, &r.key)
            .is_none()
            .then(|| format!("Secret {} has no key {}", r.name, r.key))),
    }
}

/// What stops the service from running, if anything: (reason, message).
async fn blocker(
    tp: &TokenPolicy,
    secrets: &Api<Secret>,
) -> Result<Option<(&'static str, String)>, Error> {
    let Some(users) = &tp.spec.users else {
        return Ok(Some((
            "UsersSecretMissing",
            "spec.users is not set: nobody could log in".into(),
        )));
    };
    if let Some(m) = check_secret(secrets, &users.secret_ref).await? {
        return Ok(Some(("UsersSecretMissing", m)));
    }
    if let Some(redis) = &tp.spec.redis
        && let Some(m) = check_secret(secrets, &redis.url_secret_ref).await?
    {
        return Ok(Some(("RedisSecretMissing", m)));
    }
    Ok(None)
}

fn pem_of(secret: &Secret, key: &str) -> Option<String> {
    secret_value(secret, key).and_then(|b| String::from_utf8(b).ok())
}

fn ring_of(secret: &Secret, name: &str) -> Result<KeyRing, Error> {
    let signing = pem_of(secret, rotation::SIGNING)
        .ok_or_else(|| Error::KeySecret(name.into(), format!("no {}", rotation::SIGNING)))?;
    let ann = secret.annotations();
    Ok(KeyRing {
        signing,
        next: pem_of(secret, rotation::NEXT),
        previous: pem_of(secret, rotation::PREVIOUS),
        rotated_for: ann.get(resources::ROTATED_FOR_ANNOTATION).cloned(),
        promoted_at: ann
            .get(resources::PROMOTED_AT_ANNOTATION)
            .and_then(|t| t.parse().ok()),
    })
}

/// The kids of the ring, first signs: the pod-template annotation.
fn kids(ring: &KeyRing, name: &str) -> Result<String, Error> {
    let kids: Result<Vec<_>, _> = rotation::in_order(ring)
        .into_iter()
        .map(|(file, pem)| {
            Key::from_pem(pem, file)
                .map(|k| k.kid().to_string())
                .map_err(|e| Error::KeySecret(name.into(), e.to_string()))
        })
        .collect();
    Ok(kids?.join(","))
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// The signing keys: generated once and never overwritten, then rotated as
/// `rotation::plan` says (adding and dropping here; promoting only after a
/// complete rollout, in `reconcile_inner`).
async fn signing_keys(
    tp: &TokenPolicy,
    ctx: &Context,
    secrets: &Api<Secret>,
    policy: &Policy,
    now: i64,
) -> Result<(KeyRing, Option<String>), Error> {
    let name = resources::signing_secret_name(tp);
    let rotate = tp.annotations().get(resources::ROTATE_ANNOTATION).cloned();
    let Some(existing) = secrets.get_opt(&name).await? else {
        let ring = KeyRing {
            signing: Key::generate().to_pem(),
            rotated_for: rotate,
            ..Default::default()
        };
        secrets
            .create(&post_params(), &resources::signing_secret(tp, &ring))
            .await?;
        let note = format!(
            "generated signing key {} in Secret {name}",
            kids(&ring, &name)?
        );
        publish(
            ctx,
            tp,
            EventType::Normal,
            "SigningKeyCreated",
            "Create",
            note,
        )
        .await;
        return Ok((ring, None));
    };
    let ring = ring_of(&existing, &name)?;
    let step = rotation::plan(&ring, rotate.as_deref(), false, policy, now);
    let (reason, note) = match step {
        Step::AddNext => (
            "SigningKeyAdded",
            "new signing key added, verify-only until every replica has it",
        ),
        Step::DropPrevious => (
            "SigningKeyRetired",
            "previous signing key removed: no token it signed can still be used",
        ),
        Step::Keep | Step::Promote => return Ok((ring, existing.metadata.resource_version)),
    };
    let next = rotation::apply(
        &ring,
        step,
        rotate.as_deref(),
        || Key::generate().to_pem(),
        now,
    );
    let version = replace_ring(tp, secrets, &next, existing.metadata.resource_version).await?;
    publish(
        ctx,
        tp,
        EventType::Normal,
        reason,
        "Rotate",
        format!("{note}; keys now {}", kids(&next, &name)?),
    )
    .await;
    Ok((next, version))
}

/// Replaces the key ring, guarded by the version we read (a concurrent
/// writer makes this fail with a conflict, and the reconcile is retried).
async fn replace_ring(
    tp: &TokenPolicy,
    secrets: &Api<Secret>,
    ring: &KeyRing,
    resource_version: Option<String>,
) -> Result<Option<String>, Error> {
    let mut secret = resources::signing_secret(tp, ring);
    secret.metadata.resource_version = resource_version;
    let written = secrets
        .replace(&resources::signing_secret_name(tp), &post_params(), &secret)
        .await?;
    Ok(written.metadata.resource_version)
}

/// Where the Deployment's rollout stands, as the applied object reports it.
struct Rollout {
    /// The deployment controller has seen the current template.
    current: bool,
    ready: i32,
    updated: i32,
    available: i32,
    replicas: i32,
    template_kids: Option<String>,
}

impl Rollout {
    fn of(d: &Deployment) -> Rollout {
        let st = d.status.clone().unwrap_or_default();
        Rollout {
            current: st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
            ready: st.ready_replicas.unwrap_or(0),
            updated: st.updated_replicas.unwrap_or(0),
            available: st.available_replicas.unwrap_or(0),
            replicas: st.replicas.unwrap_or(0),
            template_kids: d
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(resources::KEYS_ANNOTATION))
                .cloned(),
        }
    }

    fn in_progress(&self, want: i32) -> bool {
        !self.current || self.updated < want || self.replicas > want
    }

    /// Every replica runs the pod template carrying `kids`.
    fn complete_with(&self, kids: &str, want: i32) -> bool {
        self.template_kids.as_deref() == Some(kids)
            && self.current
            && self.updated == want
            && self.available == want
            && self.replicas == want
    }
}

async fn publish(
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
fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403
        && s.details.as_ref().is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating")))
}

async fn apply<K>(api: Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

pub async fn reconcile(tp: Arc<TokenPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = match reconcile_inner(&tp, &ctx).await {
        Err(Error::Kube(e)) if namespace_terminating(&e) => {
            tracing::debug!(policy = %key_of(&tp), "namespace is being deleted; nothing to do");
            Ok(Action::await_change())
        }
        other => other,
    };
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.failures().remove(&key_of(&tp));
        }
        // Visible on the TokenPolicy (`kubectl describe`), not only in the
        // operator's log: e.g. a verb missing from the operator's RBAC.
        Err(e) => {
            let mut note = e.to_string();
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            publish(
                &ctx,
                &tp,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                note,
            )
            .await;
        }
    }
    result
}

fn key_of(tp: &TokenPolicy) -> String {
    format!("{}/{}", tp.namespace().unwrap_or_default(), tp.name_any())
}

/// Reports what stops the service and applies nothing, so that a missing
/// Secret or an invalid spec does not churn the running Deployment.
async fn degrade(
    tp: &TokenPolicy,
    ctx: &Context,
    policies: &Api<TokenPolicy>,
    reason: &'static str,
    message: String,
) -> Result<Action, Error> {
    if degraded_reason(tp).as_deref() != Some(reason) {
        publish(
            ctx,
            tp,
            EventType::Warning,
            reason,
            "Reconcile",
            message.clone(),
        )
        .await;
    }
    let report = Report {
        ready: (false, reason, message.clone()),
        progressing: (false, reason, "waiting for the problem to be fixed".into()),
        degraded: (true, reason, message),
        ready_replicas: tp.status.as_ref().and_then(|s| s.ready_replicas),
    };
    write_status(tp, policies, &report).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn reconcile_inner(tp: &TokenPolicy, ctx: &Context) -> Result<Action, Error> {
    if tp.metadata.deletion_timestamp.is_some() {
        // Everything we made carries an ownerReference: the garbage collector removes it.
        return Ok(Action::await_change());
    }
    let ns = tp.namespace().ok_or(Error::NoNamespace)?;
    let client = ctx.client.clone();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let policies: Api<TokenPolicy> = Api::namespaced(client.clone(), &ns);

    let policy = match Policy::from_spec(&tp.spec) {
        Ok(p) => p,
        Err(e) => return degrade(tp, ctx, &policies, "InvalidSpec", e.to_string()).await,
    };
    if let Some((reason, message)) = blocker(tp, &secrets).await? {
        return degrade(tp, ctx, &policies, reason, message).await;
    }

    let now = Timestamp::now().as_second();
    let key_name = resources::signing_secret_name(tp);
    let (ring, ring_version) = signing_keys(tp, ctx, &secrets, &policy, now).await?;
    let key_ids = kids(&ring, &key_name)?;
    apply(
        Api::<ServiceAccount>::namespaced(client.clone(), &ns),
        &resources::service_account(tp),
    )
    .await?;
    apply(
        Api::<Role>::namespaced(client.clone(), &ns),
        &resources::role(tp),
    )
    .await?;
    apply(
        Api::<RoleBinding>::namespaced(client.clone(), &ns),
        &resources::role_binding(tp),
    )
    .await?;
    apply(
        Api::<Service>::namespaced(client.clone(), &ns),
        &resources::service(tp),
    )
    .await?;
    let deployment = apply(
        Api::<Deployment>::namespaced(client.clone(), &ns),
        &resources::deployment(tp, &ctx.image, &key_ids),
    )
    .await?;
    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    if tp.spec.replicas > 1 {
        apply(pdbs, &resources::pdb(tp)).await?;
    } else {
        match pdbs.delete(&tp.name_any(), &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    let want = tp.spec.replicas;
    let rollout = Rollout::of(&deployment);
    let mut promoted = false;
    if ring.next.is_some() && rollout.complete_with(&key_ids, want) {
        let next = rotation::apply(&ring, Step::Promote, None, String::new, now);
        replace_ring(tp, &secrets, &next, ring_version).await?;
        let note = format!(
            "every replica verifies the new key; it signs now (keys {})",
            kids(&next, &key_name)?
        );
        publish(
            ctx,
            tp,
            EventType::Normal,
            "SigningKeyPromoted",
            "Rotate",
            note,
        )
        .await;
        promoted = true;
    }
    let Rollout { ready, updated, .. } = rollout;
    let report = Report {
        ready: if ready >= 1 {
            (
                true,
                "DeploymentAvailable",
                format!("{ready}/{want} replicas ready"),
            )
        } else {
            (
                false,
                "DeploymentUnavailable",
                format!("0/{want} replicas ready"),
            )
        },
        progressing: if rollout.in_progress(want) {
            (
                true,
                "RollingOut",
                format!("{updated}/{want} replicas updated"),
            )
        } else {
            (false, "Stable", "all replicas run the current spec".into())
        },
        degraded: (false, "AsExpected", "no problem found".into()),
        ready_replicas: Some(ready),
    };
    if degraded_reason(tp).is_some() {
        publish(
            ctx,
            tp,
            EventType::Normal,
            "Recovered",
            "Reconcile",
            "the problem is fixed; the token service is being applied".into(),
        )
        .await;
    }
    write_status(tp, &policies, &report).await?;
    // After a promotion, come back at once to roll the pods to the new order;
    // while a previous key is kept, come back when it may be retired.
    Ok(Action::requeue(Duration::from_secs(if promoted {
        1
    } else {
        rotation::recheck_in(&ring, &policy, now).unwrap_or(300)
    })))
}

/// Backoff per object: 5 s, 10 s, 20 s … up to 5 min.
pub fn error_policy(tp: Arc<TokenPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&Reason {
            reason: error.metric_label().into(),
        })
        .inc();
    let n = {
        let mut f = ctx.failures();
        let n = f.entry(key_of(&tp)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs((5u64 << (n - 1).min(6)).min(300));
    tracing::warn!(policy = %key_of(&tp), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// TokenPolicies reconciled at once (each makes up to about ten requests).
const RECONCILE_CONCURRENCY: u16 = 8;

/// Runs the controller until a shutdown signal.
pub async fn run(ctx: Arc<Context>) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let policies = Api::<TokenPolicy>::all(client.clone());
    if let Err(e) = policies
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        anyhow::bail!(
            "cannot list TokenPolicies ({e}); is the CRD installed? (`tokenpolicy crd | kubectl apply -f -`)"
        );
    }
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGER}"));
    Controller::new(policies, watcher::Config::default().any_semantic())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned.clone())
        .owns(Api::<Secret>::all(client.clone()), owned)
        // Bounded: with 1,000 TokenPolicies at once and no bound, the API
        // server queued the operator's own requests (504s) until even its
        // Lease renewal missed the deadline and the leader stopped.
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(policy = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Reconcile against a mock API server (tower-test), in controller-rs's
    //! style: each scenario lists the requests the reconciler must make, in
    //! order, with method, exact URI and the body fields that matter, and
    //! answers as the API server would. A missing call times out; an extra
    //! call finds no answer and fails the reconcile.
    use super::*;
    use crate::fixtures::{ApiServer, mock_client, not_found};
    use crate::resources::tests::policy;
    use serde_json::{Value, json};

    fn secret(name: &str, key: &str, value: &str) -> Value {
        use base64::Engine;
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "team", "resourceVersion": "7"},
               "data": {key: base64::engine::general_purpose::STANDARD.encode(value)}})
    }

    fn context() -> (Arc<Context>, ApiServer) {
        let (client, api) = mock_client();
        let ctx = Context::new(
            client,
            "tokenpolicy:test".into(),
            Arc::new(OperatorMetrics::default()),
        );
        (Arc::new(ctx), api)
    }

    async fn run(
        tp: TokenPolicy,
        ctx: Arc<Context>,
        scenario: tokio::task::JoinHandle<()>,
    ) -> Result<Action, Error> {
        let result = reconcile(Arc::new(tp), ctx).await;
        tokio::time::timeout(Duration::from_secs(2), scenario)
            .await
            .expect("the reconciler did not make every expected call")
            .expect("scenario assertions hold");
        result
    }

    const FM: &str = "?&force=true&fieldManager=tokenpolicy-operator";

    fn ns(path: &str) -> String {
        format!("{path}{FM}")
    }

    /// The five applies of a healthy reconcile; returns the Deployment body.
    async fn applies(api: &mut ApiServer, ready: i32) -> Value {
        applies_observed(api, ready, 1).await
    }

    /// As `applies`, with the Deployment's `observedGeneration` (0: the
    /// deployment controller has not seen this template yet).
    async fn applies_observed(api: &mut ApiServer, ready: i32, observed: i64) -> Value {
        let sa = api
            .apply(
                &ns("/api/v1/namespaces/team/serviceaccounts/demo"),
                Value::Null,
            )
            .await;
        assert_eq!(sa["kind"], "ServiceAccount");
        assert_eq!(sa["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(sa["metadata"]["ownerReferences"][0]["controller"], true);
        let role = api
            .apply(
                &ns("/apis/rbac.authorization.k8s.io/v1/namespaces/team/roles/demo"),
                Value::Null,
            )
            .await;
        assert_eq!(role["rules"][0]["resourceNames"], json!(["demo"]));
        let rb = api
            .apply(
                &ns("/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings/demo"),
                Value::Null,
            )
            .await;
        assert_eq!(rb["subjects"][0]["name"], "demo");
        let svc = api
            .apply(&ns("/api/v1/namespaces/team/services/demo"), Value::Null)
            .await;
        assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
        let dep = api
            .apply(
                &ns("/apis/apps/v1/namespaces/team/deployments/demo"),
                json!({"observedGeneration": observed, "replicas": ready, "updatedReplicas": ready, "readyReplicas": ready, "availableReplicas": ready}),
            )
            .await;
        assert_eq!(dep["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        dep
    }

    fn args(dep: &Value) -> String {
        dep["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect::<Vec<_>>()
            .join(" ")
    }

    async fn status(api: &mut ApiServer) -> Value {
        let sent = api
            .expect(
                "PATCH",
                &ns("/apis/auth.tokenpolicy.io/v1alpha1/namespaces/team/tokenpolicies/demo/status"),
                200,
                serde_json::to_value(policy(1)).unwrap(),
            )
            .await;
        assert_eq!(sent["kind"], "TokenPolicy");
        sent["status"].clone()
    }

    fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
    }

    async fn users_secret_found(api: &mut ApiServer) {
        api.expect(
            "GET",
            "/api/v1/namespaces/team/secrets/demo-users",
            200,
            secret("demo-users", "users", "a:b"),
        )
        .await;
    }

    /// One replica: the disruption budget is removed (here: there was none).
    async fn no_pdb(api: &mut ApiServer) {
        api.expect(
            "DELETE",
            "/apis/policy/v1/namespaces/team/poddisruptionbudgets/demo?",
            404,
            not_found("poddisruptionbudgets", "demo"),
        )
        .await;
    }

    fn key_secret() -> Value {
        secret(
            "demo-signing-keys",
            "signing.pem",
            &Key::generate().to_pem(),
        )
    }

    #[tokio::test]
    async fn first_creation_makes_key_and_service_and_reports_status() {
        let (ctx, mut api) = context();
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/demo-signing-keys",
                404,
                not_found("secrets", "demo-signing-keys"),
            )
            .await;
            let created = api
                .expect(
                    "POST",
                    "/api/v1/namespaces/team/secrets?&fieldManager=tokenpolicy-operator",
                    201,
                    key_secret(),
                )
                .await;
            assert_eq!(created["metadata"]["name"], "demo-signing-keys");
            assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            let pem = created["stringData"]["signing.pem"].as_str().unwrap();
            assert!(Key::from_pem(pem, "created").is_ok());
            let event = api
                .expect(
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/team/events?",
                    201,
                    json!({}),
                )
                .await;
            assert_eq!(event["reason"], "SigningKeyCreated");
            let dep = applies(&mut api, 0).await;
            assert_eq!(dep["spec"]["replicas"], 1);
            assert!(args(&dep).starts_with("serve --policy-ref team/demo"));
            no_pdb(&mut api).await;
            let st = status(&mut api).await;
            assert_eq!(st["observedGeneration"], 1);
            assert_eq!(
                st["endpoint"],
                "http://demo.team.svc.cluster.local:8080/v1/verify"
            );
            assert_eq!(condition(&st, "Ready")["status"], "False");
            assert_eq!(condition(&st, "Ready")["reason"], "DeploymentUnavailable");
            assert_eq!(condition(&st, "Degraded")["status"], "False");
        });
        let action = run(policy(1), ctx, scenario).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    }

    #[tokio::test]
    async fn unchanged_spec_applies_the_same_and_keeps_the_key() {
        let (ctx, mut api) = context();
        let mut tp = policy(1);
        tp.status = Some(TokenPolicyStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: "DeploymentAvailable".into(),
                message: "1/1 replicas ready".into(),
                observed_generation: Some(1),
                last_transition_time: Time("2026-01-02T03:04:05Z".parse().unwrap()),
            }],
            ..Default::default()
        });
        let first = resources::deployment(&tp, "tokenpolicy:test", "x");
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            // The key exists: no create, no event, nothing overwritten.
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/demo-signing-keys",
                200,
                key_secret(),
            )
            .await;
            let dep = applies(&mut api, 1).await;
            assert_eq!(dep["spec"]["replicas"], first.spec.replicas.unwrap());
            assert_eq!(
                args(&dep),
                first.spec.template.spec.as_ref().unwrap().containers[0]
                    .args
                    .clone()
                    .unwrap()
                    .join(" ")
            );
            no_pdb(&mut api).await;
            let st = status(&mut api).await;
            let ready = condition(&st, "Ready");
            assert_eq!(
                (ready["status"].as_str(), ready["reason"].as_str()),
                (Some("True"), Some("DeploymentAvailable"))
            );
            // Unchanged status keeps its transition time.
            assert_eq!(ready["lastTransitionTime"], "2026-01-02T03:04:05Z");
            assert_eq!(st["readyReplicas"], 1);
        });
        run(tp, ctx, scenario).await.unwrap();
    }

    #[tokio::test]
    async fn scaling_out_adds_redis_and_a_disruption_budget() {
        let (ctx, mut api) = context();
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/redis",
                200,
                secret("redis", "url", "redis://r:6379"),
            )
            .await;
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/demo-signing-keys",
                200,
                key_secret(),
            )
            .await;
            let dep = applies(&mut api, 3).await;
            assert_eq!(dep["spec"]["replicas"], 3);
            let env = &dep["spec"]["template"]["spec"]["containers"][0]["env"];
            assert_eq!(env[0]["name"], "TOKENPOLICY_REDIS");
            assert_eq!(
                env[0]["valueFrom"]["secretKeyRef"],
                json!({"name": "redis", "key": "url", "optional": false})
            );
            let pdb = api
                .apply(
                    &ns("/apis/policy/v1/namespaces/team/poddisruptionbudgets/demo"),
                    Value::Null,
                )
                .await;
            assert_eq!(pdb["spec"]["maxUnavailable"], 1);
            let st = status(&mut api).await;
            assert_eq!(condition(&st, "Ready")["status"], "True");
            assert_eq!(condition(&st, "Progressing")["reason"], "Stable");
        });
        run(policy(3), ctx, scenario).await.unwrap();
    }

    #[tokio::test]
    async fn missing_redis_secret_is_degraded_without_deployment_churn() {
        let (ctx, mut api) = context();
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/redis",
                404,
                not_found("secrets", "redis"),
            )
            .await;
            let event = api
                .expect(
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/team/events?",
                    201,
                    json!({}),
                )
                .await;
            assert_eq!(
                (event["type"].as_str(), event["reason"].as_str()),
                (Some("Warning"), Some("RedisSecretMissing"))
            );
            // Straight to status: no key, no apply.
            let st = status(&mut api).await;
            let degraded = condition(&st, "Degraded");
            assert_eq!(
                (degraded["status"].as_str(), degraded["reason"].as_str()),
                (Some("True"), Some("RedisSecretMissing"))
            );
            assert_eq!(degraded["message"], "Secret redis not found");
            assert_eq!(condition(&st, "Ready")["status"], "False");
        });
        let action = run(policy(3), ctx, scenario).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    }

    #[tokio::test]
    async fn users_secret_without_its_key_is_degraded() {
        let (ctx, mut api) = context();
        let scenario = tokio::spawn(async move {
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/demo-users",
                200,
                secret("demo-users", "other", "a:b"),
            )
            .await;
            let event = api
                .expect(
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/team/events?",
                    201,
                    json!({}),
                )
                .await;
            assert_eq!(event["reason"], "UsersSecretMissing");
            let st = status(&mut api).await;
            assert_eq!(
                condition(&st, "Degraded")["message"],
                "Secret demo-users has no key users"
            );
        });
        run(policy(1), ctx, scenario).await.unwrap();
    }

    fn ring_secret(files: &[(&str, &str)], annotations: Value) -> Value {
        use base64::Engine;
        let data: serde_json::Map<String, Value> = files
            .iter()
            .map(|(f, pem)| {
                (
                    f.to_string(),
                    json!(base64::engine::general_purpose::STANDARD.encode(pem)),
                )
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "demo-signing-keys", "namespace": "team", "resourceVersion": "7", "annotations": annotations},
               "data": data})
    }

    fn rotating(value: &str) -> TokenPolicy {
        let mut tp = policy(1);
        tp.metadata.annotations =
            Some([(resources::ROTATE_ANNOTATION.to_string(), value.to_string())].into());
        tp
    }

    #[tokio::test]
    async fn rotation_adds_the_new_key_verify_only_first() {
        let (ctx, mut api) = context();
        let old = Key::generate();
        let (old_pem, old_kid) = (old.to_pem(), old.kid().to_string());
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/demo-signing-keys",
                200,
                ring_secret(&[("signing.pem", &old_pem)], json!({})),
            )
            .await;
            let replaced = api
                .expect("PUT", "/api/v1/namespaces/team/secrets/demo-signing-keys?&fieldManager=tokenpolicy-operator", 200, key_secret())
                .await;
            assert_eq!(replaced["metadata"]["resourceVersion"], "7");
            // The old key still signs; the new one only verifies for now.
            assert_eq!(replaced["stringData"]["signing.pem"], old_pem);
            let next = replaced["stringData"]["next.pem"]
                .as_str()
                .unwrap()
                .to_string();
            assert_ne!(next, old_pem);
            assert_eq!(
                replaced["metadata"]["annotations"][resources::ROTATED_FOR_ANNOTATION],
                "2026-11"
            );
            let event = api
                .expect(
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/team/events?",
                    201,
                    json!({}),
                )
                .await;
            assert_eq!(event["reason"], "SigningKeyAdded");
            let dep = applies_observed(&mut api, 1, 0).await;
            let next_kid = Key::from_pem(&next, "next").unwrap().kid().to_string();
            assert_eq!(
                dep["spec"]["template"]["metadata"]["annotations"][resources::KEYS_ANNOTATION],
                format!("{old_kid},{next_kid}")
            );
            assert!(args(&dep).contains("--signing-keys-dir /etc/tokenpolicy/keys"));
            // The applied template is not rolled out yet: no promotion in this pass.
            no_pdb(&mut api).await;
            status(&mut api).await;
        });
        run(rotating("2026-11"), ctx, scenario).await.unwrap();
    }

    #[tokio::test]
    async fn rotation_promotes_once_every_replica_has_the_new_key() {
        let (ctx, mut api) = context();
        let (old, new) = (Key::generate(), Key::generate());
        let (old_pem, new_pem) = (old.to_pem(), new.to_pem());
        let kids = format!("{},{}", old.kid(), new.kid());
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            let ring = ring_secret(
                &[("signing.pem", &old_pem), ("next.pem", &new_pem)],
                json!({resources::ROTATED_FOR_ANNOTATION: "2026-11"}),
            );
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/demo-signing-keys",
                200,
                ring,
            )
            .await;
            // applies() answers with a rolled-out status for this template.
            let dep = applies(&mut api, 1).await;
            assert_eq!(
                dep["spec"]["template"]["metadata"]["annotations"][resources::KEYS_ANNOTATION],
                kids
            );
            no_pdb(&mut api).await;
            let promoted = api
                .expect("PUT", "/api/v1/namespaces/team/secrets/demo-signing-keys?&fieldManager=tokenpolicy-operator", 200, key_secret())
                .await;
            assert_eq!(promoted["stringData"]["signing.pem"], new_pem);
            assert_eq!(promoted["stringData"]["previous.pem"], old_pem);
            assert!(promoted["stringData"].get("next.pem").is_none());
            assert!(
                promoted["metadata"]["annotations"][resources::PROMOTED_AT_ANNOTATION]
                    .as_str()
                    .unwrap()
                    .parse::<i64>()
                    .is_ok()
            );
            let event = api
                .expect(
                    "POST",
                    "/apis/events.k8s.io/v1/namespaces/team/events?",
                    201,
                    json!({}),
                )
                .await;
            assert_eq!(event["reason"], "SigningKeyPromoted");
            status(&mut api).await;
        });
        let action = run(rotating("2026-11"), ctx, scenario).await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(1)));
    }

    #[test]
    fn a_terminating_namespace_is_recognised_by_its_cause() {
        // As kube-apiserver answers a create in a namespace being deleted.
        let refused = |code: u16, cause: &str| {
            let status: kube::core::Status = serde_json::from_value(json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                "reason": "Forbidden",
                "message": "deployments.apps \"demo\" is forbidden: unable to create new content in namespace team because it is being terminated",
                "details": {"name": "demo", "group": "apps", "kind": "deployments",
                            "causes": [{"reason": cause, "message": "namespace team is being terminated", "field": "metadata.namespace"}]}
            }))
            .unwrap();
            kube::Error::Api(status.boxed())
        };
        assert!(namespace_terminating(&refused(403, "NamespaceTerminating")));
        // An RBAC refusal is a real failure.
        assert!(!namespace_terminating(&refused(403, "")));
        assert!(!namespace_terminating(&refused(
            409,
            "NamespaceTerminating"
        )));
    }

    #[tokio::test]
    async fn rotation_retires_the_previous_key_when_no_token_needs_it() {
        let (old, new) = (Key::generate(), Key::generate());
        let (old_pem, new_pem) = (old.to_pem(), new.to_pem());
        // Promoted 31 minutes ago; the default policy's tokens live 30m + 10m renew limit.
        let recent = (Timestamp::now().as_second() - 31 * 60).to_string();
        let long_ago = (Timestamp::now().as_second() - 41 * 60).to_string();
        for (promoted_at, retire) in [(recent, false), (long_ago, true)] {
            let (ctx, mut api) = context();
            let (old_pem, new_pem, new_kid) =
                (old_pem.clone(), new_pem.clone(), new.kid().to_string());
            let scenario = tokio::spawn(async move {
                users_secret_found(&mut api).await;
                let ring = ring_secret(
                    &[("signing.pem", &new_pem), ("previous.pem", &old_pem)],
                    json!({resources::ROTATED_FOR_ANNOTATION: "2026-11", resources::PROMOTED_AT_ANNOTATION: promoted_at}),
                );
                api.expect(
                    "GET",
                    "/api/v1/namespaces/team/secrets/demo-signing-keys",
                    200,
                    ring,
                )
                .await;
                if retire {
                    let written = api
                        .expect("PUT", "/api/v1/namespaces/team/secrets/demo-signing-keys?&fieldManager=tokenpolicy-operator", 200, key_secret())
                        .await;
                    assert_eq!(written["stringData"]["signing.pem"], new_pem);
                    assert!(written["stringData"].get("previous.pem").is_none());
                    let event = api
                        .expect(
                            "POST",
                            "/apis/events.k8s.io/v1/namespaces/team/events?",
                            201,
                            json!({}),
                        )
                        .await;
                    assert_eq!(event["reason"], "SigningKeyRetired");
                }
                let dep = applies(&mut api, 1).await;
                let keys = dep["spec"]["template"]["metadata"]["annotations"]
                    [resources::KEYS_ANNOTATION]
                    .as_str()
                    .unwrap();
                assert_eq!(keys.split(',').count(), if retire { 1 } else { 2 });
                assert!(keys.starts_with(&new_kid));
                no_pdb(&mut api).await;
                status(&mut api).await;
            });
            run(rotating("2026-11"), ctx, scenario).await.unwrap();
        }
    }

    #[tokio::test]
    async fn deletion_relies_on_owner_references() {
        let (ctx, mut api) = context();
        let mut tp = policy(1);
        tp.metadata.deletion_timestamp = Some(Time("2026-11-22T00:00:00Z".parse().unwrap()));
        // No call at all: every owned object carries an ownerReference (asserted
        // in the creation scenario) and the garbage collector removes them.
        let scenario = tokio::spawn(async move {
            api.no_more_calls(200).await;
        });
        let action = run(tp, ctx, scenario).await.unwrap();
        assert_eq!(action, Action::await_change());
    }

    #[tokio::test]
    async fn errors_back_off_per_object() {
        let (ctx, _api) = context();
        let tp = Arc::new(policy(1));
        let delays: Vec<_> = (0..8)
            .map(|_| error_policy(tp.clone(), &Error::NoNamespace, ctx.clone()))
            .collect();
        assert_eq!(delays[0], Action::requeue(Duration::from_secs(5)));
        assert_eq!(delays[1], Action::requeue(Duration::from_secs(10)));
        assert_eq!(delays[7], Action::requeue(Duration::from_secs(300)));
    }
}
