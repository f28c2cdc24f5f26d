"""Step 7: a TokenPolicy is not a way to take over objects or run pods. On
the real API server: objects that someone else made under a policy's names
are left byte for byte as they were, before and after the policy's deletion;
an image off the operator's allow-list is refused; only the named key of the
users Secret reaches the pod."""

from __future__ import annotations

import json

from conftest import condition, token_policy, users_secret, wait_ready, wait_until

NS = "e2e-ownership"


def theirs(ns: str, name: str) -> list[dict]:
    """A Service, Role, RoleBinding, ServiceAccount, PodDisruptionBudget and
    signing-key Secret as a person would make them under `name`'s names."""
    meta = lambda n: {"name": n, "namespace": ns, "labels": {"team": "theirs"}}  # noqa: E731
    return [
        {"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
         "spec": {"selector": {"app": "their-app"}, "ports": [{"port": 80, "targetPort": 8000}]}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(name),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(name),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(name),
         "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "their-app"}}}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": meta(f"{name}-signing-keys"),
         "type": "Opaque", "stringData": {"signing.pem": "their key"}},
    ]


def snapshot(kube, objs: list[dict]) -> dict[tuple[str, str], str]:
    """Each object as the API server has it, metadata and all."""
    out = {}
    for o in objs:
        key = (o["kind"], o["metadata"]["name"])
        got = kube.get(o["kind"].lower(), o["metadata"]["name"], o["metadata"]["namespace"])
        assert got, f"{key} missing"
        out[key] = json.dumps(got, sort_keys=True)
    return out


def degraded_with(kube, name: str, reason: str):
    def check():
        tp = kube.get("tp", name, NS)
        c = condition(tp, "Degraded")
        return c and c["status"] == "True" and c["reason"] == reason and c
    return check


def test_objects_under_a_policys_names_that_are_not_its_own_are_never_touched(kube, operator):
    kube.namespace(NS)
    kube.apply(users_secret(NS))
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis", "namespace": NS},
                "type": "Opaque", "stringData": {"url": "redis://redis.invalid:6379/0"}})
    # Under the names the operator derives, and under the policy's own name.
    objs = theirs(NS, "tokenpolicy-grab") + theirs(NS, "grab")
    kube.apply(objs)
    before = snapshot(kube, objs)

    # Two replicas: the PodDisruptionBudget is one the operator would write.
    kube.apply(token_policy(NS, "grab", replicas=2, redis={"urlSecretRef": {"name": "redis", "key": "url"}}))
    c = wait_until("ObjectNotOwned", degraded_with(kube, "grab", "ObjectNotOwned"), 30)
    for what in ("Secret tokenpolicy-grab-signing-keys", "ServiceAccount tokenpolicy-grab",
                 "Role tokenpolicy-grab", "RoleBinding tokenpolicy-grab", "Service tokenpolicy-grab",
                 "PodDisruptionBudget tokenpolicy-grab"):
        assert what in c["message"], c["message"]
    reasons = [e["reason"] for e in kube.events(NS, "grab")]
    assert "ObjectNotOwned" in reasons, reasons
    # Nothing was run for it, and nothing of theirs changed.
    assert kube.get("deployment", "tokenpolicy-grab", NS) is None
    assert snapshot(kube, objs) == before

    # A canary that the garbage collector removes with the policy: once it
    # is gone, the collector has acted on the deletion.
    uid = kube.get("tp", "grab", NS)["metadata"]["uid"]
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "grab-canary", "namespace": NS, "ownerReferences": [{
            "apiVersion": "auth.tokenpolicy.io/v1alpha1", "kind": "TokenPolicy", "name": "grab", "uid": uid}]}})
    kube("delete", "tp", "grab", "-n", NS, "--wait=true", "--timeout=60s")
    wait_until("the garbage collector acted", lambda: kube.get("configmap", "grab-canary", NS) is None, 60)
    assert snapshot(kube, objs) == before


def test_once_the_names_are_free_the_policy_runs_under_them(kube, operator):
    """The same policy, once the objects in the way are gone, gets its own."""
    for o in theirs(NS, "tokenpolicy-grab"):
        kube("delete", o["kind"].lower(), o["metadata"]["name"], "-n", NS, "--wait=true")
    bare = snapshot(kube, theirs(NS, "grab"))
    kube.apply(token_policy(NS, "grab", replicas=2, redis={"urlSecretRef": {"name": "redis", "key": "url"}}))
    tp = wait_ready(kube, NS, "grab", replicas=2, timeout=90)
    assert tp["status"]["endpoint"] == f"http://tokenpolicy-grab.{NS}.svc.cluster.local:8080/v1/verify"
    svc = kube.get("service", "tokenpolicy-grab", NS)
    assert svc["spec"]["selector"]["app.kubernetes.io/instance"] == "grab"
    assert any(r["uid"] == tp["metadata"]["uid"] and r.get("controller")
               for r in svc["metadata"]["ownerReferences"])
    # What carries the policy's bare name is still not the operator's.
    assert snapshot(kube, theirs(NS, "grab")) == bare


def test_an_image_off_the_allow_list_is_refused(kube, operator):
    # The operator runs with --image tokenpolicy:e2e: that repository only.
    kube.apply(token_policy(NS, "img", image="docker.io/library/busybox:latest"))
    c = wait_until("ImageNotAllowed", degraded_with(kube, "img", "ImageNotAllowed"), 30)
    assert '"docker.io/library/busybox:latest"' in c["message"] and "tokenpolicy" in c["message"], c
    assert kube.get("deployment", "tokenpolicy-img", NS) is None
    assert kube.get("serviceaccount", "tokenpolicy-img", NS) is None
    kube("patch", "tp", "img", "-n", NS, "--type=merge", "-p", '{"spec":{"image":"tokenpolicy:e2e-2"}}')
    wait_ready(kube, NS, "img", timeout=60)
    pod = kube.get("deployment", "tokenpolicy-img", NS)["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "tokenpolicy:e2e-2"


def test_only_the_named_key_of_the_users_secret_is_mounted(kube, operator):
    secret = users_secret(NS, "users-and-more")
    secret["stringData"] = {"team-users": secret["stringData"]["users"], "db-password": "hunter2"}
    kube.apply(secret)
    kube.apply(token_policy(NS, "keys", users={"secretRef": {"name": "users-and-more", "key": "team-users"}}))
    wait_ready(kube, NS, "keys", timeout=60)
    pod = kube.get("deployment", "tokenpolicy-keys", NS)["spec"]["template"]["spec"]
    (users,) = [v for v in pod["volumes"] if v["name"] == "users"]
    assert users["secret"]["secretName"] == "users-and-more"
    assert users["secret"]["items"] == [{"key": "team-users", "path": "users"}]
    args = pod["containers"][0]["args"]
    assert args[args.index("--users") + 1] == "/etc/tokenpolicy/users/users"
    assert pod["serviceAccountName"] == "tokenpolicy-keys"
    # The pod kwok runs has the same volume.
    pods = kube.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/instance=keys")["items"]
    assert pods and all(
        [v["secret"]["items"] for v in p["spec"]["volumes"] if v["name"] == "users"]
        == [[{"key": "team-users", "path": "users"}]] for p in pods)


def test_each_token_service_gets_the_configured_network_policy(kube, operator):
    """The operator runs with the chart's default tokenService.networkPolicy."""
    np = kube.get("networkpolicy", "tokenpolicy-keys", NS)
    assert np, "no NetworkPolicy"
    assert np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "keys"
    assert np["spec"]["policyTypes"] == ["Ingress"]
    web, scrape = np["spec"]["ingress"]
    # The ingress controllers on the HTTP port, the scraper on the metrics port.
    assert web["ports"] == [{"port": 8080, "protocol": "TCP"}]
    assert scrape["ports"] == [{"port": 9090, "protocol": "TCP"}]
    assert any("ingress-nginx" in json.dumps(p) for p in web["from"]), web
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    # The kubelet probes the metrics port, never the public one.
    c = kube.get("deployment", "tokenpolicy-keys", NS)["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090}
