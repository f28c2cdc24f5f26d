"""The container image, as built by tests/image/build.sh, run with podman.

The image itself: one binary, no shell, the OCI labels, ``--help``. Then the
token service in it, run the way the operator's Deployment runs it: the
Deployment comes from the image's own ``tokenpolicy render-deployment`` (the
code the operator applies), and tests/image/podman_pod.py turns its Pod
template into podman flags (user 65532, read-only root, every capability
dropped, no-new-privileges, Secret files 0440 of group fsGroup, the
arguments, environment, ports and probes). Against real redis-server
processes on 127.0.0.1, one plain, one TLS-only with a private CA and client
certificates: log in, verify, refresh, log out, /metrics, and the probes.

One change to the arguments, and only one: the Pod follows its TokenPolicy
in the cluster (``--policy-ref NAMESPACE/NAME``); with no API server here,
the same manifest is mounted read-only and named with ``--policy``.
tests/e2e/test_06b_operator_image.py runs the image against a real API
server, with the arguments untouched.

Environment: TOKENPOLICY_IMAGE (default localhost/tokenpolicy:test),
TOKENPOLICY_OCI_RUNTIME (default runc).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from podman_pod import IMAGE, LIMITS, PodContainer, free_port, image_exists, podman  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# examples/users.htpasswd: demo / demo-password (bcrypt).
USERS = (ROOT / "examples" / "users.htpasswd").read_text()
USER, PASSWORD = "demo", "demo-password"
TOKEN_SECONDS = 2
POLICY_IN_POD = "/etc/tokenpolicy/policy/tokenpolicy.yaml"


@pytest.fixture(scope="session")
def image() -> str:
    if not image_exists(IMAGE):
        pytest.fail(f"image {IMAGE} not built (bash tests/image/build.sh)")
    return IMAGE


def redis_server() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class Redis:
    def __init__(self, workdir: Path, *args: str, tls_port: bool = False):
        self.port = free_port()
        port_args = ["--port", "0", "--tls-port", str(self.port)] if tls_port else ["--port", str(self.port)]
        self.log = workdir / f"redis-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([redis_server(), *port_args, "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(workdir), *args],
                                         stdout=out, stderr=subprocess.STDOUT)

    def wait(self, cli: list[str]) -> "Redis":
        for _ in range(100):
            p = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *cli, "PING"],
                               capture_output=True, text=True)
            if p.stdout.strip() == "PONG":
                return self
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"redis not answering:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def manifest(redis: dict, name: str = "demo", ns: str = "team") -> dict:
    return {"apiVersion": "auth.tokenpolicy.io/v1alpha1", "kind": "TokenPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 2, "sessionExpirationTime": "1h", "tokenExpirationTime": f"{TOKEN_SECONDS}s",
                     "expiredTokenRenewLimit": "5m",
                     "users": {"secretRef": {"name": "demo-users", "key": "htpasswd"}},
                     "redis": redis}}


def render(image: str, workdir: Path, tp: dict) -> dict:
    """The Deployment the operator writes for `tp`, from the image's own binary."""
    f = workdir / f"{tp['metadata']['name']}.yaml"
    f.write_text(yaml.safe_dump(tp))
    f.chmod(0o644)
    p = podman("run", "--rm", *LIMITS, "--network", "none", "--read-only", "-v", f"{f}:/in/tokenpolicy.yaml:ro",
               image, "render-deployment", "/in/tokenpolicy.yaml", "--image", image)
    return json.loads(p.stdout)


def signing_key_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def volume_secret(deployment: dict, volume: str) -> str:
    for v in deployment["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == volume:
            return v["secret"]["secretName"]
    raise AssertionError(f"no volume {volume}")


def policy_file(tp_path: Path) -> callable:
    """`--policy-ref NS/NAME` -> `--policy <the same manifest, mounted>`."""
    def rewrite(args: list[str]) -> list[str]:
        assert args[0] == "serve", args
        i = args.index("--policy-ref")
        meta = yaml.safe_load(tp_path.read_text())["metadata"]
        ref = f"{meta['namespace']}/{meta['name']}"
        assert args[i + 1] == ref, args
        return [*args[:i], "--policy", POLICY_IN_POD, *args[i + 2:]]
    return rewrite


def pods(image: str, workdir: Path, tp: dict, secrets: dict, n: int = 2) -> list[PodContainer]:
    d = render(image, workdir, tp)
    pod = d["spec"]["template"]["spec"]
    assert d["spec"]["replicas"] == n
    secrets = dict(secrets)
    secrets[volume_secret(d, "signing-keys")] = {"signing.pem": signing_key_pem()}
    tp_path = workdir / f"{tp['metadata']['name']}.yaml"
    started = []
    for _ in range(n):
        c = PodContainer(pod=pod, workdir=workdir, secrets=secrets, image=image,
                         extra_mounts=[(str(tp_path), POLICY_IN_POD)], rewrite_args=policy_file(tp_path))
        started.append(c.start())
    return started


@pytest.fixture
def workdir(tmp_path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


# --------------------------------------------------------------------------
# The image itself
# --------------------------------------------------------------------------


def test_the_image_holds_one_binary_no_shell_and_its_labels(image):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    labels = info["Config"]["Labels"] or {}
    for key in ("title", "description", "licenses", "version", "revision", "created", "base.name"):
        value = labels.get(f"org.opencontainers.image.{key}", "")
        assert value and value != "unknown", (key, labels)
    assert info["Config"]["Entrypoint"] == ["tokenpolicy"]
    assert info["Config"]["User"] == "65532:65532"
    print(f"\n[image] {image}: {info['Size'] / 1e6:.1f} MB, base {labels['org.opencontainers.image.base.name']}")

    # What is in it: one executable (the dynamic loader and libraries aside), no shell.
    mount = podman("image", "mount", image).stdout.strip()
    try:
        root = Path(mount)
        executables = sorted(
            str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o111
            and ".so" not in p.name)
        assert executables == ["usr/local/bin/tokenpolicy"], executables
        for shell in ("bin/sh", "usr/bin/sh", "bin/bash", "bin/dash", "usr/bin/busybox"):
            assert not (root / shell).exists() and not (root / shell).is_symlink(), shell
        assert (root / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
        assert (root / "usr/share/zoneinfo/UTC").exists()
        assert "nonroot:x:65532:65532:" in (root / "etc/passwd").read_text()
    finally:
        podman("image", "unmount", image, check=False)

    # No shell at run time either: asking for one fails.
    p = podman("run", "--rm", *LIMITS, "--network", "none", "--entrypoint", "/bin/sh", image, "-c", "true",
               check=False)
    assert "no such file" in (p.stderr + p.stdout).lower(), p.stderr
    assert p.returncode != 0


def test_help_runs_in_the_image_as_nonroot(image):
    default = podman("run", "--rm", *LIMITS, "--network", "none", "--user", "65532:65532", "--read-only",
                     "--cap-drop", "ALL", "--security-opt", "no-new-privileges", image)
    assert "serve" in default.stdout and "operator" in default.stdout, default.stdout
    version = podman("run", "--rm", *LIMITS, "--network", "none", image, "--version").stdout
    assert version.strip().startswith("tokenpolicy "), version
    whoami = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert whoami == "65532:65532"


# --------------------------------------------------------------------------
# The token service, run as the Deployment runs it
# --------------------------------------------------------------------------


def login(url: str) -> dict:
    r = requests.post(url + "/v1/login", json={"username": USER, "password": PASSWORD}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def verify(url: str, token: str) -> requests.Response:
    return requests.get(url + "/v1/verify", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def exp_of(token: str) -> int:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]


def metric(url: str, line: str) -> float:
    for row in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {line}")


def session_round(a: PodContainer, b: PodContainer) -> None:
    """Log in on one container, verify on the other, refresh the expired
    token once, log out, and see the session revoked on the other."""
    for c in (a, b):
        c.wait_ready()
        assert c.probe("livenessProbe").status_code == 200
        assert c.probe("readinessProbe").text.strip() != ""
    url_a, url_b = (f"http://127.0.0.1:{c.port('http')}" for c in (a, b))
    metrics_a = f"http://127.0.0.1:{a.port('metrics')}"

    issued = login(url_a)
    token = issued["access_token"]
    assert verify(url_b, token).status_code == 200
    time.sleep(max(0.0, exp_of(token) - time.time()) + 0.5)
    r = requests.post(url_b + "/v1/refresh", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    fresh = r.json()["access_token"]
    assert fresh != token
    assert verify(url_a, fresh).status_code == 200

    assert metric(metrics_a, 'tokenpolicy_logins_total{outcome="success"}') >= 1
    assert metric(metrics_a, 'tokenpolicy_verify_decisions_total{outcome="allowed"}') >= 1

    r = requests.post(url_a + "/v1/logout", headers={"Authorization": f"Bearer {fresh}"}, timeout=10)
    assert r.status_code == 204, r.text
    deadline = time.monotonic() + 5
    while True:
        r = verify(url_b, fresh)
        if r.status_code == 401:
            assert r.json()["error"]["code"] == "REVOKED_SESSION", r.text
            break
        assert time.monotonic() < deadline, f"still {r.status_code} on the other replica"
        time.sleep(0.1)
    # The process, as the kernel sees it: uid and gid 65532 with the
    # fsGroup beside, no capability, no new privileges.
    for c in (a, b):
        assert c.running(), c.text()[-3000:]
        pid = podman("inspect", "--format", "{{.State.Pid}}", c.name).stdout.strip()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        assert status["Uid"].split() == ["65532"] * 4, status["Uid"]
        assert status["Gid"].split()[0] == str(c.pod["containers"][0]["securityContext"]["runAsGroup"])
        assert str(c.pod["securityContext"]["fsGroup"]) in status["Groups"].split(), status["Groups"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status["CapBnd"]
        assert status["NoNewPrivs"].strip() == "1"
        assert status["Seccomp"].strip() == "2", "no seccomp filter"
        # Its root file system is mounted read-only; so is every Secret directory.
        mounts = {f.split()[4]: f.split()[5].split(",") for f in
                  Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}
        assert "ro" in mounts["/"], mounts["/"]
        for m in c.container["volumeMounts"]:
            assert "ro" in mounts[m["mountPath"]], (m["mountPath"], mounts[m["mountPath"]])


def test_token_service_image_runs_as_its_deployment_on_redis(image, workdir):
    redis = Redis(workdir).wait([])
    tp = manifest({"urlSecretRef": {"name": "redis", "key": "url"}})
    secrets = {"demo-users": {"htpasswd": USERS}, "redis": {"url": f"redis://127.0.0.1:{redis.port}/"}}
    started = pods(image, workdir, tp, secrets)
    try:
        a = started[0]
        c = a.container
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "--signing-keys-dir" in c["args"] and "--users" in c["args"]
        session_round(*started)
        # Both replicas' sessions live in the shared Redis, under the Deployment's prefix.
        prefix = next(e["value"] for e in c["env"] if e["name"] == "TOKENPOLICY_REDIS_PREFIX")
        keys = subprocess.run(["redis-cli", "-p", str(redis.port), "--scan", "--pattern", f"{prefix}*"],
                              capture_output=True, text=True).stdout.split()
        assert keys, f"no key under {prefix}"
    finally:
        for s in started:
            s.stop()
        redis.stop()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(issuer, cn: str, ca: bool, usage=None, names=()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_key, issuer_name = (key, _name(cn)) if issuer is None else (issuer[0], issuer[1].subject)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return key, b.sign(issuer_key, hashes.SHA256())


def _pem(key=None, cert=None) -> bytes:
    if cert is not None:
        return cert.public_bytes(serialization.Encoding.PEM)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_token_service_image_trusts_a_private_ca_for_redis_tls(image, workdir):
    ca = _cert(None, "tokenpolicy image test CA", ca=True)
    server = _cert(ca, "redis", False, [ExtendedKeyUsageOID.SERVER_AUTH],
                   [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert(ca, "tokenpolicy", False, [ExtendedKeyUsageOID.CLIENT_AUTH])
    files = {"ca.pem": _pem(cert=ca[1]), "server.pem": _pem(cert=server[1]), "server.key": _pem(server[0]),
             "client.pem": _pem(cert=client[1]), "client.key": _pem(client[0])}
    for name, data in files.items():
        (workdir / name).write_bytes(data)
    redis = Redis(workdir, "--tls-cert-file", str(workdir / "server.pem"),
                  "--tls-key-file", str(workdir / "server.key"), "--tls-ca-cert-file", str(workdir / "ca.pem"),
                  "--tls-auth-clients", "yes", tls_port=True)
    redis.wait(["--tls", "--cacert", str(workdir / "ca.pem"), "--cert", str(workdir / "client.pem"),
                "--key", str(workdir / "client.key")])
    tp = manifest({"urlSecretRef": {"name": "redis", "key": "url"},
                   "tls": {"caSecretRef": {"name": "redis-ca", "key": "ca.pem"},
                           "clientSecretName": "redis-client"}})
    secrets = {"demo-users": {"htpasswd": USERS},
               "redis": {"url": f"rediss://127.0.0.1:{redis.port}/"},
               "redis-ca": {"ca.pem": files["ca.pem"]},
               "redis-client": {"tls.crt": files["client.pem"], "tls.key": files["client.key"]}}
    started = pods(image, workdir, tp, secrets)
    try:
        args = started[0].container["args"]
        assert "--redis-ca-file" in args and "--redis-client-cert" in args, args
        session_round(*started)
    finally:
        for s in started:
            s.stop()

    # The CA file is what makes it work: without it, the image's own bundle
    # does not vouch for the private CA, and the service never gets ready.
    d = render(image, workdir, tp)
    pod = d["spec"]["template"]["spec"]
    secrets[volume_secret(d, "signing-keys")] = {"signing.pem": signing_key_pem()}
    tp_path = workdir / "demo.yaml"

    def without_ca(args: list[str]) -> list[str]:
        args = policy_file(tp_path)(args)
        i = args.index("--redis-ca-file")
        return args[:i] + args[i + 2:]
    lone = PodContainer(pod=pod, workdir=workdir, secrets=secrets, image=image,
                        extra_mounts=[(str(tp_path), POLICY_IN_POD)], rewrite_args=without_ca).start()
    try:
        answered = 0
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and lone.running():
            try:
                assert lone.probe("readinessProbe").status_code == 503, "ready without the CA"
                answered += 1
            except requests.RequestException:
                pass
            time.sleep(0.25)
        assert answered, f"the service never answered its probe:\n{lone.text()[-3000:]}"
        assert "UnknownIssuer" in lone.text(), lone.text()[-3000:]
    finally:
        lone.stop()
        redis.stop()


def test_secret_files_are_read_through_the_fs_group_only(image, workdir):
    """Secret files are 0440 root:fsGroup. Without the Pod's fsGroup as a
    supplementary group, uid 65532 cannot read them and the service says so
    and stops: the group, not luck, is what lets it read its keys."""
    tp = manifest({"urlSecretRef": {"name": "redis", "key": "url"}})
    tp["spec"]["replicas"] = 1
    del tp["spec"]["redis"]
    d = render(image, workdir, tp)
    pod = json.loads(json.dumps(d["spec"]["template"]["spec"]))
    c = pod["containers"][0]
    # The user's own group is not the fsGroup here: only the fsGroup gives access.
    c["securityContext"]["runAsGroup"] = 65533
    secrets = {"demo-users": {"htpasswd": USERS}, volume_secret(d, "signing-keys"): {"signing.pem": signing_key_pem()}}
    tp_path = workdir / "demo.yaml"
    ok = PodContainer(pod=pod, workdir=workdir, secrets=secrets, image=image,
                      extra_mounts=[(str(tp_path), POLICY_IN_POD)], rewrite_args=policy_file(tp_path)).start()
    try:
        ok.wait_ready()
        login(f"http://127.0.0.1:{ok.port('http')}")
    finally:
        ok.stop()

    del pod["securityContext"]["fsGroup"]
    refused = PodContainer(pod=pod, workdir=workdir, secrets=secrets, image=image,
                           extra_mounts=[(str(tp_path), POLICY_IN_POD)], rewrite_args=policy_file(tp_path)).start()
    try:
        refused.proc.wait(timeout=30)
        assert refused.proc.returncode != 0
        assert "ermission denied" in refused.text(), refused.text()[-3000:]
    finally:
        refused.stop()
