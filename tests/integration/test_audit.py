"""The audit trail (`--audit-log`) on two replicas sharing one real
redis-server, each writing its own file: every event that the service
emits is driven across the two, and the lines are checked: on the replica
that handled the request, once, with their fields, and without any secret
of the run (passwords, hashes, tokens, password versions)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import Server, _bcrypt_2y, binary_path, child_env, free_port

#: The fields every line carries (null when they do not apply).
COMMON = ["time", "event", "user", "provider", "sid", "client_address", "user_agent",
          "result", "actor"]
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

#: Users of this test alone, in a users file of its own.
NAMES = ["ok", "fail", "thr", "renew", "reuse", "out", "end", "every", "lim", "pw", "exp",
         "refuse"]
SESSION = 8  # seconds: the session validity of the test's policy


def policy_text(action: str = "RevokeOldest") -> str:
    return (
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: audit}\n"
        "spec:\n"
        f"  sessionExpirationTime: {SESSION}s\n"
        "  tokenExpirationTime: 2s\n"
        "  expiredTokenRenewLimit: 3s\n"
        "  refreshGracePeriod: 1s\n"
        "  maxSessionsPerUser: 2\n"
        f"  sessionLimitAction: {action}\n"
    )


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Trail:
    """One replica's audit file, read as JSON lines."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for raw in self.path.read_text().splitlines():
            out.append(json.loads(raw))
        return out

    def raw(self) -> str:
        return self.path.read_text() if self.path.exists() else ""

    def find(self, **fields) -> list[dict]:
        return [e for e in self.lines() if all(e.get(k) == v for k, v in fields.items())]


@pytest.fixture
def audited(env, redis):
    """Two replicas on the module's Redis (a prefix of their own), one
    policy file and one users file of this test, each replica with its own
    audit file."""
    tag = uuid.uuid4().hex[:8]
    passwords = {n: f"{n}-secret-{uuid.uuid4().hex[:12]}" for n in NAMES}
    hashes = {n: _bcrypt_2y(pw) for n, pw in passwords.items()}
    users = env.workdir / f"users-audit-{tag}"
    users.write_text("".join(f"{n}:{h}\n" for n, h in hashes.items()))
    policy = env.workdir / f"policy-audit-{tag}.yaml"
    policy.write_text(policy_text())
    servers, trails = [], []
    for name in ("audit-a", "audit-b"):
        log = env.workdir / f"{name}-{tag}.audit.jsonl"
        s = Server(name, env.workdir, policy, users, [env.key_file], redis.url,
                   ["--redis-prefix", f"audit-{tag}", "--max-failed-logins-per-user", "3",
                    "--audit-log", str(log)])
        servers.append(s)
        trails.append(Trail(log))
    try:
        for s in servers:
            s.launch()
        yield servers, trails, passwords, hashes, users, policy
    finally:
        for s in servers:
            s.stop()


def ua(server: Server) -> dict:
    return {"User-Agent": f"pytest-audit {server.name}"}


def login(server: Server, name: str, password: str) -> requests.Response:
    return requests.post(server.url + "/v1/login", json={"username": name, "password": password},
                         headers=ua(server), timeout=30)


def bearer(server: Server, token: str) -> dict:
    return {"Authorization": f"Bearer {token}", **ua(server)}


def sid_of(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sid"]


def claims_of(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def wait_for(cond, timeout: float = 6.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def once_on(trails, index: int, **fields) -> dict:
    """The one line matching `fields`, on replica `index` and not the other."""
    here = wait_for(lambda: trails[index].find(**fields), what=f"{fields} on replica {index}")
    assert len(here) == 1, f"{len(here)} lines for {fields}: {here}"
    other = trails[1 - index].find(**fields)
    assert other == [], f"also on the other replica: {other}"
    return here[0]


def test_every_event_on_the_replica_that_handled_it_once_and_without_secrets(audited):
    (a, b), trails, pw, hashes, users_file, policy_file = audited
    tokens: list[str] = []

    def issued(r: requests.Response) -> str:
        assert r.status_code == 200, r.text
        t = r.json()["access_token"]
        tokens.append(t)
        return t

    # Its session ends while the others are driven; it is shown again at the end.
    exp_token = issued(login(a, "exp", pw["exp"]))
    exp_started = time.monotonic()

    # login_succeeded, on A only, with every field.
    t = issued(login(a, "ok", pw["ok"]))
    e = once_on(trails, 0, event="login_succeeded", user="ok")
    assert e["sid"] == sid_of(t)
    assert e["client_address"] == "127.0.0.1"
    assert e["user_agent"] == "pytest-audit audit-a"
    assert (e["result"], e["method"], e["provider"], e["actor"]) == ("success", "password", None, None)

    # login_failed with the reason code, on B.
    assert login(b, "fail", "wrong").status_code == 401
    e = once_on(trails, 1, event="login_failed", user="fail")
    assert (e["reason"], e["result"], e["sid"]) == ("INVALID_CREDENTIALS", "failure", None)

    # Throttled: three failures, then the limit refuses (on A).
    for _ in range(3):
        assert login(a, "thr", "wrong").status_code == 401
    assert login(a, "thr", pw["thr"]).status_code == 429
    wait_for(lambda: len(trails[0].find(event="login_failed", user="thr")) == 3, what="3 failures")
    e = once_on(trails, 0, event="login_refused", user="thr")
    assert (e["reason"], e["limit"], e["result"]) == ("throttled", "max_failed_logins_per_user", "refused")

    # token_renewed: by /v1/refresh on B, then on the fly by /v1/verify on A.
    t = issued(login(a, "renew", pw["renew"]))
    r = requests.post(b.url + "/v1/refresh", headers=bearer(b, t), timeout=5)
    t2 = issued(r)
    e = once_on(trails, 1, event="token_renewed", user="renew", via="refresh")
    assert (e["sid"], e["user_agent"]) == (sid_of(t), "pytest-audit audit-b")
    time.sleep(claims_of(t2)["exp"] - time.time() + 0.2)
    r = requests.get(a.url + "/v1/verify", headers=bearer(a, t2), timeout=5)
    assert r.status_code == 200 and r.headers.get("X-New-Token"), (r.status_code, r.headers)
    tokens.append(r.headers["X-New-Token"])
    once_on(trails, 0, event="token_renewed", user="renew", via="verify")

    # refresh_reuse_detected: refreshed on A, the spent token shown on B past the grace.
    t = issued(login(a, "reuse", pw["reuse"]))
    issued(requests.post(a.url + "/v1/refresh", headers=bearer(a, t), timeout=5))
    time.sleep(1.3)
    r = requests.post(b.url + "/v1/refresh", headers=bearer(b, t), timeout=5)
    assert r.json()["error"]["code"] == "TOKEN_ALREADY_REFRESHED", r.text
    e = once_on(trails, 1, event="refresh_reuse_detected", user="reuse")
    assert (e["result"], e["via"], e["sid"]) == ("revoked", "refresh", sid_of(t))

    # logout: logged in on B, out on A.
    t = issued(login(b, "out", pw["out"]))
    assert requests.post(a.url + "/v1/logout", headers=bearer(a, t), timeout=5).status_code == 204
    e = once_on(trails, 0, event="logout", user="out")
    assert (e["sid"], e["everywhere"], e["result"]) == (sid_of(t), False, "success")

    # One session ended by its user from another, on B.
    t1 = issued(login(a, "end", pw["end"]))
    t2 = issued(login(b, "end", pw["end"]))
    r = requests.delete(f"{b.url}/v1/sessions/{sid_of(t1)}", headers=bearer(b, t2), timeout=5)
    assert r.status_code == 204, r.text
    e = once_on(trails, 1, event="session_revoked", user="end")
    assert (e["sid"], e["by"], e["reason"]) == (sid_of(t1), "user", "ended_by_user")

    # Logout everywhere from A: the logout, and the other session revoked.
    t1 = issued(login(b, "every", pw["every"]))
    t2 = issued(login(a, "every", pw["every"]))
    r = requests.post(a.url + "/v1/logout?everywhere=true", headers=bearer(a, t2), timeout=5)
    assert r.status_code == 204, r.text
    e = once_on(trails, 0, event="logout", user="every")
    assert (e["sid"], e["everywhere"], e["sessions"]) == (sid_of(t2), True, 1)
    e = once_on(trails, 0, event="session_revoked", user="every")
    assert (e["sid"], e["by"], e["reason"]) == (sid_of(t1), "user", "logout_everywhere")

    # The session limit (2, RevokeOldest): the third login, on A, ends the first.
    first = issued(login(b, "lim", pw["lim"]))
    issued(login(b, "lim", pw["lim"]))
    issued(login(a, "lim", pw["lim"]))
    e = once_on(trails, 0, event="session_revoked", user="lim")
    assert (e["sid"], e["by"], e["reason"]) == (sid_of(first), "session_limit", "max_sessions_per_user")
    assert e["user_agent"] == "pytest-audit audit-a"

    # A password change in the users file, which both replicas read: each
    # session of the user is reported once, by one replica.
    p1 = issued(login(a, "pw", pw["pw"]))
    p2 = issued(login(b, "pw", pw["pw"]))
    new_pw = f"pw-changed-{uuid.uuid4().hex[:12]}"
    new_hash = _bcrypt_2y(new_pw)
    text = users_file.read_text().replace(hashes["pw"], new_hash)
    write_atomically(users_file, text)
    wait_for(lambda: len(trails[0].find(event="session_revoked", user="pw"))
             + len(trails[1].find(event="session_revoked", user="pw")) >= 2,
             timeout=10, what="the password change's revocations")
    time.sleep(3)  # both replicas have read the change by now
    revoked = trails[0].find(event="session_revoked", user="pw") + \
        trails[1].find(event="session_revoked", user="pw")
    assert sorted(e["sid"] for e in revoked) == sorted([sid_of(p1), sid_of(p2)]), revoked
    for e in revoked:
        assert (e["by"], e["reason"], e["client_address"]) == ("password_change", "password_changed", None)

    # session_expired: the session of the first login is over; shown to
    # both replicas again and again, it is reported once.
    time.sleep(max(0.0, SESSION + 0.5 - (time.monotonic() - exp_started)))
    for s in (a, b, a, b):
        r = requests.get(s.url + "/v1/verify", headers=bearer(s, exp_token), timeout=5)
        assert r.json()["error"]["code"] == "EXPIRED_SESSION", r.text
    wait_for(lambda: trails[0].find(event="session_expired") + trails[1].find(event="session_expired"),
             what="session_expired")
    time.sleep(1)
    expired = trails[0].find(event="session_expired") + trails[1].find(event="session_expired")
    assert len(expired) == 1, expired
    assert (expired[0]["user"], expired[0]["sid"], expired[0]["result"]) == \
        ("exp", sid_of(exp_token), "refused")

    # RefuseNew: the limit refuses a login (on B) once the policy says so.
    write_atomically(policy_file, policy_text("RefuseNew"))
    issued(login(a, "refuse", pw["refuse"]))
    issued(login(a, "refuse", pw["refuse"]))
    deadline = time.monotonic() + 10
    while True:
        r = login(b, "refuse", pw["refuse"])
        if r.status_code == 409 or time.monotonic() > deadline:
            break
        issued(r)  # the policy not read yet: that login took the oldest's place
        time.sleep(0.5)
    assert r.json()["error"]["code"] == "SESSION_LIMIT", r.text
    e = once_on(trails, 1, event="login_refused", user="refuse")
    assert (e["reason"], e["limit"]) == ("session_limit", "max_sessions_per_user")

    # Every line: the common fields, the time's form, a known event; each
    # line one JSON object.
    known = {"login_succeeded", "login_failed", "login_refused", "token_renewed",
             "refresh_reuse_detected", "logout", "session_revoked", "session_expired",
             "session_idle"}
    for trail in trails:
        for e in trail.lines():
            for f in COMMON:
                assert f in e, f"{f} missing from {e}"
            assert TIME.match(e["time"]), e
            assert e["event"] in known, e

    # No secret of the run in any line.
    secrets = list(pw.values()) + list(hashes.values()) + [new_pw, new_hash] + tokens
    secrets += [claims_of(t)["pwv"] for t in tokens if claims_of(t).get("pwv")]
    secrets += [t.split(".")[2] for t in tokens]  # signatures alone
    for trail in trails:
        raw = trail.raw()
        assert raw, f"{trail.path} is empty"
        for s in secrets:
            assert s not in raw, f"a secret ({s[:6]}...) is in {trail.path}"

    # The counters on /metrics count what each replica wrote.
    for s, trail in zip((a, b), trails):
        text = requests.get(s.url + "/metrics", timeout=5).text
        for event in known:
            m = re.search(r'^tokenpolicy_audit_events_total\{event="%s"\} (\d+)' % event, text, re.M)
            assert m, f"no counter for {event}"
            assert int(m.group(1)) == len(trail.find(event=event)), (s.name, event)


def test_sighup_reopens_the_file_for_logrotate(audited):
    (a, _b), trails, pw, *_ = audited
    assert login(a, "ok", pw["ok"]).status_code == 200
    wait_for(lambda: trails[0].find(event="login_succeeded"), what="the first line")
    rotated = trails[0].path.with_name(trails[0].path.name + ".1")
    os.rename(trails[0].path, rotated)
    a.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert a.running(), "SIGHUP stopped the service"
    assert login(a, "fail", "wrong").status_code == 401
    wait_for(lambda: trails[0].find(event="login_failed"), what="a line in the new file")
    assert [e["event"] for e in Trail(rotated).lines()] == ["login_succeeded"]
    assert [e["event"] for e in trails[0].lines()] == ["login_failed"]


def test_dash_writes_the_trail_to_stdout_apart_from_the_log(env, tmp_path):
    port = free_port()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    argv = [str(binary_path()), "serve", "--users", str(env.users_file),
            "--listen", f"127.0.0.1:{port}", "--audit-log", "-"]
    with open(out, "wb") as o, open(err, "wb") as e:
        p = subprocess.Popen(argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=child_env())
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), timeout=15, what="the server")
        r = requests.post(url + "/v1/login", json={"username": "alice", "password": "wrong"},
                          timeout=10)
        assert r.status_code == 401
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=15)
    lines = out.read_text().splitlines()
    assert lines, "nothing on stdout"
    events = [json.loads(l)["event"] for l in lines]  # every stdout line is an audit line
    assert events == ["login_failed"], events
    assert "login_failed" not in err.read_text()
    assert "starting token service" in err.read_text()


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False
