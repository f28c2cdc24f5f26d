"""Fixtures of the network-fault scenarios: a bridge of namespaces with two
`tokenpolicy serve` replicas and their store, each process in a namespace
of its own: one redis-server (``cluster``), a master with two Redis
replicas and three Sentinels (``sentinel_set``), or a three-master Redis
Cluster (``redis_cluster``). The load is driven from this host.

Environment:
    TOKENPOLICY_BIN    the binary under test (as in the integration suite)
    NETFAULT_SECONDS   length of each scenario (default 20; 60 for the long form)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from netns import Net, can_run, wait_port  # noqa: E402
from relay import DelayRelay  # noqa: E402
from support.procs import Process, binary_path, child_env, wait_http, wait_until  # noqa: E402,E501

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


def cli(ip: str, port: int, *args: str, timeout: float = 5.0) -> str:
    """``redis-cli`` from this host to a node on the bridge."""
    out = subprocess.run(["redis-cli", "-h", ip, "-p", str(port), *args],
                         capture_output=True, timeout=timeout, text=True)
    return out.stdout.strip()


def info(ip: str, port: int, section: str) -> dict:
    text = cli(ip, port, "INFO", section)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def redis_server() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class Hosts:
    """Two ``tokenpolicy serve`` replicas (a and b), each in its namespace,
    on the store that a subclass starts in namespaces of its own."""

    def __init__(self, net: Net, workdir: Path, relay=None, reorder: bool = False):
        self.net = net
        self.relay = relay
        self.reorder = reorder
        self.forwarders: dict = {}
        self.workdir = workdir
        self.procs: list[Process] = []
        self.add_store()
        self.hosts = {name: net.add(name) for name in ("a", "b")}
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

    def add_store(self) -> None:
        raise NotImplementedError

    def start_store(self) -> None:
        raise NotImplementedError

    @property
    def redis_url(self) -> str:
        raise NotImplementedError

    @property
    def urls(self) -> dict:
        return {n: f"http://{h.ip}:{SERVE_PORT}" for n, h in self.hosts.items()}

    def spawn(self, name: str, host, argv: list, env=None) -> Process:
        p = Process(name, host.argv(*argv), self.workdir / f"{name}.log", env=env)
        self.procs.append(p.start())
        return p

    def start(self):
        self.start_store()
        for name, h in self.hosts.items():
            self.spawn(f"replica-{name}", h, [
                str(binary_path()), "serve", "--policy", str(self.policy_file),
                "--users", str(self.users_file), "--listen", f"{h.ip}:{SERVE_PORT}",
                "--redis", self.redis_url, "--signing-key", str(self.key_file),
                "--max-logins-per-user", "1000000"], env=child_env(RUST_LOG="info"))
        for name, url in self.urls.items():
            wait_http(url + "/readyz", headers={"Connection": "close"}, timeout=20)
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(timeout=3)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_text(limit=4000)}" for p in self.procs)


class Cluster(Hosts):
    """One redis-server (``redis``) and the replicas."""

    def add_store(self) -> None:
        self.redis_host = self.net.add("redis")

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host.ip}:{REDIS_PORT}/"

    def start_store(self) -> None:
        h = self.redis_host
        self.spawn("redis", h, [
            redis_server(), "--bind", h.ip, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(self.workdir)])
        wait_port(h.ip, REDIS_PORT)
        if self.relay is not None:
            for r in self.hosts.values():
                self.net.redirect(r, h, REDIS_PORT, *self.relay.listen)
        if self.reorder:
            # Both ways of the Redis link: Redis's packets to the replicas,
            # and each replica's packets to Redis.
            self.forwarders = {"redis": self.forwarder(h, [r.ip for r in self.hosts.values()])}
            for name, r in self.hosts.items():
                self.forwarders[name] = self.forwarder(r, [h.ip])

    def forwarder(self, host, peers: list) -> Process:
        stats = self.workdir / f"reorder-{host.name}.json"
        argv = [sys.executable, str(HERE / "reorder.py"), "--stats", str(stats),
                "--seed", str(len(self.procs) + 23)]
        for peer in peers:
            argv += ["--peer", peer]
        p = self.spawn(f"reorder-{host.name}", host, argv)
        wait_until(f"the reordering forwarder in {host.name}", stats.exists, timeout=10)
        return p

    def reordering(self, on: bool) -> None:
        """Turns the reordering on or off in every forwarder."""
        for p in self.forwarders.values():
            p.check_running()
            os.kill(p.pid, signal.SIGUSR1 if on else signal.SIGUSR2)

    def reorder_stats(self) -> dict:
        """Each forwarder's counters, by namespace."""
        out = {}
        for name in self.forwarders:
            try:
                out[name] = json.loads((self.workdir / f"reorder-{name}.json").read_text())
            except (OSError, ValueError):
                out[name] = {}
        return out


#: The Sentinel set's name of the master.
MASTER_NAME = "tokenpolicy"
SENTINEL_PORT = 26379
#: What the docs recommend on every Redis that may be master
#: (docs/src/redis.md); NETFAULT_MIN_REPLICAS_MAX_LAG tries another lag.
MIN_REPLICAS = ("--min-replicas-to-write", "1", "--min-replicas-max-lag",
                os.environ.get("NETFAULT_MIN_REPLICAS_MAX_LAG", "1"))
#: Failure detection of the Sentinels, as the docs recommend it: longer than
#: the lag above (a cut-off master stops taking writes before a replica is
#: promoted), short enough that a failover happens well inside a scenario's
#: partition (NETFAULT_DOWN_AFTER_MS tries another).
DOWN_AFTER_MS = int(os.environ.get("NETFAULT_DOWN_AFTER_MS", "4000"))


class SentinelSet(Hosts):
    """A master (``m``), two Redis replicas (``r1``, ``r2``) and three
    Sentinels (``s1``..``s3``, quorum 2), each in its namespace, every Redis
    with the recommended ``min-replicas-to-write`` settings; the replicas
    reach it through the Sentinels."""

    def add_store(self) -> None:
        self.master = self.net.add("m")
        self.redis_replicas = [self.net.add(f"r{i}") for i in (1, 2)]
        self.sentinels = [self.net.add(f"s{i}") for i in (1, 2, 3)]

    @property
    def redis_url(self) -> str:
        return ("redis+sentinel://" + ",".join(f"{s.ip}:{SENTINEL_PORT}" for s in self.sentinels)
                + f"/{MASTER_NAME}")

    def redis(self, host, *extra: str) -> None:
        d = self.workdir / host.name
        d.mkdir(exist_ok=True)
        self.spawn(f"redis-{host.name}", host, [
            redis_server(), "--bind", host.ip, "--port", str(REDIS_PORT), "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--dir", str(d), *MIN_REPLICAS,
            "--repl-diskless-sync-delay", "0", *extra])
        wait_port(host.ip, REDIS_PORT)

    def start_store(self) -> None:
        m = self.master
        self.redis(m)
        for r in self.redis_replicas:
            self.redis(r, "--replicaof", m.ip, str(REDIS_PORT))
        # In sync: counted by the master's min-replicas-to-write.
        wait_until("both Redis replicas in sync", lambda: info(
            m.ip, REDIS_PORT, "replication").get("min_slaves_good_slaves") == "2", timeout=20)
        sentinel = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        for s in self.sentinels:
            d = self.workdir / s.name
            d.mkdir(exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"port {SENTINEL_PORT}\nbind {s.ip}\nprotected-mode no\ndir {d}\n"
                f"sentinel monitor {MASTER_NAME} {m.ip} {REDIS_PORT} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER_NAME} 4000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 2\n")
            self.spawn(f"sentinel-{s.name}", s, [sentinel, str(conf)])
        for s in self.sentinels:
            def ready(s=s):
                lines = cli(s.ip, SENTINEL_PORT, "SENTINEL", "MASTER", MASTER_NAME).splitlines()
                got = dict(zip(lines[::2], lines[1::2]))
                return got.get("num-slaves") == "2" and got.get("num-other-sentinels") == "2"
            wait_until(f"{s.name} to see both replicas and the other Sentinels", ready,
                       timeout=30)

    def master_ip(self) -> str:
        """The master's address as the Sentinels on the majority side see it."""
        out = cli(self.sentinels[0].ip, SENTINEL_PORT, "SENTINEL", "GET-MASTER-ADDR-BY-NAME",
                  MASTER_NAME).splitlines()
        return out[0] if out else ""


class ShardedCluster(Hosts):
    """A Redis Cluster of three masters (``c1``..``c3``, no replicas), each
    in its namespace."""

    NODE_TIMEOUT_MS = 1000

    def add_store(self) -> None:
        self.nodes = [self.net.add(f"c{i}") for i in (1, 2, 3)]

    @property
    def redis_url(self) -> str:
        return "redis+cluster://" + ",".join(f"{n.ip}:{REDIS_PORT}" for n in self.nodes)

    def start_store(self) -> None:
        for n in self.nodes:
            d = self.workdir / n.name
            d.mkdir(exist_ok=True)
            self.spawn(f"redis-{n.name}", n, [
                redis_server(), "--bind", n.ip, "--port", str(REDIS_PORT), "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--dir", str(d),
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS)])
            wait_port(n.ip, REDIS_PORT)
        out = subprocess.run(["redis-cli", "--cluster", "create",
                              *[f"{n.ip}:{REDIS_PORT}" for n in self.nodes], "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            pytest.fail(f"redis-cli --cluster create: {out.stdout}{out.stderr}")
        for n in self.nodes:
            wait_until(f"{n.name} cluster_state:ok", lambda n=n: "cluster_state:ok" in cli(
                n.ip, REDIS_PORT, "CLUSTER", "INFO"), timeout=20)

    def slots_of(self, node) -> list:
        """The slot ranges that ``node`` serves, as (first, last)."""
        for line in cli(node.ip, REDIS_PORT, "CLUSTER", "NODES").splitlines():
            f = line.split()
            if "myself" in f[2]:
                return [tuple(map(int, (r + "-" + r).split("-")[:2])) for r in f[8:]
                        if not r.startswith("[")]
        return []


def _hosts(request, make):
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
        c = make(net)
        if request.node.get_closest_marker("relay") is not None:
            relay = c.relay = DelayRelay(net.host_ip, RELAY_PORT, c.redis_host.ip,
                                         REDIS_PORT).start()
        c.start()
        yield c
    finally:
        if c is not None:
            c.stop()
        if relay is not None:
            relay.stop()
        net.stop()


@pytest.fixture
def cluster(request, tmp_path):
    """One Redis and the replicas, started; ``@pytest.mark.relay`` puts a
    delaying relay (``relay.py``) on every replica's way to Redis, and
    ``@pytest.mark.reorder`` a reordering forwarder (``reorder.py``) on
    each end of every Redis link."""
    reorder = request.node.get_closest_marker("reorder") is not None
    yield from _hosts(request, lambda net: Cluster(net, tmp_path, reorder=reorder))


@pytest.fixture
def sentinel_set(request, tmp_path):
    """A Sentinel-watched master with two Redis replicas, and the replicas."""
    yield from _hosts(request, lambda net: SentinelSet(net, tmp_path))


@pytest.fixture
def redis_cluster(request, tmp_path):
    """A three-master Redis Cluster, and the replicas."""
    yield from _hosts(request, lambda net: ShardedCluster(net, tmp_path))


def pytest_configure(config):
    config.addinivalue_line("markers", "relay: Redis reached through the delaying relay")
    config.addinivalue_line("markers", "reorder: the Redis links through the reordering forwarders")
