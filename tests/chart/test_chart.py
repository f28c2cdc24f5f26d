"""The Helm chart: strict lint, render, strict schema validation of every
rendered object, and the semantics that matter (hardening, RBAC, CRD,
optional parts), for each values file under tests/chart/values/."""

from __future__ import annotations

import copy
import io
import json
import re
import tarfile
import textwrap
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from chart_support import (
    CHART,
    CRD_FILE,
    KUBE_VERSIONS,
    LABEL_SELECTOR,
    NAMESPACE,
    OBJECT_META,
    ROOT,
    VALUES_DIR,
    cargo_version,
    chart,
    crd_json_schema,
    generated_crds,
    kube_validate,
    load_documents,
    pretty,
    render,
    render_objects,
    validate_with,
    values_file,
)

VALUES_FILES = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))

OPERATOR = "tokenpolicy-operator"
REDIS = "tokenpolicy-redis"
REVIEW_ROLE = f"{OPERATOR}-token-review"
CRD_NAME = "tokenpolicies.auth.tokenpolicy.io"
KEEP = "helm.sh/resource-policy"

# The objects each values file must render: (kind, name), and nothing else.
BASE = {
    ("ServiceAccount", OPERATOR),
    ("ClusterRole", OPERATOR),
    ("ClusterRoleBinding", OPERATOR),
    ("ClusterRole", REVIEW_ROLE),
    ("Role", f"{OPERATOR}-leader-election"),
    ("RoleBinding", f"{OPERATOR}-leader-election"),
    ("Deployment", OPERATOR),
    ("Service", f"{OPERATOR}-metrics"),
}
CRD = {("CustomResourceDefinition", CRD_NAME)}
TRIAL_REDIS = {("Secret", REDIS), ("Service", REDIS), ("Deployment", REDIS)}
EXPECTED_OBJECTS = {
    "defaults.yaml": BASE | CRD,
    "trial-redis.yaml": BASE | CRD | TRIAL_REDIS,
    "ha.yaml": BASE
    | CRD
    | {
        ("PodDisruptionBudget", OPERATOR),
        ("NetworkPolicy", OPERATOR),
        ("ServiceMonitor", OPERATOR),
    },
    "custom-image.yaml": (BASE - {("ServiceAccount", OPERATOR)})
    | {("ServiceAccount", "tokenpolicy-controller")},
}

# The operator's RBAC, verb for verb (docs/src/helm.md, "RBAC", lists it).
CLUSTER_RULES = {
    ("auth.tokenpolicy.io", "tokenpolicies"): {"get", "list", "watch"},
    ("auth.tokenpolicy.io", "tokenpolicies/status"): {"get", "patch"},
    ("", "secrets"): {"get", "list", "watch", "create", "update"},
    ("", "serviceaccounts"): {"get", "list", "watch", "create", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "list", "watch", "create", "patch"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "list", "watch", "create", "patch"},
    ("networking.k8s.io", "networkpolicies"): {"get", "list", "watch", "create", "patch", "delete"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("rbac.authorization.k8s.io", "clusterroles"): {"get", "bind"},
    ("rbac.authorization.k8s.io", "clusterrolebindings"): {"get", "create", "patch"},
}
# What the operator binds to every token service (its admin API).
REVIEW_RULES = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("authorization.k8s.io", "subjectaccessreviews"): {"create"},
}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}
LEASE_NAME = "tokenpolicy-operator"

# The labels resources.rs puts on the token service pods the operator runs.
TOKEN_SERVICE_POD = {
    "app.kubernetes.io/name": "tokenpolicy",
    "app.kubernetes.io/component": "token-service",
}

# Kinds from CRDs that kubernetes-validate has no schema for: each has a
# hand-written strict schema below, for the fields the chart uses.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": LABEL_SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$",
                            },
                        },
                    },
                },
            },
        },
    },
}
HAND_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}


def objects_for(values_name: str) -> list[dict[str, Any]]:
    return render_objects(values_file(values_name))


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, got {len(matches)}"
    return matches[0]


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def rules_by_resource(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# --- every values file -------------------------------------------------------


def test_values_files_cover_the_scenarios():
    assert set(VALUES_FILES) == set(EXPECTED_OBJECTS), "a values file without expectations"


@pytest.mark.parametrize("values_name", VALUES_FILES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_strict(values_name, kube_version):
    report = helm.lint(
        str(CHART),
        values=values_file(values_name),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{kube_version}.0",
    )
    assert report["errors"] == [], pretty(report)
    # 1 = INFO ("icon is recommended"); warnings and errors fail.
    assert all(m["severity"] <= 1 for m in report["messages"]), pretty(report)


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_renders_exactly_the_expected_objects(values_name):
    objects = objects_for(values_name)
    got = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(got) == len(set(got)), f"duplicates: {got}"
    assert set(got) == EXPECTED_OBJECTS[values_name]


@pytest.mark.parametrize("values_name", VALUES_FILES)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_object_validates_strictly(values_name, kube_version):
    for obj in objects_for(values_name):
        where = f"{obj['__template__']}: {obj['kind']}/{obj['metadata']['name']}"
        hand = HAND_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if hand:
                validate_with(hand, obj, kube_version)
            else:
                kube_validate(obj, kube_version)
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{where}: {e.message}; add a strict schema to HAND_SCHEMAS")
        except Exception as e:  # jsonschema / kubernetes-validate ValidationError
            pytest.fail(f"{where} against Kubernetes {kube_version}: {e}")


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_namespaced_objects_name_the_release_namespace(values_name):
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for obj in objects_for(values_name):
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_every_pod_is_hardened(values_name):
    """The operator's Deployment (and the trial Redis'): non-root, read-only
    root filesystem, no capability, no privilege escalation, seccomp
    RuntimeDefault, probes, resources."""
    deployments = of_kind(objects_for(values_name), "Deployment")
    assert deployments
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True
        assert pod_sc.get("seccompProfile") == {"type": "RuntimeDefault"}
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag)
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            where = f"{d['metadata']['name']}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc.get("runAsUser", 1) != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged") in (None, False), where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert c["livenessProbe"] and c["readinessProbe"], where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert "memory" in c["resources"]["limits"], where
            assert c["image"] and ":" in c["image"].rsplit("/", 1)[-1], f"{where}: untagged image"


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_operator_deployment(values_name):
    values = chart().merge_values(values_file(values_name))
    objects = objects_for(values_name)
    d = find(objects, "Deployment", OPERATOR)
    assert d["spec"]["replicas"] == values["replicaCount"]
    pod = d["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == (values["serviceAccount"]["name"] or OPERATOR)
    find(objects, "ServiceAccount", pod["serviceAccountName"])
    assert pod["automountServiceAccountToken"] is True
    (c,) = pod["containers"]
    assert c["args"] == ["operator"]

    env = {e["name"]: e for e in c["env"]}
    # Leader election reads both from the downward API.
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    port = values["metrics"]["port"]
    assert env["TOKENPOLICY_METRICS_LISTEN"]["value"] == f"0.0.0.0:{port}"
    assert env["TOKENPOLICY_LOG_FORMAT"]["value"] == values["logging"]["format"]
    assert env["RUST_LOG"]["value"] == values["logging"]["level"]

    (cport,) = c["ports"]
    assert (cport["name"], cport["containerPort"]) == ("metrics", port)
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}

    # The metrics Service reaches exactly the operator pods, on that port.
    svc = find(objects, "Service", f"{OPERATOR}-metrics")
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    assert selects(svc["spec"]["selector"], pod_labels)
    assert selects(d["spec"]["selector"]["matchLabels"], pod_labels)
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_images(values_name):
    values = chart().merge_values(values_file(values_name))
    d = find(objects_for(values_name), "Deployment", OPERATOR)
    (c,) = d["spec"]["template"]["spec"]["containers"]
    image = values["image"]
    expected = f"{image['registry']}/{image['repository']}:{image['tag'] or cargo_version()}"
    if image["digest"]:
        expected += f"@{image['digest']}"
    assert c["image"] == expected
    assert c["imagePullPolicy"] == image["pullPolicy"]
    token_service = {e["name"]: e.get("value") for e in c["env"]}["TOKENPOLICY_IMAGE"]
    assert token_service == (values["tokenServiceImage"] or expected)
    # spec.image: only the operator's own repository unless the values name others.
    env = {e["name"]: e.get("value") for e in c["env"]}
    own = f"{image['registry']}/{image['repository']}"
    allowed = env["TOKENPOLICY_ALLOWED_IMAGES"].split(",")
    assert allowed == (values["tokenService"]["allowedImages"] or [own])
    trusted = values["tokenService"]["trustedProxies"]
    assert env.get("TOKENPOLICY_TOKEN_SERVICE_TRUSTED_PROXIES") == (",".join(trusted) or None)
    # tokenService.auditLog: every token service writes its audit trail to stdout.
    audit = values["tokenService"]["auditLog"]
    assert env.get("TOKENPOLICY_TOKEN_SERVICE_AUDIT_LOG") == ("true" if audit else None)
    pull_secrets = d["spec"]["template"]["spec"].get("imagePullSecrets", [])
    assert pull_secrets == values["imagePullSecrets"]


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_token_service_network_policy_is_handed_to_the_operator(values_name):
    values = chart().merge_values(values_file(values_name))
    d = find(objects_for(values_name), "Deployment", OPERATOR)
    (c,) = d["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    wanted = values["tokenService"]["networkPolicy"]
    if not wanted["enabled"]:
        assert "TOKENPOLICY_NETWORK_POLICY" not in env
        return
    assert json.loads(env["TOKENPOLICY_NETWORK_POLICY"]) == {
        "from": wanted["from"],
        "metricsFrom": wanted["metricsFrom"],
    }


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_rbac_is_exactly_the_operators_verbs(values_name):
    objects = objects_for(values_name)
    sa = find(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]["serviceAccountName"]
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]

    role = find(objects, "ClusterRole", OPERATOR)
    for rule in role["rules"]:
        assert "*" not in rule["verbs"], rule
        if rule["resources"] == ["clusterroles"]:
            # bind and get: the token review ClusterRole only.
            assert rule["resourceNames"] == [REVIEW_ROLE], rule
        else:
            assert "resourceNames" not in rule, rule
    assert rules_by_resource(role["rules"]) == CLUSTER_RULES
    review = find(objects, "ClusterRole", REVIEW_ROLE)
    assert rules_by_resource(review["rules"]) == REVIEW_RULES
    env = {e["name"]: e.get("value") for e in
           find(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKENPOLICY_TOKEN_REVIEW_CLUSTER_ROLE"] == REVIEW_ROLE
    binding = find(objects, "ClusterRoleBinding", OPERATOR)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": OPERATOR,
    }
    assert binding["subjects"] == subject

    lease = find(objects, "Role", f"{OPERATOR}-leader-election")
    assert rules_by_resource(lease["rules"]) == LEASE_RULES
    for rule in lease["rules"]:
        # get/update only on the operator's own Lease; create cannot be limited by name.
        if rule["verbs"] != ["create"]:
            assert rule["resourceNames"] == [LEASE_NAME], rule
    lease_binding = find(objects, "RoleBinding", f"{OPERATOR}-leader-election")
    assert lease_binding["roleRef"]["kind"] == "Role"
    assert lease_binding["roleRef"]["name"] == lease["metadata"]["name"]
    assert lease_binding["subjects"] == subject


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_no_selector_crosses_with_the_token_services(values_name):
    """The chart's selectors never pick the operator's token service pods,
    and theirs (name=tokenpolicy, instance=<policy>) never pick the chart's
    pods, whatever the TokenPolicy is called."""
    objects = objects_for(values_name)
    selectors = []
    for o in objects:
        spec = o.get("spec", {})
        if o["kind"] == "Service":
            selectors.append(spec["selector"])
        elif "selector" in spec and "matchLabels" in spec["selector"]:
            selectors.append(spec["selector"]["matchLabels"])
        elif o["kind"] == "NetworkPolicy":
            selectors.append(spec["podSelector"]["matchLabels"])
    for selector in selectors:
        for instance in ("tokenpolicy", "anything"):
            labels = {**TOKEN_SERVICE_POD, "app.kubernetes.io/instance": instance}
            assert not selects(selector, labels), selector
    for d in of_kind(objects, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        token_service_selector = {
            "app.kubernetes.io/name": "tokenpolicy",
            "app.kubernetes.io/instance": labels["app.kubernetes.io/instance"],
        }
        assert not selects(token_service_selector, labels), labels


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_redis_only_when_enabled(values_name):
    values = chart().merge_values(values_file(values_name))
    objects = objects_for(values_name)
    redis = [o for o in objects if o["metadata"]["name"].endswith("-redis")]
    if not values["redis"]["enabled"]:
        assert redis == []
        return
    secret = find(objects, "Secret", REDIS)["stringData"]
    password = secret["password"]
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    assert secret["url"] == f"redis://:{password}@{REDIS}.{NAMESPACE}.svc.cluster.local:6379/0"
    conf = secret["redis.conf"].splitlines()
    assert f"requirepass {password}" in conf
    assert "maxmemory-policy noeviction" in conf
    # Durable enough that a Redis crash keeps revocations and spent refreshes.
    assert "appendonly yes" in conf and "appendonly no" not in conf
    assert "appendfsync everysec" in conf
    d = find(objects, "Deployment", REDIS)
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"] == {"type": "Recreate"}
    pod = d["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["command"] == ["redis-server", "/etc/redis/redis.conf"]
    svc = find(objects, "Service", REDIS)
    assert selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
    assert svc["spec"]["ports"][0]["port"] == 6379


def test_trial_redis_password_from_values():
    password = "a-fixed-password-of-sufficient.length"
    objects = render_objects({"redis": {"enabled": True, "password": password}})
    secret = find(objects, "Secret", REDIS)["stringData"]
    assert secret["password"] == password
    assert f"//:{password}@" in secret["url"]


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_optional_operator_objects(values_name):
    values = chart().merge_values(values_file(values_name))
    objects = objects_for(values_name)
    operator_pods = find(objects, "Deployment", OPERATOR)["spec"]["template"]["metadata"]["labels"]
    affinity = find(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"].get("affinity")
    assert (affinity is not None) == (values["replicaCount"] > 1 or bool(values["affinity"]))

    pdbs = of_kind(objects, "PodDisruptionBudget")
    if values["replicaCount"] > 1 and values["podDisruptionBudget"]["enabled"]:
        (pdb,) = pdbs
        assert pdb["spec"]["maxUnavailable"] == 1
        assert selects(pdb["spec"]["selector"]["matchLabels"], operator_pods)
    else:
        assert pdbs == []

    monitors = of_kind(objects, "ServiceMonitor")
    if values["metrics"]["serviceMonitor"]["enabled"]:
        (sm,) = monitors
        svc = find(objects, "Service", f"{OPERATOR}-metrics")
        assert selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
        assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
        for k, v in values["metrics"]["serviceMonitor"]["labels"].items():
            assert sm["metadata"]["labels"][k] == v
    else:
        assert monitors == []

    policies = of_kind(objects, "NetworkPolicy")
    if not values["networkPolicy"]["enabled"]:
        assert policies == []
        return
    np = find(objects, "NetworkPolicy", OPERATOR)
    assert selects(np["spec"]["podSelector"]["matchLabels"], operator_pods)
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = np["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress.get("from", []) == values["networkPolicy"]["metricsFrom"]
    dns, api = np["spec"]["egress"]
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    api_server = values["networkPolicy"]["apiServer"]
    assert [p["port"] for p in api["ports"]] == api_server["ports"]
    assert [t["ipBlock"]["cidr"] for t in api.get("to", [])] == api_server["cidrs"]
    if values["redis"]["enabled"]:
        find(objects, "NetworkPolicy", REDIS)


def test_redis_network_policy_admits_only_token_services():
    objects = render_objects({"redis": {"enabled": True}, "networkPolicy": {"enabled": True}})
    np = find(objects, "NetworkPolicy", REDIS)
    redis_pods = find(objects, "Deployment", REDIS)["spec"]["template"]["metadata"]["labels"]
    assert selects(np["spec"]["podSelector"]["matchLabels"], redis_pods)
    (ingress,) = np["spec"]["ingress"]
    (peer,) = ingress["from"]
    assert peer["namespaceSelector"] == {}
    assert peer["podSelector"]["matchLabels"] == TOKEN_SERVICE_POD
    assert np["spec"]["egress"] == []
    for version in KUBE_VERSIONS:
        kube_validate(np, version)


# --- the CRD -----------------------------------------------------------------


@pytest.mark.parametrize(
    "crds, present, kept",
    [
        ({}, True, True),
        ({"keep": False}, True, False),
        ({"enabled": False}, False, False),
        ({"enabled": False, "keep": True}, False, False),
    ],
)
def test_crd_enabled_and_keep(crds, present, kept):
    objects = render_objects({"crds": crds})
    found = of_kind(objects, "CustomResourceDefinition")
    assert bool(found) == present
    for crd in found:
        annotations = crd["metadata"].get("annotations", {})
        assert (annotations.get(KEEP) == "keep") == kept
        assert set(annotations) <= {KEEP}


def test_rendered_crd_is_the_generated_file():
    """The chart adds labels and the keep annotation, nothing else: the
    object is the one in crds/tokenpolicy.yaml (`tokenpolicy crd`)."""
    generated = generated_crds()
    rendered = of_kind(render_objects(), "CustomResourceDefinition")
    assert len(rendered) == len(generated) == 1
    for want, got in zip(generated, rendered):
        got = copy.deepcopy(got)
        got.pop("__template__")
        labels = got["metadata"].pop("labels")
        annotations = got["metadata"].pop("annotations")
        assert "labels" not in want["metadata"] and "annotations" not in want["metadata"]
        assert got == want
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"] == "crds"
        assert annotations == {KEEP: "keep"}


def test_crd_source_is_the_generated_file():
    """No second copy: files/crds is a symlink to the repository's crds/,
    which Helm follows when it loads the chart directory."""
    link = CHART / "files" / "crds"
    assert link.is_symlink(), "charts/tokenpolicy/files/crds must be a symlink to ../../../crds"
    assert link.resolve() == (ROOT / "crds").resolve()
    for path in CHART.rglob("*"):
        if path.is_file() and link not in path.parents:
            assert "kind: CustomResourceDefinition" not in path.read_text(), path
    loaded = {f["name"]: f["data"] for f in chart().files}
    assert loaded["files/crds/tokenpolicy.yaml"] == CRD_FILE.read_text()


def test_packaged_chart_carries_the_crd(tmp_path):
    """`helm package` stores the symlinked file itself, so a chart pulled
    from a repository renders the same CRD."""
    archive = helm.package(str(CHART), destination=str(tmp_path))
    with tarfile.open(archive) as tar:
        member = tar.getmember("tokenpolicy/files/crds/tokenpolicy.yaml")
        assert member.isfile()
        data = tar.extractfile(member).read().decode()
    assert data == CRD_FILE.read_text()
    with open(archive, "rb") as f:
        packaged = helm.Chart.load_archive(f.read())
    text = packaged.render(values={}, name="tokenpolicy", namespace=NAMESPACE)
    crd = [
        o
        for name, t in text.items()
        if not name.endswith("NOTES.txt")
        for o in load_documents(t)
        if o["kind"] == "CustomResourceDefinition"
    ]
    (from_dir,) = of_kind(render_objects(), "CustomResourceDefinition")
    from_dir.pop("__template__")
    assert crd == [from_dir]


# --- values.schema.json ------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        ({"replicaCount": -1}, "at '/replicaCount'"),
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        ({"image": {"digest": "latest"}}, "at '/image/digest'"),
        ({"image": {"tag": 1.0}}, "at '/image/tag': got number, want string"),
        ({"crds": {"keep": "yes"}}, "at '/crds/keep': got string, want boolean"),
        ({"crds": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"metrics": {"port": 80}}, "at '/metrics/port'"),
        ({"logging": {"format": "xml"}}, "at '/logging/format'"),
        ({"redis": {"password": "short"}}, "at '/redis/password'"),
        ({"redis": {"password": "has:a@colon-and-more-chars"}}, "at '/redis/password'"),
        ({"networkPolicy": {"apiServer": {"ports": []}}}, "at '/networkPolicy/apiServer/ports'"),
        ({"metrics": {"serviceMonitor": {"interval": "soon"}}}, "at '/metrics/serviceMonitor/interval'"),
    ],
)
def test_schema_refuses_bad_values(values, message):
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    text = str(refused.value)
    assert "values don't meet the specifications of the schema" in text
    assert message in text, text
    report = helm.lint(str(CHART), values=values, strict=True, namespace=NAMESPACE)
    assert any(message in e for e in report["errors"]), pretty(report)


def test_every_value_is_documented_in_the_schema():
    """values.yaml and values.schema.json describe the same keys."""
    schema = chart().schema
    assert schema is not None

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        props = node.get("properties")
        if props is None:  # a free-form Kubernetes object (resources, affinity, ...)
            return
        assert node.get("additionalProperties") is False, f"{path}: open object"
        assert set(values) <= set(props), f"{path}: {set(values) - set(props)} not in the schema"
        for key in node.get("required", []):
            assert key in values, f"{path}.{key}: required but not in values.yaml"
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, props[key], f"{path}.{key}")

    walk(chart().values, schema, "")


# --- metadata ----------------------------------------------------------------


def test_app_version_follows_the_crate():
    meta = chart().metadata
    assert meta["appVersion"] == cargo_version()
    assert meta["apiVersion"] == "v2"
    low = re.match(r">=\s*(\d+\.\d+)", meta["kubeVersion"]).group(1)
    assert low == KUBE_VERSIONS[0], "validate against the oldest supported version"


def notes(values: dict[str, Any]) -> str:
    (text,) = [t for name, t in render(values).items() if name.endswith("NOTES.txt")]
    return text


@pytest.mark.parametrize("values_name", VALUES_FILES)
def test_notes_show_a_first_policy_and_the_ingress(values_name):
    values = chart().merge_values(values_file(values_name))
    text = notes(values_file(values_name))
    # The TokenPolicy in the NOTES is valid against the CRD, and uses the trial Redis if any.
    block = re.search(r"kubectl apply -f - <<'EOF'\n(.*?)\n  EOF\n", text, re.S).group(1)
    (policy,) = load_documents(textwrap.dedent(block))
    (crd,) = generated_crds()
    validate_with(crd_json_schema(crd, "v1alpha1"), policy, KUBE_VERSIONS[-1])
    assert ("redis" in policy["spec"]) == values["redis"]["enabled"]
    if values["redis"]["enabled"]:
        assert policy["spec"]["redis"]["urlSecretRef"] == {"name": REDIS, "key": "url"}
        assert "TRIAL REDIS" in text
    # The Service the operator makes is named after the policy, never with its bare name.
    name = policy["metadata"]["name"]
    endpoint = f"http://tokenpolicy-{name}.{NAMESPACE}.svc.cluster.local:8080/v1/verify"
    assert f'nginx.ingress.kubernetes.io/auth-url: "{endpoint}"' in text
    assert f"deployment/{OPERATOR}" in text


def test_values_files_parse_as_helm_reads_them():
    for name in VALUES_FILES:
        text = (VALUES_DIR / name).read_text()
        assert helm.values_from_yaml(text) == (yaml.safe_load(io.StringIO(text)) or {})
