"""Soak (opt-in: TOKENPOLICY_SOAK=1, about 60 s): mixed login / verify /
refresh / logout load over two replicas, with one Redis restart (SIGKILL,
3 s down, back with its append-only file) in the middle. Counts, printed
and asserted: no 5xx outside the outage, no false 401, no token refreshed
twice, no logged-out session accepted; RSS of each replica before and after.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import requests

from conftest import Redis, free_port
from test_store_faults import POLICY, bearer, claims

DURATION = float(os.environ.get("TOKENPOLICY_SOAK_SECONDS", "60"))
WORKERS = 4
#: After Redis is back, replicas may need this long to reconnect.
RECOVERY = 3.0

pytestmark = pytest.mark.skipif(os.environ.get("TOKENPOLICY_SOAK") != "1",
                                reason="soak is opt-in: TOKENPOLICY_SOAK=1")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_soak_two_replicas_one_redis_restart(env, start_server, tmp_path):
    port = free_port()

    def make_redis(name):
        r = Redis(tmp_path, name=name, port=port)
        r.argv[r.argv.index("--appendonly") + 1] = "yes"
        r.argv += ["--appendfsync", "always"]
        return r.start_and_wait()

    redis = make_redis("soak-redis")
    a = start_server("soak-a", redis.url, policy=POLICY, wait=False)
    b = start_server("soak-b", redis.url, policy=POLICY, wait=False)
    a.wait_ready()
    b.wait_ready()
    replicas = [a, b]
    outage = [float("inf"), float("inf")]  # monotonic start, end (+ recovery)
    lock = threading.Lock()
    counts = dict(requests=0, err5xx_outside=0, err5xx_outage=0, false401=0, double_refresh=0,
                  resurrected=0, refreshes=0, logouts=0, logins=0)
    stop = time.monotonic() + DURATION
    session = requests.Session

    def in_outage(t0, t1):
        return t1 >= outage[0] and t0 <= outage[1]

    def call(http, method, srv, path, **kw):
        t0 = time.monotonic()
        try:
            r = http.request(method, srv.url + path, timeout=5, **kw)
            code = r.status_code
        except requests.RequestException:
            r, code = None, 599
        t1 = time.monotonic()
        with lock:
            counts["requests"] += 1
            if code >= 500:
                counts["err5xx_outage" if in_outage(t0, t1) else "err5xx_outside"] += 1
        return r, code

    def worker(seed):
        rnd = random.Random(seed)
        http = session()
        while time.monotonic() < stop:
            r, code = call(http, "POST", rnd.choice(replicas), "/v1/login",
                           json={"username": "alice", "password": env.users["alice"]})
            if code != 200:
                time.sleep(0.2)
                continue
            with lock:
                counts["logins"] += 1
            tok = r.json()["access_token"]
            for _ in range(rnd.randint(3, 8)):
                _, code = call(http, "GET", rnd.choice(replicas), "/v1/verify", headers=bearer(tok))
                if code == 401:
                    with lock:
                        counts["false401"] += 1
            if claims(tok)["iat"] >= int(time.time()):
                time.sleep(1.05 - (time.time() % 1))  # a new second: a new token
            # Refresh, and a parallel-looking retry on the other replica inside the grace.
            first, second = rnd.sample(replicas, 2)
            r1, c1 = call(http, "POST", first, "/v1/refresh", headers=bearer(tok))
            r2, c2 = call(http, "POST", second, "/v1/refresh", headers=bearer(tok))
            jtis = {claims(r.json()["access_token"])["jti"] for r, c in ((r1, c1), (r2, c2)) if c == 200}
            with lock:
                counts["refreshes"] += 1
                if len(jtis) > 1:
                    counts["double_refresh"] += 1
                if 401 in (c1, c2):
                    counts["false401"] += 1
            if c1 == 200:
                tok = r1.json()["access_token"]
            elif c2 == 200:
                tok = r2.json()["access_token"]
            _, code = call(http, "POST", rnd.choice(replicas), "/v1/logout", headers=bearer(tok))
            if code == 204:
                with lock:
                    counts["logouts"] += 1
                time.sleep(1.1)
                _, code = call(http, "GET", rnd.choice(replicas), "/v1/verify", headers=bearer(tok))
                if code == 200:
                    with lock:
                        counts["resurrected"] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for t in threads:
        t.start()
    time.sleep(5)
    rss_before = {s.name: rss_kib(s.pid) for s in replicas}
    time.sleep(max(0.0, DURATION / 2 - 5))
    outage[0] = time.monotonic()
    redis.stop(sig=signal.SIGKILL)
    time.sleep(3)
    redis = make_redis("soak-redis-2")
    outage[1] = time.monotonic() + RECOVERY
    for t in threads:
        t.join()
    rss_after = {s.name: rss_kib(s.pid) for s in replicas}
    redis.stop()
    print(f"\nsoak {DURATION:.0f}s: {counts}; outage {outage[1] - outage[0]:.1f}s incl. "
          f"{RECOVERY:.0f}s recovery; RSS KiB before {rss_before} after {rss_after}")
    assert counts["err5xx_outside"] == 0, counts
    assert counts["false401"] == 0, counts
    assert counts["double_refresh"] == 0, counts
    assert counts["resurrected"] == 0, counts
    assert counts["refreshes"] > 20, counts
