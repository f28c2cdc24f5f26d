//! The one cluster-wide grant a token service needs: `create` on
//! `tokenreviews` and `subjectaccessreviews`, for its admin API (who calls
//! it is decided by the cluster's RBAC). These are cluster-scoped, so a
//! namespaced Role cannot grant them: one ClusterRole (the chart's,
//! `--token-review-cluster-role`, holding exactly those two rules) is bound
//! by one ClusterRoleBinding of the same name that the operator keeps,
//! naming the ServiceAccount of every TokenPolicy that exists, and nothing
//! else.
//!
//! The binding is rewritten whenever a TokenPolicy appears or goes (a
//! watch of its own: a deleted TokenPolicy is never reconciled), and is
//! owned by the ClusterRole, so uninstalling the chart removes it. The
//! operator may bind that ClusterRole (`bind`, by name) without holding
//! its permissions.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use crate::crd::TokenPolicy;
use crate::operator::names::{MANAGER, object_name};

/// The binding: `role` (whose uid owns it) to the ServiceAccount of each of
/// `policies`, sorted, each once.
pub fn binding(role: &str, role_uid: &str, policies: &[TokenPolicy]) -> ClusterRoleBinding {
    let accounts: BTreeSet<(String, String)> = policies
        .iter()
        .filter(|tp| tp.metadata.deletion_timestamp.is_none())
        .filter_map(|tp| Some((tp.namespace()?, object_name(tp))))
        .collect();
    ClusterRoleBinding {
        metadata: ObjectMeta {
            name: Some(role.to_string()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_string(),
                    MANAGER.to_string(),
                )]
                .into(),
            ),
            owner_references: Some(vec![OwnerReference {
                api_version: "rbac.authorization.k8s.io/v1".into(),
                kind: "ClusterRole".into(),
                name: role.to_string(),
                uid: role_uid.to_string(),
                ..Default::default()
            }]),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.to_string(),
        },
        subjects: Some(
            accounts
                .into_iter()
                .map(|(namespace, name)| Subject {
                    kind: "ServiceAccount".into(),
                    name,
                    namespace: Some(namespace),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// Writes the binding for the TokenPolicies there are now.
pub async fn sync(client: &Client, role: &str) -> Result<(), kube::Error> {
    let roles: Api<ClusterRole> = Api::all(client.clone());
    let uid = roles.get(role).await?.uid().unwrap_or_default();
    let policies: Api<TokenPolicy> = Api::all(client.clone());
    let all = policies.list(&ListParams::default()).await?.items;
    let wanted = binding(role, &uid, &all);
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    bindings
        .patch(
            role,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&wanted),
        )
        .await?;
    tracing::debug!(
        binding = role,
        service_accounts = wanted.subjects.as_ref().map_or(0, Vec::len),
        "token review binding written"
    );
    Ok(())
}

/// Keeps the binding current: whenever a TokenPolicy comes or goes (bursts
/// taken together; status writes are not a change), and again every few
/// minutes. Never returns.
pub async fn run(client: Client, role: String) {
    let policies: Api<TokenPolicy> = Api::all(client.clone());
    let mut changes = watcher(policies, watcher::Config::default().any_semantic()).boxed();
    let mut known = Known::default();
    let mut failing = false;
    loop {
        // Settle a burst of changes, then write once.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match sync(&client, &role).await {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(binding = %role, error = %e, "cannot write the token review binding; token services' admin API answers 503 until it is");
                }
                failing = true;
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        }
        let wait = async {
            while let Some(event) = changes.next().await {
                match event {
                    Ok(e) => {
                        if known.changed_by(e) {
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "TokenPolicy watch"),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(300), wait).await;
    }
}

/// The TokenPolicies the watch has shown, to tell a TokenPolicy coming or
/// going from a write to one that exists.
#[derive(Default)]
struct Known {
    now: BTreeSet<(String, String)>,
    listing: BTreeSet<(String, String)>,
}

fn key(tp: &TokenPolicy) -> (String, String) {
    (tp.namespace().unwrap_or_default(), tp.name_any())
}

impl Known {
    fn changed_by(&mut self, event: watcher::Event<TokenPolicy>) -> bool {
        match event {
            watcher::Event::Apply(tp) => self.now.insert(key(&tp)),
            watcher::Event::Delete(tp) => self.now.remove(&key(&tp)),
            watcher::Event::Init => {
                self.listing.clear();
                false
            }
            watcher::Event::InitApply(tp) => {
                self.listing.insert(key(&tp));
                false
            }
            watcher::Event::InitDone => {
                let listed = std::mem::take(&mut self.listing);
                let changed = listed != self.now;
                self.now = listed;
                changed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::resources::tests::policy;
    use crate::testing::api_server::{mock_client, not_found};
    use serde_json::{Value, json};

    fn tp(ns: &str, name: &str) -> TokenPolicy {
        let mut p = policy(1);
        p.metadata.namespace = Some(ns.into());
        p.metadata.name = Some(name.into());
        p
    }

    #[test]
    fn the_binding_names_each_service_account_once_and_no_one_else() {
        let mut gone = tp("b", "gone");
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let b = binding(
            "tokenpolicy-token-review",
            "uid-r",
            &[tp("team", "demo"), tp("a", "x"), tp("team", "demo"), gone],
        );
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(
            v["subjects"],
            json!([
                {"kind": "ServiceAccount", "name": "tokenpolicy-x", "namespace": "a"},
                {"kind": "ServiceAccount", "name": "tokenpolicy-demo", "namespace": "team"},
            ])
        );
        assert_eq!(
            v["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tokenpolicy-token-review"})
        );
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["uid"].as_str()),
            (Some("ClusterRole"), Some("uid-r"))
        );
        // No TokenPolicy: bound to nobody.
        assert_eq!(
            serde_json::to_value(binding("r", "u", &[])).unwrap()["subjects"],
            json!([])
        );
    }

    #[tokio::test]
    async fn sync_binds_the_chart_role_to_every_token_service() {
        let (client, mut api) = mock_client();
        let scenario = tokio::spawn(async move {
            api.expect(
                "GET",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/tp-review",
                200,
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                       "metadata": {"name": "tp-review", "uid": "uid-role"}, "rules": []}),
            )
            .await;
            let list = json!({"apiVersion": "auth.tokenpolicy.io/v1alpha1", "kind": "TokenPolicyList",
                              "metadata": {}, "items": [serde_json::to_value(tp("team", "demo")).unwrap()]});
            api.expect(
                "GET",
                "/apis/auth.tokenpolicy.io/v1alpha1/tokenpolicies?",
                200,
                list,
            )
            .await;
            let sent = api
                .apply(
                    "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/tp-review?&force=true&fieldManager=tokenpolicy-operator",
                    Value::Null,
                )
                .await;
            assert_eq!(sent["subjects"][0]["name"], "tokenpolicy-demo");
            assert_eq!(sent["subjects"][0]["namespace"], "team");
            assert_eq!(sent["metadata"]["ownerReferences"][0]["uid"], "uid-role");
        });
        sync(&client, "tp-review").await.unwrap();
        scenario.await.unwrap();
    }

    #[test]
    fn only_a_token_policy_coming_or_going_is_a_change() {
        use watcher::Event;
        let mut k = Known::default();
        assert!(!k.changed_by(Event::Init));
        assert!(!k.changed_by(Event::InitApply(tp("a", "x"))));
        assert!(k.changed_by(Event::InitDone));
        // A status write to a known one is none.
        assert!(!k.changed_by(Event::Apply(tp("a", "x"))));
        assert!(k.changed_by(Event::Apply(tp("b", "y"))));
        assert!(k.changed_by(Event::Delete(tp("a", "x"))));
        assert!(!k.changed_by(Event::Delete(tp("a", "x"))));
        // A relist that finds the same set is none; one that misses a deletion is one.
        assert!(!k.changed_by(Event::Init));
        assert!(!k.changed_by(Event::InitApply(tp("b", "y"))));
        assert!(!k.changed_by(Event::InitDone));
        k.changed_by(Event::Init);
        assert!(k.changed_by(Event::InitDone));
    }

    #[tokio::test]
    async fn without_the_chart_role_nothing_is_bound() {
        let (client, mut api) = mock_client();
        let scenario = tokio::spawn(async move {
            api.expect(
                "GET",
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/tp-review",
                404,
                not_found("clusterroles", "tp-review"),
            )
            .await;
            api.no_more_calls(200).await;
        });
        assert!(sync(&client, "tp-review").await.is_err());
        scenario.await.unwrap();
    }
}
