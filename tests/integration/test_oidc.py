"""OpenID Connect sign-in against a test provider of our own (oidc_fake):
bad ID tokens one way at a time, `state` misuse, a replayed code, an off-site
`rd`, and the provider down at start. (The good flow is proven against a
real Keycloak elsewhere; here it only shows that the fake's good token
works, so that each refusal below is the one thing that was changed.)"""

from __future__ import annotations

import time
import urllib.parse

import pytest
import requests

from conftest import Server, free_port
from oidc_fake import CLIENT_ID, CLIENT_SECRET, MODES, Fake, start_service

FLOW_COOKIE = "tokenpolicy-oidc"
SESSION_COOKIE = "tokenpolicy"


@pytest.fixture(scope="module")
def fake():
    f = Fake(free_port()).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def server(env, fake):
    srv = start_service(env, fake.issuer, "oidc")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def good_mode(fake):
    fake.mode = "good"
    fake.claims = {}
    yield


def begin(srv: Server, s: requests.Session, rd: str = "/app"):
    """Login, then the provider's authorize: answers the callback URL."""
    r = s.get(srv.url + "/v1/oidc/login", params={"rd": rd}, allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    assert FLOW_COOKIE in s.cookies
    r = s.get(r.headers["Location"], allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    return r.headers["Location"]


def sessions(srv: Server, s: requests.Session) -> bool:
    return SESSION_COOKIE in s.cookies


def code(r: requests.Response) -> str:
    return r.json()["error"]["code"]


def test_login_redirects_with_pkce_state_and_nonce(server, fake):
    s = requests.Session()
    r = s.get(server.url + "/v1/oidc/login", params={"rd": "/app"}, allow_redirects=False, timeout=10)
    assert r.status_code == 302
    loc = urllib.parse.urlsplit(r.headers["Location"])
    q = dict(urllib.parse.parse_qsl(loc.query))
    assert f"{loc.scheme}://{loc.netloc}{loc.path}" == fake.issuer + "/authorize"
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert len(q["state"]) == 43 and len(q["nonce"]) == 43 and q["state"] != q["nonce"]
    assert q["redirect_uri"] == server.url + "/v1/oidc/callback"
    assert q["client_id"] == CLIENT_ID
    assert q["scope"].split() == ["openid", "email", "profile"]
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Max-Age=600" in cookie and "SameSite=Lax" in cookie
    # The verifier and the nonce are not readable in the cookie as such.
    assert q["state"] not in cookie


def test_a_good_token_gives_a_session_with_the_headers(server, fake):
    s = requests.Session()
    cb = begin(server, s)
    r = s.get(cb, allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    assert r.headers["Location"] == "/app"
    assert sessions(server, s)
    v = s.get(server.url + "/v1/verify", timeout=10)
    assert v.status_code == 200, v.text
    assert v.headers["X-Auth-Request-User"] == "fakeuser"
    assert v.headers["Remote-User"] == "fakeuser"
    assert v.headers["X-Auth-Request-Email"] == "fake@example.com"
    assert v.headers["X-Auth-Request-Groups"] == "staff,dev"
    ok = s.get(server.url + "/v1/verify", params={"allowed_groups": "admins,dev"}, timeout=10)
    assert ok.status_code == 200
    no = s.get(server.url + "/v1/verify", params={"allowed_groups": "admins"}, timeout=10)
    assert no.status_code == 403 and code(no) == "FORBIDDEN_GROUP"


def test_unsafe_claims_are_dropped(server, fake):
    fake.claims = {"groups": ["ok", "a,b", "x\r\nSet-Cookie: y"], "email_verified": False}
    s = requests.Session()
    r = s.get(begin(server, s), allow_redirects=False, timeout=10)
    assert r.status_code == 302
    v = s.get(server.url + "/v1/verify", timeout=10)
    assert v.headers["X-Auth-Request-Groups"] == "ok"
    assert "X-Auth-Request-Email" not in v.headers


@pytest.mark.parametrize("mode", [m for m in MODES if m != "good"])
def test_each_bad_id_token_is_refused_with_no_session(server, fake, mode):
    fake.mode = mode
    s = requests.Session()
    r = s.get(begin(server, s), allow_redirects=False, timeout=10)
    assert r.status_code == 401, r.text
    assert code(r) == "INVALID_ID_TOKEN"
    assert not sessions(server, s)
    assert s.get(server.url + "/v1/verify", timeout=10).status_code == 401


def test_unknown_kids_refetch_the_jwks_at_most_once_per_10s(server, fake):
    fake.mode = "unknown_kid"
    before = fake.jwks_fetches
    for _ in range(5):
        s = requests.Session()
        r = s.get(begin(server, s), allow_redirects=False, timeout=10)
        assert code(r) == "INVALID_ID_TOKEN"
    assert fake.jwks_fetches - before <= 1


def test_state_replay_tamper_missing_and_other_browser(server, fake):
    s = requests.Session()
    cb = begin(server, s)
    flow = s.cookies[FLOW_COOKIE]
    # Missing state.
    no_state = cb.split("&state=")[0] if "&state=" in cb else cb.split("?")[0]
    r = s.get(no_state, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and code(r) == "INVALID_STATE"
    # Another browser (no flow cookie) with this state.
    r = requests.get(cb, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and code(r) == "INVALID_STATE"
    # A tampered cookie.
    body, tag = flow.split(".")
    forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + tag
    r = requests.get(cb, cookies={FLOW_COOKIE: forged}, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and code(r) == "INVALID_STATE"
    # The right browser: a session, once.
    r = requests.get(cb, cookies={FLOW_COOKIE: flow}, allow_redirects=False, timeout=10)
    assert r.status_code == 302, r.text
    # Replayed (same cookie, same state): refused, no new session.
    r = requests.get(cb, cookies={FLOW_COOKIE: flow}, allow_redirects=False, timeout=10)
    assert r.status_code == 400 and code(r) == "INVALID_STATE"
    assert "already" in r.json()["error"]["message"]
    assert SESSION_COOKIE not in r.cookies


def test_a_replayed_code_is_refused(server, fake):
    s = requests.Session()
    cb = begin(server, s)
    assert s.get(cb, allow_redirects=False, timeout=10).status_code == 302
    # A new flow of this browser, with the old (spent) code.
    s2 = requests.Session()
    cb2 = begin(server, s2)
    old_code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb).query))["code"]
    q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb2).query))
    replay = server.url + "/v1/oidc/callback?" + urllib.parse.urlencode({"code": old_code, "state": q["state"]})
    r = s2.get(replay, allow_redirects=False, timeout=10)
    assert r.status_code == 401 and code(r) == "PROVIDER_REFUSED", r.text
    assert not sessions(server, s2)


def test_an_off_site_rd_is_refused(server, fake):
    for rd in ["https://evil.example.org/", "//evil.example.org/x"]:
        r = requests.get(server.url + "/v1/oidc/login", params={"rd": rd}, allow_redirects=False, timeout=10)
        assert r.status_code == 400 and code(r) == "INVALID_REDIRECT", rd
        assert FLOW_COOKIE not in r.cookies


def test_a_browser_gets_a_page_that_says_why(server, fake):
    fake.mode = "wrong_aud"
    s = requests.Session()
    r = s.get(begin(server, s), allow_redirects=False, timeout=10, headers={"Accept": "text/html"})
    assert r.status_code == 401
    assert "text/html" in r.headers["Content-Type"]
    assert "INVALID_ID_TOKEN" in r.text and "aud" in r.text


def test_allowed_groups_refuse_a_non_member_at_the_callback(env, fake):
    srv = start_service(env, fake.issuer, "oidc-groups", extra="    allowedGroups: [admins]\n")
    try:
        s = requests.Session()
        r = s.get(begin(srv, s), allow_redirects=False, timeout=10, headers={"Accept": "text/html"})
        assert r.status_code == 403 and "FORBIDDEN_USER" in r.text
        assert "group" in r.text
        assert not sessions(srv, s)
        fake.claims = {"groups": ["admins"]}
        s = requests.Session()
        assert s.get(begin(srv, s), allow_redirects=False, timeout=10).status_code == 302
    finally:
        srv.stop()


def test_the_signin_page_has_the_provider_button(server):
    r = requests.get(server.url + "/v1/login", params={"rd": "/app"}, timeout=10)
    assert r.status_code == 200
    assert 'href="oidc/login?rd=%2Fapp"' in r.text and "Sign in with Fake IdP" in r.text
    assert "<script" not in r.text


def test_provider_down_at_start_then_ready(env):
    port = free_port()
    srv = start_service(env, f"http://127.0.0.1:{port}", "oidc-down", wait=False)
    fake = None
    try:
        deadline = time.monotonic() + 15
        r = None
        while time.monotonic() < deadline:
            try:
                r = requests.get(srv.url + "/readyz", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        assert r is not None and r.status_code == 503
        assert code(r) == "PROVIDER_UNAVAILABLE" and "not discovered" in r.json()["error"]["message"]
        assert requests.get(srv.url + "/healthz", timeout=1).status_code == 200
        r = requests.get(srv.url + "/v1/oidc/login", allow_redirects=False, timeout=5)
        assert r.status_code == 503 and code(r) == "PROVIDER_UNAVAILABLE"
        time.sleep(1.5)
        warns = [l for l in srv.log_text().splitlines() if "WARN" in l and "OpenID Connect provider" in l]
        assert len(warns) == 1, warns
        fake = Fake(port).start()
        srv.wait_ready(timeout=40)
        s = requests.Session()
        assert s.get(begin(srv, s), allow_redirects=False, timeout=10).status_code == 302
        assert CLIENT_SECRET not in srv.log_text()
    finally:
        srv.stop()
        if fake:
            fake.stop()
