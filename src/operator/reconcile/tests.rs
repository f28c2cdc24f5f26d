//! Reconcile against a mock API server (tower-test), in controller-rs's
//! style: each scenario lists the requests the reconciler must make, in
//! order, with method, exact URI and the body fields that matter, and
//! answers as the API server would. A missing call times out; an extra
//! call finds no answer and fails the reconcile.
use super::*;
use crate::crd::TokenPolicyStatus;
use crate::operator::resources::tests::policy;
use crate::service::jwt::Key;
use crate::testing::api_server::{ApiServer, mock_client, not_found};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
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
            &ns("/api/v1/namespaces/team/serviceaccounts/tokenpolicy-demo"),
            Value::Null,
        )
        .await;
    assert_eq!(sa["kind"], "ServiceAccount");
    assert_eq!(sa["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert_eq!(sa["metadata"]["ownerReferences"][0]["controller"], true);
    let role = api
        .apply(
            &ns("/apis/rbac.authorization.k8s.io/v1/namespaces/team/roles/tokenpolicy-demo"),
            Value::Null,
        )
        .await;
    assert_eq!(role["rules"][0]["resourceNames"], json!(["demo"]));
    let rb = api
        .apply(
            &ns("/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings/tokenpolicy-demo"),
            Value::Null,
        )
        .await;
    assert_eq!(rb["subjects"][0]["name"], "tokenpolicy-demo");
    assert_eq!(rb["roleRef"]["name"], "tokenpolicy-demo");
    let svc = api
        .apply(
            &ns("/api/v1/namespaces/team/services/tokenpolicy-demo"),
            Value::Null,
        )
        .await;
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);
    let dep = api
        .apply(
            &ns("/apis/apps/v1/namespaces/team/deployments/tokenpolicy-demo"),
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

fn key_secret() -> Value {
    ours(secret(
        "tokenpolicy-demo-signing-keys",
        "signing.pem",
        &Key::generate().to_pem(),
    ))
}

/// `obj` controlled by the TokenPolicy `policy(_)` (uid-1).
fn ours(mut obj: Value) -> Value {
    obj["metadata"]["uid"] = json!("obj-uid");
    obj["metadata"]["ownerReferences"] = json!([{"apiVersion": "auth.tokenpolicy.io/v1alpha1",
        "kind": "TokenPolicy", "name": "demo", "uid": "uid-1", "controller": true}]);
    obj
}

/// An object named `tokenpolicy-demo` of `kind` at `path`, made by someone else.
fn theirs(kind: &str, api_version: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind,
           "metadata": {"name": "tokenpolicy-demo", "namespace": "team", "uid": "their-uid", "resourceVersion": "3"}})
}

/// The owned kinds after the signing-key Secret, in the order they are read.
const OWNED: [(&str, &str, &str); 7] = [
    (
        "ServiceAccount",
        "v1",
        "/api/v1/namespaces/team/serviceaccounts/tokenpolicy-demo",
    ),
    (
        "Role",
        "rbac.authorization.k8s.io/v1",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team/roles/tokenpolicy-demo",
    ),
    (
        "RoleBinding",
        "rbac.authorization.k8s.io/v1",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings/tokenpolicy-demo",
    ),
    (
        "Service",
        "v1",
        "/api/v1/namespaces/team/services/tokenpolicy-demo",
    ),
    (
        "Deployment",
        "apps/v1",
        "/apis/apps/v1/namespaces/team/deployments/tokenpolicy-demo",
    ),
    (
        "PodDisruptionBudget",
        "policy/v1",
        "/apis/policy/v1/namespaces/team/poddisruptionbudgets/tokenpolicy-demo",
    ),
    (
        "NetworkPolicy",
        "networking.k8s.io/v1",
        "/apis/networking.k8s.io/v1/namespaces/team/networkpolicies/tokenpolicy-demo",
    ),
];

/// Above one replica: the users Secret, then the Redis URL's, both found.
async fn users_and_redis_secrets_found(api: &mut ApiServer) {
    users_secret_found(api).await;
    api.expect(
        "GET",
        "/api/v1/namespaces/team/secrets/redis",
        200,
        secret("redis", "url", "redis://r:6379"),
    )
    .await;
}

/// The signing-key Secret found (ours), and nothing else of ours yet.
async fn keys_found(api: &mut ApiServer) {
    api.expect(
        "GET",
        "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
        200,
        key_secret(),
    )
    .await;
    lookups(api, &[]).await;
}

/// The reads before any write: each owned kind answered as `answer` says
/// (kind -> body; absent kinds are not found).
async fn lookups(api: &mut ApiServer, answer: &[(&str, Value)]) {
    for (kind, _, path) in OWNED {
        match answer.iter().find(|(k, _)| *k == kind) {
            Some((_, body)) => api.expect("GET", path, 200, body.clone()).await,
            None => {
                api.expect("GET", path, 404, not_found(kind, "tokenpolicy-demo"))
                    .await
            }
        };
    }
}

#[tokio::test]
async fn first_creation_makes_key_and_service_and_reports_status() {
    let (ctx, mut api) = context();
    let scenario = tokio::spawn(async move {
        users_secret_found(&mut api).await;
        api.expect(
            "GET",
            "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
            404,
            not_found("secrets", "tokenpolicy-demo-signing-keys"),
        )
        .await;
        lookups(&mut api, &[]).await;
        let created = api
            .expect(
                "POST",
                "/api/v1/namespaces/team/secrets?&fieldManager=tokenpolicy-operator",
                201,
                key_secret(),
            )
            .await;
        assert_eq!(created["metadata"]["name"], "tokenpolicy-demo-signing-keys");
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
        let st = status(&mut api).await;
        assert_eq!(st["observedGeneration"], 1);
        assert_eq!(
            st["endpoint"],
            "http://tokenpolicy-demo.team.svc.cluster.local:8080/v1/verify"
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
    let first = resources::deployment(&tp, "tokenpolicy:test", &[], "x");
    let scenario = tokio::spawn(async move {
        users_secret_found(&mut api).await;
        // The key exists: no create, no event, nothing overwritten.
        keys_found(&mut api).await;
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
        users_and_redis_secrets_found(&mut api).await;
        keys_found(&mut api).await;
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
                &ns("/apis/policy/v1/namespaces/team/poddisruptionbudgets/tokenpolicy-demo"),
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
    ours(json!({"apiVersion": "v1", "kind": "Secret",
           "metadata": {"name": "tokenpolicy-demo-signing-keys", "namespace": "team", "resourceVersion": "7", "annotations": annotations},
           "data": data}))
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
            "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
            200,
            ring_secret(&[("signing.pem", &old_pem)], json!({})),
        )
        .await;
        lookups(&mut api, &[]).await;
        // The plan reads the Deployment as applied, so the ring is written
        // after the applies; this pass still applies the ring as it was.
        let dep = applies(&mut api, 1).await;
        assert_eq!(
            dep["spec"]["template"]["metadata"]["annotations"][resources::KEYS_ANNOTATION],
            old_kid
        );
        assert!(args(&dep).contains("--signing-keys-dir /etc/tokenpolicy/keys"));
        let replaced = api
            .expect("PUT", "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys?&fieldManager=tokenpolicy-operator", 200, key_secret())
            .await;
        assert_eq!(replaced["metadata"]["resourceVersion"], "7");
        // The old key still signs; the new one only verifies for now.
        assert_eq!(replaced["stringData"]["signing.pem"], old_pem);
        let next = replaced["stringData"]["next.pem"]
            .as_str()
            .unwrap()
            .to_string();
        assert_ne!(next, old_pem);
        assert!(Key::from_pem(&next, "next").is_ok());
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
        status(&mut api).await;
    });
    // Back at once, to roll the pods out with the new key.
    let action = run(rotating("2026-11"), ctx, scenario).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));
}

#[tokio::test]
async fn rotation_rolls_the_new_key_out_before_promoting_it() {
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
            "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
            200,
            ring,
        )
        .await;
        lookups(&mut api, &[]).await;
        // The template with the new key is not rolled out yet: no promotion.
        let dep = applies_observed(&mut api, 1, 0).await;
        assert_eq!(
            dep["spec"]["template"]["metadata"]["annotations"][resources::KEYS_ANNOTATION],
            kids
        );
        status(&mut api).await;
    });
    let action = run(rotating("2026-11"), ctx, scenario).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
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
            "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
            200,
            ring,
        )
        .await;
        lookups(&mut api, &[]).await;
        // applies() answers with a rolled-out status for this template.
        let dep = applies(&mut api, 1).await;
        assert_eq!(
            dep["spec"]["template"]["metadata"]["annotations"][resources::KEYS_ANNOTATION],
            kids
        );
        let promoted = api
            .expect("PUT", "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys?&fieldManager=tokenpolicy-operator", 200, key_secret())
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
        let (old_pem, new_pem, new_kid) = (old_pem.clone(), new_pem.clone(), new.kid().to_string());
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            let ring = ring_secret(
                &[("signing.pem", &new_pem), ("previous.pem", &old_pem)],
                json!({resources::ROTATED_FOR_ANNOTATION: "2026-11", resources::PROMOTED_AT_ANNOTATION: promoted_at}),
            );
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
                200,
                ring,
            )
            .await;
            lookups(&mut api, &[]).await;
            let dep = applies(&mut api, 1).await;
            let keys = dep["spec"]["template"]["metadata"]["annotations"]
                [resources::KEYS_ANNOTATION]
                .as_str()
                .unwrap();
            // The ring is written after the applies: this pass applies both keys.
            assert_eq!(keys.split(',').count(), 2);
            assert!(keys.starts_with(&new_kid));
            if retire {
                let written = api
                    .expect("PUT", "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys?&fieldManager=tokenpolicy-operator", 200, key_secret())
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
            status(&mut api).await;
        });
        let action = run(rotating("2026-11"), ctx, scenario).await.unwrap();
        let again = if retire { 1 } else { 300 };
        assert_eq!(action, Action::requeue(Duration::from_secs(again)));
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

/// The Warning event and the Degraded status of a refused reconcile, then
/// silence: nothing is written. Returns the Degraded condition.
async fn refused(api: &mut ApiServer, reason: &str) -> Value {
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
        (Some("Warning"), Some(reason))
    );
    let st = status(api).await;
    let degraded = condition(&st, "Degraded").clone();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some(reason))
    );
    assert_eq!(condition(&st, "Ready")["status"], "False");
    api.no_more_calls(200).await;
    degraded
}

#[tokio::test]
async fn objects_of_others_under_our_names_are_never_written() {
    let (ctx, mut api) = context();
    let scenario = tokio::spawn(async move {
        users_and_redis_secrets_found(&mut api).await;
        // Not adopted as the key ring: someone else's Secret.
        let mut keys = theirs("Secret", "v1");
        keys["metadata"]["name"] = json!("tokenpolicy-demo-signing-keys");
        api.expect(
            "GET",
            "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
            200,
            keys,
        )
        .await;
        // Everything but the NetworkPolicy (none is configured) is theirs;
        // one is controlled by another TokenPolicy of the same name.
        let mut answers: Vec<(&str, Value)> = OWNED[..6]
            .iter()
            .map(|(kind, version, _)| (*kind, theirs(kind, version)))
            .collect();
        answers[3].1["metadata"]["ownerReferences"] = json!([{"apiVersion": "auth.tokenpolicy.io/v1alpha1",
            "kind": "TokenPolicy", "name": "demo", "uid": "uid-0", "controller": true}]);
        lookups(&mut api, &answers).await;
        let degraded = refused(&mut api, "ObjectNotOwned").await;
        assert_eq!(
            degraded["message"],
            "Secret tokenpolicy-demo-signing-keys, ServiceAccount tokenpolicy-demo, \
             Role tokenpolicy-demo, RoleBinding tokenpolicy-demo, Service tokenpolicy-demo, \
             Deployment tokenpolicy-demo, PodDisruptionBudget tokenpolicy-demo already exist \
             and are not controlled by this TokenPolicy: left unchanged. Rename or remove \
             them, or give the TokenPolicy another name"
        );
    });
    let action = run(policy(3), ctx, scenario).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
}

#[tokio::test]
async fn with_one_replica_only_our_own_disruption_budget_is_deleted() {
    for (pdb, deleted) in [
        (theirs("PodDisruptionBudget", "policy/v1"), false),
        (ours(theirs("PodDisruptionBudget", "policy/v1")), true),
    ] {
        let (ctx, mut api) = context();
        let scenario = tokio::spawn(async move {
            users_secret_found(&mut api).await;
            api.expect(
                "GET",
                "/api/v1/namespaces/team/secrets/tokenpolicy-demo-signing-keys",
                200,
                key_secret(),
            )
            .await;
            lookups(&mut api, &[("PodDisruptionBudget", pdb)]).await;
            applies(&mut api, 1).await;
            if deleted {
                let sent = api
                    .expect(
                        "DELETE",
                        "/apis/policy/v1/namespaces/team/poddisruptionbudgets/tokenpolicy-demo?",
                        200,
                        json!({}),
                    )
                    .await;
                // Guarded by the uid read: never one made again by someone else.
                assert_eq!(sent["preconditions"]["uid"], "obj-uid");
            }
            let st = status(&mut api).await;
            assert_eq!(condition(&st, "Degraded")["status"], "False");
            api.no_more_calls(200).await;
        });
        run(policy(1), ctx, scenario).await.unwrap();
    }
}

#[tokio::test]
async fn an_image_off_the_allow_list_is_refused_before_anything_is_read() {
    let (ctx, mut api) = context();
    let mut tp = policy(1);
    tp.spec.image = Some("busybox:latest".into());
    let scenario = tokio::spawn(async move {
        let degraded = refused(&mut api, "ImageNotAllowed").await;
        let message = degraded["message"].as_str().unwrap();
        assert!(
            message.starts_with(
                "spec.image \"busybox:latest\" is not an allowed image (allowed: tokenpolicy)"
            ),
            "{message}"
        );
    });
    run(tp, ctx, scenario).await.unwrap();
}

#[tokio::test]
async fn an_allowed_image_runs_behind_the_configured_network_policy() {
    let (client, mut api) = mock_client();
    let config: resources::NetworkPolicyConfig = serde_json::from_value(json!({
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    }))
    .unwrap();
    let ctx = Context::new(
        client,
        "tokenpolicy:test".into(),
        Arc::new(OperatorMetrics::default()),
    )
    .with_allowed_images(crate::operator::images::AllowedImages::new(
        &["mirror.example/tokenpolicy".into()],
        "tokenpolicy:test",
    ))
    .with_network_policy(Some(config));
    let mut tp = policy(1);
    tp.spec.image = Some("mirror.example/tokenpolicy:2".into());
    let scenario = tokio::spawn(async move {
        users_secret_found(&mut api).await;
        keys_found(&mut api).await;
        let dep = applies(&mut api, 1).await;
        assert_eq!(
            dep["spec"]["template"]["spec"]["containers"][0]["image"],
            "mirror.example/tokenpolicy:2"
        );
        let np = api
            .apply(
                &ns("/apis/networking.k8s.io/v1/namespaces/team/networkpolicies/tokenpolicy-demo"),
                Value::Null,
            )
            .await;
        assert_eq!(np["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(
            np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
            "demo"
        );
        assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
        // The ingress controllers reach the HTTP port, the scraper the metrics port.
        let rules: Vec<_> = np["spec"]["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .map(|rule| {
                let from: Vec<_> = rule["from"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].clone()
                    })
                    .collect();
                (rule["ports"].clone(), from)
            })
            .collect();
        assert_eq!(
            rules,
            [
                (
                    json!([{"port": 8080, "protocol": "TCP"}]),
                    vec![json!("ingress-nginx")]
                ),
                (
                    json!([{"port": 9090, "protocol": "TCP"}]),
                    vec![json!("monitoring")]
                ),
            ]
        );
        status(&mut api).await;
        api.no_more_calls(200).await;
    });
    run(tp, Arc::new(ctx), scenario).await.unwrap();
}

/// A policy that signs users in through a provider, and no users file.
fn oidc_policy() -> TokenPolicy {
    let mut tp = policy(1);
    tp.spec.users = None;
    tp.spec.external_url = Some("https://auth.example.com".into());
    tp.spec.oidc = Some(crate::crd::OidcSpec {
        issuer_url: "https://idp.example.com/realms/team".into(),
        client_id: "tokenpolicy".into(),
        client_secret_ref: crate::crd::SecretKeyRef {
            name: "oidc-client".into(),
            key: "secret".into(),
        },
        ..Default::default()
    });
    tp
}

#[tokio::test]
async fn a_missing_oidc_client_secret_is_degraded_and_a_provider_needs_no_users_file() {
    let (ctx, mut api) = context();
    let scenario = tokio::spawn(async move {
        // No users Secret is asked for: the provider signs users in.
        api.expect(
            "GET",
            "/api/v1/namespaces/team/secrets/oidc-client",
            404,
            not_found("secrets", "oidc-client"),
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
        assert_eq!(event["reason"], "OidcSecretMissing");
        let st = status(&mut api).await;
        let degraded = condition(&st, "Degraded");
        assert_eq!(
            (degraded["reason"].as_str(), degraded["message"].as_str()),
            (
                Some("OidcSecretMissing"),
                Some("Secret oidc-client not found")
            )
        );
    });
    run(oidc_policy(), ctx, scenario).await.unwrap();
}
