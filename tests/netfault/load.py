"""The mixed load of the scenarios, recorded in a :class:`history.History`.

Each client logs in (on a replica at random), then verifies, refreshes
(alone, or racing the same token on two replicas at once) and after a
while logs out, retrying a logout answered 503 until it gets 204 (what
clients are told to do). Some sessions are kept past their end. After a
logout, a prober keeps showing the session's last token to every replica
for a while: that is how a logout that has not reached a replica shows.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import requests

from history import History, Op, Token

TIMEOUT = 10.0


def _code(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("code", ""))
    return ""


class Load:
    def __init__(self, history: History, replicas: dict, users: dict, seed: int = 1,
                 clients: int = 6, probe_for: float = 3.0):
        self.h = history
        self.replicas = replicas  # name -> base URL
        self.users = users  # name -> password
        self.seed = seed
        self.clients = clients
        self.probe_for = probe_for
        self.stop_at = 0.0
        self.probes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._local = threading.local()

    # -- one request, recorded ------------------------------------------------

    def _session(self, replica: str) -> requests.Session:
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            sessions = self._local.sessions = {}
        s = sessions.get(replica)
        if s is None:
            s = sessions[replica] = requests.Session()
            s.trust_env = False  # never through a proxy of this host
        return s

    def _send(self, kind: str, replica: str, client: int, token: Optional[str] = None,
              sent: Optional[Token] = None, probe: bool = False, body=None) -> tuple:
        url = self.replicas[replica]
        op = Op(kind=kind, replica=replica, start=time.time(), sent=sent, client=client,
                probe=probe)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        path, method = {
            "login": ("/v1/login", "POST"),
            "verify": ("/v1/verify", "GET"),
            "refresh": ("/v1/refresh", "POST"),
            "logout": ("/v1/logout", "POST"),
        }[kind]
        new_token = None
        try:
            r = self._session(replica).request(method, url + path, headers=headers, json=body,
                                               timeout=TIMEOUT)
            op.status = r.status_code
            op.code = _code(r) if r.status_code >= 400 else ""
            if r.status_code == 200 and kind in ("login", "refresh"):
                new_token = r.json()["access_token"]
            elif r.status_code == 200 and kind == "verify":
                new_token = r.headers.get("X-New-Token")
        except requests.RequestException as e:
            op.status = 0
            op.code = type(e).__name__
            # A connection in an unknown state is not reused.
            self._session(replica).close()
            self._local.sessions.pop(replica, None)
        op.end = time.time()
        if new_token:
            op.new = Token.parse(new_token)
        self.h.record(op)
        return op, new_token

    # -- clients ---------------------------------------------------------------

    def _login(self, rng, client: int, user: str):
        while time.time() < self.stop_at:
            replica = rng.choice(list(self.replicas))
            op, token = self._send("login", replica, client,
                                   body={"username": user, "password": self.users[user]})
            if token:
                return token
            time.sleep(0.2)
        return None

    def _race(self, client: int, token: str, sent: Token) -> list:
        """The same token refreshed on every replica at once."""
        names = list(self.replicas)
        barrier = threading.Barrier(len(names))
        got: list = []

        def one(name):
            barrier.wait(timeout=5)
            got.append(self._send("refresh", name, client, token, sent))

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got

    def _probe(self, client: int, token: str, sent: Token, until: float) -> None:
        while time.time() < min(until, self.stop_at + 1.0):
            for name in self.replicas:
                self._send("verify", name, client, token, sent, probe=True)
            time.sleep(0.25)

    def client(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        user = list(self.users)[i % len(self.users)]
        while time.time() < self.stop_at:
            token = self._login(rng, i, user)
            if token is None:
                return
            sent = Token.parse(token)
            # Some sessions are kept past their end (20 s in the scenarios).
            keep_until = time.time() + rng.uniform(2.0, 24.0)
            dead = False
            while time.time() < min(keep_until, self.stop_at) and not dead:
                p = rng.random()
                if p < 0.6:
                    op, new = self._send("verify", rng.choice(list(self.replicas)), i, token, sent)
                    results = [(op, new)]
                elif p < 0.9:
                    results = [self._send("refresh", rng.choice(list(self.replicas)), i, token,
                                          sent)]
                else:
                    results = self._race(i, token, sent)
                for op, new in results:
                    if new:
                        token, sent = new, Token.parse(new)
                    if op.status == 401:
                        dead = True
                time.sleep(rng.uniform(0.03, 0.12))
            if dead or time.time() >= self.stop_at:
                continue
            # Log out, retrying a 503 elsewhere until it is 204.
            while time.time() < self.stop_at + 5.0:
                op, _ = self._send("logout", rng.choice(list(self.replicas)), i, token, sent)
                if op.status == 204:
                    self.probes.submit(self._probe, i, token, sent, op.end + self.probe_for)
                    break
                if op.status == 401:
                    break
                time.sleep(0.2)

    def run(self, seconds: float, during=None) -> None:
        """Runs the load for ``seconds``, and ``during()`` (the fault
        schedule) alongside it."""
        self.stop_at = time.time() + seconds
        threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                   for i in range(self.clients)]
        for t in threads:
            t.start()
        try:
            if during is not None:
                during()
        finally:
            for t in threads:
                t.join(timeout=seconds + 30)
            self.probes.shutdown(wait=True)
