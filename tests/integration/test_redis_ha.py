"""The token service on highly available Redis: Sentinel and Cluster.

Real redis-server / redis-sentinel processes on free loopback ports, two
`tokenpolicy serve` replicas per topology. Failures are real: SIGKILL of the
master. The figures (503 windows, key distribution) are printed (run with -s
to see them); they are reported, never asserted as timings beyond generous
"it came back at all" bounds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import HTTP_TIMEOUT, ManagedProcess, free_port, redis_server_path
from test_token_service import (assert_error, assert_verified, bearer, check_token_body, describe,
                                login_ok, logout, poll, refresh, sleep_until, unverified_claims,
                                verify)

MARGIN = 0.3
# Long renew window and session: tokens stay refreshable across a failover.
HA_POLICY = dict(session=120, token=2, renew=40, grace=1)


def cli(port: int, *args: str, timeout: float = 5.0) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, timeout=timeout, text=True)
    return out.stdout.strip()


def wait_for(what: str, fn, timeout: float = 15.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - reported on timeout
            last = e
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Node(ManagedProcess):
    """A redis-server (or sentinel) with its own directory and config."""

    def __init__(self, workdir: Path, name: str, args: list[str], sentinel_conf: str | None = None):
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        if sentinel_conf is not None:
            conf = self.dir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                            + sentinel_conf)
            argv = [redis_sentinel_path(), str(conf)]
        else:
            argv = [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1",
                    "--protected-mode", "no", "--save", "", "--appendonly", "no",
                    "--dir", str(self.dir), *args]
        super().__init__(name, argv, workdir / f"{name}.log")

    def start_and_wait(self) -> "Node":
        self.start()
        wait_for(f"{self.name} to answer PING", lambda: cli(self.port, "PING") == "PONG")
        return self

    def info(self, section: str) -> dict:
        text = cli(self.port, "INFO", section)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def redis_sentinel_path() -> str:
    for p in ("/usr/bin/redis-sentinel",):
        if os.access(p, os.X_OK):
            return p
    pytest.fail("redis-sentinel not installed (tests/run.sh installs it)")


@pytest.fixture
def nodes(env, redis_bin):
    started: list[Node] = []

    def _node(name: str, *args: str, sentinel_conf: str | None = None) -> Node:
        n = Node(env.workdir, name, list(args), sentinel_conf)
        started.append(n)
        return n.start_and_wait()

    yield _node
    for n in started:
        n.stop(sig=signal.SIGKILL)


def race(servers, token: str, n: int = 50) -> list:
    sessions = [requests.Session() for _ in range(n)]
    for i, s in enumerate(sessions):
        assert s.get(servers[i % 2].url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=15)
            results[i] = sessions[i].post(servers[i % 2].url + "/v1/refresh", headers=bearer(token),
                                          timeout=15)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for s in sessions:
        s.close()
    errors = [r for r in results if not isinstance(r, requests.Response)]
    assert not errors, f"{len(errors)} requests failed outright: {errors[:3]}"
    oks = [r for r in results if r.status_code == 200]
    for r in results:
        if r.status_code == 503:
            # An overloaded host can make Redis answer late: an honest 503, never a second token.
            assert_error(r, 503, "STORE_UNAVAILABLE")
        elif r.status_code != 200:
            # Arrived after the grace: reuse, which revokes the session, so
            # later ones may find it revoked already.
            assert_error(r, 401, {"TOKEN_ALREADY_REFRESHED", "REVOKED_SESSION"})
    assert oks, "no refresh succeeded"
    tokens = {r.json()["access_token"] for r in oks}
    assert len(tokens) == 1, f"{len(tokens)} different tokens handed out for one refresh"
    return sorted(r.status_code for r in results)


def refresh_through_failover(env, servers, kill, max_outage: float = 30.0, logins: int = 160,
                             keep=lambda iss: True, interval: float = 0.05) -> dict:
    """Refreshes expired tokens of fresh sessions one after the other (every
    50 ms, alternating replicas) while ``kill()`` takes the master away;
    returns the timeline. A token whose refresh got 503 is set aside (its
    claim may or may not have landed), the next one is used."""
    pool = [login_ok(servers[i % 2], env, "alice", session_len=HA_POLICY["session"],
                     token_len=HA_POLICY["token"]) for i in range(logins)]
    pool = [t for t in pool if keep(t)]
    sleep_until(max(t.exp for t in pool) + MARGIN)
    timeline: list[tuple[float, int, str]] = []
    t_kill = None
    first_ok_after = None
    i = 0
    started = time.monotonic()
    while i < len(pool):
        now = time.monotonic()
        if t_kill is None and now - started > 1.0:
            kill()
            t_kill = time.monotonic()
        try:
            r = refresh(servers[i % 2], pool[i].token, timeout=10)
            code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
            if not code and r.status_code != 200:
                code = r.text[:80]
            timeline.append((time.monotonic(), r.status_code, str(code)))
            if r.status_code == 200:
                check_token_body(r, session_len=HA_POLICY["session"], token_len=HA_POLICY["token"])
        except requests.RequestException as e:
            timeline.append((time.monotonic(), 0, repr(e)))
        i += 1
        if t_kill is not None:
            oks_after = [t for t, s, _ in timeline if s == 200 and t > t_kill]
            if oks_after and first_ok_after is None:
                first_ok_after = oks_after[0]
            if first_ok_after is not None and time.monotonic() - first_ok_after > 1.0:
                break
            assert time.monotonic() - t_kill < max_outage, \
                f"no refresh succeeded {max_outage}s after the kill: {timeline[-5:]}"
        time.sleep(interval)
    assert t_kill is not None and first_ok_after is not None, f"ran out of tokens: {timeline[-5:]}"
    statuses = {(s, c) for _, s, c in timeline}
    assert statuses <= {(200, ""), (503, "STORE_UNAVAILABLE")}, \
        f"only 200 and 503 STORE_UNAVAILABLE are acceptable (never a false 401): {sorted(statuses)}"
    unavailable = [t for t, s, _ in timeline if s != 200]
    window = (max(unavailable) - min(unavailable)) if unavailable else 0.0
    return dict(kill_to_first_ok=first_ok_after - t_kill, window_503=window,
                n_503=len(unavailable), n=len(timeline))


def keys_on(port: int, pattern: str) -> list[str]:
    out = cli(port, "--scan", "--pattern", pattern)
    return [k for k in out.splitlines() if k]


# ==========================================================================
# Sentinel
# ==========================================================================


def test_sentinel_race_failover_and_replay(env, nodes, start_server):
    master = nodes("sentinel-master")
    replica = nodes("sentinel-replica", "--replicaof", "127.0.0.1", str(master.port))
    conf = (f"sentinel monitor mymaster 127.0.0.1 {master.port} 2\n"
            "sentinel down-after-milliseconds mymaster 400\n"
            "sentinel failover-timeout mymaster 2000\n"
            "sentinel parallel-syncs mymaster 1\n")
    sentinels = [nodes(f"sentinel-{i}", sentinel_conf=conf) for i in range(3)]
    wait_for("the replica in sync", lambda: master.info("replication").get("connected_slaves") == "1")
    for s in sentinels:
        wait_for(f"{s.name} to see the replica and the other sentinels", lambda s=s: (
            "num-slaves" in (o := cli(s.port, "SENTINEL", "MASTER", "mymaster"))
            and o.splitlines()[o.splitlines().index("num-slaves") + 1] == "1"
            and o.splitlines()[o.splitlines().index("num-other-sentinels") + 1] == "2"))

    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + "/mymaster"
    a = start_server("sentinel-a", url, policy=HA_POLICY)
    b = start_server("sentinel-b", url, policy=HA_POLICY)
    servers = [a, b]

    # 1. The race: 50 concurrent refreshes of one expired token, one new token.
    old = login_ok(a, env, session_len=120, token_len=2)
    sleep_until(old.exp + MARGIN)
    print(f"\nsentinel race statuses: {race(servers, old.token)}")

    # 2. A token refreshed before the failover (its claim replicated), for the replay below.
    spent = login_ok(b, env, session_len=120, token_len=2)
    sleep_until(spent.exp + MARGIN)
    spent_new = check_token_body(refresh(a, spent.token), session_len=120, token_len=2)
    claimed_at = time.time()
    wait_for("the claim on the replica",
             lambda: keys_on(replica.port, f"*{{{spent.claims['sid']}}}:refresh:*"), timeout=5)

    # 3. SIGKILL the master under refresh load: the service finds the new master itself.
    fig = refresh_through_failover(env, servers, lambda: master.stop(sig=signal.SIGKILL))
    wait_for("the replica promoted", lambda: replica.info("replication").get("role") == "master")
    print(f"sentinel failover: first refresh OK {fig['kill_to_first_ok']:.2f}s after SIGKILL; "
          f"503 STORE_UNAVAILABLE for {fig['window_503']:.2f}s ({fig['n_503']} of {fig['n']} refreshes)")

    # 4. The token refreshed before the failover, replayed after the grace: still refused.
    sleep_until(claimed_at + HA_POLICY["grace"] + MARGIN)
    assert_error(refresh(b, spent.token), 401, "TOKEN_ALREADY_REFRESHED")
    assert_error(verify(a, spent_new.token), 401, "REVOKED_SESSION")

    # 5. Revocations still reach the other replica (the subscriber followed the failover).
    iss = login_ok(a, env, session_len=120, token_len=2)
    assert_verified(verify(b, iss.token), "alice", iss.claims["sid"])
    assert logout(a, iss.token).status_code == 204
    rb, elapsed = poll(lambda: verify(b, iss.token), lambda r: r.status_code != 200, timeout=3.0)
    assert_error(rb, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"logout took {elapsed:.2f}s to reach the other replica after failover"

    # 6. Asynchronous replication can lose a claim: the old master comes back
    #    as a replica; it is frozen (SIGSTOP) while a refresh is claimed on the
    #    master, the master is killed, the frozen replica resumes and is promoted
    #    without that write. The replay is then accepted a second time.
    master.start()
    wait_for("the old master back as a replica",
             lambda: replica.info("replication").get("connected_slaves") == "1", timeout=20)
    lost = login_ok(a, env, session_len=120, token_len=2)
    sleep_until(lost.exp + MARGIN)
    os.kill(master.pid, signal.SIGSTOP)
    try:
        first = check_token_body(refresh(a, lost.token), session_len=120, token_len=2)
        replica.stop(sig=signal.SIGKILL)
    finally:
        os.kill(master.pid, signal.SIGCONT)
    t_claim = time.time()
    wait_for("the frozen replica promoted", lambda: master.info("replication").get("role") == "master",
             timeout=20)
    sleep_until(t_claim + HA_POLICY["grace"] + MARGIN)
    r, _ = poll(lambda: refresh(b, lost.token), lambda r: r.status_code != 503, timeout=15, interval=0.2)
    if r.status_code == 200:
        second = r.json()["access_token"]
        assert unverified_claims(second)["jti"] != first.claims["jti"]
        print("sentinel lost write: the claim did not reach the replica before the failover; "
              "the replay after the grace got a SECOND new token (WAIT-less asynchronous replication)")
    elif r.json().get("error", {}).get("code") == "REVOKED_SESSION":
        # The promoted replica had not finished its first sync: it came up
        # without the store's epoch key, the service saw the data loss, and
        # refused every token issued before it (users sign in again).
        assert_error(r, 401, "REVOKED_SESSION")
        assert "lost its state" in r.text, describe(r)
        print("sentinel lost write: the promoted replica lacked the whole data set; "
              "the data loss was detected and the replay refused (REVOKED_SESSION)")
    else:
        assert_error(r, 401, "TOKEN_ALREADY_REFRESHED")
        print("sentinel lost write: the claim survived the failover (replica had it)")


# ==========================================================================
# Cluster
# ==========================================================================


def test_cluster_spread_race_logout_and_failover(env, nodes, start_server):
    cluster_args = ("--cluster-enabled", "yes", "--cluster-node-timeout", "500",
                    "--cluster-replica-validity-factor", "0")
    # An explicit bus port: the default (port + 10000) fails above 55535.
    cn = [nodes(f"cluster-{i}", *cluster_args, "--cluster-port", str(free_port()),
                "--cluster-config-file", str(env.workdir / f"cluster-{i}" / "nodes.conf"))
          for i in range(6)]
    out = subprocess.run(["redis-cli", "--cluster", "create",
                          *[f"127.0.0.1:{n.port}" for n in cn],
                          "--cluster-replicas", "1", "--cluster-yes"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    for n in cn:
        wait_for(f"{n.name} cluster_state:ok", lambda n=n: n.info("cluster") is not None and
                 "cluster_state:ok" in cli(n.port, "CLUSTER", "INFO"), timeout=20)

    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cn[:2])
    a = start_server("cluster-a", url, policy=HA_POLICY)
    b = start_server("cluster-b", url, policy=HA_POLICY)
    servers = [a, b]

    # 1. Sessions spread over the three masters: refresh 30 sessions, count claim keys per master.
    spent = []
    for i in range(30):
        spent.append(login_ok(servers[i % 2], env, session_len=120, token_len=2))
    sleep_until(max(t.exp for t in spent) + MARGIN)
    for i, t in enumerate(spent):
        check_token_body(refresh(servers[i % 2], t.token), session_len=120, token_len=2)
    masters = [n for n in cn if n.info("replication").get("role") == "master"]
    assert len(masters) == 3
    spread = {n.port: len(keys_on(n.port, "*:refresh:*")) for n in masters}
    print(f"\ncluster: refresh claims of 30 sessions per master port: {spread}")
    assert sum(spread.values()) == 30 and all(v > 0 for v in spread.values()), spread

    # 2. The race.
    old = login_ok(a, env, session_len=120, token_len=2)
    sleep_until(old.exp + MARGIN)
    print(f"cluster race statuses: {race(servers, old.token)}")

    # 3. Logout on a reaches b within 1 s.
    iss = login_ok(a, env, session_len=120, token_len=2)
    assert_verified(verify(b, iss.token), "alice", iss.claims["sid"])
    assert logout(a, iss.token).status_code == 204
    t0 = time.monotonic()
    rb, _ = poll(lambda: verify(b, iss.token), lambda r: r.status_code != 200, timeout=3.0)
    elapsed = time.monotonic() - t0
    assert_error(rb, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"logout took {elapsed:.2f}s to reach the other replica"

    # 4. Kill one master (the one b's subscriber may sit on is as good as any).
    victim = masters[0]
    myself = next(l for l in cli(victim.port, "CLUSTER", "NODES").splitlines() if "myself" in l)
    ranges = [tuple(map(int, (r + "-" + r).split("-")[:2])) for r in myself.split()[8:]]

    def on_victim(iss) -> bool:
        slot = int(cli(victim.port, "CLUSTER", "KEYSLOT", "{" + iss.claims["sid"] + "}"))
        return any(lo <= slot <= hi for lo, hi in ranges)

    # Only sessions whose slot the killed master serves: the others never notice.
    fig = refresh_through_failover(env, servers, lambda: victim.stop(sig=signal.SIGKILL),
                                   logins=300, keep=on_victim, interval=0.08)
    promoted = wait_for("a replica promoted", lambda: [
        n for n in cn if n is not victim and n.running()
        and n.info("replication").get("role") == "master"
        and n not in masters], timeout=20)
    print(f"cluster failover: {promoted[0].name} promoted; first refresh OK "
          f"{fig['kill_to_first_ok']:.2f}s after SIGKILL; 503 STORE_UNAVAILABLE for "
          f"{fig['window_503']:.2f}s ({fig['n_503']} of {fig['n']} refreshes)")

    # 5. After the failover: logout still propagates; sessions on every slot work.
    iss = login_ok(b, env, session_len=120, token_len=2)
    assert_verified(verify(a, iss.token), "alice", iss.claims["sid"])
    assert logout(b, iss.token).status_code == 204
    ra, elapsed = poll(lambda: verify(a, iss.token), lambda r: r.status_code != 200, timeout=3.0)
    assert_error(ra, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"logout took {elapsed:.2f}s to reach the other replica after failover"
    for i in range(12):
        t = login_ok(servers[i % 2], env, session_len=120, token_len=2)
        assert_verified(verify(servers[(i + 1) % 2], t.token), "alice", t.claims["sid"])


def test_unsupported_redis_urls_are_refused_at_start(env, start_server):
    for url in ("redis+sentinel://:hunter2-pw@127.0.0.1:26379",
                "memcached://:hunter2-pw@127.0.0.1:1",
                "redis+cluster://:hunter2-pw@127.0.0.1:7000/3"):
        srv = start_server("bad-url", url, wait=False)
        deadline = time.monotonic() + 15
        while srv.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not srv.running(), f"started with {url.split('@')[-1]}"
        # The service's own output (the harness logs the command line first).
        text = "\n".join(l for l in srv.log_text().splitlines() if not l.startswith("===== start"))
        assert "hunter2-pw" not in text, text
        assert "redis+sentinel://" in text and "redis+cluster://" in text, text
