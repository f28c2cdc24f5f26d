"""The session registry on two replicas sharing one real redis-server:
listing and ending sessions, logging out everywhere, and the per-user
session limit under a race of 50 logins."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import Server

PASSWORD = "alice-password"
#: Enough room that the race is decided by the session limit, not by the
#: failed-login throttle or the hashing queue.
RACE_ARGS = [
    "--max-failed-logins-per-user", "1000",
    "--max-failed-logins-per-address", "1000",
    "--login-queue", "64",
]


def policy_file(env, limit: int, action: str) -> Path:
    p = env.workdir / f"policy-sessions-{uuid.uuid4().hex[:8]}.yaml"
    p.write_text(
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: sessions}\n"
        "spec:\n"
        "  sessionExpirationTime: 1h\n"
        "  tokenExpirationTime: 10m\n"
        "  expiredTokenRenewLimit: 1m\n"
        "  refreshGracePeriod: 1s\n"
        f"  maxSessionsPerUser: {limit}\n"
        f"  sessionLimitAction: {action}\n"
    )
    return p


@pytest.fixture
def replicas(env, redis):
    """Factory: two replicas on the module's Redis under a given limit, each
    with a Redis prefix of its own test so that tests do not share users'
    sessions; stopped at test end."""
    started = []

    def _start(limit: int, action: str):
        pol = policy_file(env, limit, action)
        prefix = f"sessions-{uuid.uuid4().hex[:8]}"
        pair = []
        for name in ("sess-a", "sess-b"):
            s = Server(name, env.workdir, pol, env.users_file, [env.key_file], redis.url,
                       RACE_ARGS + ["--redis-prefix", prefix])
            started.append(s)
            pair.append(s)
        for s in pair:
            s.launch()
        return pair

    yield _start
    for s in started:
        s.stop()


def login(server: Server) -> requests.Response:
    return requests.post(server.url + "/v1/login",
                         json={"username": "alice", "password": PASSWORD},
                         headers={"User-Agent": "pytest-sessions"}, timeout=30)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def verify(server: Server, token: str) -> requests.Response:
    return requests.get(server.url + "/v1/verify", headers=bearer(token), timeout=5)


def sessions(server: Server, token: str) -> requests.Response:
    return requests.get(server.url + "/v1/sessions", headers=bearer(token), timeout=5)


def alive(pair, tokens, settle: float = 1.0) -> list[str]:
    """The tokens both replicas still accept once revocations have had
    `settle` seconds to reach every replica."""
    time.sleep(settle)
    return [t for t in tokens if all(verify(s, t).status_code == 200 for s in pair)]


def race(pair, n: int = 50) -> list[requests.Response]:
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda i: login(pair[i % 2]), range(n)))


def test_fifty_racing_logins_never_leave_more_than_the_limit_alive(replicas):
    pair = replicas(3, "RevokeOldest")
    answers = race(pair)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    tokens = [r.json()["access_token"] for r in answers]
    live = alive(pair, tokens)
    assert len(live) == 3, f"{len(live)} sessions alive, the limit is 3"
    for s in pair:
        listed = sessions(s, live[0]).json()["sessions"]
        assert len(listed) == 3
        assert sorted(e["sid"] for e in listed) == sorted(
            requests.get(s.url + "/v1/verify", headers=bearer(t), timeout=5)
            .headers["X-Auth-Request-Session"] for t in live)


def test_fifty_racing_logins_with_refuse_new_admit_exactly_the_limit(replicas):
    pair = replicas(3, "RefuseNew")
    answers = race(pair)
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert len(ok) == 3, [r.status_code for r in answers]
    for r in refused:
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "SESSION_LIMIT"
    assert len(alive(pair, [r.json()["access_token"] for r in ok], settle=0)) == 3


def test_sessions_are_listed_and_ended_across_replicas(replicas):
    a, b = replicas(0, "RevokeOldest")
    first = login(a).json()["access_token"]
    second = login(b).json()["access_token"]
    assert verify(b, first).status_code == 200
    listed = sessions(a, second).json()["sessions"]
    assert [e["current"] for e in listed] == [False, True]
    assert listed[0]["user_agent"] == "pytest-sessions"
    assert listed[0]["client_address"] == "127.0.0.1"
    assert listed[0]["method"] == "password"
    old = listed[0]["sid"]
    r = requests.delete(a.url + f"/v1/sessions/{old}", headers=bearer(second), timeout=5)
    assert r.status_code == 204, r.text
    started = time.monotonic()
    while verify(b, first).status_code == 200 and time.monotonic() - started < 3:
        time.sleep(0.02)
    assert time.monotonic() - started < 1.0, "replica b accepted the ended session for over 1 s"
    assert verify(b, first).json()["error"]["code"] == "REVOKED_SESSION"
    assert [e["sid"] for e in sessions(b, second).json()["sessions"]] != [old]
    assert len(sessions(b, second).json()["sessions"]) == 1


def test_logout_everywhere_reaches_the_other_replica_within_one_second(replicas):
    a, b = replicas(0, "RevokeOldest")
    tokens = [login(s).json()["access_token"] for s in (a, b, a, b)]
    for t in tokens:
        assert verify(b, t).status_code == 200
        assert verify(a, t).status_code == 200
    r = requests.post(a.url + "/v1/logout?everywhere=true", headers=bearer(tokens[0]), timeout=5)
    assert r.status_code == 204, r.text
    started = time.monotonic()
    while any(verify(b, t).status_code == 200 for t in tokens) and time.monotonic() - started < 3:
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"replica b still accepted a session {elapsed:.3f}s after logout everywhere"
    for t in tokens:
        assert verify(b, t).json()["error"]["code"] == "REVOKED_SESSION"
    fresh = login(b).json()["access_token"]
    listed = sessions(a, fresh)
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["sessions"]) == 1
