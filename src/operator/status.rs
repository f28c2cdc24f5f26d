//! The TokenPolicy's status: conditions keyed by type, each with its
//! observedGeneration, and lastTransitionTime kept while the status holds.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource as _, ResourceExt};
use serde::Serialize;

use crate::crd::{TokenPolicy, TokenPolicyStatus};
use crate::operator::context::Error;
use crate::operator::names::{self, MANAGER};

/// A condition type of the TokenPolicy's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConditionType {
    Ready,
    Progressing,
    Degraded,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Progressing => "Progressing",
            ConditionType::Degraded => "Degraded",
        }
    }
}

/// A condition's reason: only the constants below exist. The degrading
/// ones double as the reasons of the Warning events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConditionReason(&'static str);

impl ConditionReason {
    pub const DEPLOYMENT_AVAILABLE: Self = Self("DeploymentAvailable");
    pub const DEPLOYMENT_UNAVAILABLE: Self = Self("DeploymentUnavailable");
    pub const ROLLING_OUT: Self = Self("RollingOut");
    pub const STABLE: Self = Self("Stable");
    pub const AS_EXPECTED: Self = Self("AsExpected");
    pub const INVALID_SPEC: Self = Self("InvalidSpec");
    pub const USERS_SECRET_MISSING: Self = Self("UsersSecretMissing");
    pub const REDIS_SECRET_MISSING: Self = Self("RedisSecretMissing");
    /// The OpenID Connect client secret or the provider's CA is missing.
    pub const OIDC_SECRET_MISSING: Self = Self("OidcSecretMissing");
    /// An object under one of the operator's names is someone else's.
    pub const OBJECT_NOT_OWNED: Self = Self("ObjectNotOwned");
    /// `spec.image` is not on the operator's allow-list.
    pub const IMAGE_NOT_ALLOWED: Self = Self("ImageNotAllowed");

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

/// One condition's state as a reconciliation finds it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ConditionState {
    pub status: bool,
    pub reason: ConditionReason,
    pub message: String,
}

impl ConditionState {
    pub fn yes(reason: ConditionReason, message: impl Into<String>) -> Self {
        ConditionState {
            status: true,
            reason,
            message: message.into(),
        }
    }

    pub fn no(reason: ConditionReason, message: impl Into<String>) -> Self {
        ConditionState {
            status: false,
            reason,
            message: message.into(),
        }
    }
}

/// The conditions and counters that a reconciliation reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub ready: ConditionState,
    pub progressing: ConditionState,
    pub degraded: ConditionState,
    pub ready_replicas: Option<i32>,
}

/// The one place a condition is made: `lastTransitionTime` changes only
/// when the status does.
fn condition(
    kind: ConditionType,
    state: &ConditionState,
    old: &[Condition],
    generation: Option<i64>,
    now: &Timestamp,
) -> Condition {
    let status = if state.status { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == kind.as_str() && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(*now));
    Condition {
        type_: kind.as_str().into(),
        status: status.into(),
        reason: state.reason.as_str().into(),
        message: state.message.clone(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct StatusPatch {
    api_version: Cow<'static, str>,
    kind: Cow<'static, str>,
    status: TokenPolicyStatus,
}

/// Writes `report` as the status, its conditions made at `now` (the
/// reconcile's clock: nothing in here reads one).
pub(crate) async fn write_status(
    tp: &TokenPolicy,
    api: &Api<TokenPolicy>,
    report: &Report,
    now: Timestamp,
) -> Result<(), Error> {
    let old = tp
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = tp.metadata.generation;
    let status = TokenPolicyStatus {
        observed_generation: generation,
        conditions: vec![
            condition(ConditionType::Ready, &report.ready, old, generation, &now),
            condition(
                ConditionType::Progressing,
                &report.progressing,
                old,
                generation,
                &now,
            ),
            condition(
                ConditionType::Degraded,
                &report.degraded,
                old,
                generation,
                &now,
            ),
        ],
        ready_replicas: report.ready_replicas,
        endpoint: Some(names::endpoint(tp)),
    };
    let patch = StatusPatch {
        api_version: TokenPolicy::api_version(&()),
        kind: TokenPolicy::kind(&()),
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

pub(crate) fn degraded_reason(tp: &TokenPolicy) -> Option<String> {
    tp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Degraded.as_str() && c.status == "True")
        .map(|c| c.reason.clone())
}
