//! `tokenpolicy operator`: the controller that turns each TokenPolicy into a
//! running token service (docs/src/kubernetes.md). The objects themselves
//! are built in `resources.rs`; this module decides what to apply.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crd::{SecretKeyRef, TokenPolicy};
pub use crate::operator::context::{Context, Error};
use crate::operator::context::{namespace_terminating, publish};
use crate::operator::keys::{kids, rotate, secret_value, signing_ring};
pub use crate::operator::metrics::{OperatorMetrics, Reason};
use crate::operator::names::{MANAGER, object_name, signing_secret_name};
use crate::operator::ownership::{self, Found, conflict_message, find};
use crate::operator::resources::{self, TLS_SECRET_KEYS};
use crate::operator::rollout::Rollout;
use crate::operator::rotation;
use crate::operator::status::{
    ConditionReason as R, ConditionState as C, Report, degraded_reason, write_status,
};
use crate::policy::Policy;
use crate::trusted_proxies::TrustedProxies;

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
async fn blocker(tp: &TokenPolicy, secrets: &Api<Secret>) -> Result<Option<(R, String)>, Error> {
    let oidc = tp.spec.oidc.as_ref();
    match &tp.spec.users {
        // A provider signs users in; a users file is then optional.
        None if oidc.is_some() => {}
        None => {
            return Ok(Some((
                R::USERS_SECRET_MISSING,
                "spec.users and spec.oidc are both unset: nobody could log in".into(),
            )));
        }
        Some(users) => {
            if let Some(m) = check_secret(secrets, &users.secret_ref).await? {
                return Ok(Some((R::USERS_SECRET_MISSING, m)));
            }
        }
    }
    if let Some(oidc) = oidc {
        let wanted = std::iter::once(&oidc.client_secret_ref).chain(oidc.ca_secret_ref.as_ref());
        for r in wanted {
            if let Some(m) = check_secret(secrets, r).await? {
                return Ok(Some((R::OIDC_SECRET_MISSING, m)));
            }
        }
    }
    let Some(redis) = &tp.spec.redis else {
        return Ok(None);
    };
    let mut wanted = vec![redis.url_secret_ref.clone()];
    if let Some(tls) = &redis.tls {
        wanted.extend(tls.ca_secret_ref.clone());
        if let Some(name) = &tls.client_secret_name {
            wanted.extend(TLS_SECRET_KEYS.map(|key| SecretKeyRef {
                name: name.clone(),
                key: key.into(),
            }));
        }
    }
    for r in wanted {
        if let Some(m) = check_secret(secrets, &r).await? {
            return Ok(Some((R::REDIS_SECRET_MISSING, m)));
        }
    }
    Ok(None)
}

fn api<K>(client: &Client, ns: &str) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), ns)
}

/// Deletes `name` if this TokenPolicy controls it, guarded by the uid read
/// (an object made again by someone else in between is not deleted).
async fn delete_ours<K>(api: &Api<K>, name: &str, found: &Found<K>) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let Found::Ours(obj) = found else {
        return Ok(());
    };
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.meta().uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side apply of an object that is absent or already ours (checked
/// just before, in the same reconcile).
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

#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(policy = %key_of(&tp), generation = tp.metadata.generation.unwrap_or(0))
)]
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
    reason: R,
    message: String,
) -> Result<Action, Error> {
    if degraded_reason(tp).as_deref() != Some(reason.as_str()) {
        publish(
            ctx,
            tp,
            EventType::Warning,
            reason.as_str(),
            "Reconcile",
            message.clone(),
        )
        .await;
    }
    let report = Report {
        ready: C::no(reason, message.clone()),
        progressing: C::no(reason, "waiting for the problem to be fixed"),
        degraded: C::yes(reason, message),
        ready_replicas: tp.status.as_ref().and_then(|s| s.ready_replicas),
    };
    write_status(tp, policies, &report, Timestamp::now()).await?;
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
        Err(e) => return degrade(tp, ctx, &policies, R::INVALID_SPEC, e.to_string()).await,
    };
    if let Some(Err(e)) = tp
        .spec
        .trusted_proxies
        .as_deref()
        .map(TrustedProxies::parse)
    {
        let message = format!("spec.trustedProxies: {e}");
        return degrade(tp, ctx, &policies, R::INVALID_SPEC, message).await;
    }
    if let Some(image) = tp.spec.image.as_deref()
        && !ctx.allowed_images.allows(image)
    {
        let message = format!(
            "spec.image {image:?} is not an allowed image (allowed: {}); the operator's \
             allowedImages setting decides which images a TokenPolicy may run",
            ctx.allowed_images.entries().join(", ")
        );
        return degrade(tp, ctx, &policies, R::IMAGE_NOT_ALLOWED, message).await;
    }
    if let Some((reason, message)) = blocker(tp, &secrets).await? {
        return degrade(tp, ctx, &policies, reason, message).await;
    }

    // Every object this reconcile may write or delete, read first: anything
    // under our names that this TokenPolicy does not control stops it here,
    // before a single write.
    let name = object_name(tp);
    let key_name = signing_secret_name(tp);
    let key_secret = ownership::classify(secrets.get_opt(&key_name).await?, tp);
    let sa = find(&api::<ServiceAccount>(&client, &ns), &name, tp).await?;
    let role = find(&api::<Role>(&client, &ns), &name, tp).await?;
    let binding = find(&api::<RoleBinding>(&client, &ns), &name, tp).await?;
    let service = find(&api::<Service>(&client, &ns), &name, tp).await?;
    let deploy = find(&api::<Deployment>(&client, &ns), &name, tp).await?;
    let pdb = find(&api::<PodDisruptionBudget>(&client, &ns), &name, tp).await?;
    let netpol = find(&api::<NetworkPolicy>(&client, &ns), &name, tp).await?;
    let wants_pdb = tp.spec.replicas > 1;
    let wants_netpol = ctx.network_policy.is_some();
    let mut foreign = Vec::new();
    for (found, needed) in [
        (key_secret.foreign(), true),
        (sa.foreign(), true),
        (role.foreign(), true),
        (binding.foreign(), true),
        (service.foreign(), true),
        (deploy.foreign(), true),
        (pdb.foreign(), wants_pdb),
        (netpol.foreign(), wants_netpol),
    ] {
        foreign.extend(found.filter(|_| needed).map(str::to_string));
    }
    if !foreign.is_empty() {
        let message = conflict_message(&foreign);
        return degrade(tp, ctx, &policies, R::OBJECT_NOT_OWNED, message).await;
    }

    let clock = Timestamp::now();
    let now = clock.as_second();
    let existing_keys = match key_secret {
        Found::Ours(s) => Some(s),
        _ => None,
    };
    let (ring, ring_version) = signing_ring(tp, ctx, &secrets, existing_keys).await?;
    let key_ids = kids(&ring, &key_name)?;
    apply(
        api::<ServiceAccount>(&client, &ns),
        &resources::service_account(tp),
    )
    .await?;
    apply(api::<Role>(&client, &ns), &resources::role(tp)).await?;
    apply(
        api::<RoleBinding>(&client, &ns),
        &resources::role_binding(tp),
    )
    .await?;
    apply(api::<Service>(&client, &ns), &resources::service(tp)).await?;
    let mut wanted = resources::deployment(tp, &ctx.image, &ctx.trusted_proxies, &key_ids);
    if ctx.audit_log {
        resources::audit_to_stdout(&mut wanted);
    }
    let deployment = apply(api::<Deployment>(&client, &ns), &wanted).await?;
    let pdbs = api::<PodDisruptionBudget>(&client, &ns);
    if wants_pdb {
        apply(pdbs, &resources::pdb(tp)).await?;
    } else {
        delete_ours(&pdbs, &name, &pdb).await?;
    }
    let netpols = api::<NetworkPolicy>(&client, &ns);
    match &ctx.network_policy {
        Some(config) => {
            apply(netpols, &resources::network_policy(tp, config)).await?;
        }
        None => delete_ours(&netpols, &name, &netpol).await?,
    }

    let rollout = Rollout::of(&deployment);
    let rotated = rotate(
        tp,
        ctx,
        &secrets,
        (&ring, ring_version),
        &rollout,
        &policy,
        now,
    )
    .await?;
    let Rollout {
        want,
        ready,
        updated,
        ..
    } = rollout;
    let report = Report {
        ready: if ready >= 1 {
            C::yes(
                R::DEPLOYMENT_AVAILABLE,
                format!("{ready}/{want} replicas ready"),
            )
        } else {
            C::no(
                R::DEPLOYMENT_UNAVAILABLE,
                format!("0/{want} replicas ready"),
            )
        },
        progressing: if rollout.in_progress() {
            C::yes(R::ROLLING_OUT, format!("{updated}/{want} replicas updated"))
        } else {
            C::no(R::STABLE, "all replicas run the current spec")
        },
        degraded: C::no(R::AS_EXPECTED, "no problem found"),
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
    write_status(tp, &policies, &report, clock).await?;
    // After a rotation step, come back at once to roll the pods to the new
    // ring; while a previous key is kept, come back when it may be retired.
    Ok(Action::requeue(Duration::from_secs(if rotated {
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
mod tests;
