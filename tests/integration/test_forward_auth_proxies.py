"""The same forward-auth scenario behind every proxy of proxy_support.py
(nginx as ingress-nginx configures it, Traefik, Caddy), driven by a
cookie-keeping client through the proxy, against one `tokenpolicy serve`
and an echo upstream that shows what the application received.

The question per proxy: does the `Set-Cookie` of a successful check (a
token renewed on the fly) reach the client? Where it does, the client's jar
takes the renewed cookie and its next request sends it. Where it does not
(Caddy's forward_auth), the service runs with `--no-renew-on-verify`: the
expired token gets `401 EXPIRED_TOKEN`, its one refresh is left unspent,
and the client renews with `POST /v1/refresh` through the proxy.

Policy: session 8 s, token 2 s, renew limit 3 s, grace 1 s. `iat`/`exp` are
whole seconds, so the timed tests log in just after a second boundary and
act a few tenths of a second away from every boundary.

Run: python3 -m pytest -q tests/integration/test_forward_auth_proxies.py
     (-k traefik / -k caddy / -k nginx for one proxy)
"""

from __future__ import annotations

import math
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from nginx_support import COOKIE, HOST, jwt_claims, sleep_until
from proxy_support import ALL, ProxyStack, start_proxy_stack

HTTP_TIMEOUT = 10.0
SLIP = 0.3
JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html,application/xhtml+xml"}
IDENTITY = ("x-auth-request-user", "x-auth-request-session", "remote-user")


@pytest.fixture(scope="module", params=ALL)
def stack(request, tmp_path_factory):
    st = start_proxy_stack(request.param, tmp_path_factory.mktemp(f"forward-auth-{request.param}"))
    try:
        yield st
    finally:
        st.stop()


@pytest.fixture(autouse=True)
def _logs_on_failure(request, stack: ProxyStack):
    stack.mark()
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        with capman.global_and_fixture_disabled():
            reporter.write_sep("-", f"logs for {request.node.name} ({stack.name} {stack.version})")
            reporter.write_line(stack.report())


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def code(r: requests.Response) -> str | None:
    """The error code from WWW-Authenticate: every proxy passes that header
    of a 401 on (nginx replaces the JSON body with its own page)."""
    m = re.search(r'error_description="([A-Z_]+)"', r.headers.get("WWW-Authenticate", ""))
    return m.group(1) if m else None


def set_cookie_token(r: requests.Response) -> str | None:
    raw = r.headers.get("Set-Cookie")
    if not raw:
        return None
    m = re.search(rf"(?:^|[,\s]){COOKIE}=([^;,\s]*)", raw)
    return m.group(1) if m else None


def jar(s: requests.Session) -> str | None:
    return s.cookies.get(COOKIE, domain=HOST)


def echoed(r: requests.Response) -> dict:
    assert r.status_code == 200, f"{r.request.method} {r.url}: {r.status_code} {r.headers} {r.text[:300]!r}"
    body = r.json()
    assert "headers" in body, f"not an answer of the echo upstream: {body!r}"
    return body


def cookie_sent(body: dict) -> str | None:
    m = re.search(rf"(?:^|;\s*){COOKIE}=([^;]*)", body["headers"].get("Cookie") or "")
    return m.group(1) if m else None


def assert_identity(body: dict, user: str, sid: str) -> None:
    h = body["headers"]
    assert (h["X-Auth-Request-User"], h["Remote-User"], h["X-Auth-Request-Session"]) == (user, user, sid), body
    for name in IDENTITY:
        assert body["header_names"].count(name) == 1, f"{name} sent {body['header_names'].count(name)}x: {body}"
    # Not an address: the service sends no X-Auth-Request-Email, and the
    # proxy copies that name too, so nothing of that name may arrive.
    assert "x-auth-request-email" not in body["header_names"], body


def get(s, url: str, **kw) -> requests.Response:
    kw.setdefault("timeout", HTTP_TIMEOUT)
    kw.setdefault("allow_redirects", False)
    kw.setdefault("headers", JSON)
    return s.get(url, **kw)


def align_to_second(offset: float = 0.05) -> None:
    sleep_until(math.floor(time.time()) + 1 + offset)


def at(iat: int, offset: float, what: str) -> None:
    late = time.time() - (iat + offset)
    if late > SLIP:
        pytest.fail(f"timing slipped: {what} was due at iat+{offset}s, now {late:.2f}s late")
    sleep_until(iat + offset)


def login(stack: ProxyStack, s: requests.Session) -> tuple[str, dict]:
    r = s.post(f"{stack.url}/v1/login", json={"username": stack.username, "password": stack.password},
               timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, f"login: {r.status_code} {r.text[:300]!r}"
    token = r.json()["access_token"]
    assert set_cookie_token(r) == token and jar(s) == token, r.headers
    return token, jwt_claims(token)


def refresh(stack: ProxyStack, s: requests.Session) -> str:
    """POST /v1/refresh through the proxy with the jar's cookie: the
    service's own answer, whose Set-Cookie every proxy passes on."""
    r = s.post(f"{stack.url}/v1/refresh", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, f"refresh: {r.status_code} {r.text[:300]!r}"
    new = set_cookie_token(r)
    assert new and new == r.json()["access_token"] and jar(s) == new, r.headers
    return new


def renew(stack: ProxyStack, s: requests.Session, path: str, previous: str, sid: str) -> str:
    """One request whose cookie has expired inside the renew window; returns
    the token the jar holds afterwards (a new one)."""
    seen = len(stack.echo.requests_seen)
    r = get(s, stack.url + path)
    if stack.renews_on_the_fly:
        body = echoed(r)  # the application answered: no interruption
        assert_identity(body, stack.username, sid)
        assert cookie_sent(body) == previous
        new = set_cookie_token(r)
        assert new and new != previous, f"{stack.name}: renewed cookie did not reach the client: {r.headers}"
        raw = r.headers["Set-Cookie"]
        assert "HttpOnly" in raw and "Path=/" in raw and "SameSite=Lax" in raw, raw
        assert jar(s) == new, "the cookie jar did not take the renewed cookie"
    else:
        # Not renewed behind the client's back: 401, and the refresh is
        # still unspent, so the client's own refresh gets the new token.
        assert (r.status_code, code(r)) == (401, "EXPIRED_TOKEN"), (r.status_code, r.headers, r.text[:300])
        assert set_cookie_token(r) is None, r.headers
        assert len(stack.echo.requests_seen) == seen, "the expired token reached the upstream"
        new = refresh(stack, s)
    c = jwt_claims(new)
    assert c["sid"] == sid and c["jti"] != jwt_claims(previous)["jti"], c
    return new


# --------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------


def test_no_token_gets_401_or_the_signin_redirect(stack: ProxyStack):
    seen = len(stack.echo.requests_seen)
    with requests.Session() as s:
        r = get(s, f"{stack.url}/api/items")
        assert (r.status_code, code(r)) == (401, "EMPTY_TOKEN"), (r.status_code, r.headers, r.text[:300])
        r = get(s, f"{stack.url}/api/items", cookies={COOKIE: "not-a-jwt"})
        assert (r.status_code, code(r)) == (401, "INVALID_TOKEN"), (r.status_code, r.headers)
        r = get(s, f"{stack.url}/api/items", headers={**JSON, "X-Auth-Request-User": "admin",
                                                       "Remote-User": "admin"})
        assert r.status_code == 401

        # A browser is sent to sign in, with rd = the URL it asked for.
        r = get(s, f"{stack.url}/app/page?x=1", headers=HTML)
        assert r.status_code == 302, (r.status_code, r.headers, r.text[:300])
        loc = r.headers["Location"]
        assert loc.startswith(stack.signin_url + "?"), loc
        assert parse_qs(urlsplit(loc).query) == {"rd": [f"{stack.url}/app/page?x=1"]}, loc
        # ... and the sign-in page, through the proxy, accepts that rd.
        r = get(s, loc, headers=HTML)
        assert r.status_code == 200 and 'name="rd"' in r.text, (r.status_code, r.text[:300])
    assert len(stack.echo.requests_seen) == seen, "an unauthenticated request reached the upstream"


def test_identity_reaches_the_upstream_and_forged_copies_do_not(stack: ProxyStack):
    with requests.Session() as s:
        token, c = login(stack, s)
        for path in ("/app/dashboard", "/api/items?limit=1"):
            r = get(s, stack.url + path)
            body = echoed(r)
            assert body["path"] == path
            assert_identity(body, stack.username, c["sid"])
            assert cookie_sent(body) == token
            assert set_cookie_token(r) is None, f"Set-Cookie on a valid token: {r.headers}"

        forged = {**JSON, "X-Auth-Request-User": "admin", "Remote-User": "admin",
                  "X-Auth-Request-Session": "forged", "X-Auth-Request-Email": "admin@example.com"}
        assert_identity(echoed(get(s, f"{stack.url}/api/me", headers=forged)), stack.username, c["sid"])

        # The same token as a Bearer header, no cookie (API clients).
        r = get(requests, f"{stack.url}/api/items", headers={**JSON, "Authorization": f"Bearer {token}"})
        assert_identity(echoed(r), stack.username, c["sid"])


def test_renewal_until_the_session_ends(stack: ProxyStack):
    """A client keeps using the app across three token expiries; the
    session still ends 8 s after login."""
    with requests.Session() as s:
        align_to_second()
        t1, c1 = login(stack, s)
        iat, sid = c1["iat"], c1["sid"]
        assert c1["exp"] - iat == 2, c1
        session_end = c1["auth_time"] + 8

        previous = t1
        for step, offset in enumerate((2.4, 4.4, 6.4), start=1):
            at(iat, offset, f"renewal {step}")
            new = renew(stack, s, f"/app/renew-{step}", previous, sid)
            cn = jwt_claims(new)
            assert cn["iat"] == iat + 2 * step and cn["auth_time"] == c1["auth_time"], cn
            assert cn["exp"] == min(cn["iat"] + 2, session_end), cn
            # The next request sends the new cookie and needs no renewal.
            r = get(s, f"{stack.url}/api/after-renew-{step}")
            body = echoed(r)
            assert cookie_sent(body) == new, "the next request did not use the renewed cookie"
            assert_identity(body, stack.username, sid)
            assert set_cookie_token(r) is None, f"renewed again right away: {r.headers}"
            previous = new

        at(iat, 8.4, "after the session end")
        for how, kw in (("cookie", {"cookies": {COOKIE: previous}}),
                        ("bearer", {"headers": {**JSON, "Authorization": f"Bearer {previous}"}})):
            r = get(requests, f"{stack.url}/api/late", **kw)
            assert (r.status_code, code(r)) == (401, "EXPIRED_SESSION"), (how, r.status_code, r.headers)
        r = get(requests, f"{stack.url}/app/late", cookies={COOKIE: previous}, headers=HTML)
        assert r.status_code == 302 and r.headers["Location"].startswith(stack.signin_url + "?"), r.headers
        # The jar dropped the cookie at the session end (Max-Age).
        r = get(s, f"{stack.url}/api/late")
        assert r.status_code == 401, r.text[:300]


def test_old_token_replayed_after_the_grace_revokes_the_session(stack: ProxyStack):
    with requests.Session() as s:
        align_to_second()
        t1, c1 = login(stack, s)
        iat, sid = c1["iat"], c1["sid"]
        if stack.renews_on_the_fly:
            at(iat, 2.4, "renewal")
        else:
            # The check at iat+2.2 answers 401 and must not spend the
            # refresh: the client's own refresh, more than the grace later,
            # would otherwise count as reuse.
            at(iat, 2.2, "expired check")
            r = get(s, f"{stack.url}/api/x")
            assert (r.status_code, code(r)) == (401, "EXPIRED_TOKEN"), (r.status_code, r.headers)
            at(iat, 3.4, "refresh after the grace")
        renewed_at = time.time()
        t2 = renew(stack, s, "/api/x", t1, sid) if stack.renews_on_the_fly else refresh(stack, s)
        assert t2 != t1

        # After the grace, inside T1's renew window (ends at iat+5): reuse.
        sleep_until(renewed_at + 1.2)
        assert time.time() < iat + 5 - SLIP, "too late: the old token left its renew window"
        seen = len(stack.echo.requests_seen)
        replay = {**JSON, "Authorization": f"Bearer {t1}"}
        r = get(requests, f"{stack.url}/api/replay", headers=replay)
        if stack.renews_on_the_fly:
            assert (r.status_code, code(r)) == (401, "TOKEN_ALREADY_REFRESHED"), (r.status_code, r.headers)
        else:
            # Checks never exchange a token here, so the proxy's check only
            # refuses it; the exchange that counts as reuse is a refresh.
            assert (r.status_code, code(r)) == (401, "EXPIRED_TOKEN"), (r.status_code, r.headers)
            r = requests.post(f"{stack.url}/v1/refresh", headers=replay, timeout=HTTP_TIMEOUT)
            assert (r.status_code, code(r)) == (401, "TOKEN_ALREADY_REFRESHED"), (r.status_code, r.headers)
        assert len(stack.echo.requests_seen) == seen, "the replayed token reached the upstream"
        # The whole session is revoked: the newest token too.
        r = get(s, f"{stack.url}/api/after-replay")
        assert (r.status_code, code(r)) == (401, "REVOKED_SESSION"), (r.status_code, r.headers)


def test_logout_through_the_proxy(stack: ProxyStack):
    with requests.Session() as s:
        token, c = login(stack, s)
        assert_identity(echoed(get(s, f"{stack.url}/app/before")), stack.username, c["sid"])
        r = s.post(f"{stack.url}/v1/logout", timeout=HTTP_TIMEOUT)
        assert r.status_code == 204, (r.status_code, r.text[:300])
        assert set_cookie_token(r) == "" and "Max-Age=0" in r.headers["Set-Cookie"], r.headers
        assert jar(s) is None, "the jar kept the cookie after logout"
        r = get(s, f"{stack.url}/app/after", headers=HTML)
        assert r.status_code == 302 and r.headers["Location"].startswith(stack.signin_url + "?"), r.headers
        # The token itself is dead everywhere, not only forgotten by the jar.
        r = get(requests, f"{stack.url}/api/after", headers={**JSON, "Authorization": f"Bearer {token}"})
        assert (r.status_code, code(r)) == (401, "REVOKED_SESSION"), (r.status_code, r.headers)
