"""A Pod's container, run with podman the way the kubelet would run it.

The container spec comes from a Deployment (the one the operator writes,
rendered by ``tokenpolicy render-deployment``, or one read from a cluster),
never typed again here. Each field becomes a podman flag:

==========================  ==============================================
securityContext             ``--user uid:gid``, ``--group-add fsGroup``,
                            ``--read-only`` (no tmpfs added: a Pod gets
                            none), ``--cap-drop``, ``no-new-privileges``,
                            podman's default seccomp profile (RuntimeDefault)
Secret volumes              a directory of files, root-owned, group fsGroup,
                            mode ``defaultMode``, mounted read-only
env                         ``value`` as is; ``secretKeyRef`` from the given
                            Secrets; ``fieldRef`` from the given Pod fields
ports and listen addresses  host network: each containerPort gets a free
                            loopback port, and every ``0.0.0.0:<containerPort>``
                            argument or env value becomes ``127.0.0.1:<that port>``
ServiceAccount token        with ``service_account`` given (and unless the Pod
                            opts out): token, ca.crt and namespace at
                            /var/run/secrets/kubernetes.io/serviceaccount, and
                            KUBERNETES_SERVICE_HOST/PORT naming the API server
resources.limits.memory     ``--memory``
==========================  ==============================================

Anything else in the spec that would change how the container runs is an
error, so that a new field cannot be silently ignored.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import requests

RUNTIME = os.environ.get("TOKENPOLICY_OCI_RUNTIME", "runc")
# runc, not crun: crun refuses the hybrid cgroup layout of some machines.
PODMAN = ["podman", "--runtime", RUNTIME]
IMAGE = os.environ.get("TOKENPOLICY_IMAGE", "localhost/tokenpolicy:test")
# Open files and processes: podman's defaults raise both to limits that a
# sandboxed machine may forbid the runtime to set ("error setting rlimit");
# a Pod gets its runtime's limits, never its own. The open files limit is
# this process's own; processes (threads count) a fixed 16384.
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)
LIMITS = ["--ulimit", f"nofile={_NOFILE[0]}:{_NOFILE[1]}", "--ulimit", "nproc=16384:16384"]

# Container fields this translation knows; any other one is refused.
KNOWN_CONTAINER = {"name", "image", "args", "env", "ports", "livenessProbe", "readinessProbe",
                   "resources", "securityContext", "volumeMounts", "imagePullPolicy",
                   "terminationMessagePath", "terminationMessagePolicy"}
KNOWN_POD = {"serviceAccountName", "securityContext", "containers", "volumes",
             "automountServiceAccountToken", "restartPolicy", "terminationGracePeriodSeconds",
             "dnsPolicy", "schedulerName", "serviceAccount",
             # Where a Pod is scheduled, not how its container runs.
             "affinity", "nodeSelector", "tolerations", "priorityClassName", "imagePullSecrets",
             "topologySpreadConstraints", "nodeName", "priority", "enableServiceLinks",
             "preemptionPolicy"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def podman(*args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
    return p


def image_exists(image: str = IMAGE) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def memory_flag(quantity: str) -> str:
    """A Kubernetes memory quantity as podman's --memory (bytes)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|k|M|G)?", quantity)
    if not m:
        raise AssertionError(f"memory limit {quantity!r} not understood")
    unit = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1000, "M": 1000**2, "G": 1000**3}
    return str(int(m.group(1)) * unit[m.group(2)])


@dataclass
class PodContainer:
    """One container of a Pod template, translated to podman flags."""

    pod: dict
    workdir: Path
    # Secret name -> {key: bytes or str}: what the kubelet would mount.
    secrets: dict
    # Pod fields for env fieldRef (metadata.name, metadata.namespace).
    fields: dict = field(default_factory=dict)
    # Extra mounts (host path, container path) beside the Pod's volumes.
    extra_mounts: list = field(default_factory=list)
    # Rewrites of the argument list (a Pod's context that this machine lacks).
    rewrite_args: Optional[Callable[[list[str]], list[str]]] = None
    image: Optional[str] = None
    # (API server URL, token, CA bytes, namespace): the in-cluster identity.
    service_account: Optional[tuple] = None
    name: str = field(default_factory=lambda: f"tp-{uuid.uuid4().hex[:10]}")
    host_ports: dict = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None

    @property
    def container(self) -> dict:
        containers = self.pod["containers"]
        assert len(containers) == 1, "one container per Pod"
        return containers[0]

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def port(self, name_or_number) -> int:
        """The loopback port standing for a containerPort (by name or number)."""
        for p in self.container.get("ports", []):
            if name_or_number in (p.get("name"), p["containerPort"]):
                return self.host_ports[p["containerPort"]]
        raise AssertionError(f"no containerPort {name_or_number!r} in {self.container.get('ports')}")

    def argv(self) -> tuple[list[str], dict]:
        """podman run's arguments, and the environment that carries secret values."""
        pod, c = self.pod, self.container
        unknown = (set(c) - KNOWN_CONTAINER) | (set(pod) - KNOWN_POD)
        assert not unknown, f"fields this translation does not know: {sorted(unknown)}"
        psc = pod.get("securityContext", {})
        sc = c.get("securityContext", {})
        flags = ["run", "--rm", "--name", self.name, "--network", "host", "--pull", "never", *LIMITS]
        env = dict(os.environ)

        # Who runs it.
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        gid = sc.get("runAsGroup", psc.get("runAsGroup"))
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root:
            assert uid not in (None, 0), "runAsNonRoot needs a numeric non-root runAsUser here"
        if uid is not None:
            flags += ["--user", f"{uid}:{gid if gid is not None else uid}"]
        fs_group = psc.get("fsGroup")
        for g in [*([fs_group] if fs_group is not None else []), *psc.get("supplementalGroups", [])]:
            flags += ["--group-add", str(g)]
        if sc.get("readOnlyRootFilesystem"):
            # A Pod gets no tmpfs on /tmp, /run or /var/tmp: neither does this.
            flags += ["--read-only", "--read-only-tmpfs=false"]
        caps = sc.get("capabilities", {})
        for cap in caps.get("drop", []):
            flags += ["--cap-drop", cap]
        for cap in caps.get("add", []):
            flags += ["--cap-add", cap]
        if sc.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        for profile in (sc.get("seccompProfile"), psc.get("seccompProfile")):
            if profile:
                assert profile["type"] == "RuntimeDefault", profile  # podman's default profile
        assert not sc.get("privileged"), "privileged"

        # Resources.
        limits = (c.get("resources") or {}).get("limits") or {}
        if "memory" in limits:
            flags += ["--memory", memory_flag(limits["memory"])]
        if "cpu" in limits:
            cpu = limits["cpu"]
            flags += ["--cpus", str(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu))]

        # Ports: the host network stands for the Pod's; each containerPort
        # gets a free loopback port.
        for p in c.get("ports", []):
            assert p.get("protocol", "TCP") == "TCP", p
            self.host_ports[p["containerPort"]] = free_port()

        def listen(a: str) -> str:
            m = re.fullmatch(r"0\.0\.0\.0:(\d+)", a)
            if not m:
                return a
            port = int(m.group(1))
            assert port in self.host_ports, f"listens on {a}, which no containerPort declares"
            return f"127.0.0.1:{self.host_ports[port]}"

        # Environment.
        for e in c.get("env", []):
            if "value" in e:
                flags += ["--env", f"{e['name']}={listen(e['value'])}"]
                continue
            src = e["valueFrom"]
            if "secretKeyRef" in src:
                ref = src["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            elif "fieldRef" in src:
                value = self.fields[src["fieldRef"]["fieldPath"]]
            else:
                raise AssertionError(f"env source not understood: {src}")
            env[e["name"]] = value.decode() if isinstance(value, bytes) else value
            flags += ["--env", e["name"]]  # the value travels in podman's environment, not argv

        # Volumes: Secrets as the kubelet writes them.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            assert set(v) == {"name", "secret"}, f"only Secret volumes are translated: {v}"
            assert not m.get("subPath"), m
            host = self._secret_dir(v["name"], v["secret"], fs_group)
            flags += ["-v", f"{host}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        for host, path in self.extra_mounts:
            flags += ["-v", f"{host}:{path}:ro"]

        # The ServiceAccount, as the kubelet projects it.
        if self.service_account and pod.get("automountServiceAccountToken", True):
            server, token, ca, namespace = self.service_account
            m = re.fullmatch(r"https://([^:/]+):(\d+)/?", server)
            assert m, server
            sa = self.workdir / f"{self.name}-serviceaccount"
            sa.mkdir()
            for fname, value in (("token", token), ("ca.crt", ca), ("namespace", namespace)):
                f = sa / fname
                f.write_bytes(value if isinstance(value, bytes) else value.encode())
                os.chown(f, 0, fs_group if fs_group is not None else 0)
                f.chmod(0o644 if fs_group is None else 0o640)
            sa.chmod(0o755)
            flags += ["-v", f"{sa}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                      "--env", f"KUBERNETES_SERVICE_HOST={m.group(1)}",
                      "--env", f"KUBERNETES_SERVICE_PORT={m.group(2)}"]

        args = list(c.get("args", []))
        if self.rewrite_args:
            args = self.rewrite_args(args)
        args = [listen(a) for a in args]
        assert "command" not in c, "the image's ENTRYPOINT runs"
        return [*flags, self.image or c["image"], *args], env

    def _secret_dir(self, volume: str, spec: dict, fs_group: Optional[int]) -> Path:
        data = self.secrets[spec["secretName"]]
        d = self.workdir / f"{self.name}-{volume}"
        d.mkdir(parents=True)
        mode = spec.get("defaultMode", 0o644)
        items = spec.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            f = d / item["path"]
            value = data[item["key"]]
            f.write_bytes(value if isinstance(value, bytes) else value.encode())
            os.chown(f, 0, fs_group if fs_group is not None else 0)
            f.chmod(item.get("mode", mode))
        os.chown(d, 0, fs_group if fs_group is not None else 0)
        d.chmod(0o755)
        return d

    def start(self) -> "PodContainer":
        argv, env = self.argv()
        with open(self.log, "ab") as out:
            out.write(f"===== {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen([*PODMAN, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def probe(self, kind: str) -> requests.Response:
        """GET on the port and path that the container's probe names."""
        http = self.container[kind]["httpGet"]
        return requests.get(f"http://127.0.0.1:{self.port(http['port'])}{http['path']}", timeout=2)

    def wait_ready(self, timeout: float = 60) -> "PodContainer":
        """Until the readiness probe answers 200, as the kubelet would wait."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"container {self.name} exited ({self.proc.returncode}):\n{self.text()[-4000:]}")
            try:
                r = self.probe("readinessProbe")
                if r.status_code == 200:
                    return self
                last = f"{r.status_code} {r.text[:200]}"
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready after {timeout}s (last: {last}):\n{self.text()[-4000:]}")

    def stop(self) -> None:
        podman("rm", "-f", "-t", "5", self.name, check=False, timeout=60)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
