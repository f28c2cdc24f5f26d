"""Step 6b: the container image (tests/image/build.sh) against the real API
server, run with podman as the kubelet would run its Pods
(tests/image/podman_pod.py: user, read-only root, capabilities, Secret
files, the projected ServiceAccount token, ports and probes).

* The operator, from the chart's own Deployment as the API server holds it
  (arguments, environment, probes, securityContext), as the chart's
  ServiceAccount, in-cluster configuration: it takes the Lease when the
  main operator lets it go, and reconciles a TokenPolicy to Ready.
* A token service, from the Deployment that the operator applied, with its
  arguments untouched (``--policy-ref``), its Secrets read from the cluster
  and its own ServiceAccount: it serves, and follows a policy patch without
  a restart.

Without the image the tests are skipped, unless TOKENPOLICY_IMAGE_REQUIRED=1
(tests/e2e/run.sh sets it): then they fail.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest
import requests

from conftest import (DEMO_PASSWORD, DEMO_USER, OPERATOR_SA, ROOT, SYSTEM_NS, refusals, secret_data,
                      token_policy, users_secret, wait_ready, wait_until)

sys.path.insert(0, str(ROOT / "tests" / "image"))
from podman_pod import IMAGE, PodContainer, image_exists  # noqa: E402

LEASE = "tokenpolicy-operator"
LEASE_SECONDS, RETRY_SECONDS = 15, 5


@pytest.fixture(scope="module")
def image() -> str:
    if image_exists(IMAGE):
        return IMAGE
    if os.environ.get("TOKENPOLICY_IMAGE_REQUIRED") == "1":
        pytest.fail(f"image {IMAGE} not built (bash tests/image/build.sh)")
    pytest.skip(f"image {IMAGE} not built")


def service_account(kube, ns: str, sa: str) -> tuple:
    token = kube("create", "token", sa, "-n", ns, "--duration", "1h").strip()
    return kube.server, token, Path(kube.ca).read_bytes(), ns


def holder(kube) -> str:
    return (kube.get("lease", LEASE, SYSTEM_NS) or {}).get("spec", {}).get("holderIdentity") or ""


def test_the_operator_image_leads_and_reconciles_as_the_charts_pod(kube, operators, operator, image, workdir):
    deployments = kube.json("get", "deployments", "-n", SYSTEM_NS)["items"]
    (chart,) = [d for d in deployments if d["spec"]["template"]["spec"]["containers"][0]["name"] == "operator"]
    pod = chart["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR_SA
    d = workdir / "operator-image"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    c = PodContainer(pod=pod, workdir=d, secrets={}, image=image, name="tp-e2e-operator-image",
                     fields={"metadata.name": "op-image", "metadata.namespace": SYSTEM_NS},
                     service_account=service_account(kube, SYSTEM_NS, OPERATOR_SA))
    ns = kube.namespace("e2e-operator-image")
    kube.apply(users_secret(ns))
    c.start()
    try:
        # Alive, not leading yet: the main operator holds the Lease.
        wait_until("operator image live", lambda: c.running() and c.probe("livenessProbe").ok, 60)
        assert c.probe("readinessProbe").ok
        assert holder(kube).startswith("op-main-")
        operators.stop_main()  # releases the Lease
        wait_until("operator image leads", lambda: holder(kube).startswith("op-image"),
                   LEASE_SECONDS + RETRY_SECONDS + 10, 0.5)
        kube.apply(token_policy(ns, "from-image"))
        wait_ready(kube, ns, "from-image", replicas=1)
        writers = {e.get("reportingInstance") for e in kube.events(ns, "from-image")}
        assert writers == {"op-image"}, writers
        metrics = requests.get(f"http://127.0.0.1:{c.port('metrics')}/metrics", timeout=5).text
        assert "tokenpolicy_operator_reconciles_total" in metrics
        assert c.running(), c.text()[-3000:]
        assert not refusals(c.text()), refusals(c.text())[:5]
    finally:
        c.stop()
        operators.start_main()
        wait_until("main operator leads again", lambda: holder(kube).startswith("op-main-"),
                   LEASE_SECONDS + RETRY_SECONDS + 10, 0.5)
        kube("delete", "namespace", ns, "--wait=false")


def test_the_token_service_image_runs_its_deployment_untouched(kube, operator, image, workdir):
    ns = kube.namespace("e2e-service-image")
    kube.apply(users_secret(ns))
    kube.apply(token_policy(ns, "svc", tokenExpirationTime="10m"))
    wait_ready(kube, ns, "svc", replicas=1)
    deployment = kube.get("deployment", "tokenpolicy-svc", ns)
    pod = deployment["spec"]["template"]["spec"]
    names = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    secrets = {n: secret_data(kube.get("secret", n, ns)) for n in names}
    d = workdir / "service-image"
    d.mkdir(exist_ok=True)
    d.chmod(0o755)
    c = PodContainer(pod=pod, workdir=d, secrets=secrets, image=image, name="tp-e2e-service-image",
                     service_account=service_account(kube, ns, pod["serviceAccountName"]))
    assert c.container["args"][:3] == ["serve", "--policy-ref", f"{ns}/svc"]
    c.start()
    try:
        c.wait_ready()
        assert c.probe("livenessProbe").ok
        url = f"http://127.0.0.1:{c.port('http')}"

        def token_seconds() -> int:
            r = requests.post(url + "/v1/login", json={"username": DEMO_USER, "password": DEMO_PASSWORD},
                              timeout=10)
            assert r.status_code == 200, r.text
            token = r.json()["access_token"]
            v = requests.get(url + "/v1/verify", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert v.status_code == 200, v.text
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return claims["exp"] - claims["iat"]
        assert token_seconds() == 600
        # A patch reaches the running container through its watch, as its ServiceAccount.
        kube("patch", "tp", "svc", "-n", ns, "--type=merge", "-p", '{"spec":{"tokenExpirationTime":"5m"}}')
        wait_until("the container follows the patch", lambda: token_seconds() == 300, 30, 0.5)
        assert c.running(), c.text()[-3000:]
        assert not refusals(c.text()), refusals(c.text())[:5]
    finally:
        c.stop()
        kube("delete", "namespace", ns, "--wait=false")
