"""Forward-auth through a real nginx configured the way ingress-nginx
configures itself for `auth-url` / `auth-response-headers` / `auth-signin`
(examples/forward-auth/ingress-nginx.conf.template), in front of a tiny echo upstream
and one `tokenpolicy serve` (in-process store).

Layout (one nginx server, as for three Ingresses on one host):
    /app/  auth-url + auth-response-headers + auth-signin   -> echo
    /api/  auth-url + auth-response-headers                  -> echo
    /v1/   the token service itself (sign-in page, login)    -> tokenpolicy

Policy: session 8 s, token 2 s, renew limit 3 s, grace 1 s. `iat`/`exp` are
whole seconds floored from the request time, so the timed tests log in just
after a second boundary and act at `iat + n + ~0.4 s`.

Run: python3 -m pytest -q tests/integration/test_nginx_forward_auth.py
"""

from __future__ import annotations

import math
import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from nginx_support import (
    COOKIE,
    HOST,
    Stack,
    jwt_claims,
    sleep_until,
    start_stack,
    stop_stack,
)

HTTP_TIMEOUT = 10.0
#: How late a timed step may start before the schedule no longer proves
#: anything (the whole-second boundaries are 0.4 s away from each step).
SLIP = 0.3


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    st = start_stack(tmp_path_factory.mktemp("nginx-forward-auth"))
    try:
        yield st
    finally:
        stop_stack(st)


@pytest.fixture(autouse=True)
def _logs_on_failure(request, stack: Stack):
    """On failure, print the nginx and service logs written during the test."""
    stack.mark()
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        reporter = request.config.pluginmanager.getplugin("terminalreporter")
        with capman.global_and_fixture_disabled():
            reporter.write_sep("-", f"logs for {request.node.name}")
            reporter.write_line(stack.report())


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def www_auth_code(r: requests.Response) -> str | None:
    """The error code the service put in WWW-Authenticate (auth_request
    passes that header of a 401 on to the client; nginx replaces the body)."""
    m = re.search(r'error_description="([A-Z_]+)"', r.headers.get("WWW-Authenticate", ""))
    return m.group(1) if m else None


def json_code(r: requests.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except Exception:
        return None


def set_cookie_token(r: requests.Response) -> str | None:
    """The value of our cookie in the response's Set-Cookie, if any."""
    raw = r.headers.get("Set-Cookie")
    if not raw:
        return None
    m = re.search(rf"(?:^|[,\s]){COOKIE}=([^;,\s]*)", raw)
    return m.group(1) if m else None


def echoed(r: requests.Response) -> dict:
    """The echo upstream's view of the request (fails if nginx answered)."""
    assert r.status_code == 200, f"{r.request.method} {r.url}: {r.status_code} {r.text[:300]!r}"
    body = r.json()
    assert "headers" in body, f"not an answer of the echo upstream: {body!r}"
    return body


def cookie_sent(body: dict) -> str | None:
    m = re.search(rf"(?:^|;\s*){COOKIE}=([^;]*)", body["headers"].get("Cookie") or "")
    return m.group(1) if m else None


def jar_token(s: requests.Session) -> str | None:
    return s.cookies.get(COOKIE, domain=HOST)


def align_to_second(offset: float = 0.05) -> None:
    """Sleep until just after the next whole second, so that a token issued
    now has `iat` = that second and steps at `iat + n + 0.4` are 0.4 s from
    every boundary."""
    sleep_until(math.floor(time.time()) + 1 + offset)


def at(iat: int, offset: float, what: str) -> None:
    """Sleep until `iat + offset` (wall clock, as the service's); fail if we
    are already too late for the step to mean anything."""
    target = iat + offset
    late = time.time() - target
    if late > SLIP:
        pytest.fail(f"timing slipped: {what} was due at iat+{offset}s, now {late:.2f}s late "
                    f"(machine too loaded for the 2 s token policy)")
    sleep_until(target)


def login(stack: Stack, s: requests.Session) -> tuple[str, dict]:
    """POST JSON /v1/login through the ingress; the cookie lands in the jar."""
    r = s.post(f"{stack.url}/v1/login", json={"username": stack.username, "password": stack.password},
               timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, f"login: {r.status_code} {r.text[:300]!r}"
    token = r.json()["access_token"]
    assert set_cookie_token(r) == token, f"login Set-Cookie: {r.headers.get('Set-Cookie')!r}"
    assert jar_token(s) == token, f"cookie jar after login: {s.cookies!r}"
    return token, jwt_claims(token)


def get(s, url: str, **kw) -> requests.Response:
    kw.setdefault("timeout", HTTP_TIMEOUT)
    kw.setdefault("allow_redirects", False)
    return s.get(url, **kw)


def assert_identity(body: dict, user: str, sid: str) -> None:
    h = body["headers"]
    assert h["X-Auth-Request-User"] == user, body
    assert h["Remote-User"] == user, body
    assert h["X-Auth-Request-Session"] == sid, body
    for name in ("x-auth-request-user", "x-auth-request-session", "remote-user"):
        assert body["header_names"].count(name) == 1, f"{name} sent {body['header_names'].count(name)}x"


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_no_token_api_gets_401_browser_app_gets_signin_redirect(stack: Stack):
    seen = len(stack.echo.requests_seen)
    with requests.Session() as s:
        # /api/: auth-url without auth-signin -> the 401 reaches the client.
        r = get(s, f"{stack.url}/api/items", headers={"Accept": "application/json"})
        assert r.status_code == 401, (r.status_code, r.headers, r.text[:300])
        assert www_auth_code(r) == "EMPTY_TOKEN", r.headers

        r = get(s, f"{stack.url}/api/items", cookies={COOKIE: "not-a-jwt"})
        assert r.status_code == 401
        assert www_auth_code(r) == "INVALID_TOKEN", r.headers

        # /app/: auth-signin -> 302 to the sign-in page with rd = the original URL.
        r = get(s, f"{stack.url}/app/page?x=1", headers={"Accept": "text/html"})
        assert r.status_code == 302, (r.status_code, r.headers, r.text[:300])
        loc = r.headers["Location"]
        assert loc.startswith(stack.signin_url + "?"), loc
        assert parse_qs(urlsplit(loc).query) == {"rd": [f"{stack.url}/app/page?x=1"]}, loc
        assert set_cookie_token(r) is None, r.headers

        # Forged identity headers from the client never get past auth.
        r = get(s, f"{stack.url}/api/items", headers={"X-Auth-Request-User": "admin", "Remote-User": "admin"})
        assert r.status_code == 401
    assert len(stack.echo.requests_seen) == seen, "an unauthenticated request reached the upstream"


def test_login_then_upstream_sees_identity(stack: Stack):
    with requests.Session() as s:
        token, c = login(stack, s)
        assert c["sub"] == stack.username
        for path in ("/app/dashboard", "/api/items?limit=1"):
            r = get(s, stack.url + path)
            body = echoed(r)
            assert body["path"] == path
            assert_identity(body, stack.username, c["sid"])
            assert cookie_sent(body) == token, "the cookie jar did not send the session cookie"
            assert set_cookie_token(r) is None, f"unexpected Set-Cookie on a valid token: {r.headers}"

        # Identity headers sent by the client are overwritten by the auth answer.
        r = get(s, f"{stack.url}/api/me", headers={"X-Auth-Request-User": "admin", "Remote-User": "admin",
                                                    "X-Auth-Request-Session": "forged"})
        assert_identity(echoed(r), stack.username, c["sid"])

        # The same token as a Bearer header (API clients), no cookie.
        r = get(requests, f"{stack.url}/api/items", headers={"Authorization": f"Bearer {token}"})
        assert_identity(echoed(r), stack.username, c["sid"])


def test_renewed_on_the_fly_through_nginx_until_the_session_ends(stack: Stack):
    """One client keeps using the app: each expired-but-renewable token is
    exchanged during the auth subrequest, the new one comes back through
    `auth_request_set $auth_cookie ...; add_header Set-Cookie $auth_cookie`,
    and the session still ends 8 s after login."""
    with requests.Session() as s:
        align_to_second()
        t1, c1 = login(stack, s)
        iat, sid = c1["iat"], c1["sid"]
        assert c1["exp"] - iat == 2 and c1["auth_time"] == iat, c1
        session_end = c1["auth_time"] + 8

        if time.time() > iat + 2 - SLIP:
            pytest.fail("timing slipped: login took too long to test the still-valid token")
        r = get(s, f"{stack.url}/app/a")
        assert_identity(echoed(r), stack.username, sid)
        assert set_cookie_token(r) is None

        previous = t1
        for step, offset in enumerate((2.4, 4.4, 6.4), start=1):
            # The token in the jar expired 0.4 s ago, inside the renew window.
            at(iat, offset, f"renewal {step}")
            r = get(s, f"{stack.url}/app/renew-{step}")
            body = echoed(r)  # 200 from the upstream, not a 401/302
            assert_identity(body, stack.username, sid)
            assert cookie_sent(body) == previous
            new = set_cookie_token(r)
            assert new, f"renewal {step}: no Set-Cookie from nginx: {r.headers}"
            assert new != previous
            raw = r.headers["Set-Cookie"]
            assert "HttpOnly" in raw and "Path=/" in raw and "SameSite=Lax" in raw, raw
            assert jar_token(s) == new, "the cookie jar did not take the renewed cookie"
            cn = jwt_claims(new)
            assert cn["sid"] == sid and cn["sub"] == stack.username and cn["auth_time"] == c1["auth_time"], cn
            assert cn["jti"] != jwt_claims(previous)["jti"]
            assert cn["iat"] == iat + 2 * step, cn
            assert cn["exp"] == min(cn["iat"] + 2, session_end), cn

            # The next request carries the new cookie and needs no renewal.
            r = get(s, f"{stack.url}/api/after-renew-{step}")
            body = echoed(r)
            assert cookie_sent(body) == new, "the next request did not use the renewed cookie"
            assert_identity(body, stack.username, sid)
            assert set_cookie_token(r) is None, f"renewed again right away: {r.headers}"
            previous = new

        newest = previous
        assert jwt_claims(newest)["exp"] == session_end  # capped by the session (rule 3)

        at(iat, 7.6, "last request of the session")
        r = get(s, f"{stack.url}/api/last")
        assert_identity(echoed(r), stack.username, sid)
        assert set_cookie_token(r) is None

        at(iat, 8.4, "after the session end")
        # The browser's jar has dropped the cookie by now (Max-Age = session end);
        # a client that kept the token still gets nothing.
        for how, kw in (("cookie", {"cookies": {COOKIE: newest}}),
                        ("bearer", {"headers": {"Authorization": f"Bearer {newest}"}})):
            r = get(requests, f"{stack.url}/api/late", **kw)
            assert r.status_code == 401, (how, r.status_code, r.text[:300])
            assert www_auth_code(r) == "EXPIRED_SESSION", (how, r.headers)
        r = get(requests, f"{stack.url}/app/late", cookies={COOKIE: newest})
        assert r.status_code == 302 and r.headers["Location"].startswith(stack.signin_url + "?"), r.headers
        r = requests.get(f"{stack.service_url}/v1/verify", headers={"Authorization": f"Bearer {newest}"},
                         timeout=HTTP_TIMEOUT)
        assert (r.status_code, json_code(r)) == (401, "EXPIRED_SESSION"), r.text
        r = get(s, f"{stack.url}/api/late")
        assert r.status_code == 401, r.text[:300]


def test_old_token_replayed_after_the_grace_is_rejected(stack: Stack):
    with requests.Session() as s:
        align_to_second()
        t1, c1 = login(stack, s)
        iat, sid = c1["iat"], c1["sid"]

        at(iat, 2.4, "renewal")
        renewed_at = time.time()
        r = get(s, f"{stack.url}/api/x")
        assert_identity(echoed(r), stack.username, sid)
        t2 = set_cookie_token(r)
        assert t2 and t2 != t1 and jar_token(s) == t2, r.headers

        # A racing request (another tab) with the old cookie, inside the
        # grace: let through, and handed the same new token.
        sleep_until(renewed_at + 0.3)
        r = get(requests, f"{stack.url}/api/race", cookies={COOKIE: t1})
        assert_identity(echoed(r), stack.username, sid)
        raced = set_cookie_token(r)
        assert raced and jwt_claims(raced)["jti"] == jwt_claims(t2)["jti"], \
            f"inside the grace expected the same new token, got Set-Cookie {r.headers.get('Set-Cookie')!r}"

        # After the grace (and still inside T1's renew window, which ends at iat+5):
        # reuse of a spent token.
        sleep_until(renewed_at + 1.0 + 0.5)
        assert time.time() < iat + 5 - SLIP, "too late: the old token left its renew window"
        seen = len(stack.echo.requests_seen)
        r = get(requests, f"{stack.url}/api/replay", headers={"Authorization": f"Bearer {t1}"})
        assert r.status_code == 401, (r.status_code, r.text[:300])
        assert www_auth_code(r) == "TOKEN_ALREADY_REFRESHED", r.headers
        r = get(requests, f"{stack.url}/app/replay", cookies={COOKIE: t1})
        assert r.status_code == 302, (r.status_code, r.headers)
        assert len(stack.echo.requests_seen) == seen, "the replayed token reached the upstream"

        # Reuse detection revoked the whole session: the newest token is dead too.
        r = get(s, f"{stack.url}/api/after-replay")
        assert r.status_code == 401, (r.status_code, r.text[:300])
        assert www_auth_code(r) == "REVOKED_SESSION", r.headers


def test_signin_page_rejects_open_redirects(stack: Stack):
    login_url = f"{stack.url}/v1/login"
    for rd in ("http://evil.example/", "https://evil.example/app", "//evil.example/",
               f"http://{HOST}.evil.example/", "javascript:alert(1)"):
        r = requests.get(login_url, params={"rd": rd}, timeout=HTTP_TIMEOUT, allow_redirects=False)
        assert (r.status_code, json_code(r)) == (400, "INVALID_REDIRECT"), (rd, r.status_code, r.text[:300])

    # A forged X-Forwarded-Host does not make evil.example "this host": the
    # ingress sets X-Forwarded-Host to the real Host.
    r = requests.get(login_url, params={"rd": "http://evil.example/"}, headers={"X-Forwarded-Host": "evil.example"},
                     timeout=HTTP_TIMEOUT, allow_redirects=False)
    assert (r.status_code, json_code(r)) == (400, "INVALID_REDIRECT"), r.text[:300]

    # This site is plain http on the ingress's port: another port or https
    # is another site.
    for rd in (f"http://{HOST}/app/other-port", f"http://{HOST}:1/app/other-port",
               stack.url.replace("http://", "https://", 1) + "/app/page"):
        r = requests.get(login_url, params={"rd": rd}, timeout=HTTP_TIMEOUT, allow_redirects=False)
        assert (r.status_code, json_code(r)) == (400, "INVALID_REDIRECT"), (rd, r.status_code, r.text[:300])

    for rd in (f"{stack.url}/app/page?x=1", "/app/relative"):
        r = requests.get(login_url, params={"rd": rd}, timeout=HTTP_TIMEOUT, allow_redirects=False)
        assert r.status_code == 200, (rd, r.status_code, r.text[:300])
        assert "text/html" in r.headers.get("Content-Type", "")
        assert re.search(r'<form[^>]*method="post"', r.text), r.text
        assert f'name="rd" value="{rd}"' in r.text, r.text

    # The form post: an off-site rd is refused before any credential check.
    form = {"username": stack.username, "password": stack.password, "rd": "http://evil.example/"}
    r = requests.post(login_url, data=form, timeout=HTTP_TIMEOUT, allow_redirects=False)
    assert (r.status_code, json_code(r)) == (400, "INVALID_REDIRECT"), (r.status_code, r.text[:300])
    assert set_cookie_token(r) is None and "Location" not in r.headers, r.headers


def test_browser_sign_in_round_trip(stack: Stack):
    """302 to the sign-in page, the form, 303 back to rd with the cookie,
    then the app: what a browser does behind ingress-nginx + auth-signin."""
    original = f"{stack.url}/app/page?x=1"
    with requests.Session() as s:
        r = get(s, original, headers={"Accept": "text/html"})
        assert r.status_code == 302, r.headers
        r = get(s, r.headers["Location"])
        assert r.status_code == 200, (r.status_code, r.text[:300])
        m = re.search(r'<form[^>]*action="([^"]*)"', r.text)
        assert m, r.text
        action = requests.compat.urljoin(r.url, m.group(1))
        assert action == f"{stack.url}/v1/login", action
        rd = re.search(r'name="rd" value="([^"]*)"', r.text).group(1)
        assert rd == original

        r = s.post(action, data={"username": stack.username, "password": stack.password, "rd": rd},
                   timeout=HTTP_TIMEOUT, allow_redirects=False)
        assert r.status_code == 303, (r.status_code, r.text[:300])
        assert r.headers["Location"] == original, r.headers
        token = set_cookie_token(r)
        assert token and jar_token(s) == token, r.headers

        r = get(s, r.headers["Location"])
        body = echoed(r)
        assert body["path"] == "/app/page?x=1"
        assert_identity(body, stack.username, jwt_claims(token)["sid"])
        assert cookie_sent(body) == token
