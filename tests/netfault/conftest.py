"""Fixtures of the network-fault scenarios: a bridge of namespaces with
redis-server in one and two `tokenpolicy serve` replicas in two others, the
load driven from this host.

Environment:
    TOKENPOLICY_BIN    the binary under test (as in the integration suite)
    NETFAULT_SECONDS   length of each scenario (default 20; 60 for the long form)
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from netns import HOST_IP, Net, can_run, wait_port  # noqa: E402
from relay import DelayRelay  # noqa: E402
from support.procs import Process, binary_path, child_env, wait_http  # noqa: E402

REDIS_PORT = 6379
SERVE_PORT = 8080
RELAY_PORT = 16379
#: Sessions end within a scenario; tokens outlive the lag bound.
POLICY = dict(session=20, token=15, renew=10, grace=1)
USERS = {f"user{i}": f"password-{i}" for i in range(6)}


def seconds() -> float:
    return float(os.environ.get("NETFAULT_SECONDS", "20"))


def policy_yaml(session, token, renew, grace) -> str:
    return (
        "apiVersion: auth.tokenpolicy.io/v1alpha1\nkind: TokenPolicy\n"
        "metadata: {name: netfault}\nspec:\n"
        f"  sessionExpirationTime: {session}s\n  tokenExpirationTime: {token}s\n"
        f"  expiredTokenRenewLimit: {renew}s\n  refreshGracePeriod: {grace}s\n"
    )


class Cluster:
    """Redis and the replicas, each in its namespace."""

    def __init__(self, net: Net, workdir: Path, relay=None):
        self.net = net
        self.relay = relay
        self.workdir = workdir
        self.redis_host = net.add("redis")
        self.hosts = {name: net.add(name) for name in ("a", "b")}
        self.procs: list[Process] = []
        key = Ed25519PrivateKey.generate()
        self.key_file = workdir / "signing.pem"
        self.key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.users_file = workdir / "users.htpasswd"
        self.users_file.write_text("".join(
            f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for u, p in USERS.items()))
        self.policy_file = workdir / "policy.yaml"
        self.policy_file.write_text(policy_yaml(**POLICY))

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host.ip}:{REDIS_PORT}/"

    @property
    def urls(self) -> dict:
        return {n: f"http://{h.ip}:{SERVE_PORT}" for n, h in self.hosts.items()}

    def start(self) -> "Cluster":
        redis = shutil.which("redis-server") or "/usr/bin/redis-server"
        r = Process("redis", self.redis_host.argv(
            redis, "--bind", self.redis_host.ip, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.workdir)),
            self.workdir / "redis.log")
        self.procs.append(r.start())
        wait_port(self.redis_host.ip, REDIS_PORT)
        for name, h in self.hosts.items():
            if self.relay is not None:
                self.net.redirect(h, self.redis_host, REDIS_PORT, *self.relay.listen)
            argv = h.argv(
                str(binary_path()), "serve", "--policy", str(self.policy_file),
                "--users", str(self.users_file), "--listen", f"{h.ip}:{SERVE_PORT}",
                "--redis", self.redis_url, "--signing-key", str(self.key_file),
                "--max-logins-per-user", "1000000")
            p = Process(f"replica-{name}", argv, self.workdir / f"replica-{name}.log",
                        env=child_env(RUST_LOG="info"))
            self.procs.append(p.start())
        for name, url in self.urls.items():
            wait_http(url + "/readyz", headers={"Connection": "close"}, timeout=20)
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_text(limit=4000)}" for p in self.procs)


@pytest.fixture
def cluster(request, tmp_path):
    """The hosts, started; ``@pytest.mark.relay`` puts a delaying relay
    (``relay.py``) on every replica's way to Redis."""
    why = can_run()
    if why:
        pytest.fail(f"the network-fault scenarios cannot run here: {why}")
    if not binary_path().exists():
        pytest.fail(f"no tokenpolicy binary at {binary_path()} (TOKENPOLICY_BIN)")
    net = Net()
    c = None
    relay = None
    try:
        net.start()
        if request.node.get_closest_marker("relay") is not None:
            relay = DelayRelay(HOST_IP, RELAY_PORT, "10.77.0.10", REDIS_PORT).start()
        c = Cluster(net, tmp_path, relay)
        assert c.redis_host.ip == "10.77.0.10"
        c.start()
        yield c
    finally:
        if c is not None:
            c.stop()
        if relay is not None:
            relay.stop()
        net.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "relay: Redis reached through the delaying relay")
