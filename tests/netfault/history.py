"""A history of client requests and a checker of the service's promises.

Every request the load sends is recorded as an :class:`Op`: when it started
and ended (this host's clock, which the namespaces share with the
replicas), which replica it reached, the token it sent (its claims), the
answer and any new token. Faults are recorded as :class:`Fault` windows
with the replicas they cut off. After the run, :func:`check` reads the
history, like a Jepsen checker, and reports every violation of:

1. No token is ever refreshed into two different new tokens, counting every
   replica's answers (``/v1/refresh`` and a renewal by ``/v1/verify``).
2. No request that started more than ``propagation`` (1 s) after a logout's
   ``204`` (or a revocation: a spent token shown again after the grace) was
   accepted with any token of that session by a replica that could reach
   Redis; a replica cut off accepted none later than ``max_lag`` after it.
3. No ``401`` for a token that was valid under the rules all through the
   request: ``503`` is the only failure allowed while the store is away.
   A correct login answered ``401`` is one too.
4. No session outlives its ``sessionExpirationTime``: nothing accepted after
   its end, and no token issued past it.
5. Every ``503`` came while a fault touched that replica, or within
   ``recovery`` after its end.

It also computes the figures each scenario reports (:class:`Verdict`).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

#: A request accepted: the session was vouched for.
ACCEPTED = (200,)
#: Kinds of request that present a session's token.
TOKEN_KINDS = ("verify", "refresh", "logout")


@dataclass(frozen=True)
class Policy:
    session: float
    token: float
    renew: float
    grace: float


@dataclass
class Token:
    """What the checker needs of a token: its claims."""

    sid: str
    jti: str
    iat: int
    exp: int
    auth_time: int

    @staticmethod
    def parse(jwt: str) -> "Token":
        payload = jwt.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        c = json.loads(base64.urlsafe_b64decode(payload))
        return Token(sid=c["sid"], jti=c["jti"], iat=int(c["iat"]), exp=int(c["exp"]),
                     auth_time=int(c["auth_time"]))


@dataclass
class Op:
    kind: str  # login, verify, refresh, logout
    replica: str
    start: float
    end: float = 0.0
    status: int = 0  # 0: no answer (connection failed or timed out)
    code: str = ""
    sent: Optional[Token] = None
    new: Optional[Token] = None
    client: int = 0
    probe: bool = False  # a check of a logged-out session's token

    @property
    def sid(self) -> Optional[str]:
        if self.sent is not None:
            return self.sent.sid
        return self.new.sid if self.new is not None else None


@dataclass
class Fault:
    name: str
    replicas: frozenset  # replicas the fault touches
    start: float
    end: float = float("inf")
    cuts_off: bool = False  # the replicas cannot reach Redis at all

    def touches(self, replica: str, t0: float, t1: float, after: float = 0.0) -> bool:
        return replica in self.replicas and t0 <= self.end + after and t1 >= self.start


@dataclass
class History:
    policy: Policy
    max_lag: float = 10.0
    propagation: float = 1.0
    recovery: float = 5.0
    ops: list = field(default_factory=list)
    faults: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, op: Op) -> Op:
        with self.lock:
            self.ops.append(op)
        return op

    def fault(self, name: str, replicas, cuts_off: bool = False) -> Fault:
        f = Fault(name, frozenset(replicas), time.time(), cuts_off=cuts_off)
        with self.lock:
            self.faults.append(f)
        return f

    @staticmethod
    def healed(f: Fault) -> None:
        f.end = time.time()


@dataclass
class Verdict:
    violations: dict  # invariant number -> list of messages
    figures: dict

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def summary(self) -> str:
        lines = [f"figures: {json.dumps(self.figures, sort_keys=True)}"]
        for n in sorted(self.violations):
            v = self.violations[n]
            lines.append(f"invariant {n}: {len(v)} violation(s)")
            lines.extend(f"  {m}" for m in v[:10])
        return "\n".join(lines)


# -- the checks ----------------------------------------------------------------


def _renewals(h: History) -> list:
    """(op, old token, new token) for every answer that refreshed a token."""
    out = []
    for op in h.ops:
        if op.status == 200 and op.sent is not None and op.new is not None \
                and op.kind in ("refresh", "verify") and op.new.jti != op.sent.jti:
            out.append(op)
    return out


def check_once(h: History) -> list:
    """Invariant 1: one new token per refreshed token."""
    seen: dict = {}
    bad = []
    for op in _renewals(h):
        first = seen.setdefault(op.sent.jti, op)
        if first.new.jti != op.new.jti:
            bad.append(f"token {op.sent.jti} refreshed into {first.new.jti} "
                       f"(on {first.replica} at {first.start:.3f}) and {op.new.jti} "
                       f"(on {op.replica} at {op.start:.3f})")
    return bad


def revocations(h: History) -> list:
    """(sid, when it took effect at the latest, the op) of every logout
    answered 204 and every reuse detection (a revocation by the rules)."""
    out = []
    for op in h.ops:
        if op.sent is None:
            continue
        if op.kind == "logout" and op.status == 204:
            out.append((op.sent.sid, op.end, op))
        elif op.status == 401 and op.code == "TOKEN_ALREADY_REFRESHED":
            out.append((op.sent.sid, op.end, op))
    return out


def _cut_off(h: History, replica: str, t0: float, t1: float) -> Optional[Fault]:
    for f in h.faults:
        if f.cuts_off and f.touches(replica, t0, t1):
            return f
    return None


def check_logout_reach(h: History, slack: float = 0.0) -> list:
    """Invariant 2."""
    first: dict = {}
    for sid, at, op in revocations(h):
        if sid not in first or at < first[sid][0]:
            first[sid] = (at, op)
    bad = []
    for op in h.ops:
        if op.status not in ACCEPTED or op.sent is None or op.kind not in ("verify", "refresh"):
            continue
        rev = first.get(op.sent.sid)
        if rev is None:
            continue
        at, _ = rev
        late = op.start - at
        if late <= h.propagation + slack:
            continue
        fault = _cut_off(h, op.replica, at, op.start)
        if fault is not None and late <= h.max_lag + slack:
            continue
        where = f"cut off by {fault.name}" if fault else "connected"
        bound = h.max_lag if fault else h.propagation
        bad.append(f"session {op.sent.sid} accepted by {op.kind} on {op.replica} ({where}) "
                   f"{late:.2f}s after its revocation (bound {bound:.2f}s)")
    return bad


def _spent(h: History) -> dict:
    """jti -> start of the first request that refreshed it (answered 200)."""
    out: dict = {}
    for op in _renewals(h):
        out[op.sent.jti] = min(out.get(op.sent.jti, op.start), op.start)
    return out


def false_401s(h: History, tol: float = 0.05) -> list:
    """Invariant 3: 401s that no rule explains."""
    # A logout revokes from when it starts, whatever its answer: one
    # answered 503 may still take effect when Redis catches up.
    revoked: dict = {}  # sid -> [(start, op)] of what may have revoked it
    for _, _, op in revocations(h):
        revoked.setdefault(op.sent.sid, []).append((op.start, op))
    for op in h.ops:
        if op.kind == "logout" and op.sent is not None and op.status != 204:
            revoked.setdefault(op.sent.sid, []).append((op.start, op))
    spent = _spent(h)
    p = h.policy
    bad = []
    for op in h.ops:
        if op.status != 401:
            continue
        if op.kind == "login":
            bad.append(f"correct login answered 401 {op.code} on {op.replica} at {op.start:.3f}")
            continue
        t = op.sent
        if t is None:
            continue
        session_end = min(t.auth_time + p.session, t.exp + p.renew)
        valid_until = t.exp  # verify and refresh without renewal
        renewable_until = t.exp + p.renew
        why = []
        if op.end >= t.auth_time + p.session - tol:
            why.append("session over")
        if op.end >= renewable_until - tol:
            why.append("past the renew limit")
        if any(at <= op.end and by is not op for at, by in revoked.get(t.sid, ())):
            why.append("session revoked")
        # A spent token: refreshing it again after the grace is refused
        # (and revokes its session). A refresh, or a verify that must renew.
        renewing = op.kind == "refresh" or op.end >= valid_until - tol
        if renewing and t.jti in spent and spent[t.jti] + p.grace <= op.end + tol:
            why.append("spent")
        if not why:
            bad.append(f"401 {op.code} for a valid token of session {t.sid} on {op.replica} "
                       f"({op.kind} at {op.start:.3f}-{op.end:.3f}, exp {t.exp}, "
                       f"session end {session_end})")
    return bad


def check_session_end(h: History, tol: float = 0.05) -> list:
    """Invariant 4."""
    p = h.policy
    bad = []
    for op in h.ops:
        t = op.sent
        if t is not None and op.status in ACCEPTED and op.kind in ("verify", "refresh"):
            end = t.auth_time + p.session
            if op.start > end + tol:
                bad.append(f"session {t.sid} accepted by {op.kind} on {op.replica} "
                           f"{op.start - end:.2f}s after its end")
        n = op.new
        if n is not None and n.exp > n.auth_time + p.session:
            bad.append(f"token {n.jti} of session {n.sid} issued with exp {n.exp} past "
                       f"the session end {n.auth_time + int(p.session)}")
    return bad


def check_503s(h: History) -> list:
    """Invariant 5."""
    bad = []
    for op in h.ops:
        if op.status != 503:
            continue
        if any(f.touches(op.replica, op.start, op.end, after=h.recovery) for f in h.faults):
            continue
        bad.append(f"503 {op.code} for {op.kind} on {op.replica} at {op.start:.3f}, "
                   "with no fault on that replica")
    return bad


def figures(h: History) -> dict:
    ops = h.ops
    t0 = min((op.start for op in ops), default=0.0)
    out: dict = {
        "requests": len(ops),
        "by_kind": {},
        "503": sum(op.status == 503 for op in ops),
        "no_answer": sum(op.status == 0 for op in ops),
        "false_401": len(false_401s(h)),
        "logouts": sum(op.kind == "logout" and op.status == 204 for op in ops),
        "racing_refreshes": 0,
    }
    for op in ops:
        out["by_kind"][op.kind] = out["by_kind"].get(op.kind, 0) + 1
    if out["503"]:
        s = [op for op in ops if op.status == 503]
        out["503_window_s"] = [round(min(o.start for o in s) - t0, 2),
                               round(max(o.end for o in s) - t0, 2)]
    out["faults_s"] = [[f.name, round(f.start - t0, 2), round(f.end - t0, 2)] for f in h.faults]
    # The last 503 after each heal: how long recovery took.
    after = 0.0
    for f in h.faults:
        for op in ops:
            if op.status == 503 and op.replica in f.replicas and op.end > f.end:
                after = max(after, op.end - f.end)
    out["last_503_after_heal_s"] = round(after, 2)
    # Racing refreshes: the same token refreshed by more than one request.
    counts: dict = {}
    for op in ops:
        if op.kind == "refresh" and op.sent is not None:
            counts[op.sent.jti] = counts.get(op.sent.jti, 0) + 1
    out["racing_refreshes"] = sum(1 for n in counts.values() if n > 1)
    # After each heal: how long until a logout made while a replica was
    # cut off was refused there (first 401 on it), and the longest that a
    # revoked session was still accepted anywhere after its revocation.
    reach = 0.0
    for f in h.faults:
        if not f.cuts_off:
            continue
        for sid, at, _ in revocations(h):
            if not (f.start <= at <= f.end):
                continue
            for r in f.replicas:
                refused = [op.start for op in ops if op.replica == r and op.sent is not None
                           and op.sent.sid == sid and op.status == 401 and op.start >= f.end]
                if refused:
                    reach = max(reach, min(refused) - f.end)
    out["logout_reach_after_heal_s"] = round(reach, 2)
    first: dict = {}
    for sid, at, _ in revocations(h):
        first[sid] = min(first.get(sid, at), at)
    lag = {}
    for op in ops:
        if op.status in ACCEPTED and op.sent is not None and op.sent.sid in first \
                and op.kind in ("verify", "refresh"):
            late = op.start - first[op.sent.sid]
            lag[op.replica] = max(lag.get(op.replica, 0.0), late)
    out["longest_accept_after_logout_s"] = {r: round(v, 2) for r, v in sorted(lag.items())}
    return out


def check(h: History) -> Verdict:
    return Verdict(
        violations={
            1: check_once(h),
            2: check_logout_reach(h),
            3: false_401s(h),
            4: check_session_end(h),
            5: check_503s(h),
        },
        figures=figures(h),
    )
