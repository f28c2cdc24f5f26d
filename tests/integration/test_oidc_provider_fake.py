"""Back-channel logout tokens and renewal re-checks that a real provider
never makes: from our test provider (oidc_fake), each logout token wrong
in one way at a time, a replay across replicas, and refresh_token grants
answered with a refusal, an error that is not one, or a rotated token.
(Keycloak's own tokens and refusals: test_oidc_keycloak_provider.py.)"""

from __future__ import annotations

import re
import secrets
import subprocess
import time

import pytest
import requests

from conftest import Server, free_port
from oidc_fake import LOGOUT_MODES, Fake, start_service

LOGOUT = "/v1/oidc/backchannel-logout"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def fake():
    f = Fake(free_port()).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def server(env, fake):
    srv = start_service(env, fake.issuer, "oidc-bcl")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def reset(fake):
    fake.mode, fake.claims, fake.refresh_answer = "good", {}, None
    yield


def sign_in(srv: Server, fake: Fake, sub: str = "fake-sub-1", psid=None) -> requests.Session:
    """A session of `sub` through the fake, its ID token carrying `psid` as `sid`."""
    fake.claims = {"sub": sub, **({"sid": psid} if psid else {})}
    s = requests.Session()
    r = s.get(srv.url + "/v1/oidc/login", params={"rd": "/app"}, allow_redirects=False,
              timeout=10)
    assert r.status_code == 302, r.text
    r = s.get(r.headers["Location"], allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    r = s.get(r.headers["Location"], allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    return s


def verify(s: requests.Session, srv: Server) -> requests.Response:
    return s.get(srv.url + "/v1/verify", timeout=10)


def post_logout(srv: Server, token: str) -> requests.Response:
    return requests.post(srv.url + LOGOUT, data={"logout_token": token}, timeout=10)


def code(r: requests.Response) -> str:
    return r.json()["error"]["code"]


def counter(srv: Server, result: str) -> int:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    m = re.search(r'^tokenpolicy_oidc_recheck_total\{result="%s"\} (\d+)' % result, text, re.M)
    assert m, text[:1500]
    return int(m.group(1))


# --------------------------------------------------------------------------
# Back-channel logout
# --------------------------------------------------------------------------


def test_logout_tokens_wrong_one_way_are_refused_and_end_nothing(server, fake):
    psid = "ps-" + secrets.token_hex(4)
    s = sign_in(server, fake, psid=psid)
    for mode in LOGOUT_MODES:
        if mode == "good":
            continue
        r = post_logout(server, fake.logout_token(mode, sid=psid))
        assert r.status_code == 400, (mode, r.status_code, r.text)
        assert code(r) == "INVALID_LOGOUT_TOKEN", mode
        assert r.headers["Cache-Control"] == "no-store", mode
        assert verify(s, server).status_code == 200, f"{mode} ended the session"
    good = fake.logout_token(sid=psid)
    # Not a form post, no token, two tokens: refused too.
    for r in (
        requests.post(server.url + LOGOUT, json={"logout_token": good}, timeout=10),
        requests.post(server.url + LOGOUT, data={"other": "x"}, timeout=10),
        requests.post(server.url + LOGOUT, data=[("logout_token", good)] * 2, headers=FORM,
                      timeout=10),
    ):
        assert r.status_code == 400 and code(r) == "INVALID_LOGOUT_TOKEN", r.text
    assert verify(s, server).status_code == 200
    r = post_logout(server, good)
    assert r.status_code == 200, r.text
    assert r.headers["Cache-Control"] == "no-store"
    v = verify(s, server)
    assert v.status_code == 401 and code(v) == "REVOKED_SESSION", v.text
    again = post_logout(server, good)
    assert again.status_code == 400 and "already used" in again.json()["error"]["message"]


def test_a_logout_token_by_sid_ends_that_provider_session_and_by_sub_all(server, fake):
    one = sign_in(server, fake, sub="u-many", psid="ps-one-" + secrets.token_hex(3))
    two = sign_in(server, fake, sub="u-many", psid="ps-two-" + secrets.token_hex(3))
    other = sign_in(server, fake, sub="u-other", psid="ps-x-" + secrets.token_hex(3))
    # A provider session of none of ours: nothing ends.
    r = post_logout(server, fake.logout_token(sid="ps-none-" + secrets.token_hex(3), sub=None))
    assert r.status_code == 200, r.text
    for s in one, two, other:
        assert verify(s, server).status_code == 200
    # By sub alone: every session of that user, no other.
    r = post_logout(server, fake.logout_token(sub="u-many"))
    assert r.status_code == 200, r.text
    for s in one, two:
        v = verify(s, server)
        assert v.status_code == 401 and code(v) == "REVOKED_SESSION", v.text
    assert verify(other, server).status_code == 200


def test_a_logout_token_is_taken_once_across_replicas(env, redis, fake):
    a = start_service(env, fake.issuer, "bcl-a", redis.url, wait=False)
    b = start_service(env, fake.issuer, "bcl-b", redis.url, external=a.url, wait=False)
    try:
        a.wait_ready()
        b.wait_ready()
        psid = "ps-" + secrets.token_hex(4)
        s = sign_in(a, fake, psid=psid)
        for srv in a, b:
            assert verify(s, srv).status_code == 200
        token = fake.logout_token(sid=psid)
        r = post_logout(b, token)
        assert r.status_code == 200, r.text
        began = time.monotonic()
        pending = {a.name: a, b.name: b}
        while pending and time.monotonic() - began < 1.0:
            for name, srv in list(pending.items()):
                if verify(s, srv).status_code == 401:
                    del pending[name]
            time.sleep(0.02)
        assert not pending, f"still signed in after 1 s on {sorted(pending)}"
        for srv in a, b:
            r = post_logout(srv, token)
            assert r.status_code == 400 and code(r) == "INVALID_LOGOUT_TOKEN", r.text
    finally:
        a.stop()
        b.stop()


# --------------------------------------------------------------------------
# Renewal re-check
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(env, redis, fake):
    """One replica on Redis with 2 s tokens."""
    srv = start_service(env, fake.issuer, "recheck-quick", redis.url, token="2s")
    yield srv
    srv.stop()


def renew(s: requests.Session, srv: Server) -> requests.Response:
    time.sleep(2.6)
    return verify(s, srv)


def test_the_refresh_token_rotates_and_is_never_shown(quick, fake, redis):
    s = sign_in(quick, fake)
    issued = fake.refresh_tokens[-1]
    grants = len(fake.refresh_grants)
    ok = counter(quick, "ok")
    r = renew(s, quick)
    assert r.status_code == 200 and "X-New-Token" in r.headers, r.text
    assert fake.refresh_grants[grants:] == [issued]
    rotated = fake.refresh_tokens[-1]
    assert rotated != issued
    r = renew(s, quick)
    assert r.status_code == 200 and "X-New-Token" in r.headers, r.text
    # The next grant presents the rotated token, once.
    assert fake.refresh_grants[grants:] == [issued, rotated]
    assert counter(quick, "ok") == ok + 2
    # Neither token is in our token, a cookie, a log line or Redis in clear.
    seen = " ".join([r.headers.get("X-New-Token", ""), str(dict(s.cookies)),
                     quick.log_text(0, 10**7)])
    dump = subprocess.run(["redis-cli", "-u", redis.url, "--scan"], capture_output=True,
                          text=True, timeout=10).stdout.split()
    values = []
    for key in dump:
        if key.endswith(":oidc-refresh"):
            values.append(subprocess.run(["redis-cli", "-u", redis.url, "GET", key],
                                         capture_output=True, text=True, timeout=10).stdout)
    assert values, "no sealed refresh token in Redis"
    for rt in (issued, rotated, fake.refresh_tokens[-1]):
        assert rt not in seen
        assert all(rt not in v for v in values)
    assert all(v.startswith("v1.") for v in values)


def test_invalid_grant_revokes_and_other_errors_do_not(quick, fake):
    s = sign_in(quick, fake)
    fake.refresh_answer = "invalid_client"  # our side misconfigured: no refusal
    unavailable = counter(quick, "unavailable")
    r = renew(s, quick)
    assert r.status_code == 200 and "X-New-Token" in r.headers, r.text
    assert counter(quick, "unavailable") == unavailable + 1
    fake.refresh_answer = "invalid_grant"
    refused = counter(quick, "refused")
    r = renew(s, quick)
    assert r.status_code == 401 and code(r) == "REVOKED_SESSION", r.text
    assert counter(quick, "refused") == refused + 1
    fake.refresh_answer = None
    grants = len(fake.refresh_grants)
    v = verify(s, quick)
    assert v.status_code == 401 and code(v) == "REVOKED_SESSION"
    assert len(fake.refresh_grants) == grants, "a revoked session asked the provider again"
