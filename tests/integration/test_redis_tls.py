"""The token service on Redis over TLS (`rediss://`, `rediss+sentinel://`,
`rediss+cluster://`).

Real redis-server / redis-sentinel processes listening only on a TLS port
(`--port 0 --tls-port P`), with certificates made here: a private CA, a
server certificate for 127.0.0.1, a client certificate the servers require
(`tls-auth-clients yes`), and the wrong ones (another CA, another name). The
service trusts the private CA through --redis-ca-file and presents its client
certificate through --redis-client-cert / --redis-client-key.
"""

from __future__ import annotations

import datetime
import ipaddress
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import HTTP_TIMEOUT, ManagedProcess, binary_path, child_env, free_port, redis_server_path
from test_redis_ha import HA_POLICY, MARGIN, race, redis_sentinel_path, wait_for
from test_token_service import (assert_error, assert_verified, check_token_body, login, login_ok, logout,
                                poll, refresh, sleep_until, verify)

# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca, cn: str, usage, names: list) -> tuple:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)


@pytest.fixture(scope="module")
def pki(env) -> Pki:
    d = env.workdir / "redis-tls"
    d.mkdir(exist_ok=True)
    ca, other = _ca("tokenpolicy test CA"), _ca("another CA")
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    made = {
        # Redis nodes talk to each other (replication, cluster bus) with this one too.
        "server": _leaf(ca, "redis", server, loopback),
        "client": _leaf(ca, "tokenpolicy", [ExtendedKeyUsageOID.CLIENT_AUTH], []),
        "rogue": _leaf(other, "redis", server, loopback),
        "misnamed": _leaf(ca, "redis", server, [x509.DNSName("redis.elsewhere.example")]),
    }
    for name, (key, cert) in made.items():
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{name}.key", key)
    (d / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    return Pki(d)


# --------------------------------------------------------------------------
# TLS-only Redis nodes
# --------------------------------------------------------------------------


def tls_cli(pki: Pki, port: int, *args: str, timeout: float = 10.0,
            insecure: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "--tls",
                           *(["--insecure"] if insecure else []),
                           "--cacert", pki.path("ca.pem"), "--cert", pki.path("client.pem"),
                           "--key", pki.path("client.key"), *args],
                          capture_output=True, timeout=timeout, text=True)


def tls_args(pki: Pki, cert: str = "server") -> list[str]:
    return ["tls-cert-file", pki.path(f"{cert}.pem"), "tls-key-file", pki.path(f"{cert}.key"),
            "tls-ca-cert-file", pki.path("ca.pem"), "tls-auth-clients", "yes",
            "tls-replication", "yes"]


class TlsNode(ManagedProcess):
    """A redis-server (or sentinel) that listens only on a TLS port."""

    def __init__(self, workdir: Path, pki: Pki, name: str, args: list[str] = (),
                 cert: str = "server", sentinel_conf: str | None = None):
        self.pki = pki
        # Our CA does not vouch for the wrong certificates: their PING skips the check.
        self.insecure = cert != "server"
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        tls = tls_args(pki, cert)
        if sentinel_conf is not None:
            conf = self.dir / "sentinel.conf"
            lines = [f"port 0", f"tls-port {self.port}", "bind 127.0.0.1", "protected-mode no",
                     f"dir {self.dir}"]
            lines += [f"{k} {v}" for k, v in zip(tls[::2], tls[1::2])]
            conf.write_text("\n".join(lines) + "\n" + sentinel_conf)
            argv = [redis_sentinel_path(), str(conf)]
        else:
            argv = [redis_server_path(), "--port", "0", "--tls-port", str(self.port),
                    "--bind", "127.0.0.1", "--protected-mode", "no", "--save", "",
                    "--appendonly", "no", "--dir", str(self.dir),
                    *[f"--{a}" if i % 2 == 0 else a for i, a in enumerate(tls)], *args]
        super().__init__(name, argv, workdir / f"{name}.log")

    def cli(self, *args: str) -> str:
        return tls_cli(self.pki, self.port, *args, insecure=self.insecure).stdout.strip()

    def start_and_wait(self) -> "TlsNode":
        self.start()
        wait_for(f"{self.name} to answer PING over TLS", lambda: self.cli("PING") == "PONG")
        return self

    def info(self, section: str) -> dict:
        return dict(line.split(":", 1) for line in self.cli("INFO", section).splitlines() if ":" in line)


@pytest.fixture
def tls_nodes(env, pki, redis_bin):
    started: list[TlsNode] = []

    def _node(name: str, *args: str, cert: str = "server", sentinel_conf: str | None = None,
              wait: bool = True) -> TlsNode:
        n = TlsNode(env.workdir, pki, name, list(args), cert, sentinel_conf)
        started.append(n)
        return n.start_and_wait() if wait else n

    yield _node
    for n in started:
        n.stop(sig=signal.SIGKILL)


def client_flags(pki: Pki, ca: bool = True, client: bool = True) -> list[str]:
    flags = ["--redis-ca-file", pki.path("ca.pem")] if ca else []
    if client:
        flags += ["--redis-client-cert", pki.path("client.pem"),
                  "--redis-client-key", pki.path("client.key")]
    return flags


def across_two_replicas(env, a, b) -> None:
    """What Redis is shared for, checked over TLS: a session seen by both
    replicas, one refresh per expired token, revocation heard by the other."""
    iss = login_ok(a, env, session_len=HA_POLICY["session"], token_len=HA_POLICY["token"])
    assert_verified(verify(b, iss.token), "alice", iss.claims["sid"])
    sleep_until(iss.exp + MARGIN)
    print(f"\nrace over TLS: {race([a, b], iss.token, n=20)}")
    fresh = login_ok(b, env, session_len=HA_POLICY["session"], token_len=HA_POLICY["token"])
    assert logout(b, fresh.token).status_code == 204
    r, elapsed = poll(lambda: verify(a, fresh.token), lambda r: r.status_code != 200, timeout=3.0)
    assert_error(r, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"logout took {elapsed:.2f}s to reach the other replica over TLS"


# --------------------------------------------------------------------------
# One server
# --------------------------------------------------------------------------


def test_one_server_over_tls_with_a_private_ca_and_a_client_certificate(env, pki, tls_nodes,
                                                                        start_server):
    node = tls_nodes("tls-redis")
    # The server does ask for a client certificate: without one, it refuses.
    bare = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(node.port), "--tls",
                           "--cacert", pki.path("ca.pem"), "PING"],
                          capture_output=True, text=True, timeout=10)
    assert "PONG" not in bare.stdout, bare
    url = f"rediss://127.0.0.1:{node.port}/"
    a = start_server("tls-a", url, policy=HA_POLICY, extra_args=client_flags(pki))
    b = start_server("tls-b", url, policy=HA_POLICY, extra_args=client_flags(pki))
    across_two_replicas(env, a, b)
    # The state is in that Redis, read back over TLS.
    keys = node.cli("--scan", "--pattern", "tokenpolicy:*").split()
    assert any(":refresh:" in k for k in keys) and any(k.endswith(":revoked") for k in keys), keys


def wait_unready(server, seconds: float = 4.0) -> None:
    """Never ready while Redis cannot be trusted, and logins refused."""
    def answers() -> bool:
        assert server.running(), server.log_text()
        try:
            return requests.get(server.url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200
        except requests.ConnectionError:
            return False
    wait_for(f"{server.name} to listen", answers)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.running(), server.log_text()
        r = requests.get(server.url + "/readyz", timeout=HTTP_TIMEOUT)
        assert r.status_code == 503, f"{server.name} ready on an untrusted Redis: {r.text}"
        time.sleep(0.5)
    r = requests.post(server.url + "/v1/login", json={"username": "alice", "password": "alice-password"},
                      timeout=HTTP_TIMEOUT)
    assert_error(r, 503, "STORE_UNAVAILABLE")


@pytest.mark.parametrize("case", ["other CA", "other name", "system CAs only", "no client certificate",
                                  "plaintext server"])
def test_a_redis_that_cannot_be_trusted_is_never_used(env, pki, tls_nodes, start_redis, start_server,
                                                      case):
    flags = client_flags(pki)
    if case == "system CAs only":
        flags = client_flags(pki, ca=False)
    elif case == "no client certificate":
        flags = client_flags(pki, client=False)
    if case == "plaintext server":
        port = start_redis("plain").port
    else:
        cert = {"other CA": "rogue", "other name": "misnamed"}.get(case, "server")
        port = tls_nodes(f"tls-{cert}", cert=cert).port
    srv = start_server("tls-untrusted-" + case.replace(" ", "-"), f"rediss://127.0.0.1:{port}/", policy=HA_POLICY,
                       extra_args=flags, wait=False)
    wait_unready(srv)
    log = srv.log_text()
    assert "BEGIN" not in log and "PRIVATE" not in log, "key material in the log"
    # The reason, said once at WARN (the level operators read), not per retry.
    warned = [l for l in log.splitlines() if " WARN " in l and "Redis unavailable" in l]
    assert len(warned) == 1, log[-3000:]
    if case in ("other CA", "other name", "system CAs only"):
        assert "certificate" in warned[0], warned


def test_certificate_flags_are_checked_at_start(env, pki, tmp_path):
    def start(*args: str) -> subprocess.CompletedProcess:
        argv = [str(binary_path()), "serve", "--users", str(env.users_file),
                "--signing-key", str(env.key_file), "--listen", f"127.0.0.1:{free_port()}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, env=child_env())

    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("just text\n")
    cases = [
        # Certificates with a plaintext URL would be ignored: refused instead.
        (["--redis", "redis://127.0.0.1:6379/", *client_flags(pki)], "rediss://"),
        (["--redis", "redis+cluster://127.0.0.1:7000", "--redis-ca-file", pki.path("ca.pem")],
         "rediss://"),
        # No way to turn the certificate check off.
        (["--redis", "rediss://127.0.0.1:6379/#insecure"], "#insecure (no certificate check) is refused"),
        # A CA file with nothing to trust in it.
        (["--redis", "rediss://127.0.0.1:6379/", "--redis-ca-file", str(not_pem)],
         "no PEM certificate"),
        (["--redis", "rediss://127.0.0.1:6379/", "--redis-ca-file", pki.path("client.key")],
         "no PEM certificate"),
        (["--redis", "rediss://127.0.0.1:6379/", "--redis-ca-file", str(tmp_path / "absent.pem")],
         "absent.pem"),
        # A key that is not a key (never quoted back).
        (["--redis", "rediss://127.0.0.1:6379/", "--redis-client-cert", pki.path("client.pem"),
          "--redis-client-key", pki.path("client.pem")], "no PEM private key"),
        # Half a client identity, or certificates without Redis at all.
        (["--redis", "rediss://127.0.0.1:6379/", "--redis-client-cert", pki.path("client.pem")],
         "--redis-client-key"),
        (["--redis-ca-file", pki.path("ca.pem")], "--redis"),
    ]
    for args, said in cases:
        out = start(*args)
        assert out.returncode != 0, f"{args} started"
        assert said in out.stderr, f"{args}: {out.stderr[-2000:]}"
        assert "BEGIN" not in out.stderr


# --------------------------------------------------------------------------
# Sentinel and Cluster
# --------------------------------------------------------------------------


def test_sentinel_over_tls_follows_a_failover(env, pki, tls_nodes, start_server):
    master = tls_nodes("tls-s-master")
    replica = tls_nodes("tls-s-replica", "--replicaof", "127.0.0.1", str(master.port))
    conf = (f"sentinel monitor mymaster 127.0.0.1 {master.port} 2\n"
            "sentinel down-after-milliseconds mymaster 400\n"
            "sentinel failover-timeout mymaster 2000\n")
    sentinels = [tls_nodes(f"tls-sentinel-{i}", sentinel_conf=conf) for i in range(3)]
    wait_for("the replica in sync over TLS",
             lambda: master.info("replication").get("connected_slaves") == "1")
    for s in sentinels:
        wait_for(f"{s.name} to see the others", lambda s=s: (
            "num-other-sentinels" in (o := s.cli("SENTINEL", "MASTER", "mymaster"))
            and o.splitlines()[o.splitlines().index("num-other-sentinels") + 1] == "2"))
    url = "rediss+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + "/mymaster"
    a = start_server("tls-sentinel-a", url, policy=HA_POLICY, extra_args=client_flags(pki))
    b = start_server("tls-sentinel-b", url, policy=HA_POLICY, extra_args=client_flags(pki))
    across_two_replicas(env, a, b)

    master.stop(sig=signal.SIGKILL)
    wait_for("the replica promoted", lambda: replica.info("replication").get("role") == "master",
             timeout=20)
    # The Sentinels name the new master a moment after its promotion.
    r, _ = poll(lambda: login(a, "alice", env.users["alice"]), lambda r: r.status_code != 503,
                timeout=15, interval=0.2)
    iss = check_token_body(r, session_len=HA_POLICY["session"], token_len=HA_POLICY["token"])
    sleep_until(iss.exp + MARGIN)
    r, _ = poll(lambda: refresh(b, iss.token), lambda r: r.status_code != 503, timeout=15,
                interval=0.2)
    check_token_body(r, session_len=HA_POLICY["session"], token_len=HA_POLICY["token"])
    assert replica.cli("--scan", "--pattern", f"*{{{iss.claims['sid']}}}:refresh:*"), \
        "the claim is not on the promoted master"


def test_cluster_over_tls(env, pki, tls_nodes, start_server):
    cluster_args = ("--cluster-enabled", "yes", "--tls-cluster", "yes", "--cluster-node-timeout", "500")
    cn = [tls_nodes(f"tls-cluster-{i}", *cluster_args, "--cluster-port", str(free_port()),
                    "--cluster-config-file", str(env.workdir / f"tls-cluster-{i}" / "nodes.conf"))
          for i in range(3)]
    out = tls_cli(pki, cn[0].port, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in cn],
                  "--cluster-yes", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for n in cn:
        wait_for(f"{n.name} cluster_state:ok", lambda n=n: "cluster_state:ok" in n.cli("CLUSTER", "INFO"),
                 timeout=20)
    url = "rediss+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cn[:2])
    a = start_server("tls-cluster-a", url, policy=HA_POLICY, extra_args=client_flags(pki))
    b = start_server("tls-cluster-b", url, policy=HA_POLICY, extra_args=client_flags(pki))
    across_two_replicas(env, a, b)
    # Sessions land on every shard, each reached over TLS: 48 claims leave a
    # shard empty with odds of 3 x (2/3)^48, below one in ten million.
    for i in range(48):
        iss = login_ok((a, b)[i % 2], env, session_len=HA_POLICY["session"],
                       token_len=HA_POLICY["token"])
        check_token_body(refresh((b, a)[i % 2], iss.token), session_len=HA_POLICY["session"],
                         token_len=HA_POLICY["token"])
    spread = [len(n.cli("--scan", "--pattern", "*:refresh:*").split()) for n in cn]
    assert sum(spread) >= 48 and all(spread), spread
