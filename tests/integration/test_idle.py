"""The idle timeout (`sessionIdleTimeout`, rule 2) on two replicas sharing
one real redis-server: activity on one replica keeps a session alive on
the other; with no activity anywhere, both answer `401 IDLE_SESSION` by the
timeout plus the slack, never before the timeout; the sign-in page says
"signed out after inactivity"; and a busy session costs Redis at most one
write per replica per write slice, not one per request.

Every check of a session is itself activity (it would keep the session
alive), so each session is checked once, at a chosen moment after its last
activity: one just before the timeout, one just past the timeout plus the
slack."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import Server

PASSWORD = "alice-password"
#: The timeout and its slack, max(5 s, timeout / 20) (seconds).
IDLE = 10
SLACK = 5
#: A write slice: the slack less 1.25 s.
SLICE = SLACK - 1.25


def policy_file(env, idle: int = IDLE) -> Path:
    p = env.workdir / f"policy-idle-{uuid.uuid4().hex[:8]}.yaml"
    p.write_text(
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: idle}\n"
        "spec:\n"
        "  sessionExpirationTime: 1h\n"
        "  tokenExpirationTime: 10m\n"
        "  expiredTokenRenewLimit: 1m\n"
        "  refreshGracePeriod: 1s\n"
        f"  sessionIdleTimeout: {idle}s\n"
    )
    return p


@pytest.fixture
def pair(env, redis):
    """Two replicas on the module's Redis under the idle policy, with a
    Redis prefix of their own; stopped at test end."""
    pol = policy_file(env)
    prefix = f"idle-{uuid.uuid4().hex[:8]}"
    servers = [
        Server(name, env.workdir, pol, env.users_file, [env.key_file], redis.url,
               ["--redis-prefix", prefix])
        for name in ("idle-a", "idle-b")
    ]
    try:
        for s in servers:
            s.launch()
        yield servers
    finally:
        for s in servers:
            s.stop()


def login(server: Server) -> str:
    r = requests.post(server.url + "/v1/login",
                      json={"username": "alice", "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def verify(server: Server, token: str) -> requests.Response:
    return requests.get(server.url + "/v1/verify", headers=bearer(token), timeout=5)


def code(r: requests.Response) -> str:
    return r.json()["error"]["code"]


def sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def command_calls(redis, command: str) -> int:
    """Calls of one command so far, those made by scripts included."""
    out = subprocess.run(["redis-cli", "-p", str(redis.port), "INFO", "commandstats"],
                         capture_output=True, text=True, timeout=5, check=True).stdout
    for line in out.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def script_calls(redis) -> int:
    """Script calls so far, less the store's epoch checks (each replica runs
    one four times a second, and it is the one script that calls TIME)."""
    return command_calls(redis, "evalsha") - command_calls(redis, "time")


def test_activity_anywhere_keeps_a_session_and_none_ends_it_on_both(pair):
    a, b = pair
    # Kept alive by activity on A only, then asked on B just before the
    # timeout; kept by activity on both, then asked on both just past the
    # timeout and the slack.
    kept = login(a)
    ends = login(a)
    assert verify(b, ends).status_code == 200
    last = 0.0
    for i in range(12):  # 24 s: more than twice the timeout
        assert verify(a, kept).status_code == 200, i
        assert verify(a if i % 2 else b, ends).status_code == 200, i
        last = time.monotonic()
        time.sleep(2)
    # B never saw `kept`; A's activity, written in the background, keeps it.
    sleep_until(last + IDLE - 1)
    r = verify(b, kept)
    assert r.status_code == 200, (r.status_code, r.text)
    kept_at = time.monotonic()
    # Nobody used `ends` for the timeout plus the slack: over, on both,
    # for every use of its token.
    sleep_until(last + IDLE + SLACK + 0.3)
    r = verify(b, ends)
    assert (r.status_code, code(r)) == (401, "IDLE_SESSION"), r.text
    assert 'error_description="IDLE_SESSION"' in r.headers["WWW-Authenticate"]
    r = verify(a, ends)
    assert (r.status_code, code(r)) == (401, "IDLE_SESSION"), r.text
    r = requests.post(a.url + "/v1/refresh", headers=bearer(ends), timeout=5)
    assert (r.status_code, code(r)) == (401, "IDLE_SESSION"), r.text
    # The check on B was activity: `kept` lives on A too (A last saw it
    # more than the timeout ago).
    assert time.monotonic() - kept_at < IDLE
    assert verify(a, kept).status_code == 200
    # The list shows `kept`, with its last activity, and not `ends`.
    listed = requests.get(a.url + "/v1/sessions", headers=bearer(kept), timeout=5).json()["sessions"]
    current = [s for s in listed if s["current"]]
    assert len(current) == 1
    assert current[0]["last_active_at"] > current[0]["started_at"], current[0]
    # The browser that still sends the dead cookie is told why.
    page = requests.get(a.url + "/v1/login", headers={"Cookie": f"__Host-tokenpolicy={ends}"},
                        timeout=5)
    assert page.status_code == 200
    assert "signed out after inactivity" in page.text
    assert "session has expired" not in page.text


def test_a_session_never_ends_before_the_timeout(pair):
    """Sessions used on one replica, then asked on the other at moments
    just short of the timeout after their last use: all alive."""
    a, b = pair
    tokens = [login(a) for _ in range(4)]
    lasts = []
    for t in tokens:
        for _ in range(3):
            assert verify(a, t).status_code == 200
            time.sleep(0.3)
        lasts.append(time.monotonic())
    # The first just at the timeout's edge, the others before it.
    checks = [(lasts[i], IDLE - 0.5 - i * 2, t) for i, t in enumerate(tokens)]
    for last, after, t in sorted(checks, key=lambda c: c[0] + c[1]):
        sleep_until(last + after)
        r = verify(b, t)
        assert r.status_code == 200, (after, r.status_code, r.text)


def test_busy_sessions_cost_one_write_per_replica_per_slice(pair, redis):
    """Many requests of a few sessions on both replicas for 12 s: the
    activity writes to Redis are bounded by the write slice, whatever the
    number of requests."""
    a, b = pair
    tokens = [login(a) for _ in range(3)]
    for t in tokens:
        assert verify(b, t).status_code == 200
    before = script_calls(redis)
    seconds = 12.0
    stop = time.monotonic() + seconds
    counts = []

    def drive(server: Server, token: str):
        n = 0
        with requests.Session() as s:
            while time.monotonic() < stop:
                assert s.get(server.url + "/v1/verify", headers=bearer(token), timeout=5).status_code == 200
                n += 1
        counts.append(n)

    threads = [threading.Thread(target=drive, args=(srv, t)) for srv in (a, b) for t in tokens]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    time.sleep(0.6)  # the last flush
    writes = script_calls(redis) - before
    requests_made = sum(counts)
    # Each of 3 sessions on each of 2 replicas: one write per slice at
    # most, plus one at the start of the window.
    bound = 3 * 2 * (int(seconds / SLICE) + 2)
    assert requests_made > 10 * bound, requests_made
    assert 3 * 2 <= writes <= bound, (writes, bound, requests_made)
    print(f"{requests_made} verifies of 3 sessions on 2 replicas in {seconds:.0f} s: "
          f"{writes} activity writes")
