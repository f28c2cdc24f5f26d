"""A real node beside kwok's: containerd, runc and the CNI bridge under a
real kubelet (tests/e2e/node.sh), registered with the suite's API server.

Pods are pinned to it by nodeSelector and a toleration of its taint (so
nothing else in the suite lands there); the kubelet's own readiness probes
decide their Ready condition (kwok would mark them Ready whatever they do),
and the test reaches them only through `kubectl port-forward` on 127.0.0.1.
The workload image is made here from Debian's static busybox and imported
with `ctr -n k8s.io images import`: no registry.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Kube

NODE = "tp-node-0"
IMAGE = "localhost/tokenpolicy-e2e-web:1"
NODE_SH = ROOT / "tests/e2e/node.sh"


def node_env(kube: Kube) -> dict:
    # cluster.sh keeps admin.kubeconfig at the top of its state directory.
    return {**os.environ, "TOKENPOLICY_E2E_STATE": str(Path(kube.kubeconfig).parent),
            "K8S_BIN": str(kube.bin)}


@pytest.fixture(scope="module")
def node(kube: Kube, tmp_path_factory) -> str:
    env = node_env(kube)
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(NODE_SH), "up"], env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"node.sh up failed:\n{p.stderr}\n{p.stdout}"
    print(f"\n[e2e] real node up in {time.monotonic() - t0:.1f}s")
    try:
        d = tmp_path_factory.mktemp("image")
        tar = d / "web.tar"
        links = [f"@busybox:/bin/{a}" for a in ("sh", "mkdir", "httpd")]
        subprocess.run(["python3", str(ROOT / "tests/e2e/node/oci_archive.py"), "--name", IMAGE,
                        "--out", str(tar), "--entrypoint", "/bin/busybox",
                        "/bin/busybox:/bin/busybox", *links], check=True, timeout=60)
        subprocess.run(["bash", str(NODE_SH), "import", str(tar)], env=env, check=True,
                       capture_output=True, timeout=120)
        yield NODE
    finally:
        subprocess.run(["bash", str(NODE_SH), "down"], env=env, capture_output=True, timeout=120)


def web(name: str, token: str, probe_path: str, replicas: int = 2) -> list[dict]:
    # The container writes TOKEN into the page it serves, so a reply that
    # carries it came from this Deployment's own process.
    script = ('mkdir -p /tmp/www && echo "$TOKEN" > /tmp/www/index.html'
              ' && exec httpd -f -p 8080 -h /tmp/www')
    labels = {"app": name}
    return [{
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": NODE},
                     "tolerations": [{"key": "tokenpolicy.test/real-node", "operator": "Exists",
                                      "effect": "NoSchedule"}],
                     "terminationGracePeriodSeconds": 2,
                     "containers": [{
                         "name": "web", "image": IMAGE, "imagePullPolicy": "Never",
                         "args": ["sh", "-c", script],
                         "env": [{"name": "TOKEN", "value": token}],
                         "ports": [{"containerPort": 8080}],
                         "readinessProbe": {"httpGet": {"path": probe_path, "port": 8080},
                                            "periodSeconds": 1}}]}}},
    }, {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]},
    }]


def pods(kube: Kube, ns: str, app: str) -> list[dict]:
    return kube.json("get", "pods", "-n", ns, "-l", f"app={app}")["items"]


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in pod.get("status", {}).get("conditions", []))


def test_pods_run_on_the_real_node_and_its_probes_decide_ready(kube: Kube, node: str):
    ns = kube.namespace(f"real-node-probe-{secrets.token_hex(3)}")
    kube.apply(web("good", secrets.token_hex(8), "/index.html"), ns=ns)
    kube.apply(web("bad", secrets.token_hex(8), "/missing", replicas=1), ns=ns)
    kube("rollout", "status", "deploy/good", "-n", ns, "--timeout", "180s", timeout=200)
    good = pods(kube, ns, "good")
    assert len(good) == 2 and all(ready(p) for p in good)
    for p in good:
        assert p["spec"]["nodeName"] == node
        (cs,) = p["status"]["containerStatuses"]
        assert cs["containerID"].startswith("containerd://"), cs
        assert "running" in cs["state"], cs
    # The same image with a probe on a path it does not serve: running,
    # never Ready (kwok would have marked it Ready).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        (bad,) = pods(kube, ns, "bad")
        statuses = bad.get("status", {}).get("containerStatuses", [])
        if statuses and "running" in statuses[0]["state"]:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"the bad Pod never ran: {bad.get('status')}")
    time.sleep(5)  # five probe periods
    (bad,) = pods(kube, ns, "bad")
    assert not ready(bad), bad["status"]
    assert bad["status"]["containerStatuses"][0]["ready"] is False


def test_port_forward_to_the_service_reaches_a_real_container(kube: Kube, node: str):
    ns = kube.namespace(f"real-node-forward-{secrets.token_hex(3)}")
    token = secrets.token_hex(16)
    kube.apply(web("web", token, "/index.html"), ns=ns)
    kube("rollout", "status", "deploy/web", "-n", ns, "--timeout", "180s", timeout=200)
    pf = subprocess.Popen([str(kube.bin / "kubectl"), "--kubeconfig", kube.kubeconfig, "-n", ns,
                           "port-forward", "--address", "127.0.0.1", "svc/web", "0:80"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert pf.stdout is not None
        line = pf.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+) -> 8080", line)
        assert m, f"port-forward said {line!r}; stderr: {pf.stderr.read() if pf.poll() is not None else ''}"
        r = requests.get(f"http://127.0.0.1:{m.group(1)}/index.html", timeout=10)
        assert r.status_code == 200
        assert r.text.strip() == token
    finally:
        pf.terminate()
        pf.wait(timeout=10)
