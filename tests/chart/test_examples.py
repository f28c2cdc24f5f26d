"""Every YAML under examples/: built-in kinds strictly valid for Kubernetes
(kubernetes-validate), TokenPolicies valid against the generated CRD's
openAPIV3Schema, and the references between them resolving. The CEL rules
of the CRD are checked on the same files by the Rust tests
(`crd::tests::samples`), which read every `kind: TokenPolicy` document of
examples/*.yaml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from chart_support import (
    EXAMPLES,
    KUBE_VERSIONS,
    crd_json_schema,
    generated_crds,
    kube_validate,
    load_documents,
    untyped_nodes,
    validate_with,
)

FILES = sorted(EXAMPLES.rglob("*.yaml")) + sorted(EXAMPLES.rglob("*.yml"))
TOKEN_POLICY = ("auth.tokenpolicy.io/v1alpha1", "TokenPolicy")

# The recommended scenarios of the token security policy, one file each.
SCENARIOS = {
    "short-term-operation.yaml": "short-term",
    "long-term-work.yaml": "long-term",
    "high-security.yaml": "high-security",
    "low-risk.yaml": "low-risk",
}


def seconds(duration: str) -> int:
    """A policy duration (`1d12h`, `90s`, `0`) in seconds."""
    if duration == "0":
        return 0
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+)([dhms])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def documents(path: Path) -> list[dict[str, Any]]:
    return load_documents(path.read_text())


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in FILES for doc in documents(path)]


def token_policies() -> dict[str, dict[str, Any]]:
    return {
        doc["metadata"]["name"]: doc
        for _, doc in all_documents()
        if (doc["apiVersion"], doc["kind"]) == TOKEN_POLICY
    }


def test_the_crd_schema_is_structural():
    for crd in generated_crds():
        for version in crd["spec"]["versions"]:
            assert untyped_nodes(version["schema"]["openAPIV3Schema"]) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_is_valid(path):
    (crd,) = generated_crds()
    schema = crd_json_schema(crd, "v1alpha1")
    docs = documents(path)
    assert docs, f"{path}: no document"
    for doc in docs:
        where = f"{path.name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in KUBE_VERSIONS:
            try:
                if (doc["apiVersion"], doc["kind"]) == TOKEN_POLICY:
                    validate_with(schema, doc, version)
                else:
                    kube_validate(doc, version)
            except kubernetes_validate.SchemaNotFoundError as e:
                pytest.fail(f"{where}: {e.message}")
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as e:
                pytest.fail(f"{where} (Kubernetes {version}): {e.message} at {list(e.absolute_path)}")


def test_the_crd_schema_check_refuses_what_the_api_server_would():
    """The converted schema is not toothless: unknown fields, wrong types
    and malformed durations fail."""
    (crd,) = generated_crds()
    schema = crd_json_schema(crd, "v1alpha1")
    base = token_policies()["short-term"]
    for spec_change in (
        {"sessionTimeout": "8h"},
        {"tokenExpirationTime": "30 minutes"},
        {"replicas": "2"},
        {"users": {"secretRef": {"name": "u"}}},
        {"cookie": {"sameSite": "Sometimes"}},
    ):
        bad = {**base, "spec": {**base["spec"], **spec_change}}
        with pytest.raises(jsonschema.ValidationError):
            validate_with(schema, bad, KUBE_VERSIONS[-1])


def test_one_policy_per_recommended_scenario():
    policies = token_policies()
    for file, name in SCENARIOS.items():
        (doc,) = documents(EXAMPLES / file)
        assert doc["metadata"]["name"] == name
        assert (EXAMPLES / file).read_text().startswith("# "), f"{file}: explain the choice"
    spec = {name: policies[name]["spec"] for name in SCENARIOS.values()}
    hour, minute = 3600, 60
    # Short-term operation: a session of 1-2 h.
    assert hour <= seconds(spec["short-term"]["sessionExpirationTime"]) <= 2 * hour
    # Long-term work: 8 h.
    assert seconds(spec["long-term"]["sessionExpirationTime"]) == 8 * hour
    # High security: tokens of 10 min or less.
    assert seconds(spec["high-security"]["tokenExpirationTime"]) <= 10 * minute
    # Low risk: tokens of 1 h.
    assert seconds(spec["low-risk"]["tokenExpirationTime"]) == hour
    for name, s in spec.items():
        # The rules the CRD's CEL enforces, restated for a readable failure here.
        session = seconds(s["sessionExpirationTime"])
        assert seconds(s["tokenExpirationTime"]) <= session, name
        assert seconds(s["expiredTokenRenewLimit"]) <= session, name
        assert s.get("replicas", 1) <= 1 or "redis" in s, name


def test_secret_references_resolve():
    """Every Secret key a TokenPolicy names is defined under examples/, in
    the policy's namespace."""
    secrets = {
        (doc["metadata"]["namespace"], doc["metadata"]["name"]): doc
        for _, doc in all_documents()
        if doc["kind"] == "Secret"
    }
    for name, policy in token_policies().items():
        ns = policy["metadata"].get("namespace")
        if ns is None:  # the laptop default (examples/tokenpolicy.yaml)
            continue
        spec = policy["spec"]
        refs = []
        if "users" in spec:
            refs.append(spec["users"]["secretRef"])
        if "redis" in spec:
            refs.append(spec["redis"]["urlSecretRef"])
        for ref in refs:
            secret = secrets.get((ns, ref["name"]))
            assert secret, f"{name}: Secret {ns}/{ref['name']} is not in examples/"
            assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {}), (name, ref)
    redis_url = secrets[("auth", "redis-url")]["stringData"]["url"]
    assert re.fullmatch(r"rediss?://(:[^@]+@)?[a-z0-9.-]+:\d+/\d+", redis_url)


NODES = r"[a-z0-9.-]+:\d+(,[a-z0-9.-]+:\d+)*"
REDIS_FORMS = {
    "redis-url": rf"rediss?://(:[^@]+@)?[a-z0-9.-]+:\d+/\d+",
    "redis-sentinel-url": rf"rediss?\+sentinel://(:[^@]+@)?{NODES}/[A-Za-z0-9_-]+(\?sentinel_password=[^&]+)?",
    "redis-cluster-url": rf"rediss?\+cluster://(:[^@]+@)?{NODES}",
}


def test_one_redis_url_example_per_form():
    """One Secret under examples/ for each Redis form the token service reads
    (one server, Sentinel, Cluster), each URL in its form."""
    secrets = {doc["metadata"]["name"]: doc for _, doc in all_documents() if doc["kind"] == "Secret"}
    for name, form in REDIS_FORMS.items():
        assert name in secrets, f"no example Secret {name}"
        url = secrets[name]["stringData"]["url"]
        assert re.fullmatch(form, url), (name, url)


def test_ingress_uses_a_policy_endpoint():
    policies = token_policies()
    ingresses = [doc for _, doc in all_documents() if doc["kind"] == "Ingress"]
    protected = [i for i in ingresses if "nginx.ingress.kubernetes.io/auth-url" in i["metadata"].get("annotations", {})]
    assert protected, "no Ingress with auth-url"
    for ingress in protected:
        ann = ingress["metadata"]["annotations"]
        m = re.fullmatch(
            # The operator names the Service tokenpolicy-<policy>.
            r"http://tokenpolicy-([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:8080/v1/verify",
            ann["nginx.ingress.kubernetes.io/auth-url"],
        )
        assert m, ann
        policy = policies[m.group(1)]
        assert policy["metadata"]["namespace"] == m.group(2)
        headers = ann["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")
        # Every identity header verify can answer with: one the answer lacks
        # (X-Auth-Request-Email, for a user name that is not an address) is
        # then dropped, while an unlisted one would pass the client's copy on.
        assert {"X-Auth-Request-User", "X-Auth-Request-Session", "Remote-User", "X-Auth-Request-Email"} <= set(
            headers
        ), headers
        signin = ann["nginx.ingress.kubernetes.io/auth-signin"]
        host = ingress["spec"]["rules"][0]["host"]
        assert signin == f"https://{host}/v1/login"
        # The sign-in page is served on that host under /v1/, by the policy's Service.
        signin_routes = [
            (i["metadata"]["namespace"], p["backend"]["service"])
            for i in ingresses
            for r in i["spec"]["rules"]
            if r["host"] == host
            for p in r["http"]["paths"]
            if p["path"] == "/v1/"
        ]
        service = f"tokenpolicy-{m.group(1)}"
        assert signin_routes == [(m.group(2), {"name": service, "port": {"number": 8080}})]


def test_rust_sample_scan_sees_only_token_policies():
    """crd::tests::samples takes every `\\n---` piece of examples/*.yaml that
    contains the text `kind: TokenPolicy` as a TokenPolicy: keep that text
    out of other documents (and their comments)."""
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for piece in path.read_text().split("\n---"):
            docs = load_documents(piece)
            if "kind: TokenPolicy" in piece:
                assert [(d["apiVersion"], d["kind"]) for d in docs] == [TOKEN_POLICY], path
