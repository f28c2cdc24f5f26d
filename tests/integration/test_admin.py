"""The admin API and the `tokenpolicy sessions` CLI on two replicas sharing
one real redis-server, authorised by `--admin-token-file`: list a user's
sessions, revoke one by its id and all of a user's, on every replica; a
wrong token is 401 (exit 3), a server without any admin configuration
answers 404 (exit 4). The cluster's TokenReview/SubjectAccessReview path
runs against a real API server in tests/e2e/test_07_admin.py."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import binary_path, child_env

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
LONG_POLICY = dict(session=3600, token=600, renew=60, grace=1)


@pytest.fixture(scope="module")
def token_file(env) -> Path:
    p = env.workdir / "admin-token"
    p.write_text(ADMIN_TOKEN + "\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def pair(env, redis, token_file):
    """Two replicas with the admin token, on one Redis prefix of their own."""
    prefix = f"admin-{uuid.uuid4().hex[:8]}"
    servers = [
        env.start_server(name, redis.url, LONG_POLICY,
                         ["--redis-prefix", prefix, "--admin-token-file", str(token_file)])
        for name in ("admin-a", "admin-b")
    ]
    yield servers
    for s in servers:
        s.stop()


def login(server, user: str) -> tuple[str, str]:
    r = requests.post(server.url + "/v1/login",
                      json={"username": user, "password": f"{user}-password"},
                      headers={"User-Agent": "pytest-admin"}, timeout=30)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    v = requests.get(server.url + "/v1/verify", headers={"Authorization": f"Bearer {token}"},
                     timeout=5)
    assert v.status_code == 200
    return token, v.headers["X-Auth-Request-Session"]


def verify(server, token: str) -> int:
    return requests.get(server.url + "/v1/verify", headers={"Authorization": f"Bearer {token}"},
                        timeout=5).status_code


def refused_within(server, token: str, seconds: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if verify(server, token) == 401:
            return True
        time.sleep(0.05)
    return verify(server, token) == 401


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    e = child_env()
    e.pop("KUBECONFIG", None)
    e["HOME"] = "/nonexistent"  # no ~/.kube/config of the machine's
    e.update(env_extra or {})
    return subprocess.run([str(binary_path()), "sessions", *args], capture_output=True,
                          text=True, timeout=60, env=e)


def test_cli_lists_and_revokes_on_every_replica(pair, token_file):
    a, b = pair
    t1, sid1 = login(a, "alice")
    t2, sid2 = login(a, "alice")
    tb, sidb = login(b, "bob")
    auth = ["--token-file", str(token_file)]

    out = cli("list", "--user", "alice", "--server", b.url, *auth)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("SID\tMETHOD")
    assert [l.split("\t")[0] for l in lines[1:]] == [sid1, sid2]
    assert all("\tpassword\t" in l and "pytest-admin" in l for l in lines[1:])

    out = cli("list", "--user", "alice", "--json", "--server", a.url, *auth)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert listed["user"] == "alice" and listed["provider"] is None
    assert [s["sid"] for s in listed["sessions"]] == [sid1, sid2]
    assert listed["sessions"][0]["client_address"] == "127.0.0.1"

    # One session ended through replica b is refused on replica a at once.
    out = cli("revoke", "--sid", sid1, "--server", b.url, *auth)
    assert out.returncode == 0, out.stderr
    assert sid1 in out.stdout
    assert refused_within(a, t1)
    assert verify(a, t2) == 200 and verify(b, t2) == 200
    out = cli("revoke", "--sid", sid1, "--server", a.url, *auth)
    assert out.returncode == 4, (out.returncode, out.stderr)
    assert "SESSION_NOT_FOUND" in out.stderr

    # All of alice's, through replica a; bob's stays.
    out = cli("revoke", "--user", "alice", "--server", a.url, *auth)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1 session(s) of alice revoked"
    assert refused_within(b, t2)
    assert verify(b, tb) == 200
    out = cli("list", "--user", "alice", "--json", "--server", b.url, *auth)
    assert json.loads(out.stdout)["sessions"] == []
    out = cli("list", "--user", "bob", "--json", "--server", a.url, *auth)
    assert [s["sid"] for s in json.loads(out.stdout)["sessions"]] == [sidb]


def test_a_wrong_token_is_401_and_changes_nothing(pair, env):
    a, _ = pair
    t, _ = login(a, "alice")
    wrong = env.workdir / "wrong-admin-token"
    wrong.write_text("not-the-admin-token\n")
    for args in (("list", "--user", "alice"), ("revoke", "--user", "alice")):
        out = cli(*args, "--server", a.url, "--token-file", str(wrong))
        assert out.returncode == 3, (args, out.returncode, out.stderr)
        assert "401 ADMIN_UNAUTHENTICATED" in out.stderr
    # A user's own session token is no admin token either.
    r = requests.delete(a.url + "/v1/admin/sessions", params={"user": "alice"},
                        headers={"Authorization": f"Bearer {t}"}, timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "ADMIN_UNAUTHENTICATED"
    assert verify(a, t) == 200


def test_the_kubeconfig_bearer_token_is_used_without_token_file(pair, env):
    a, _ = pair
    _, sid = login(a, "erin")
    kubeconfig = env.workdir / "admin-kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://192.0.2.1:6443'}}]\n"
        f"users: [{{name: u, user: {{token: {ADMIN_TOKEN}}}}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    out = cli("list", "--user", "erin", "--json", "--server", a.url,
              env_extra={"KUBECONFIG": str(kubeconfig)})
    assert out.returncode == 0, out.stderr
    assert sid in [s["sid"] for s in json.loads(out.stdout)["sessions"]]
    # A context with a client certificate only has no token to show.
    certs = env.workdir / "cert-kubeconfig"
    certs.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://192.0.2.1:6443'}}]\n"
        "users: [{name: u, user: {client-certificate-data: AAAA, client-key-data: AAAA}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    out = cli("list", "--user", "erin", "--server", a.url, env_extra={"KUBECONFIG": str(certs)})
    assert out.returncode == 1
    assert "no bearer token" in out.stderr and "--token-file" in out.stderr


def test_without_admin_configuration_the_admin_api_is_not_found(env, redis, token_file):
    s = env.start_server("admin-off", redis.url, LONG_POLICY,
                         ["--redis-prefix", f"admin-off-{uuid.uuid4().hex[:8]}"])
    try:
        t, sid = login(s, "alice")
        for method, path in (("GET", "/v1/admin/sessions?user=alice"),
                             ("DELETE", "/v1/admin/sessions?user=alice"),
                             ("DELETE", f"/v1/admin/sessions/{sid}")):
            r = requests.request(method, s.url + path,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
            assert r.status_code == 404, (method, path, r.status_code)
        out = cli("revoke", "--sid", sid, "--server", s.url, "--token-file", str(token_file))
        assert out.returncode == 4, out.stderr
        assert "no admin API" in out.stderr
        assert verify(s, t) == 200
    finally:
        s.stop()


def test_usage_errors_and_an_unreachable_server(token_file):
    out = cli("revoke", "--token-file", str(token_file))
    assert out.returncode == 2
    out = cli("revoke", "--sid", "x", "--user", "y", "--token-file", str(token_file))
    assert out.returncode == 2
    out = cli("list", "--user", "alice", "--server", "ftp://x", "--token-file", str(token_file))
    assert out.returncode == 1 and "http:// or https://" in out.stderr
    from conftest import free_port
    out = cli("list", "--user", "alice", "--server", f"http://127.0.0.1:{free_port()}",
              "--token-file", str(token_file))
    assert out.returncode == 1 and out.stderr.startswith("error: cannot reach http://127.0.0.1:")
