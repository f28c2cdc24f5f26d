//! The signing-key ring in its Secret: generated once and never overwritten,
//! then rotated one step at a time as [`rotation::plan`] says (the only
//! place a step is decided).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;

use crate::crd::TokenPolicy;
use crate::operator::context::{Context, Error, publish};
use crate::operator::names::{
    MANAGER, PROMOTED_AT_ANNOTATION, ROTATE_ANNOTATION, ROTATED_FOR_ANNOTATION, signing_secret_name,
};
use crate::operator::resources;
use crate::operator::rollout::Rollout;
use crate::operator::rotation::{self, KeyRing, Step};
use crate::policy::Policy;
use crate::signing_key::Key;

/// A Secret's value for `key`, from `data` or (not yet converted) `stringData`.
pub(crate) fn secret_value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
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
        rotated_for: ann.get(ROTATED_FOR_ANNOTATION).cloned(),
        promoted_at: ann.get(PROMOTED_AT_ANNOTATION).and_then(|t| t.parse().ok()),
    })
}

/// The kids of the ring, first signs: the pod-template annotation.
pub(crate) fn kids(ring: &KeyRing, name: &str) -> Result<String, Error> {
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

/// The signing keys as `existing` (the Secret as read, known to be this
/// TokenPolicy's) holds them, generated once if there is no Secret yet (and
/// never overwritten): the ring and the version read.
pub(crate) async fn signing_ring(
    tp: &TokenPolicy,
    ctx: &Context,
    secrets: &Api<Secret>,
    existing: Option<Secret>,
) -> Result<(KeyRing, Option<String>), Error> {
    let name = signing_secret_name(tp);
    if let Some(existing) = existing {
        return Ok((
            ring_of(&existing, &name)?,
            existing.metadata.resource_version,
        ));
    }
    let ring = KeyRing {
        signing: Key::generate().to_pem(),
        rotated_for: tp.annotations().get(ROTATE_ANNOTATION).cloned(),
        ..Default::default()
    };
    let created = secrets
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
    Ok((ring, created.metadata.resource_version))
}

/// Takes the rotation step [`rotation::plan`] decides for `ring`, given the
/// Deployment as applied (`rollout`), and writes the new ring. Returns
/// whether the ring changed (the pods pick it up at the next reconcile).
pub(crate) async fn rotate(
    tp: &TokenPolicy,
    ctx: &Context,
    secrets: &Api<Secret>,
    (ring, version): (&KeyRing, Option<String>),
    rollout: &Rollout,
    policy: &Policy,
    now: i64,
) -> Result<bool, Error> {
    let name = signing_secret_name(tp);
    let rotate = tp.annotations().get(ROTATE_ANNOTATION).cloned();
    let step = rotation::plan(
        ring,
        &kids(ring, &name)?,
        rotate.as_deref(),
        rollout,
        policy,
        now,
    );
    let (reason, note) = match step {
        Step::Keep => return Ok(false),
        Step::AddNext => (
            "SigningKeyAdded",
            "new signing key added, verify-only until every replica has it",
        ),
        Step::Promote => (
            "SigningKeyPromoted",
            "every replica verifies the new key; it signs now",
        ),
        Step::DropPrevious => (
            "SigningKeyRetired",
            "previous signing key removed: no token it signed can still be used",
        ),
    };
    let next = rotation::apply(
        ring,
        step,
        rotate.as_deref(),
        || Key::generate().to_pem(),
        now,
    );
    replace_ring(tp, secrets, &next, version).await?;
    publish(
        ctx,
        tp,
        EventType::Normal,
        reason,
        "Rotate",
        format!("{note}; keys now {}", kids(&next, &name)?),
    )
    .await;
    Ok(true)
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
        .replace(&signing_secret_name(tp), &post_params(), &secret)
        .await?;
    Ok(written.metadata.resource_version)
}
