"""Fixtures for the end-to-end suite: a real control plane on 127.0.0.1.

One cluster per session (``tests/e2e/cluster.sh up``; set ``E2E_KUBECONFIG``
and ``E2E_K8S_BIN`` to reuse a running one instead). The chart is installed
with the real ``helm`` CLI; ``tokenpolicy operator`` runs as a local process
authenticated as the chart's ServiceAccount (a TokenRequest token, no admin
credentials). Everything talks to 127.0.0.1 only: kwok plays the kubelet, so
no container runs and no pod IP is ever dialled.

Environment:
    TOKENPOLICY_BIN   the binary (default ${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}/debug/tokenpolicy)
    E2E_KUBECONFIG, E2E_K8S_BIN   reuse a cluster (not stopped at the end)
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.procs import (  # noqa: E402  (tests/ is put on the path first)
    Process as Proc,
    binary_path,
    child_env,
    free_port,
    wait_until,
)

__all__ = ["Proc", "binary_path", "child_env", "free_port", "wait_until"]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tokenpolicy"
RELEASE = "tokenpolicy"
SYSTEM_NS = "tokenpolicy-system"
OPERATOR_SA = "tokenpolicy-operator"
#: The chart's ClusterRole that the operator binds to every token service.
REVIEW_ROLE = "tokenpolicy-operator-token-review"
CLUSTER_ROLE = "tokenpolicy-operator"
CRD = "tokenpolicies.auth.tokenpolicy.io"
# examples/users.htpasswd: demo / demo-password (bcrypt).
DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"


# A request the API server refused for want of permission, as kube-rs logs
# it ("... is forbidden: ...", reason Forbidden, code 403). Not a bare
# "403": request logs carry numbers such as micros=403.
_REFUSED = re.compile(r"forbidden|code: 403\b", re.IGNORECASE)


def refusals(log: str) -> list[str]:
    """The log lines that record a request refused by RBAC."""
    return [line for line in log.splitlines() if _REFUSED.search(line)]


# --------------------------------------------------------------------------
# kubectl / helm
# --------------------------------------------------------------------------


class Kube:
    def __init__(self, kubeconfig: str, bin_dir: str):
        self.kubeconfig = kubeconfig
        self.bin = Path(bin_dir)
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        self.server = cfg["clusters"][0]["cluster"]["server"]
        self.ca = cfg["clusters"][0]["cluster"]["certificate-authority"]

    def run(self, *args: str, input: Optional[str] = None, check: bool = True,
            kubeconfig: Optional[str] = None, timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(self.bin / "kubectl"), "--kubeconfig", kubeconfig or self.kubeconfig, *args]
        p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
        return p

    def __call__(self, *args: str, **kw) -> str:
        return self.run(*args, **kw).stdout

    def json(self, *args: str, **kw):
        return json.loads(self.run(*args, "-o", "json", **kw).stdout)

    def get(self, kind: str, name: str, ns: Optional[str] = None):
        """The object, or None when it does not exist."""
        args = ["get", kind, name, "--ignore-not-found", "-o", "json"]
        if ns:
            args += ["-n", ns]
        out = self.run(*args).stdout
        return json.loads(out) if out.strip() else None

    def apply(self, manifest, ns: Optional[str] = None, **kw) -> str:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(
            manifest if isinstance(manifest, list) else [manifest])
        args = ["apply", "-f", "-"] + (["-n", ns] if ns else [])
        return self(*args, input=text, **kw)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, HELM_CACHE_HOME="/var/tmp/tokenpolicy-e2e-helm/cache",
                   HELM_CONFIG_HOME="/var/tmp/tokenpolicy-e2e-helm/config",
                   HELM_DATA_HOME="/var/tmp/tokenpolicy-e2e-helm/data")
        p = subprocess.run([str(self.bin / "helm"), *args], capture_output=True, text=True, env=env,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
        return p

    def namespace(self, name: str) -> str:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return name

    def events(self, ns: str, name: str, kind: str = "TokenPolicy") -> list[dict]:
        """events.k8s.io Events about one object, oldest first."""
        items = self.json("get", "events.events.k8s.io", "-n", ns,
                          "--field-selector", f"regarding.name={name},regarding.kind={kind}")["items"]
        return sorted(items, key=lambda e: e.get("eventTime") or e["metadata"]["creationTimestamp"])

    def token_kubeconfig(self, ns: str, sa: str, path: Path, duration: str = "3h") -> Path:
        """A kubeconfig that authenticates only with a TokenRequest token
        for ServiceAccount ns/sa: no client certificate, no admin."""
        token = self("create", "token", sa, "-n", ns, "--duration", duration).strip()
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": self.server, "certificate-authority": self.ca}}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "e2e", "user": sa, "namespace": ns}}],
            "current-context": "sa",
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def metrics(self) -> str:
        return self("get", "--raw", "/metrics")


def condition(obj: dict, kind: str) -> Optional[dict]:
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c
    return None


def secret_data(secret: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------

def chart_network_policy() -> str:
    """The chart's default tokenService.networkPolicy, as the chart hands it
    to the operator (TOKENPOLICY_NETWORK_POLICY)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())["tokenService"]["networkPolicy"]
    return json.dumps({"from": values["from"], "metricsFrom": values["metricsFrom"]})


class Operator(Proc):
    """`tokenpolicy operator` as the chart's ServiceAccount, with the chart's
    default token service NetworkPolicy."""

    def __init__(self, name: str, kubeconfig: Path, log: Path, *extra: str):
        self.metrics_port = free_port()
        argv = [str(binary_path()), "operator", "--lease-namespace", SYSTEM_NS,
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--image", "tokenpolicy:e2e",
                "--token-service-network-policy", chart_network_policy(),
                "--token-review-cluster-role", REVIEW_ROLE, *extra]
        super().__init__(name, argv, log, child_env(KUBECONFIG=str(kubeconfig), POD_NAME=name))

    def start(self) -> "Operator":
        super().start()
        wait_until(f"operator {self.name} metrics", self._up, 30)
        return self

    def _up(self) -> bool:
        self.check_running()
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=2).ok

    def reconciles(self) -> int:
        body = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
        m = re.search(r"^tokenpolicy_operator_reconciles_total (\d+)", body, re.M)
        return int(m.group(1)) if m else 0


class TokenService(Proc):
    """`tokenpolicy serve --policy-ref` as a token service's ServiceAccount."""

    def __init__(self, name: str, kubeconfig: Path, log: Path, policy_ref: str, users: Path,
                 keys_dir: Optional[Path] = None):
        self.port = free_port()
        argv = [str(binary_path()), "serve", "--policy-ref", policy_ref, "--users", str(users),
                "--listen", f"127.0.0.1:{self.port}"]
        if keys_dir:
            argv += ["--signing-keys-dir", str(keys_dir)]
        super().__init__(name, argv, log, child_env(KUBECONFIG=str(kubeconfig)))
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "TokenService":
        super().start()

        def up():
            self.check_running()
            return requests.get(self.url + "/readyz", timeout=2).ok
        wait_until(f"{self.name} ready", up, 30, 0.1)
        return self

    def login(self, user: str = DEMO_USER, password: str = DEMO_PASSWORD) -> str:
        r = requests.post(self.url + "/v1/login", json={"username": user, "password": password}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def verify(self, token: str) -> tuple[int, Optional[str]]:
        r = requests.get(self.url + "/v1/verify", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        code = None
        if r.status_code != 200:
            code = r.json()["error"]["code"]
        return r.status_code, code


# --------------------------------------------------------------------------
# Session fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def kube() -> Kube:
    if os.environ.get("E2E_KUBECONFIG"):
        yield Kube(os.environ["E2E_KUBECONFIG"], os.environ["E2E_K8S_BIN"])
        return
    t0 = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "tests/e2e/cluster.sh"), "up"], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.exit(f"cluster.sh up failed:\n{p.stderr}\n{p.stdout}", returncode=1)
    out = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    print(f"\n[e2e] cluster up in {time.monotonic() - t0:.1f}s")
    try:
        yield Kube(out["KUBECONFIG"], out["K8S_BIN"])
    finally:
        subprocess.run(["bash", str(ROOT / "tests/e2e/cluster.sh"), "down"], capture_output=True)


@pytest.fixture(scope="session")
def release(kube: Kube) -> str:
    """The chart, installed by the real helm CLI (CRD included)."""
    kube.helm("upgrade", "--install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--create-namespace",
              "--set", "image.registry=registry.invalid", "--wait", "--timeout", "3m")
    wait_until("CRD established", lambda: condition(kube.get("crd", CRD), "Established")
               and condition(kube.get("crd", CRD), "Established")["status"] == "True", 30)
    return RELEASE


class Operators:
    """The suite's operator: one process (restarted when a test needs it
    stopped), all of its output in one log that must never show a 403."""

    def __init__(self, kube: Kube, workdir: Path):
        self.kube, self.workdir = kube, workdir
        self.kubeconfig = kube.token_kubeconfig(SYSTEM_NS, OPERATOR_SA, workdir / "operator.kubeconfig")
        self.log = workdir / "operator-main.log"
        self.main: Optional[Operator] = None

    def start_main(self) -> Operator:
        if self.main is None or not self.main.running():
            self.main = Operator("op-main", self.kubeconfig, self.log).start()
        return self.main

    def stop_main(self) -> None:
        if self.main:
            self.main.stop()

    def extra(self, name: str) -> Operator:
        return Operator(name, self.kubeconfig, self.workdir / f"operator-{name}.log")


@pytest.fixture(scope="session")
def operators(kube: Kube, release: str, workdir: Path) -> Operators:
    ops = Operators(kube, workdir)
    ops.start_main()
    yield ops
    ops.stop_main()


@pytest.fixture()
def operator(operators: Operators) -> Operator:
    """The main operator, running."""
    return operators.start_main()


USERS_HTPASSWD = (ROOT / "examples" / "users.htpasswd").read_text()


def users_secret(ns: str, name: str = "users") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "stringData": {"users": USERS_HTPASSWD}}


def token_policy(ns: str, name: str, **spec) -> dict:
    base = {"sessionExpirationTime": "1h", "tokenExpirationTime": "10m", "expiredTokenRenewLimit": "5m",
            "users": {"secretRef": {"name": "users", "key": "users"}}}
    base.update(spec)
    return {"apiVersion": "auth.tokenpolicy.io/v1alpha1", "kind": "TokenPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": base}


def wait_ready(kube: Kube, ns: str, name: str, timeout: float = 60, replicas: Optional[int] = None) -> dict:
    def ready():
        tp = kube.get("tokenpolicy", name, ns)
        c = condition(tp, "Ready")
        if not (c and c["status"] == "True"):
            return None
        st = tp["status"]
        if st.get("observedGeneration") != tp["metadata"]["generation"]:
            return None
        if replicas is not None and st.get("readyReplicas") != replicas:
            return None
        return tp
    return wait_until(f"TokenPolicy {ns}/{name} Ready", ready, timeout)
