"""OpenID Connect sign-in against the real Keycloak (keycloak_support.py).

Two `tokenpolicy serve` replicas share one redis-server and one external URL
(replica a's); Keycloak's realm `tokenpolicy` signs users in through its own
login form. A cookie-keeping HTTP client plays the browser:

* alice, bob and carol sign in and get the identity headers on both
  replicas, also when the callback lands on the other replica;
* a replayed callback, a tampered `state`, a callback from another browser,
  a code already exchanged and an off-site `rd` are refused, with no session;
* `allowed_groups` at /v1/verify, and `allowedGroups` in the policy;
* our session ends at `sessionExpirationTime` while Keycloak's goes on, and
  signing in again passes Keycloak with one redirect and no password form.

Keycloak is required: without it the `keycloak` fixture fails, it never skips.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import statistics
import time
import urllib.parse
from dataclasses import dataclass
from typing import Optional

import pytest
import requests

from conftest import Env, Redis, Server, free_port
from keycloak_support import USERS, _FormParser, keycloak, login_through_keycloak  # noqa: F401

FLOW_COOKIE = "tokenpolicy-oidc"
SESSION_COOKIE = "tokenpolicy"
CALLBACK = "/v1/oidc/callback"


def policy_text(kc, external: str, session: str = "1h", token: str = "10m",
                renew: str = "5m", extra: str = "") -> str:
    return (
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: oidc-keycloak}\n"
        "spec:\n"
        f"  sessionExpirationTime: {session}\n"
        f"  tokenExpirationTime: {token}\n"
        f"  expiredTokenRenewLimit: {renew}\n"
        "  cookie: {secure: false}\n"
        f"  externalURL: {external}\n"
        "  oidc:\n"
        f"    issuerURL: {kc.issuer}\n"
        f"    clientID: {kc.client_id}\n"
        "    clientSecretRef: {name: tokenpolicy-oidc, key: client-secret}\n"
        "    caSecretRef: {name: idp-ca, key: ca.crt}\n"
        "    providerName: Keycloak\n"
        f"{extra}"
    )


_COUNTER = [0]


def start_replica(env: Env, kc, name: str, redis_url: Optional[str], port: int, external: str,
                  wait: bool = True, **policy) -> Server:
    """One `tokenpolicy serve` on `port`, signing in through Keycloak."""
    _COUNTER[0] += 1
    pfile = env.workdir / f"policy-kc-{name}-{_COUNTER[0]}.yaml"
    pfile.write_text(policy_text(kc, external, **policy))
    secret = env.workdir / "keycloak-client-secret"
    secret.write_text(kc.client_secret + "\n")
    secret.chmod(0o600)
    srv = Server(name, env.workdir, pfile, env.users_file, [env.key_file], redis_url,
                 ["--oidc-client-secret-file", str(secret), "--oidc-ca-file", str(kc.ca_file)])
    srv.port = port
    i = srv.argv.index("--listen")
    srv.argv[i + 1] = f"127.0.0.1:{port}"
    return srv.launch(wait)


@dataclass
class Pair:
    a: Server
    b: Server
    redis: Redis
    external: str


@pytest.fixture(scope="module")
def kc(keycloak):  # noqa: F811
    # Any port of http://127.0.0.1 for our callback (Keycloak's loopback
    # rule); another module may have left its own redirect URI registered.
    keycloak.set_client_redirects([f"http://127.0.0.1{CALLBACK}"])
    return keycloak


@pytest.fixture(scope="module")
def pair(env, redis, kc):
    """Replicas a and b: one Redis, one signing key, one external URL (a's)."""
    port_a, port_b = free_port(), free_port()
    external = f"http://127.0.0.1:{port_a}"
    started = []
    try:
        a = start_replica(env, kc, "kc-a", redis.url, port_a, external, wait=False)
        started.append(a)
        b = start_replica(env, kc, "kc-b", redis.url, port_b, external, wait=False)
        started.append(b)
        a.wait_ready()
        b.wait_ready()
        yield Pair(a=a, b=b, redis=redis, external=external)
    finally:
        for s in started:
            s.stop()


@pytest.fixture
def single(env, kc):
    """Factory: one more replica with its own policy (memory store); stopped at test end."""
    started = []

    def _start(name: str, **policy) -> Server:
        port = free_port()
        srv = start_replica(env, kc, name, None, port, f"http://127.0.0.1:{port}", **policy)
        started.append(srv)
        return srv

    yield _start
    for s in started:
        s.stop()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def browser(kc) -> requests.Session:
    """A fresh cookie jar: trusts the test CA only, ignores the environment's proxy and CA."""
    s = requests.Session()
    s.trust_env = False
    s.verify = str(kc.ca_file)
    return s


def get(s: requests.Session, url: str, **kw) -> requests.Response:
    return s.get(url, allow_redirects=False, timeout=15, verify=s.verify, **kw)


def code_of(r: requests.Response) -> str:
    return r.json()["error"]["code"]


def to_callback(kc, s: requests.Session, login_base: str, user: str, rd: str = "/app") -> str:
    """Start at `login_base`/v1/oidc/login, sign in at Keycloak's form; return the callback URL."""
    login = f"{login_base}/v1/oidc/login?{urllib.parse.urlencode({'rd': rd})}"
    r = login_through_keycloak(s, login, user, USERS[user])
    assert r.status_code in (302, 303), (r.status_code, getattr(r, "keycloak_errors", None), r.text[:300])
    return urllib.parse.urljoin(r.url, r.headers["Location"])


def on(url: str, srv: Server) -> str:
    """The same URL (path and query) sent to `srv`."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(("http", f"127.0.0.1:{srv.port}", parts.path, parts.query, ""))


def query(url: str) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def with_query(url: str, **changes) -> str:
    parts = urllib.parse.urlsplit(url)
    q = query(url)
    q.update(changes)
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def sets_session(r: requests.Response) -> bool:
    return any(c.startswith(SESSION_COOKIE + "=")
               for c in r.raw.headers.getlist("Set-Cookie"))


def verify(s: requests.Session, srv: Server, **params) -> requests.Response:
    return get(s, srv.url + "/v1/verify", params=params or None)


def assert_no_session(s: requests.Session, r: requests.Response, srv: Server) -> None:
    assert not sets_session(r), r.raw.headers.getlist("Set-Cookie")
    assert SESSION_COOKIE not in s.cookies
    assert verify(s, srv).status_code == 401


def flow_cookie_of(s: requests.Session) -> str:
    value = s.cookies.get(FLOW_COOKIE)
    assert value, f"no {FLOW_COOKIE} cookie in {list(s.cookies.keys())}"
    return value


def sign_in(kc, pair: Pair, user: str) -> requests.Session:
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, user)
    r = get(s, cb)
    assert r.status_code == 302, r.text
    return s


# --------------------------------------------------------------------------
# 1. The flow
# --------------------------------------------------------------------------


def test_alice_signs_in_through_keycloak_and_both_replicas_know_her(kc, pair):
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, "alice", rd="/app/page?x=1")
    # Keycloak sends her back to our external URL's callback with a code
    # and the state we sent.
    assert cb.startswith(pair.external + CALLBACK + "?"), cb
    assert {"code", "state"} <= query(cb).keys()
    r = get(s, cb)
    assert r.status_code == 302, r.text
    assert r.headers["Location"] == "/app/page?x=1"
    assert sets_session(r)
    for srv in pair.a, pair.b:
        v = verify(s, srv)
        assert v.status_code == 200, (srv, v.text)
        assert v.headers["X-Auth-Request-User"] == "alice"
        assert v.headers["Remote-User"] == "alice"
        assert v.headers["X-Auth-Request-Email"] == "alice@example.com"
        assert v.headers["X-Auth-Request-Groups"] == "admins,staff"


def test_the_callback_may_land_on_the_other_replica(kc, pair):
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, "alice")
    r = get(s, on(cb, pair.b))
    assert r.status_code == 302, r.text
    assert sets_session(r)
    for srv in pair.b, pair.a:
        v = verify(s, srv)
        assert v.status_code == 200, (srv, v.text)
        assert v.headers["X-Auth-Request-User"] == "alice"
    # And the other way round: login at b, callback at a.
    s2 = browser(kc)
    cb2 = to_callback(kc, s2, pair.b.url, "bob")
    r2 = get(s2, on(cb2, pair.a))
    assert r2.status_code == 302, r2.text
    v = verify(s2, pair.b)
    assert v.status_code == 200 and v.headers["X-Auth-Request-User"] == "bob"
    assert v.headers["X-Auth-Request-Email"] == "bob@example.org"
    assert v.headers["X-Auth-Request-Groups"] == "staff"


def test_carol_with_an_unverified_email_gets_no_email_header(kc, pair):
    s = sign_in(kc, pair, "carol")
    for srv in pair.a, pair.b:
        v = verify(s, srv)
        assert v.status_code == 200, v.text
        assert v.headers["X-Auth-Request-User"] == "carol"
        assert "X-Auth-Request-Email" not in v.headers
        assert not v.headers.get("X-Auth-Request-Groups")


# --------------------------------------------------------------------------
# 2. Refused, with no session
# --------------------------------------------------------------------------


def test_a_replayed_callback_is_refused(kc, pair):
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, "alice")
    flow = flow_cookie_of(s)
    first = get(s, cb)
    assert first.status_code == 302, first.text
    # The same state, code and flow cookie again, from a jar without our
    # session, at either replica.
    for srv in pair.a, pair.b:
        replay = browser(kc)
        replay.cookies.set(FLOW_COOKIE, flow, domain="127.0.0.1", path="/")
        r = get(replay, on(cb, srv))
        assert r.status_code == 400, r.text
        assert code_of(r) == "INVALID_STATE"
        assert_no_session(replay, r, srv)


def test_a_tampered_state_is_refused(kc, pair):
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, "alice")
    state = query(cb)["state"]
    flipped = ("A" if state[0] != "A" else "B") + state[1:]
    r = get(s, with_query(cb, state=flipped))
    assert r.status_code == 400, r.text
    assert code_of(r) == "INVALID_STATE"
    assert_no_session(s, r, pair.a)
    missing = get(s, on(cb, pair.a).split("?")[0] + "?" + urllib.parse.urlencode(
        {"code": query(cb)["code"]}))
    assert missing.status_code == 400 and code_of(missing) == "INVALID_STATE"
    assert_no_session(s, missing, pair.a)


def test_a_callback_from_another_browser_is_refused(kc, pair):
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, "alice")
    other = browser(kc)  # no flow cookie
    r = get(other, cb)
    assert r.status_code == 400, r.text
    assert code_of(r) == "INVALID_STATE"
    assert_no_session(other, r, pair.a)
    # Another browser's own flow cookie does not fit this state either.
    third = browser(kc)
    to_callback(kc, third, pair.a.url, "bob")
    r = get(third, cb)
    assert r.status_code == 400 and code_of(r) == "INVALID_STATE", r.text
    assert_no_session(third, r, pair.a)


def test_a_code_already_exchanged_is_refused(kc, pair):
    s = browser(kc)
    cb = to_callback(kc, s, pair.a.url, "alice")
    # Someone who saw the code exchanges it first, at Keycloak itself
    # (without the PKCE verifier: Keycloak spends the code anyway).
    token_endpoint = kc.discovery()["token_endpoint"]
    stolen = kc.http.post(token_endpoint, data={
        "grant_type": "authorization_code", "code": query(cb)["code"],
        "redirect_uri": pair.external + CALLBACK, "code_verifier": secrets.token_urlsafe(48),
        "client_id": kc.client_id, "client_secret": kc.client_secret,
    }, timeout=15, verify=str(kc.ca_file))
    assert stolen.status_code == 400, stolen.text
    # Our exchange, with the right state and verifier, is then refused.
    r = get(s, cb)
    assert r.status_code == 401, r.text
    assert code_of(r) == "PROVIDER_REFUSED"
    assert_no_session(s, r, pair.a)


def test_an_off_site_rd_is_refused_at_login(kc, pair):
    for rd in ("https://evil.example/", "//evil.example/x", "https:evil.example"):
        s = browser(kc)
        r = get(s, pair.a.url + "/v1/oidc/login", params={"rd": rd})
        assert r.status_code == 400, (rd, r.status_code, r.text)
        assert code_of(r) == "INVALID_REDIRECT"
        assert "Location" not in r.headers
        assert FLOW_COOKIE not in s.cookies
        assert_no_session(s, r, pair.a)


# --------------------------------------------------------------------------
# 3. Groups
# --------------------------------------------------------------------------


def test_allowed_groups_at_verify(kc, pair):
    alice = sign_in(kc, pair, "alice")
    bob = sign_in(kc, pair, "bob")
    for srv in pair.a, pair.b:
        ok = verify(alice, srv, allowed_groups="admins")
        assert ok.status_code == 200, ok.text
        assert ok.headers["X-Auth-Request-Groups"] == "admins,staff"
        no = verify(bob, srv, allowed_groups="admins")
        assert no.status_code == 403, no.text
        assert code_of(no) == "FORBIDDEN_GROUP"
        # bob is signed in all the same, and a group of his lets him through.
        assert verify(bob, srv).status_code == 200
        assert verify(bob, srv, allowed_groups="admins,staff").status_code == 200


def test_allowed_groups_in_the_policy_refuse_at_the_callback(kc, single):
    srv = single("kc-admins-only", extra="    allowedGroups: [admins]\n")
    # A browser (Accept: text/html) gets a page that says why.
    bob = browser(kc)
    r = get(bob, to_callback(kc, bob, srv.url, "bob"),
            headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 403, r.text
    assert r.headers["Content-Type"].startswith("text/html"), r.headers
    assert "Sign-in refused" in r.text and "FORBIDDEN_USER" in r.text, r.text
    assert "not in a group that may sign in here" in r.text, r.text
    assert_no_session(bob, r, srv)
    # A script gets the JSON error.
    bob2 = browser(kc)
    r = get(bob2, to_callback(kc, bob2, srv.url, "bob"))
    assert r.status_code == 403 and code_of(r) == "FORBIDDEN_USER", r.text
    assert_no_session(bob2, r, srv)
    alice = browser(kc)
    r = get(alice, to_callback(kc, alice, srv.url, "alice"))
    assert r.status_code == 302, r.text
    assert verify(alice, srv).status_code == 200


# --------------------------------------------------------------------------
# 4. Our session ends at our sessionExpirationTime; Keycloak's does not
# --------------------------------------------------------------------------


def test_our_session_ends_first_and_keycloak_signs_in_again_without_a_password(kc, single):
    # Tokens of 3 s, renewed by /v1/verify on the way: only the session's
    # end (6 s after our login) stops them, not a token's expiry.
    srv = single("kc-short", session="6s", token="3s", renew="2s")
    s = browser(kc)
    r = get(s, to_callback(kc, s, srv.url, "alice"))
    assert r.status_code == 302, r.text
    began = time.monotonic()

    def at(second: float) -> int:
        time.sleep(max(0.0, second - (time.monotonic() - began)))
        return verify(s, srv).status_code

    assert [at(t) for t in (0.5, 2.0, 3.5, 5.0)] == [200] * 4
    assert at(7.0) == 401
    assert kc.user_sessions("alice"), "Keycloak's session should still be alive"
    # Again: our login, then ONE redirect at Keycloak straight back with a code.
    r = get(s, srv.url + "/v1/oidc/login", params={"rd": "/again"})
    assert r.status_code == 302, r.text
    assert r.headers["Location"].startswith(kc.discovery()["authorization_endpoint"])
    at_kc = get(s, r.headers["Location"])
    assert at_kc.status_code in (302, 303), (at_kc.status_code, at_kc.text[:300])
    cb = urllib.parse.urljoin(at_kc.url, at_kc.headers["Location"])
    assert cb.startswith(srv.url + CALLBACK + "?"), cb
    assert "code" in query(cb)
    r = get(s, cb)
    assert r.status_code == 302 and r.headers["Location"] == "/again", r.text
    v = verify(s, srv)
    assert v.status_code == 200 and v.headers["X-Auth-Request-User"] == "alice"


def test_without_keycloaks_session_the_form_is_shown(kc, pair):
    # The counterpart of the test above: a fresh jar meets the password form.
    s = browser(kc)
    r = get(s, pair.a.url + "/v1/oidc/login", params={"rd": "/"})
    assert r.status_code == 302
    page = get(s, r.headers["Location"])
    assert page.status_code == 200
    form = _FormParser()
    form.feed(page.text)
    assert form.found and "password" in page.text


# --------------------------------------------------------------------------
# Measurement: our callback end to end vs Keycloak's token endpoint alone
# --------------------------------------------------------------------------


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_callback_time_against_the_token_endpoint(kc, pair, capsys):
    """Our callback end to end (state, exchange, ID token checks, session in
    Redis) beside Keycloak's token endpoint alone for a code of the same
    kind, on a fresh TLS connection and on a kept-alive one."""
    rounds = 10
    ours, fresh_ms, kept_ms = [], [], []
    disc = kc.discovery()
    kept = browser(kc)
    kept.get(disc["token_endpoint"].rsplit("/", 1)[0] + "/certs", timeout=15, verify=kept.verify)

    def direct_code() -> tuple[str, str, str]:
        verifier, challenge = _pkce()
        redirect = f"http://127.0.0.1:{free_port()}{CALLBACK}"
        q = urllib.parse.urlencode({
            "response_type": "code", "client_id": kc.client_id, "scope": "openid email profile",
            "redirect_uri": redirect, "state": secrets.token_urlsafe(16),
            "nonce": secrets.token_urlsafe(16), "code_challenge": challenge,
            "code_challenge_method": "S256",
        })
        back = login_through_keycloak(browser(kc), f"{disc['authorization_endpoint']}?{q}",
                                      "alice", USERS["alice"])
        return query(back.headers["Location"])["code"], verifier, redirect

    def exchange(http: requests.Session, code: str, verifier: str, redirect: str) -> float:
        t = time.perf_counter()
        tok = http.post(disc["token_endpoint"], data={
            "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
            "redirect_uri": redirect,
        }, auth=(kc.client_id, kc.client_secret), timeout=15, verify=str(kc.ca_file))
        took = time.perf_counter() - t
        assert tok.status_code == 200, tok.text
        assert tok.json()["id_token"]
        return took

    for _ in range(rounds):
        s = browser(kc)
        cb = to_callback(kc, s, pair.a.url, "alice")
        t = time.perf_counter()
        r = get(s, cb)
        ours.append(time.perf_counter() - t)
        assert r.status_code == 302, r.text
        assert verify(s, pair.a).status_code == 200
        fresh_ms.append(exchange(browser(kc), *direct_code()))
        kept_ms.append(exchange(kept, *direct_code()))

    def show(name: str, xs: list[float]) -> str:
        return (f"{name}: median {statistics.median(xs) * 1000:.1f} ms "
                f"(min {min(xs) * 1000:.1f}, max {max(xs) * 1000:.1f})")

    with capsys.disabled():
        print(f"\n[measure] n={rounds}; {show('our callback end to end', ours)}; "
              f"{show('token endpoint, fresh TLS connection', fresh_ms)}; "
              f"{show('token endpoint, kept-alive connection', kept_ms)}")
