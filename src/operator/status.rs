//! The TokenPolicy's status: conditions keyed by type, each with its
//! observedGeneration, and lastTransitionTime kept while the status holds.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource as _, ResourceExt};
use serde::Serialize;

use crate::crd::{TokenPolicy, TokenPolicyStatus};
use crate::operator::reconcile::Error;
use crate::operator::resources::{self, MANAGER};

/// The conditions, reasons and counters that a reconciliation reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Report {
    pub ready: (bool, &'static str, String),
    pub progressing: (bool, &'static str, String),
    pub degraded: (bool, &'static str, String),
    pub ready_replicas: Option<i32>,
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
    api_version: Cow<'static, str>,
    kind: Cow<'static, str>,
    status: TokenPolicyStatus,
}

pub(crate) async fn write_status(
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
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.clone())
}
