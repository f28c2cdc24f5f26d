"""A token whose signature the service remembers (the verified-token cache)
still loses, at once, to what can change after it was first verified:
revocation on another replica, a shortened policy, the user's removal and a
password change. Each token here is verified several times first, so that
later checks are answered from the cache."""

from __future__ import annotations

import time

import requests

from conftest import HTTP_TIMEOUT, _bcrypt_2y, policy_yaml

LONG = {"session": 3600, "token": 600, "renew": 60, "grace": 5}


def login(server, user, password) -> str:
    r = requests.post(server.url + "/v1/login", json={"username": user, "password": password},
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def verify(server, token):
    return requests.get(server.url + "/v1/verify", headers={"Authorization": f"Bearer {token}"},
                        timeout=HTTP_TIMEOUT)


def warm(server, token, times=5):
    for _ in range(times):
        r = verify(server, token)
        assert r.status_code == 200, r.text


def until_refused(server, token, timeout):
    """Verifies until refused; returns (response, seconds it took)."""
    t0 = time.monotonic()
    while True:
        r = verify(server, token)
        if r.status_code != 200 or time.monotonic() - t0 > timeout:
            return r, time.monotonic() - t0
        time.sleep(0.05)


def code(r) -> str:
    return r.json()["error"]["code"]


def private_users(env, tmp_path):
    users = tmp_path / "users"
    users.write_text(env.users_file.read_text())
    return users


def test_revocation_on_another_replica_ends_a_cached_token(cluster):
    env = cluster.env
    token = login(cluster.a, "alice", env.users["alice"])
    warm(cluster.a, token)
    warm(cluster.b, token)
    r = requests.post(cluster.b.url + "/v1/logout", headers={"Authorization": f"Bearer {token}"},
                      timeout=HTTP_TIMEOUT)
    assert r.status_code == 204, r.text
    refused, took = until_refused(cluster.a, token, timeout=3.0)
    assert refused.status_code == 401 and code(refused) == "REVOKED_SESSION", refused.text
    assert took < 1.0, f"replica a accepted a logged-out cached token for {took:.2f}s"


def test_shortened_policy_ends_a_cached_token(env, redis, start_server, tmp_path):
    srv = start_server("cache-policy", redis.url, policy=LONG)
    token = login(srv, "alice", env.users["alice"])
    warm(srv, token)
    time.sleep(1.1)  # the session is now older than the policy below allows
    srv.policy_file.write_text(policy_yaml(session=1, token=1, renew=0, grace=0))
    refused, took = until_refused(srv, token, timeout=6.0)
    assert refused.status_code == 401 and code(refused) == "EXPIRED_SESSION", refused.text


def test_removed_user_ends_a_cached_token(env, redis, start_server, tmp_path):
    users = private_users(env, tmp_path)
    srv = start_server("cache-user", redis.url, policy=LONG, users_file=users)
    token = login(srv, "alice", env.users["alice"])
    warm(srv, token)
    users.write_text("".join(l + "\n" for l in env.users_file.read_text().splitlines()
                             if not l.startswith("alice:")))
    refused, _ = until_refused(srv, token, timeout=6.0)
    assert refused.status_code == 401 and code(refused) == "REVOKED_SESSION", refused.text


def test_password_change_ends_a_cached_token(env, redis, start_server, tmp_path):
    users = private_users(env, tmp_path)
    srv = start_server("cache-password", redis.url, policy=LONG, users_file=users)
    token = login(srv, "alice", env.users["alice"])
    warm(srv, token)
    lines = [l for l in env.users_file.read_text().splitlines() if not l.startswith("alice:")]
    lines.append("alice:" + _bcrypt_2y("a-new-password"))
    users.write_text("\n".join(lines) + "\n")
    refused, _ = until_refused(srv, token, timeout=6.0)
    assert refused.status_code == 401 and code(refused) == "REVOKED_SESSION", refused.text
    # The new password logs in, and its token verifies.
    assert verify(srv, login(srv, "alice", "a-new-password")).status_code == 200
