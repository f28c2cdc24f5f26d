"""The provider's say over our sessions, against the real Keycloak:

* renewal re-check (`recheckOnRenew`): a user disabled through Keycloak's
  admin REST API gets 401 REVOKED_SESSION at the next renewal, on both
  replicas; with Keycloak stopped, renewals go on, nobody is logged out,
  and `tokenpolicy_oidc_recheck_total{result="unavailable"}` counts them;
* back-channel logout: Keycloak's admin "sign out" of a user posts a
  logout token to replica a (the client's `backchannel.logout.url`, set at
  start to a relay in front of a's free port); the user's sessions are
  refused on both replicas within 1 s, and Keycloak's own logout token,
  replayed, is refused on both;
* `allowed_groups` through nginx configured as ingress-nginx: 200 for a
  member, 403 for a non-member.

Two replicas share one redis-server, as in test_oidc_keycloak.py; tokens
last 2 s so that renewals come quickly. Each test signs in users of its
own, created through the admin API, so the realm's users stay as they are.
Keycloak is required: without it the `keycloak` fixture fails, it never skips.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from conftest import free_port
from keycloak_support import keycloak, login_through_keycloak  # noqa: F401
from test_oidc_keycloak import Pair, browser, code_of, get, kc, start_replica  # noqa: F401

TOKEN_SECONDS = 2


def new_user(kc, stem: str) -> str:  # noqa: F811
    name = f"{stem}-{secrets.token_hex(3)}"
    kc.create_user(name, f"{name}-password", email=f"{name}@example.com")
    return name


def sign_in(kc, srv, user: str) -> requests.Session:  # noqa: F811
    s = browser(kc)
    login = f"{srv.url}/v1/oidc/login?{urllib.parse.urlencode({'rd': '/app'})}"
    r = login_through_keycloak(s, login, user, kc.users[user])
    assert r.status_code in (302, 303), (r.status_code, getattr(r, "keycloak_errors", None))
    cb = urllib.parse.urljoin(r.url, r.headers["Location"])
    r = get(s, cb)
    assert r.status_code == 302, r.text
    return s


def verify(s: requests.Session, srv) -> requests.Response:
    return get(s, srv.url + "/v1/verify")


def rechecks(srv, result: str) -> int:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    m = re.search(r'^tokenpolicy_oidc_recheck_total\{result="%s"\} (\d+)' % result, text, re.M)
    assert m, f"no recheck counter for {result}:\n{text[:2000]}"
    return int(m.group(1))


def until_expired() -> None:
    """Past the current token's expiry, inside its renew limit."""
    time.sleep(TOKEN_SECONDS + 0.6)


@pytest.fixture(scope="module")
def short(env, redis, kc):  # noqa: F811
    """Replicas a and b with 2 s tokens: one Redis, one signing key, a's external URL."""
    port_a, port_b = free_port(), free_port()
    external = f"http://127.0.0.1:{port_a}"
    started = []
    policy = {"session": "10m", "token": f"{TOKEN_SECONDS}s", "renew": "5m"}
    try:
        a = start_replica(env, kc, "kcp-a", redis.url, port_a, external, wait=False, **policy)
        started.append(a)
        b = start_replica(env, kc, "kcp-b", redis.url, port_b, external, wait=False, **policy)
        started.append(b)
        a.wait_ready()
        b.wait_ready()
        yield Pair(a=a, b=b, redis=redis, external=external)
    finally:
        for s in started:
            s.stop()


# --------------------------------------------------------------------------
# 6. Re-check at renewal
# --------------------------------------------------------------------------


def test_a_disabled_user_is_refused_at_the_next_renewal_on_both_replicas(kc, short):
    user = new_user(kc, "dora")
    on_a, on_b = sign_in(kc, short.a, user), sign_in(kc, short.a, user)
    # A renewal while Keycloak stands by her: the grant runs, she goes on.
    # Replica a renews one session, replica b the other.
    until_expired()
    ok_a, ok_b = rechecks(short.a, "ok"), rechecks(short.b, "ok")
    r = verify(on_a, short.a)
    assert r.status_code == 200, r.text
    assert "X-New-Token" in r.headers
    r = verify(on_b, short.b)
    assert r.status_code == 200 and "X-New-Token" in r.headers, r.text
    assert rechecks(short.a, "ok") == ok_a + 1
    assert rechecks(short.b, "ok") == ok_b + 1
    # Plain verifies of the fresh tokens ask nobody.
    for s in on_a, on_b:
        for srv in short.a, short.b:
            assert verify(s, srv).status_code == 200
    assert rechecks(short.a, "ok") == ok_a + 1
    assert rechecks(short.b, "ok") == ok_b + 1

    refused_a, refused_b = rechecks(short.a, "refused"), rechecks(short.b, "refused")
    kc.disable_user(user)
    until_expired()
    # Each replica runs the next renewal of one session and is refused.
    r = verify(on_a, short.a)
    assert r.status_code == 401, r.text
    assert code_of(r) == "REVOKED_SESSION"
    r = verify(on_b, short.b)
    assert r.status_code == 401, r.text
    assert code_of(r) == "REVOKED_SESSION"
    assert rechecks(short.a, "refused") == refused_a + 1
    assert rechecks(short.b, "refused") == refused_b + 1
    # Both sessions are over on both replicas, and /v1/refresh says so too.
    for s in on_a, on_b:
        for srv in short.a, short.b:
            r = verify(s, srv)
            assert r.status_code == 401 and code_of(r) == "REVOKED_SESSION", (srv.name, r.text)
        r = s.post(short.b.url + "/v1/refresh", timeout=10, headers={"Origin": short.b.url})
        assert r.status_code == 401 and code_of(r) == "REVOKED_SESSION", r.text
    kc.enable_user(user)


def test_with_keycloak_stopped_renewals_go_on_and_are_counted(kc, short):
    user = new_user(kc, "stan")
    s = sign_in(kc, short.a, user)
    unavailable = rechecks(short.a, "unavailable") + rechecks(short.b, "unavailable")
    kc.stop()
    try:
        renewed = 0
        for srv in (short.a, short.b, short.a):
            until_expired()
            r = verify(s, srv)
            assert r.status_code == 200, (srv.name, r.text)
            assert "X-New-Token" in r.headers, r.headers
            renewed += 1
            for other in short.a, short.b:
                assert verify(s, other).status_code == 200
        assert rechecks(short.a, "unavailable") + rechecks(short.b, "unavailable") \
            == unavailable + renewed
    finally:
        kc.start()
    # Keycloak is back: the next renewal is checked again, and passes.
    ok = rechecks(short.a, "ok")
    until_expired()
    r = verify(s, short.a)
    assert r.status_code == 200 and "X-New-Token" in r.headers, r.text
    assert rechecks(short.a, "ok") == ok + 1


# --------------------------------------------------------------------------
# 7. Back-channel logout
# --------------------------------------------------------------------------


class Relay:
    """Between Keycloak and replica a: keeps each logout token it passes on."""

    def __init__(self, target: str):
        self.target = target
        self.bodies: list[bytes] = []
        self.answers: list[int] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                relay.bodies.append(body)
                r = requests.post(relay.target, data=body, timeout=10, headers={
                    "Content-Type": self.headers.get("Content-Type", "")})
                relay.answers.append(r.status_code)
                self.send_response(r.status_code)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/oidc/backchannel-logout"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_keycloaks_sign_out_ends_the_sessions_on_both_replicas_within_a_second(kc, short):
    relay = Relay(short.a.url + "/v1/oidc/backchannel-logout")
    kc.set_backchannel_logout_url(relay.url)
    try:
        user, bystander = new_user(kc, "bea"), new_user(kc, "bo")
        laptop, phone = sign_in(kc, short.a, user), sign_in(kc, short.b, user)
        other = sign_in(kc, short.a, bystander)
        for s in laptop, phone, other:
            for srv in short.a, short.b:
                assert verify(s, srv).status_code == 200
        kc.logout_user(user)
        signed_out = time.monotonic()
        pending = {(i, srv.name): (s, srv) for i, s in enumerate((laptop, phone))
                   for srv in (short.a, short.b)}
        while pending and time.monotonic() - signed_out < 1.0:
            for k, (s, srv) in list(pending.items()):
                r = verify(s, srv)
                if r.status_code == 401 and code_of(r) == "REVOKED_SESSION":
                    del pending[k]
            time.sleep(0.02)
        assert not pending, f"still signed in 1 s after Keycloak's sign-out: {sorted(pending)}"
        # Keycloak's logout tokens went through, one per session; the other
        # user is untouched.
        assert relay.answers and set(relay.answers) == {200}, relay.answers
        assert all(b"logout_token=" in b for b in relay.bodies)
        for srv in short.a, short.b:
            assert verify(other, srv).status_code == 200
        # Keycloak's own token, replayed, on either replica: refused.
        for srv in short.a, short.b:
            r = requests.post(srv.url + "/v1/oidc/backchannel-logout", data=relay.bodies[0],
                              headers={"Content-Type": "application/x-www-form-urlencoded"},
                              timeout=10)
            assert r.status_code == 400, r.text
            assert code_of(r) == "INVALID_LOGOUT_TOKEN"
            assert "already used" in r.json()["error"]["message"]
            assert r.headers["Cache-Control"] == "no-store"
    finally:
        relay.stop()


# --------------------------------------------------------------------------
# 8. allowed_groups through nginx (ingress-nginx's configuration)
# --------------------------------------------------------------------------


def test_allowed_groups_through_nginx(kc, short, tmp_path):
    """`/api/` is protected with `auth-url: …/v1/verify?allowed_groups=admins`,
    `/app/` with the plain verify: alice (admins) passes both, bob (staff)
    only `/app/`; nginx hands our 403 to the client and the app never
    sees bob's request."""
    from nginx_support import EchoUpstream, Proc, nginx_path, render_nginx_conf, wait_http

    echo = EchoUpstream().start()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    text, _ = render_nginx_conf(prefix, port, short.a.port, echo.addr)
    plain = f'set $target "http://127.0.0.1:{short.a.port}/v1/verify";'
    assert text.count(plain) == 2
    first = text.index(plain) + len(plain)
    text = text[:first] + text[first:].replace(
        plain, plain.replace('/v1/verify"', '/v1/verify?allowed_groups=admins"'), 1)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    ngx = Proc("nginx", [nginx_path(), "-p", str(prefix), "-c", str(conf),
                         "-e", str(prefix / "error.log")], prefix / "nginx.out")
    ngx.start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", ngx, 30, log=prefix / "error.log")
        alice, bob = sign_in(kc, short.a, "alice"), sign_in(kc, short.a, "bob")
        for path in ("/app/x", "/api/x"):
            r = get(alice, f"http://127.0.0.1:{port}{path}")
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            assert r.json()["headers"]["X-Auth-Request-User"] == "alice"
        r = get(bob, f"http://127.0.0.1:{port}/app/x")
        assert r.status_code == 200 and r.json()["headers"]["X-Auth-Request-User"] == "bob"
        seen = len(echo.requests_seen)
        r = get(bob, f"http://127.0.0.1:{port}/api/x")
        assert r.status_code == 403, (r.status_code, r.text[:300])
        assert len(echo.requests_seen) == seen, "the app saw a request the group rule refused"
        # The code nginx turned into its own 403 page, asked directly.
        r = get(bob, short.a.url + "/v1/verify", params={"allowed_groups": "admins"})
        assert r.status_code == 403 and code_of(r) == "FORBIDDEN_GROUP", r.text
    finally:
        ngx.stop()
        echo.stop()
