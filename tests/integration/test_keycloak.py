"""The Keycloak test support against the real Keycloak it starts (keycloak_support.py).

Each test drives Keycloak itself (no tokenpolicy): discovery over HTTPS with
the test CA, an authorization-code + PKCE flow through Keycloak's own login
form, a code used twice, a disabled user's refresh, and back-channel logout.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import queue
import secrets
import threading
import urllib.parse

import jwt
import pytest
import requests

from keycloak_support import USERS, keycloak, login_through_keycloak  # noqa: F401

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"
CALLBACK_PATH = "/v1/oidc/callback"
BACKCHANNEL_PATH = "/v1/oidc/backchannel-logout"


class Catcher:
    """A tiny HTTP server on 127.0.0.1 that records every request it gets."""

    def __init__(self):
        self.requests: "queue.Queue[dict]" = queue.Queue()
        catcher = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self, body: bytes):
                catcher.requests.put({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": body})
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802
                self._record(b"")

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self._record(self.rfile.read(length))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout: float = 10.0) -> dict:
        return self.requests.get(timeout=timeout)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def catcher(keycloak):  # noqa: F811
    c = Catcher()
    keycloak.set_client_redirects([c.base + CALLBACK_PATH])
    keycloak.set_backchannel_logout_url(c.base + BACKCHANNEL_PATH)
    yield c
    c.close()


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
    return verifier, challenge.decode()


def browser(keycloak) -> requests.Session:  # noqa: F811
    s = requests.Session()
    s.trust_env = False
    s.verify = str(keycloak.ca_file)
    return s


def authorize(keycloak, catcher, user: str):  # noqa: F811
    """Sign `user` in through the login form; return (code, verifier, nonce, session)."""
    disc = keycloak.discovery()
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": keycloak.client_id, "scope": "openid email profile",
        "redirect_uri": catcher.base + CALLBACK_PATH, "state": state, "nonce": nonce,
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    s = browser(keycloak)
    resp = login_through_keycloak(s, f"{disc['authorization_endpoint']}?{query}", user, USERS[user])
    assert resp.status_code in (302, 303), (resp.status_code, getattr(resp, "keycloak_errors", None))
    location = resp.headers["Location"]
    assert location.startswith(catcher.base + CALLBACK_PATH + "?"), location
    # The browser lands on the callback: the catcher sees the same query.
    landing = requests.Session()
    landing.trust_env = False
    landing.get(location, timeout=10)
    got = catcher.next()
    params = urllib.parse.parse_qs(urllib.parse.urlsplit(got["path"]).query)
    assert params["state"] == [state]
    return params["code"][0], verifier, nonce, s


def exchange(keycloak, catcher, code: str, verifier: str) -> requests.Response:  # noqa: F811
    disc = keycloak.discovery()
    return keycloak.http.post(disc["token_endpoint"], data={
        "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
        "redirect_uri": catcher.base + CALLBACK_PATH,
        "client_id": keycloak.client_id, "client_secret": keycloak.client_secret,
    }, timeout=15)


def keycloak_key(keycloak, token: str):  # noqa: F811
    jwks = keycloak.http.get(keycloak.discovery()["jwks_uri"], timeout=15).json()
    kid = jwt.get_unverified_header(token)["kid"]
    (key,) = [k for k in jwks["keys"] if k["kid"] == kid]
    return jwt.PyJWK(key)


def decode(keycloak, token: str, **kw) -> dict:  # noqa: F811
    key = keycloak_key(keycloak, token)
    return jwt.decode(token, key, algorithms=[key.algorithm_name], issuer=keycloak.issuer,
                      audience=keycloak.client_id, **kw)


def test_discovery_answers_over_https_with_the_test_ca(keycloak):  # noqa: F811
    disc = keycloak.discovery()
    assert disc["issuer"] == keycloak.issuer
    assert keycloak.issuer == f"https://127.0.0.1:{keycloak.port}/realms/tokenpolicy"
    assert "S256" in disc["code_challenge_methods_supported"]
    assert disc["backchannel_logout_supported"] is True
    assert disc["backchannel_logout_session_supported"] is True
    # Without the test CA the same URL is refused.
    plain = requests.Session()
    plain.trust_env = False
    with pytest.raises(requests.exceptions.SSLError):
        plain.get(keycloak.discovery_url, timeout=10)
    # HTTP is off.
    with pytest.raises(requests.exceptions.ConnectionError):
        plain.get(f"http://127.0.0.1:{keycloak.port}/realms/tokenpolicy", timeout=5)


def test_code_flow_with_pkce_gives_the_realms_claims(keycloak, catcher):  # noqa: F811
    expected = {
        "alice": (["admins", "staff"], "alice@example.com", True),
        "bob": (["staff"], "bob@example.org", True),
        "carol": ([], "carol@example.net", False),
    }
    for user, (groups, email, verified) in expected.items():
        code, verifier, nonce, _ = authorize(keycloak, catcher, user)
        r = exchange(keycloak, catcher, code, verifier)
        assert r.status_code == 200, r.text
        body = r.json()
        assert "refresh_token" in body
        claims = decode(keycloak, body["id_token"])
        assert claims["preferred_username"] == user
        assert sorted(claims.get("groups", [])) == groups
        assert claims["email"] == email
        assert claims["email_verified"] is verified
        assert claims["nonce"] == nonce
        assert claims["azp"] == keycloak.client_id


def test_pkce_is_required(keycloak, catcher):  # noqa: F811
    code, _verifier, _nonce, _ = authorize(keycloak, catcher, "bob")
    r = exchange(keycloak, catcher, code, secrets.token_urlsafe(48))
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_grant"


def test_wrong_password_shows_the_form_again(keycloak, catcher):  # noqa: F811
    disc = keycloak.discovery()
    _verifier, challenge = pkce_pair()
    query = urllib.parse.urlencode({
        "response_type": "code", "client_id": keycloak.client_id, "scope": "openid",
        "redirect_uri": catcher.base + CALLBACK_PATH, "state": "s", "nonce": "n",
        "code_challenge": challenge, "code_challenge_method": "S256",
    })
    resp = login_through_keycloak(browser(keycloak), f"{disc['authorization_endpoint']}?{query}",
                                  "alice", "not-the-password")
    assert resp.status_code == 200
    assert resp.keycloak_errors, resp.text[:500]


def test_a_code_exchanged_twice_is_refused(keycloak, catcher):  # noqa: F811
    code, verifier, _nonce, _ = authorize(keycloak, catcher, "alice")
    first = exchange(keycloak, catcher, code, verifier)
    assert first.status_code == 200, first.text
    second = exchange(keycloak, catcher, code, verifier)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"


def test_a_disabled_user_cannot_refresh(keycloak, catcher):  # noqa: F811
    code, verifier, _nonce, _ = authorize(keycloak, catcher, "bob")
    tokens = exchange(keycloak, catcher, code, verifier).json()
    disc = keycloak.discovery()

    def refresh(token):
        return keycloak.http.post(disc["token_endpoint"], data={
            "grant_type": "refresh_token", "refresh_token": token,
            "client_id": keycloak.client_id, "client_secret": keycloak.client_secret,
        }, timeout=15)

    ok = refresh(tokens["refresh_token"])
    assert ok.status_code == 200, ok.text
    keycloak.disable_user("bob")
    try:
        refused = refresh(ok.json()["refresh_token"])
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_grant"
    finally:
        keycloak.enable_user("bob")


def test_admin_logout_sends_a_backchannel_logout_token(keycloak, catcher):  # noqa: F811
    code, verifier, _nonce, _ = authorize(keycloak, catcher, "alice")
    tokens = exchange(keycloak, catcher, code, verifier).json()
    id_claims = decode(keycloak, tokens["id_token"])
    assert keycloak.user_sessions("alice")
    keycloak.logout_user("alice")
    # One logout_token per session of alice's (earlier tests left some):
    # each is checked, and one names the session signed in here.
    sids = []
    while id_claims["sid"] not in sids:
        got = catcher.next(timeout=15)
        assert got["method"] == "POST"
        assert got["path"] == BACKCHANNEL_PATH
        form = urllib.parse.parse_qs(got["body"].decode())
        (logout_token,) = form["logout_token"]
        claims = decode(keycloak, logout_token)
        assert BACKCHANNEL_EVENT in claims["events"]
        assert claims["events"][BACKCHANNEL_EVENT] == {}
        assert "nonce" not in claims
        assert claims["sub"] == id_claims["sub"]
        assert claims.get("jti")
        sids.append(claims["sid"])
    assert keycloak.user_sessions("alice") == []


def test_stop_and_start_keep_the_realm(keycloak, catcher):  # noqa: F811
    keycloak.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        keycloak.http.get(keycloak.discovery_url, timeout=5)
    took = keycloak.start()
    print(f"keycloak restart: {took:.1f} s, RSS {(keycloak.rss_kib() or 0) // 1024} MiB")
    assert keycloak.discovery()["issuer"] == keycloak.issuer
    keycloak.set_client_redirects([catcher.base + CALLBACK_PATH])
    code, verifier, _nonce, _ = authorize(keycloak, catcher, "bob")
    assert exchange(keycloak, catcher, code, verifier).status_code == 200
