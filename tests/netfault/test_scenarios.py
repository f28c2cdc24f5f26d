"""Network faults under a mixed load, judged by the history checker.

Each scenario runs ``NETFAULT_SECONDS`` (default 20 s; 60 s for the long
form) of logins, verifies, refreshes (racing ones too) and logouts against
two replicas sharing one Redis, each in its own network namespace, with a
fault on the links to Redis in the middle. The verdict is the checker's
(``history.py``: invariants 1-5) and the figures are printed.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from conftest import POLICY, REDIS_PORT, USERS, seconds
from history import History, Policy, Token, check
from load import Load

#: The documented recovery: after a heal, a replica answers again within
#: the command timeout (2 s) plus the reconnection backoff (at most 2 s).
RECOVERY = 5.0
MAX_LAG = 10.0


def history() -> History:
    return History(policy=Policy(**POLICY), max_lag=MAX_LAG, propagation=1.0,
                   recovery=RECOVERY)


def report(name: str, h: History):
    v = check(h)
    print(f"\n[{name}] {v.summary()}")
    out = os.environ.get("NETFAULT_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"scenario": name, "seconds": seconds(), "ok": v.ok,
                                "violations": {k: len(x) for k, x in v.violations.items()},
                                "figures": v.figures}) + "\n")
    return v


def redis_cmd(host_ip: str, *args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
    with socket.create_connection((host_ip, REDIS_PORT), timeout=3) as s:
        s.sendall(b"".join(parts))
        s.settimeout(1)
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\r\n") and len(chunk) < 65536:
                    break
        except socket.timeout:
            pass
        return data


def subscriber_ports(cluster, replica: str) -> set:
    """Local ports of ``replica``'s pub/sub connections, as Redis lists them."""
    ip = cluster.hosts[replica].ip
    out = redis_cmd(cluster.redis_host.ip, "CLIENT", "LIST", "TYPE", "pubsub").decode(errors="replace")
    ports = set()
    for field in out.split():
        if field.startswith(f"addr={ip}:"):
            ports.add(int(field.rsplit(":", 1)[1]))
    return ports


def schedule(warm: float, length: float):
    """Sleeps until the fault starts; returns when it is to end."""
    time.sleep(warm)
    return time.time() + length


def run(cluster, name: str, fault, probe_for: float = 3.0) -> tuple:
    h = history()
    load = Load(h, cluster.urls, USERS, seed=hash(name) & 0xFFFF, probe_for=probe_for)
    load.run(seconds(), during=lambda: fault(h))
    v = report(name, h)
    return h, v


def assert_verdict(h: History, v, cluster) -> None:
    assert v.figures["requests"] > 100, v.summary()
    assert v.ok, v.summary() + "\n" + cluster.logs()


def test_redis_partitioned_from_both_replicas(cluster):
    """(a) Redis cut off (packets dropped) from both replicas for 10 s."""
    net, redis = cluster.net, cluster.redis_host

    def fault(h):
        end = schedule(max(3.0, seconds() * 0.2), 10.0)
        f = h.fault("partition-both", {"a", "b"}, cuts_off=True)
        for r in cluster.hosts.values():
            net.drop(r, redis)
        time.sleep(max(0.0, end - time.time()))
        for r in cluster.hosts.values():
            net.heal(r)
        h.healed(f)

    h, v = run(cluster, "partition-both", fault, probe_for=MAX_LAG + 3)
    assert_verdict(h, v, cluster)
    assert v.figures["503"] > 0, "the partition changed nothing: was it applied?"


def test_one_replica_partitioned_with_logouts_elsewhere(cluster):
    """(b) Replica b cut off from Redis (dropped) for longer than the lag
    bound, while a keeps working and sessions are logged out on it."""
    net, redis = cluster.net, cluster.redis_host
    b = cluster.hosts["b"]
    load = None
    marked = []

    def fault(h):
        length = max(14.0, seconds() * 0.6)
        end = schedule(max(3.0, seconds() * 0.15) - 1.0, length + 1.0)
        # Besides the load: one session that b has seen live, logged out on
        # a just after the partition began, then shown to b throughout.
        user = list(USERS)[0]
        _, token = load._send("login", "a", 99, body={"username": user, "password": USERS[user]})
        if token:
            sent = Token.parse(token)
            op, _ = load._send("verify", "b", 99, token, sent)
            marked.append(op.status)
        time.sleep(1.0)
        f = h.fault("partition-b", {"b"}, cuts_off=True)
        net.drop(b, redis)
        if token:
            time.sleep(0.5)
            op, _ = load._send("logout", "a", 99, token, sent)
            marked.append(op.status)
            if op.status == 204:
                load.probes.submit(load._probe, 99, token, sent, op.end + MAX_LAG + 4)
        time.sleep(max(0.0, end - time.time()))
        net.heal(b)
        h.healed(f)

    h = history()
    load = Load(h, cluster.urls, USERS, seed=2, probe_for=MAX_LAG + 4)
    load.run(seconds(), during=lambda: fault(h))
    v = report("partition-one", h)
    assert marked == [200, 204], f"the marked session: {marked}"
    assert_verdict(h, v, cluster)
    on_a = [op for op in h.ops if op.replica == "a" and op.status == 503]
    assert not on_a, f"{len(on_a)} 503s on the replica that kept Redis"


@pytest.mark.relay
def test_slow_redis_link(cluster):
    """(c) 200 ms ± 50 ms added to every Redis round trip of both replicas."""

    def fault(h):
        end = schedule(2.0, seconds() - 4.0)
        f = h.fault("delay-200ms", {"a", "b"})
        cluster.relay.set(0.2, 0.05)
        time.sleep(max(0.0, end - time.time()))
        cluster.relay.set(0.0)
        h.healed(f)

    h, v = run(cluster, "delay-200ms", fault)
    assert_verdict(h, v, cluster)
    slow = [op.end - op.start for op in h.ops if op.kind == "login"
            and h.faults[0].start + 0.5 < op.start and op.end < h.faults[0].end]
    assert slow and min(slow) >= 0.2, f"logins during the delay took {slow}"


def test_lossy_redis_link(cluster):
    """(d) 5% of the packets between each replica and Redis lost, each way."""
    net, redis = cluster.net, cluster.redis_host

    def fault(h):
        end = schedule(2.0, seconds() - 4.0)
        f = h.fault("loss-5%", {"a", "b"})
        for r in cluster.hosts.values():
            net.loss(r, redis, 5)
        time.sleep(max(0.0, end - time.time()))
        for r in cluster.hosts.values():
            net.heal(r)
        h.healed(f)

    h, v = run(cluster, "loss-5%", fault)
    assert_verdict(h, v, cluster)


def test_pubsub_link_cut_while_commands_flow(cluster):
    """(e) Replica b's subscription silently cut (its TCP connection's
    packets dropped by port), again each time it subscribes anew, while its
    command connection stays up."""
    net, redis = cluster.net, cluster.redis_host
    b = cluster.hosts["b"]
    cut: set = set()

    def fault(h):
        end = schedule(3.0, max(10.0, seconds() * 0.5))
        f = h.fault("pubsub-cut-b", {"b"})
        while time.time() < end:
            for port in subscriber_ports(cluster, "b") - cut:
                net.cut_connection(b, redis, port)
                cut.add(port)
            time.sleep(0.1)
        net.heal(b)
        h.healed(f)

    h, v = run(cluster, "pubsub-cut", fault)
    assert cut, "no subscription of b was found to cut"
    assert_verdict(h, v, cluster)
    # The command link stayed up: b answered throughout, with no 503.
    on_b = [op for op in h.ops if op.replica == "b" and op.status == 503]
    assert not on_b, f"{len(on_b)} 503s on b although its commands flowed"
