"""Redis faults against real processes: redis-server killed, paused
(SIGSTOP/SIGCONT), flushed, restarted empty or with its data; the pub/sub
connection killed; a replica killed mid-refresh.

What must hold throughout: a valid token keeps verifying, refresh and login
answer 503 STORE_UNAVAILABLE with Retry-After within 2 s while Redis is
away, /readyz follows Redis, no token is ever refreshed twice and no
logged-out session comes back.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import jwt
import requests

from conftest import Redis, free_port

#: Long enough tokens that nothing expires during a fault, short grace.
POLICY = dict(session=300, token=60, renew=60, grace=1)


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def login(srv, env, user="alice", timeout=10.0) -> requests.Response:
    return requests.post(srv.url + "/v1/login", json={"username": user, "password": env.users[user]},
                         timeout=timeout)


def login_token(srv, env) -> str:
    r = login(srv, env)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def refresh(srv, token: str, timeout=10.0) -> requests.Response:
    return requests.post(srv.url + "/v1/refresh", headers=bearer(token), timeout=timeout)


def verify(srv, token: str, timeout=10.0) -> requests.Response:
    return requests.get(srv.url + "/v1/verify", headers=bearer(token), timeout=timeout)


def logout(srv, token: str, timeout=10.0) -> requests.Response:
    return requests.post(srv.url + "/v1/logout", headers=bearer(token), timeout=timeout)


def ready(srv) -> int:
    try:
        return requests.get(srv.url + "/readyz", timeout=5).status_code
    except requests.RequestException:
        return 0


def redis_cmd(port: int, *args: str) -> bytes:
    """One command over RESP on a fresh connection."""
    parts = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        parts.append(f"${len(b)}\r\n".encode() + b + b"\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"".join(parts))
        return s.recv(4096)


def code(r: requests.Response) -> str:
    try:
        return r.json().get("error", {}).get("code") or r.json().get("code", "")
    except ValueError:
        return ""


def assert_unavailable(r: requests.Response, elapsed: float) -> None:
    print(f"503 {r.request.method} {r.request.path_url} in {elapsed:.2f}s")
    assert r.status_code == 503, f"{r.status_code} {r.text}"
    assert r.headers.get("Retry-After"), r.headers
    assert elapsed <= 2.0, f"503 took {elapsed:.2f}s"


def timed(fn, *a):
    t = time.monotonic()
    r = fn(*a)
    return r, time.monotonic() - t


def wait_for(cond, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    return cond()


def two_replicas(start_server, redis_url, policy=POLICY):
    a = start_server("fault-a", redis_url, policy=policy, wait=False)
    b = start_server("fault-b", redis_url, policy=policy, wait=False)
    a.wait_ready()
    b.wait_ready()
    return a, b


# --------------------------------------------------------------------------
# Data loss
# --------------------------------------------------------------------------


def test_flushall_neither_resurrects_a_logout_nor_allows_a_second_refresh(env, start_redis,
                                                                          start_server):
    redis = start_redis("redis-flush")
    a, b = two_replicas(start_server, redis.url)
    out = login_token(a, env)
    assert verify(b, out).status_code == 200
    assert logout(a, out).status_code == 204
    assert wait_for(lambda: verify(b, out).status_code == 401, 2)

    spent = login_token(a, env)
    time.sleep(1.1)  # a later second: the refresh is a new token
    r = refresh(a, spent)
    assert r.status_code == 200, r.text
    renewed = r.json()["access_token"]

    assert redis_cmd(redis.port, "FLUSHALL").startswith(b"+OK")
    time.sleep(1.5)
    # A replica that joins after the loss and never saw the logout.
    c = start_server("fault-c", redis.url, policy=POLICY)
    r = verify(c, out)
    assert r.status_code == 401, f"logged-out session came back after FLUSHALL: {r.status_code}"
    time.sleep(1.2)  # past the grace
    for srv in (a, b, c):
        r = refresh(srv, spent)
        assert r.status_code == 401, f"{srv.name}: second refresh after FLUSHALL: {r.status_code} {r.text}"
        assert code(r) == "REVOKED_SESSION", r.text
    # Tokens still valid keep verifying; new logins refresh normally.
    assert verify(c, renewed).status_code == 200
    fresh = login_token(b, env)
    time.sleep(1.1)
    assert refresh(a, fresh).status_code == 200


def test_restart_empty_and_with_data(env, start_server, tmp_path):
    port = free_port()
    empty = Redis(tmp_path, name="redis-restart", port=port).start_and_wait()
    try:
        a, b = two_replicas(start_server, empty.url)
        out = login_token(a, env)
        assert verify(b, out).status_code == 200
        assert logout(b, out).status_code == 204
        spent = login_token(a, env)
        time.sleep(1.1)
        assert refresh(b, spent).status_code == 200
        empty.stop(sig=signal.SIGKILL)
        empty = Redis(tmp_path, name="redis-restart-2", port=port).start_and_wait()
        time.sleep(1.5)
        c = start_server("fault-c", empty.url, policy=POLICY)
        assert verify(c, out).status_code == 401, "logout lost with Redis's data"
        time.sleep(1.2)
        for srv in (a, b):
            r = refresh(srv, spent)
            assert r.status_code == 401 and code(r) == "REVOKED_SESSION", r.text
    finally:
        empty.stop()

    # With its data (append-only file): nothing is lost, nothing to refuse.
    port = free_port()
    aof_dir = tmp_path / "aof"
    aof_dir.mkdir()
    durable = Redis(aof_dir, name="redis-aof", port=port)
    durable.argv[durable.argv.index("--appendonly") + 1] = "yes"
    durable.argv += ["--appendfsync", "always"]
    durable.start_and_wait()
    try:
        a = start_server("fault-d", durable.url, policy=POLICY)
        keep = login_token(a, env)
        gone = login_token(a, env)
        assert logout(a, gone).status_code == 204
        time.sleep(1.1)
        spent = refresh(a, login_token(a, env))
        assert spent.status_code == 200
        durable.stop(sig=signal.SIGKILL)
        durable = Redis(aof_dir, name="redis-aof", port=port)
        durable.argv[durable.argv.index("--appendonly") + 1] = "yes"
        durable.start_and_wait()
        assert wait_for(lambda: ready(a) == 200, 5)
        time.sleep(1.0)
        r = refresh(a, keep)
        assert r.status_code == 200, f"refresh after a restart with data: {r.status_code} {r.text}"
        e = start_server("fault-e", durable.url, policy=POLICY)
        assert verify(e, gone).status_code == 401
    finally:
        durable.stop()


# --------------------------------------------------------------------------
# Pub/sub lost
# --------------------------------------------------------------------------


def test_killed_subscription_does_not_keep_a_logged_out_session(env, start_redis, start_server):
    redis = start_redis("redis-pubsub")
    a, b = two_replicas(start_server, redis.url)
    results = []
    for _ in range(3):
        tok = login_token(a, env)
        assert verify(b, tok).status_code == 200
        assert verify(b, tok).status_code == 200  # now answered from B's cache
        killed = redis_cmd(redis.port, "CLIENT", "KILL", "TYPE", "pubsub")
        assert killed.startswith(b":"), killed
        assert logout(a, tok).status_code == 204
        t0 = time.monotonic()
        refused = wait_for(lambda: verify(b, tok).status_code == 401, 3.0, interval=0.02)
        results.append(time.monotonic() - t0)
        assert refused, f"B still accepts a logged-out session {time.monotonic() - t0:.1f}s after logout"
        assert results[-1] <= 2.0, results
    print(f"logout refused on B after pub/sub kill: {['%.2f' % x for x in results]} s")


# --------------------------------------------------------------------------
# Redis paused / killed
# --------------------------------------------------------------------------


def test_refresh_answered_503_is_not_applied_late(env, start_redis, start_server):
    redis = start_redis("redis-pause")
    a, b = two_replicas(start_server, redis.url)
    # One refresh first, so that Redis holds the claim script, as any Redis
    # that has served a refresh does: on a fresh one the paused claim would
    # fail with NOSCRIPT when it finally ran, and apply nothing either way.
    assert refresh(a, login_token(a, env)).status_code == 200
    tok = login_token(a, env)
    time.sleep(1.1)
    os.kill(redis.pid, signal.SIGSTOP)
    try:
        r, took = timed(refresh, a, tok)
        assert_unavailable(r, took)
    finally:
        os.kill(redis.pid, signal.SIGCONT)
    time.sleep(2.5)  # longer than the grace: a late-applied claim would make the retry "reuse"
    r = refresh(b, tok)
    assert r.status_code == 200, f"retry of a refresh answered 503 cost the session: {r.status_code} {r.text}"
    new = r.json()["access_token"]
    assert verify(a, new).status_code == 200
    # And it is still the only refresh.
    time.sleep(1.2)
    assert refresh(a, tok).status_code == 401


def test_redis_killed_and_paused_fail_static_then_recover(env, start_server, tmp_path):
    port = free_port()
    redis = Redis(tmp_path, name="redis-outage", port=port).start_and_wait()
    try:
        a, b = two_replicas(start_server, redis.url)
        seen = login_token(a, env)
        assert verify(a, seen).status_code == 200 and verify(b, seen).status_code == 200
        unseen = login_token(a, env)  # issued by A, never verified anywhere
        for fault in ("SIGSTOP", "SIGKILL"):
            if fault == "SIGSTOP":
                os.kill(redis.pid, signal.SIGSTOP)
            else:
                redis.stop(sig=signal.SIGKILL)
            try:
                t_fault = time.monotonic()
                assert wait_for(lambda: ready(a) == 503 and ready(b) == 503, 6), "readyz stays ready"
                print(f"{fault}: /readyz unready on both after {time.monotonic() - t_fault:.2f}s")
                assert verify(a, seen).status_code == 200
                assert verify(b, seen).status_code == 200
                r = verify(a, unseen)
                assert r.status_code == 200, f"{fault}: token issued here refused: {r.status_code} {r.text}"
                for fn, arg in ((refresh, seen), (login, env)):
                    r, took = timed(fn, a, arg)
                    assert_unavailable(r, took)
            finally:
                if fault == "SIGSTOP":
                    os.kill(redis.pid, signal.SIGCONT)
                else:
                    redis = Redis(tmp_path, name="redis-outage-2", port=port).start_and_wait()
            t_back = time.monotonic()
            assert wait_for(lambda: ready(a) == 200 and ready(b) == 200, 6), "readyz does not recover"
            print(f"{fault}: /readyz ready on both {time.monotonic() - t_back:.2f}s after Redis was back")
            assert verify(b, seen).status_code == 200
            assert login(b, env).status_code == 200
    finally:
        redis.stop()


def test_replica_killed_mid_refresh_never_refreshes_twice(env, start_redis, start_server):
    redis = start_redis("redis-kill")
    a, b = two_replicas(start_server, redis.url)
    for _ in range(3):
        tok = login_token(b, env)
        time.sleep(1.05)
        got = []

        def on_a():
            try:
                got.append(refresh(a, tok, timeout=3).json().get("access_token"))
            except (requests.RequestException, ValueError):
                pass

        t = threading.Thread(target=on_a)
        t.start()
        time.sleep(0.005)
        a.stop(sig=signal.SIGKILL)
        t.join()
        r = refresh(b, tok)
        if r.status_code == 200:
            got.append(r.json()["access_token"])
        else:  # A won and answered nobody, more than the grace ago: still one refresh only
            assert code(r) == "TOKEN_ALREADY_REFRESHED", r.text
        jtis = {claims(x)["jti"] for x in got if x}
        assert len(jtis) <= 1, f"token refreshed twice: {jtis}"
        time.sleep(1.2)
        assert refresh(b, tok).status_code == 401
        a.start()
        a.wait_ready()


class FreezingProxy:
    """A TCP proxy to Redis that can silently stop forwarding the
    connections that subscribed (the socket stays open, nothing flows): a
    pub/sub connection dead without anyone noticing, as a lost network path
    or a stuck middlebox leaves it."""

    def __init__(self, redis_port: int):
        self.redis_port = redis_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.stopped = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/"

    def _accept(self):
        while not self.stopped.is_set():
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.redis_port))
            self.conns += [c, u]
            state = {"pubsub": False}
            threading.Thread(target=self._pipe, args=(c, u, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, state, False), daemon=True).start()

    def _pipe(self, src, dst, state, upstream):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and b"SUBSCRIBE" in data.upper():
                    state["pubsub"] = True
                while state["pubsub"] and self.frozen.is_set() and not self.stopped.is_set():
                    time.sleep(0.05)  # hold the bytes: the connection is silently dead
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.stopped.set()
        self.listener.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


def test_silently_dead_subscription_stops_trusting_the_cache(env, start_redis, start_server):
    redis = start_redis("redis-frozen")
    proxy = FreezingProxy(redis.port)
    try:
        a = start_server("fault-a", redis.url, policy=POLICY)
        b = start_server("fault-b", proxy.url, policy=POLICY)
        tok = login_token(a, env)
        assert verify(b, tok).status_code == 200
        assert verify(b, tok).status_code == 200  # now answered from B's cache
        proxy.frozen.set()
        time.sleep(0.2)
        assert logout(a, tok).status_code == 204
        t0 = time.monotonic()
        refused = wait_for(lambda: verify(b, tok).status_code == 401, 5.0, interval=0.02)
        took = time.monotonic() - t0
        assert refused, f"B still accepts a logged-out session {took:.1f}s after logout"
        assert took <= 2.0, f"B refused the logged-out session only after {took:.2f}s"
        print(f"silently dead subscription: logout refused on B after {took:.2f}s")
    finally:
        proxy.close()
