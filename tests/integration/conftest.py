"""Fixtures for the black-box integration tests of `tokenpolicy serve`.

Everything runs against real processes on loopback:

* a real ``redis-server`` on a free port (``--save '' --appendonly no``);
* one Ed25519 signing key (PKCS#8 PEM) and one users file in a temp dir;
* two ``tokenpolicy serve`` replicas sharing that Redis and that key.

Every process writes stdout+stderr to its own log file; when a test fails the
part of each log written during the test is attached to the failure report
(section "log <name>"). All waits use ``time.monotonic`` deadlines, and every
process we start is killed at teardown, and again at interpreter exit as a
safety net.

Environment:
    TOKENPOLICY_BIN   path of the binary (default
                      ``${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}/debug/tokenpolicy``)
    REDIS_SERVER      path of redis-server (default: ``redis-server`` on PATH,
                      else /usr/bin/redis-server)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import bcrypt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.procs import (  # noqa: E402  (tests/ is put on the path first)
    _ALL as _ALL_PROCS,
    Process as ManagedProcess,
    binary_path,
    child_env,
    free_port,
    wait_http,
    wait_until,
)

__all__ = ["ManagedProcess", "binary_path", "child_env", "free_port", "wait_http", "wait_until"]

# --------------------------------------------------------------------------
# Constants shared with the tests
# --------------------------------------------------------------------------

ISSUER = "tokenpolicy"
AUDIENCE = "tokenpolicy"
COOKIE_NAME = "__Host-tokenpolicy"

#: The short policy most tests run under (seconds).
SHORT_POLICY = dict(session=8, token=2, renew=3, grace=1)

#: Users written to the users file: name -> (password, hash kind).
USERS = {
    "alice": ("alice-password", "bcrypt"),   # everyday user of most tests
    "bob": ("bob-password", "argon2id"),     # hash made by `tokenpolicy hash-password`
    "dave": ("dave-password", "bcrypt"),     # wrong-password tests
    "mallory": ("mallory-password", "bcrypt"),  # throttling test
    "erin": ("erin-password", "bcrypt"),     # metrics / misc
}

READY_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0

# --------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------


def redis_server_path() -> str:
    env = os.environ.get("REDIS_SERVER")
    if env:
        return env
    return shutil.which("redis-server") or "/usr/bin/redis-server"


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------


class Redis(ManagedProcess):
    def __init__(self, workdir: Path, name: str = "redis", port: Optional[int] = None):
        self.port = port or free_port()
        argv = [
            redis_server_path(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--dir", str(workdir),
        ]
        super().__init__(name, argv, workdir / f"{name}.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/"

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.settimeout(timeout)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start_and_wait(self, timeout: float = 10.0) -> "Redis":
        self.start()

        def answers() -> bool:
            self.check_running()
            return self.ping()
        wait_until(f"{self.name} to answer PING", answers, timeout, 0.05)
        return self


def wait_for_redis_binary(timeout: float = 60.0) -> str:
    """redis-server may still be being installed when the suite starts."""
    deadline = time.monotonic() + timeout
    while True:
        path = redis_server_path()
        if os.access(path, os.X_OK):
            return path
        if time.monotonic() >= deadline:
            pytest.fail(f"redis-server not found/executable at {path}")
        time.sleep(1.0)


# --------------------------------------------------------------------------
# tokenpolicy serve
# --------------------------------------------------------------------------


def policy_yaml(session: int, token: int, renew: int, grace: int, name: str = "test") -> str:
    return (
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"  sessionExpirationTime: {session}s\n"
        f"  tokenExpirationTime: {token}s\n"
        f"  expiredTokenRenewLimit: {renew}s\n"
        f"  refreshGracePeriod: {grace}s\n"
    )


class Server(ManagedProcess):
    def __init__(self, name: str, workdir: Path, policy_file: Path, users_file: Path,
                 key_files: list[Path], redis_url: Optional[str], extra_args: list[str] = ()):
        self.port = free_port()
        self.policy_file = policy_file
        self.users_file = users_file
        argv = [
            str(binary_path()), "serve",
            "--policy", str(policy_file),
            "--users", str(users_file),
            "--listen", f"127.0.0.1:{self.port}",
        ]
        if redis_url:
            argv += ["--redis", redis_url]
        for k in key_files:
            argv += ["--signing-key", str(k)]
        # The suite logs one user in far more often than a person would:
        # the per-user limit on successful logins is lifted unless a test
        # sets it.
        if "--max-logins-per-user" not in extra_args:
            argv += ["--max-logins-per-user", "1000000"]
        argv += list(extra_args)
        super().__init__(name, argv, workdir / f"{name}.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.url}>"

    def launch(self, wait: bool = True) -> "Server":
        """Starts the process and, with `wait`, waits until it is ready;
        a server that never gets ready is stopped before the error goes on."""
        self.start()
        if wait:
            try:
                self.wait_ready()
            except Exception:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "Server":
        # `Connection: close`: no connection of ours lingers in the
        # server's per-client count.
        wait_http(self.url + "/readyz", self, timeout, headers={"Connection": "close"}, every=0.1)
        return self


@dataclass
class Env:
    """Files shared by all servers of the session."""
    workdir: Path
    key_file: Path
    private_key: Ed25519PrivateKey
    users_file: Path
    users: dict  # name -> password
    argon2_error: Optional[str] = None
    _counter: list = field(default_factory=lambda: [0])

    def start_server(self, name: str, redis_url: Optional[str], policy: Optional[dict] = None,
                     extra_args: list[str] = (), wait: bool = True,
                     users_file: Optional[Path] = None,
                     key_files: Optional[list[Path]] = None) -> Server:
        pol = dict(SHORT_POLICY)
        pol.update(policy or {})
        self._counter[0] += 1
        pfile = self.workdir / f"policy-{name}-{self._counter[0]}.yaml"
        pfile.write_text(policy_yaml(**pol))
        keys = [self.key_file] if key_files is None else key_files
        srv = Server(name, self.workdir, pfile, users_file or self.users_file, keys, redis_url,
                     extra_args)
        return srv.launch(wait)


def _bcrypt_2y(password: str, rounds: int = 5) -> str:
    h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    assert h.startswith("$2b$")
    return "$2y$" + h[4:]


def _argon2_via_binary(password: str) -> str:
    out = subprocess.run(
        [str(binary_path()), "hash-password"],
        input=password.encode(), capture_output=True, timeout=60, env=child_env(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"hash-password exited {out.returncode}: {out.stderr.decode(errors='replace')}")
    lines = [l.strip() for l in out.stdout.decode().splitlines() if l.strip()]
    if len(lines) != 1:
        raise RuntimeError(f"hash-password printed {lines!r}, expected one PHC line")
    phc = lines[0]
    # Tolerate a "name:hash"-less line only; we write the name ourselves.
    if not phc.startswith("$argon2id$"):
        raise RuntimeError(f"hash-password printed {phc!r}, expected an $argon2id$ PHC string")
    return phc


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tp_binary() -> Path:
    path = binary_path()
    if not os.access(path, os.X_OK):
        pytest.fail(f"tokenpolicy binary not found at {path} (set TOKENPOLICY_BIN)")
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory, tp_binary) -> Env:
    workdir = tmp_path_factory.mktemp("tokenpolicy")
    key = Ed25519PrivateKey.generate()
    key_file = workdir / "signing-key.pem"
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)

    lines = []
    argon2_error = None
    for name, (pw, kind) in USERS.items():
        if kind == "bcrypt":
            lines.append(f"{name}:{_bcrypt_2y(pw)}")
        else:
            try:
                lines.append(f"{name}:{_argon2_via_binary(pw)}")
            except Exception as e:  # reported by the argon2 test, not by every test
                argon2_error = str(e)
    users_file = workdir / "users"
    users_file.write_text("\n".join(lines) + "\n")
    return Env(workdir=workdir, key_file=key_file, private_key=key, users_file=users_file,
               users={n: pw for n, (pw, _) in USERS.items()}, argon2_error=argon2_error)


@pytest.fixture(scope="session")
def redis_bin() -> str:
    return wait_for_redis_binary()


@pytest.fixture(scope="module")
def redis(env, redis_bin):
    r = Redis(env.workdir, name="redis-main")
    try:
        r.start_and_wait()
        yield r
    finally:
        r.stop()


@dataclass
class Cluster:
    a: Server
    b: Server
    redis: Redis
    env: Env

    @property
    def replicas(self) -> list[Server]:
        return [self.a, self.b]


@pytest.fixture(scope="module")
def _module_cluster(env, redis):
    """Two replicas (a, b) with the short policy, one Redis, one key."""
    started = []
    try:
        a = env.start_server("replica-a", redis.url, wait=False)
        started.append(a)
        b = env.start_server("replica-b", redis.url, wait=False)
        started.append(b)
        a.wait_ready()
        b.wait_ready()
        yield Cluster(a=a, b=b, redis=redis, env=env)
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def cluster(_module_cluster):
    """The module's cluster, checked before each test: a replica found dead
    (it crashed in an earlier test, which then failed and showed its log, or
    something outside the suite killed it) is restarted on its port, with a
    warning, so that one death does not fail every later test."""
    c = _module_cluster
    for proc in (c.redis, c.a, c.b):
        if not proc.running():
            code = proc.proc.returncode if proc.proc else None
            warnings.warn(f"{proc.name} was not running (exit status {code}); restarting it")
            if isinstance(proc, Redis):
                proc.start_and_wait()
            else:
                proc.start()
                proc.wait_ready()
    return c


@pytest.fixture
def start_server(env):
    """Factory: start a server with a given policy; stopped at test end."""
    started = []

    def _start(name: str, redis_url: Optional[str], policy: Optional[dict] = None,
               extra_args: list[str] = (), wait: bool = True, users_file: Optional[Path] = None,
               key_files: Optional[list[Path]] = None) -> Server:
        srv = env.start_server(name, redis_url, policy=policy, extra_args=extra_args, wait=wait,
                               users_file=users_file, key_files=key_files)
        started.append(srv)
        return srv

    yield _start
    for s in started:
        s.stop()


@pytest.fixture
def start_redis(env, redis_bin):
    """Factory: a private redis-server; stopped at test end."""
    started = []

    def _start(name: str) -> Redis:
        r = Redis(env.workdir, name=name)
        started.append(r)
        return r.start_and_wait()

    yield _start
    for r in started:
        r.stop()


# --------------------------------------------------------------------------
# Attach server logs to failure reports
# --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _log_offsets(request):
    # Every process alive now (a server that dies during the test is reported too).
    request.node._tp_log_offsets = {id(p): p.log_size() for p in _ALL_PROCS if p.running()}
    request.node._tp_test_start = time.monotonic()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    offsets = getattr(item, "_tp_log_offsets", {})
    t0 = getattr(item, "_tp_test_start", 0.0)
    for p in list(_ALL_PROCS):
        if id(p) in offsets:
            start = offsets[id(p)]
        elif p.started_at >= t0 and p.started_at > 0:
            start = 0
        else:
            continue
        text = p.log_text(start)
        state = "running" if p.running() else f"NOT RUNNING, exit status {p.proc.returncode if p.proc else '-'}"
        rep.sections.append((f"log {p.name} ({state}, {p.log_path})", text or "<no output during this test>"))
