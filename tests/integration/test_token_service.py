"""Black-box tests of `tokenpolicy serve` over HTTP (the policy rules and the HTTP API).

Most tests run against two replicas (``cluster.a`` / ``cluster.b``) that share
one Redis and one signing key, under the short policy:

    session 8 s, token 2 s, renew limit 3 s, refresh grace 1 s.

Token timestamps are whole seconds floored from the server clock (the same
clock as ours: same host), so every wait is computed from the claims of the
token at hand (``sleep_until(exp + 0.3)``) rather than from when we sent the
request. Each test logs in afresh.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import AUDIENCE, COOKIE_NAME, HTTP_TIMEOUT, ISSUER, SHORT_POLICY, _bcrypt_2y, policy_yaml

SESSION = SHORT_POLICY["session"]
TOKEN = SHORT_POLICY["token"]
RENEW = SHORT_POLICY["renew"]
GRACE = SHORT_POLICY["grace"]

MARGIN = 0.3  # seconds past a boundary before we probe it

# ==========================================================================
# Helpers
# ==========================================================================


def describe(r: requests.Response) -> str:
    req = r.request
    return (f"{req.method} {req.url} -> {r.status_code}\n"
            f"  response headers: {dict(r.headers)}\n"
            f"  response body: {r.text[:600]!r}")


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def cookie(token: str) -> dict:
    return {"Cookie": f"{COOKIE_NAME}={token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unverified_claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def unverified_header(token: str) -> dict:
    return jwt.get_unverified_header(token)


def sleep_until(epoch: float) -> None:
    """Sleep until the wall clock (the server's clock) reaches ``epoch``."""
    while True:
        left = epoch - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.5))


def require_before(epoch: float, what: str) -> None:
    """Guard for timing-dependent steps: fail loudly (instead of asserting
    something meaningless) if the machine was too slow to stay in a window."""
    now = time.time()
    assert now < epoch, (f"timing window missed ({what}): now={now:.3f} >= {epoch:.3f}; "
                         f"the test machine is too slow for the short policy")


def parse_www_authenticate(value: str) -> dict:
    m = re.match(r"^\s*Bearer\s+(.*)$", value or "", re.IGNORECASE | re.DOTALL)
    assert m, f"WWW-Authenticate is not a Bearer challenge: {value!r}"
    return {k.lower(): v for k, v in re.findall(r'([A-Za-z_]+)\s*=\s*"([^"]*)"', m.group(1))}


def assert_error(r: requests.Response, status: int, code) -> dict:
    """Status, JSON error body {"error":{"code","message"}} and, for 401s,
    ``WWW-Authenticate: Bearer error="invalid_token", error_description="<code>"``.
    ``code`` may be a set of acceptable codes."""
    codes = {code} if isinstance(code, str) else set(code)
    assert r.status_code == status, f"expected {status} {sorted(codes)}; got:\n{describe(r)}"
    try:
        body = r.json()
    except ValueError:
        pytest.fail(f"error body is not JSON:\n{describe(r)}")
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), \
        f"error body lacks an 'error' object:\n{describe(r)}"
    got = body["error"].get("code")
    assert got in codes, f"expected error.code in {sorted(codes)}, got {got!r}:\n{describe(r)}"
    msg = body["error"].get("message")
    assert isinstance(msg, str) and msg, f"error.message missing/empty:\n{describe(r)}"
    if status == 401:
        wa = r.headers.get("WWW-Authenticate")
        assert wa, f"401 without WWW-Authenticate:\n{describe(r)}"
        params = parse_www_authenticate(wa)
        assert params.get("error") == "invalid_token", f"WWW-Authenticate {wa!r}:\n{describe(r)}"
        assert params.get("error_description") == got, \
            f"WWW-Authenticate error_description != body code {got!r}: {wa!r}"
    assert r.status_code != 500
    return body


def set_cookies(r: requests.Response) -> list[str]:
    try:
        return list(r.raw.headers.getlist("Set-Cookie"))
    except AttributeError:  # pragma: no cover - older urllib3
        v = r.headers.get("Set-Cookie")
        return [v] if v else []


def token_cookie(r: requests.Response) -> tuple[str, set]:
    """(value, lower-cased attribute names) of our cookie in Set-Cookie."""
    for sc in set_cookies(r):
        parts = [p.strip() for p in sc.split(";")]
        name, _, value = parts[0].partition("=")
        if name == COOKIE_NAME:
            attrs = {p.split("=", 1)[0].strip().lower() for p in parts[1:] if p}
            return value, attrs
    pytest.fail(f"no Set-Cookie for {COOKIE_NAME!r}:\n{describe(r)}")


def parse_rfc3339_utc(s: str) -> float:
    assert isinstance(s, str), s
    assert s.endswith("Z") or s.endswith("+00:00"), f"not an RFC3339 UTC time: {s!r}"
    dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    assert dt.tzinfo is not None and dt.utcoffset().total_seconds() == 0, s
    return dt.timestamp()


@dataclass
class Issued:
    """A token as the service returned it (login or refresh)."""
    token: str
    claims: dict
    body: dict
    resp: requests.Response

    @property
    def exp(self) -> int:
        return self.claims["exp"]

    @property
    def auth_time(self) -> int:
        return self.claims["auth_time"]


def check_token_body(r: requests.Response, session_len: int = SESSION, token_len: int = TOKEN) -> Issued:
    """The 200 body of login/refresh, its cookie and its token's claims."""
    assert r.status_code == 200, describe(r)
    body = r.json()
    for k in ("access_token", "token_type", "expires_in", "session_expires_at"):
        assert k in body, f"missing {k!r}: {body}"
    assert body["token_type"] == "Bearer", body
    assert isinstance(body["expires_in"], int) and not isinstance(body["expires_in"], bool), body
    tok = body["access_token"]
    assert isinstance(tok, str) and tok.count(".") == 2, body
    claims = unverified_claims(tok)
    for k in ("iss", "aud", "sub", "sid", "jti"):
        assert isinstance(claims.get(k), str) and claims[k], f"claim {k}: {claims}"
    for k in ("iat", "exp", "auth_time"):
        assert isinstance(claims.get(k), int) and not isinstance(claims[k], bool), f"claim {k}: {claims}"
    assert claims["iss"] == ISSUER and claims["aud"] == AUDIENCE, claims
    # exp = min(iat + token, auth_time + session)
    assert claims["exp"] == min(claims["iat"] + token_len, claims["auth_time"] + session_len), claims
    # expires_in counts from "now" (between iat and iat+1) to exp
    assert claims["exp"] - claims["iat"] - 1 <= body["expires_in"] <= claims["exp"] - claims["iat"], \
        (body, claims)
    assert parse_rfc3339_utc(body["session_expires_at"]) == claims["auth_time"] + session_len, (body, claims)
    hdr = unverified_header(tok)
    assert hdr.get("alg") == "EdDSA" and hdr.get("kid"), hdr
    value, attrs = token_cookie(r)
    assert value == tok, f"cookie value differs from access_token:\n{set_cookies(r)}"
    assert "httponly" in attrs, f"cookie not HttpOnly: {set_cookies(r)}"
    return Issued(token=tok, claims=claims, body=body, resp=r)


def login(server, user: str, password: str, **kw) -> requests.Response:
    return requests.post(server.url + "/v1/login", json={"username": user, "password": password},
                         timeout=kw.pop("timeout", HTTP_TIMEOUT), **kw)


def login_ok(server, env, user: str = "alice", **kw) -> Issued:
    before = int(time.time())
    r = login(server, user, env.users[user])
    after = time.time()
    iss = check_token_body(r, **kw)
    assert iss.claims["sub"] == user, iss.claims
    assert iss.claims["auth_time"] == iss.claims["iat"], iss.claims
    assert before <= iss.claims["iat"] <= after, (before, iss.claims, after)
    return iss


def refresh(server, token: str, via: str = "bearer", timeout: float = HTTP_TIMEOUT) -> requests.Response:
    headers = bearer(token) if via == "bearer" else cookie(token)
    return requests.post(server.url + "/v1/refresh", headers=headers, timeout=timeout)


def verify(server, token: str | None, path: str = "/v1/verify", method: str = "GET",
           via: str = "bearer", headers: dict | None = None) -> requests.Response:
    h = {}
    if token is not None:
        h.update(bearer(token) if via == "bearer" else cookie(token))
    h.update(headers or {})
    return requests.request(method, server.url + path, headers=h, timeout=HTTP_TIMEOUT)


def logout(server, token: str, via: str = "bearer") -> requests.Response:
    headers = bearer(token) if via == "bearer" else cookie(token)
    return requests.post(server.url + "/v1/logout", headers=headers, timeout=HTTP_TIMEOUT)


def assert_verified(r: requests.Response, user: str, sid: str, renewed: bool = False) -> None:
    assert r.status_code == 200, describe(r)
    assert r.headers.get("X-Auth-Request-User") == user, describe(r)
    assert r.headers.get("Remote-User") == user, describe(r)
    assert r.headers.get("X-Auth-Request-Session") == sid, describe(r)
    if not renewed:
        assert "X-New-Token" not in r.headers, f"unexpected on-the-fly renewal:\n{describe(r)}"


def poll(fn, done, timeout: float, interval: float = 0.05):
    """Call fn() every ``interval`` until done(result) or the deadline;
    returns (result, elapsed seconds)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        res = fn()
        if done(res) or time.monotonic() >= deadline:
            return res, time.monotonic() - t0
        time.sleep(interval)


def make_jwt(header: dict, payload: dict, sign) -> str:
    """Compact JWS with exactly the given header (no defaults added)."""
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(payload, separators=(",", ":")).encode())
    signing_input = f"{h}.{p}".encode()
    return f"{h}.{p}.{b64url(sign(signing_input))}"


# ==========================================================================
# 1. login and verify
# ==========================================================================


def test_healthz_and_readyz(cluster):
    for s in cluster.replicas:
        for path in ("/healthz", "/readyz"):
            r = requests.get(s.url + path, timeout=HTTP_TIMEOUT)
            assert r.status_code == 200, describe(r)


def test_login_and_verify_on_both_replicas(cluster):
    env = cluster.env
    iss = login_ok(cluster.a, env, "alice")
    c = iss.claims
    assert c["exp"] - c["iat"] == TOKEN, c

    # The signature verifies with the public half of the key we gave the servers.
    pub = env.private_key.public_key()
    decoded = jwt.decode(iss.token, pub, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,
                         options={"verify_exp": False})
    assert decoded == c

    # Valid on both replicas, by bearer and by cookie, any method, any /v1/verify/* path.
    for s in cluster.replicas:
        assert_verified(verify(s, iss.token), "alice", c["sid"])
        assert_verified(verify(s, iss.token, via="cookie"), "alice", c["sid"])
    assert_verified(verify(cluster.a, iss.token, path="/v1/verify/some/upstream/path", method="POST"),
                    "alice", c["sid"])
    for method in ("PUT", "DELETE", "PATCH", "HEAD"):
        assert_verified(verify(cluster.b, iss.token, path="/v1/verify/x", method=method), "alice", c["sid"])

    # A token issued by replica b is valid on replica a.
    iss_b = login_ok(cluster.b, env, "alice")
    assert iss_b.claims["sid"] != c["sid"], "two logins share a session id"
    assert_verified(verify(cluster.a, iss_b.token), "alice", iss_b.claims["sid"])


# ==========================================================================
# 2. one refresh, grace, reuse detection
# ==========================================================================


def test_refresh_once_then_reuse_revokes_session(cluster):
    env = cluster.env
    old = login_ok(cluster.a, env)
    sleep_until(old.exp + MARGIN)

    r1 = refresh(cluster.a, old.token)
    claimed_by = time.time()  # the claim happened before this instant
    new = check_token_body(r1)
    assert new.claims["sid"] == old.claims["sid"]
    assert new.claims["auth_time"] == old.claims["auth_time"]
    assert new.claims["sub"] == "alice"
    assert new.claims["jti"] != old.claims["jti"]
    assert new.token != old.token
    assert new.claims["iat"] >= old.exp

    # Within the grace, a racing request with the old token gets the same new token.
    r2 = refresh(cluster.b, old.token)
    assert r2.status_code == 200, describe(r2)
    assert r2.json()["access_token"] == new.token, "second refresh inside the grace got a different token"

    for s in cluster.replicas:
        assert_verified(verify(s, new.token), "alice", new.claims["sid"])

    # After the grace, the same old token is reuse of a spent credential.
    sleep_until(claimed_by + GRACE + 0.3)
    require_before(old.exp + RENEW - 0.2, "old token must still be inside its renew window")
    r3 = refresh(cluster.a, old.token)
    assert_error(r3, 401, "TOKEN_ALREADY_REFRESHED")

    # ... and the whole session is revoked, on both replicas (within 1 s).
    assert_error(verify(cluster.a, new.token), 401, "REVOKED_SESSION")
    rb, elapsed = poll(lambda: verify(cluster.b, new.token), lambda r: r.status_code != 200, timeout=2.0)
    assert_error(rb, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"replica b accepted a revoked session for {elapsed:.2f}s"


# ==========================================================================
# 3. past the renew limit
# ==========================================================================


def test_past_renew_limit_is_expired_token(cluster):
    env = cluster.env
    iss = login_ok(cluster.a, env)
    # Still renewable just before the limit is covered elsewhere; here: past it.
    sleep_until(iss.exp + RENEW + MARGIN)
    require_before(iss.auth_time + SESSION - 0.2, "session must still be alive")
    assert_error(refresh(cluster.a, iss.token), 401, "EXPIRED_TOKEN")
    assert_error(refresh(cluster.b, iss.token, via="cookie"), 401, "EXPIRED_TOKEN")
    r = verify(cluster.b, iss.token)
    assert_error(r, 401, "EXPIRED_TOKEN")
    assert "X-New-Token" not in r.headers, describe(r)
    assert_error(verify(cluster.a, iss.token, via="cookie"), 401, "EXPIRED_TOKEN")


# ==========================================================================
# 4. the session end is hard
# ==========================================================================


def test_session_end_is_hard_even_for_fresh_tokens(cluster):
    env = cluster.env
    t0 = login_ok(cluster.a, env)
    A = t0.auth_time
    sid = t0.claims["sid"]
    chain = [t0]

    # Refresh at A+2.3 (-> exp A+4), at A+4.3 (-> exp A+6), at A+7.3 (-> exp min(A+9, A+8) = A+8).
    replicas = [cluster.b, cluster.a, cluster.b]
    for when, srv in zip((A + 2 + MARGIN, A + 4 + MARGIN, A + 7 + MARGIN), replicas):
        prev = chain[-1]
        sleep_until(when)
        require_before(prev.exp + RENEW - 0.1, "previous token must be renewable")
        require_before(A + SESSION - 0.2, "session must be alive")
        nxt = check_token_body(refresh(srv, prev.token))
        assert nxt.claims["sid"] == sid and nxt.claims["auth_time"] == A, nxt.claims
        assert nxt.claims["jti"] != prev.claims["jti"]
        chain.append(nxt)

    last = chain[-1]
    assert last.exp == A + SESSION, f"last refreshed token's exp {last.exp} != auth_time + session {A + SESSION}"
    assert last.body["expires_in"] <= 1, last.body
    assert_verified(verify(cluster.a, last.token), "alice", sid)

    sleep_until(A + SESSION + MARGIN)
    for s in cluster.replicas:
        assert_error(verify(s, last.token), 401, "EXPIRED_SESSION")
        assert_error(refresh(s, last.token), 401, "EXPIRED_SESSION")
    # Any token of the session, old or new.
    assert_error(verify(cluster.b, chain[1].token), 401, "EXPIRED_SESSION")
    assert_error(refresh(cluster.a, chain[2].token), 401, "EXPIRED_SESSION")


# ==========================================================================
# 5. logout propagates
# ==========================================================================


def test_logout_on_a_is_refused_on_b_within_one_second(cluster):
    env = cluster.env
    iss = login_ok(cluster.a, env)
    sid = iss.claims["sid"]
    # Both replicas have seen (and may cache) the token.
    assert_verified(verify(cluster.b, iss.token), "alice", sid)
    assert_verified(verify(cluster.a, iss.token), "alice", sid)

    r = logout(cluster.a, iss.token)
    assert r.status_code == 204, describe(r)
    assert r.content == b"", describe(r)
    t_logout = time.monotonic()

    assert_error(verify(cluster.a, iss.token), 401, "REVOKED_SESSION")
    rb, _ = poll(lambda: verify(cluster.b, iss.token), lambda r: r.status_code != 200, timeout=3.0)
    elapsed = time.monotonic() - t_logout
    assert_error(rb, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"replica b still accepted the logged-out token {elapsed:.3f}s after logout"
    assert_error(refresh(cluster.b, iss.token), 401, "REVOKED_SESSION")


def test_refresh_and_logout_with_cookie(cluster):
    env = cluster.env
    old = login_ok(cluster.a, env)
    sid = old.claims["sid"]
    assert_verified(verify(cluster.b, old.token, via="cookie"), "alice", sid)
    sleep_until(old.exp + MARGIN)

    new = check_token_body(refresh(cluster.a, old.token, via="cookie"))
    assert new.claims["sid"] == sid
    assert_verified(verify(cluster.b, new.token, via="cookie"), "alice", sid)

    r = logout(cluster.b, new.token, via="cookie")
    assert r.status_code == 204, describe(r)
    ra, elapsed = poll(lambda: verify(cluster.a, new.token), lambda r: r.status_code != 200, timeout=3.0)
    assert_error(ra, 401, "REVOKED_SESSION")
    assert elapsed < 1.0, f"replica a accepted the logged-out token for {elapsed:.3f}s"


# ==========================================================================
# 6. the refresh race
# ==========================================================================


def test_concurrent_refreshes_get_one_identical_token(cluster):
    env = cluster.env
    n = 60
    servers = cluster.replicas
    old = login_ok(cluster.a, env)

    sessions = [requests.Session() for _ in range(n)]
    for i, s in enumerate(sessions):  # open the connections before the burst
        assert s.get(servers[i % 2].url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=15)
            r = sessions[i].post(servers[i % 2].url + "/v1/refresh", headers=bearer(old.token), timeout=15)
            results[i] = r
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    sleep_until(old.exp + MARGIN)
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    burst = time.monotonic() - t0
    for s in sessions:
        s.close()

    errors = [r for r in results if not isinstance(r, requests.Response)]
    assert not errors, f"{len(errors)} requests failed outright: {errors[:3]}"
    statuses = [r.status_code for r in results]
    assert 500 not in statuses and all(s < 500 for s in statuses), \
        f"5xx in the race: {sorted(set(statuses))}\n" + "\n".join(describe(r) for r in results if r.status_code >= 500)
    oks = [r for r in results if r.status_code == 200]
    assert oks, f"no refresh succeeded: statuses {statuses}\n{describe(results[0])}"
    for r in results:
        if r.status_code != 200:
            # Only a request that arrived after the grace may lose; nothing else is acceptable.
            assert_error(r, 401, "TOKEN_ALREADY_REFRESHED")
    tokens = {r.json()["access_token"] for r in oks}
    assert len(tokens) == 1, f"{len(tokens)} different tokens handed out for one refresh"
    jtis = {unverified_claims(t)["jti"] for t in tokens}
    assert len(jtis) == 1 and old.claims["jti"] not in jtis
    if burst < GRACE * 0.8:
        assert len(oks) == n, (f"burst took {burst:.2f}s (< grace {GRACE}s) yet only {len(oks)}/{n} "
                               f"got 200: {sorted(statuses)}")
    print(f"race: {n} refreshes in {burst:.3f}s, statuses {sorted(statuses)}")
    new = tokens.pop()
    nc = unverified_claims(new)
    assert nc["sid"] == old.claims["sid"] and nc["auth_time"] == old.auth_time
    if len(oks) == n:  # no late loser revoked the session
        for s in servers:
            assert_verified(verify(s, new), "alice", nc["sid"])


# ==========================================================================
# 7. JWKS
# ==========================================================================


def test_jwks_verifies_tokens_with_pyjwt(cluster):
    env = cluster.env
    iss = login_ok(cluster.a, env)

    docs = []
    for s in cluster.replicas:
        r = requests.get(s.url + "/.well-known/jwks.json", timeout=HTTP_TIMEOUT)
        assert r.status_code == 200, describe(r)
        assert r.headers.get("Content-Type", "").startswith("application/"), describe(r)
        docs.append(r.json())
    assert docs[0] == docs[1], "replicas with the same key publish different JWKS"
    keys = docs[0]["keys"]
    assert len(keys) == 1, keys
    k = keys[0]
    assert {k.get("kty"), k.get("crv"), k.get("alg"), k.get("use")} == {"OKP", "Ed25519", "EdDSA", "sig"}, k
    assert k["kty"] == "OKP" and k["crv"] == "Ed25519" and k["alg"] == "EdDSA" and k["use"] == "sig", k
    assert "d" not in k, "JWKS leaks the private key!"
    raw_pub = env.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert k["x"] == b64url(raw_pub), "JWKS x is not our public key"
    assert k.get("kid") and unverified_header(iss.token)["kid"] == k["kid"]

    client = jwt.PyJWKClient(cluster.b.url + "/.well-known/jwks.json", cache_keys=False)
    signing_key = client.get_signing_key_from_jwt(iss.token)
    decoded = jwt.decode(iss.token, signing_key.key, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER,
                         options={"verify_exp": False})
    assert decoded["sub"] == "alice" and decoded["sid"] == iss.claims["sid"]
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(iss.token, signing_key.key, algorithms=["EdDSA"], audience="someone-else",
                   options={"verify_exp": False})


# ==========================================================================
# 8. forward-auth renews on the fly
# ==========================================================================


def test_verify_renews_expired_token_on_the_fly(cluster):
    env = cluster.env
    old = login_ok(cluster.a, env)
    sid = old.claims["sid"]
    sleep_until(old.exp + MARGIN)

    r = verify(cluster.a, old.token, path="/v1/verify/app")
    assert_verified(r, "alice", sid, renewed=True)
    new_token = r.headers.get("X-New-Token")
    assert new_token, f"no X-New-Token for an expired-but-renewable token:\n{describe(r)}"
    value, attrs = token_cookie(r)
    assert value == new_token and "httponly" in attrs, set_cookies(r)
    nc = unverified_claims(new_token)
    assert nc["sid"] == sid and nc["auth_time"] == old.auth_time and nc["sub"] == "alice"
    assert nc["jti"] != old.claims["jti"]
    assert nc["exp"] == min(nc["iat"] + TOKEN, old.auth_time + SESSION) and nc["iat"] >= old.exp
    jwt.decode(new_token, env.private_key.public_key(), algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)

    # The new token is valid as is, on the other replica too.
    assert_verified(verify(cluster.b, new_token), "alice", sid)
    # A parallel request of the same page, inside the grace, gets the same new token.
    r2 = verify(cluster.b, old.token, via="cookie")
    assert_verified(r2, "alice", sid, renewed=True)
    assert r2.headers.get("X-New-Token") == new_token, describe(r2)


def test_streaming_requests_are_never_renewed_on_the_fly(cluster):
    env = cluster.env
    old = login_ok(cluster.a, env)
    sleep_until(old.exp + MARGIN)

    r = verify(cluster.a, old.token, headers={"Accept": "text/event-stream"})
    assert_error(r, 401, "EXPIRED_TOKEN")
    assert "X-New-Token" not in r.headers, describe(r)
    ws = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
          "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()}
    r = verify(cluster.b, old.token, headers=ws)
    assert_error(r, 401, "EXPIRED_TOKEN")
    assert "X-New-Token" not in r.headers, describe(r)

    # The one refresh was not spent behind the page's back.
    new = check_token_body(refresh(cluster.a, old.token))
    assert new.claims["sid"] == old.claims["sid"]


# ==========================================================================
# 9. bad input
# ==========================================================================


def test_missing_token_is_empty_token(cluster):
    a, b = cluster.a, cluster.b
    assert_error(verify(a, None), 401, "EMPTY_TOKEN")
    assert_error(verify(b, None, path="/v1/verify/x", method="POST"), 401, "EMPTY_TOKEN")
    assert_error(requests.post(a.url + "/v1/refresh", timeout=HTTP_TIMEOUT), 401, "EMPTY_TOKEN")
    assert_error(requests.post(b.url + "/v1/logout", timeout=HTTP_TIMEOUT), 401, "EMPTY_TOKEN")
    # Present but empty: EMPTY_TOKEN is the natural answer; INVALID_TOKEN is tolerated.
    assert_error(verify(a, "", via="cookie"), 401, {"EMPTY_TOKEN", "INVALID_TOKEN"})
    assert_error(verify(b, None, headers={"Authorization": "Bearer "}), 401, {"EMPTY_TOKEN", "INVALID_TOKEN"})


MALFORMED = {
    "one-part": "abc",
    "two-parts": "a.b",
    "three-letters": "a.b.c",
    "three-dots": "...",
    "four-parts": "a.b.c.d",
    "five-parts": "x.y.z.w.v",
    "empty-signature": "eyJhbGciOiJFZERTQSJ9.e30.",
    "short-signature": "eyJhbGciOiJFZERTQSJ9.e30.AAAA",
    "not-base64": "!!!.???.###",
    "empty-objects": "e30.e30.e30",
    "json-null": "bnVsbA.bnVsbA.bnVsbA",
    "json-array": "W10.W10.W10",
    "percent-junk": "%00%00.%ff.%2e",
    "non-ascii-bytes": "t\xf6k\xe9n.\xff\xfe.\x80",
}


@pytest.mark.parametrize("bad", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_tokens_are_invalid(cluster, bad):
    assert_error(verify(cluster.a, bad), 401, "INVALID_TOKEN")
    assert_error(refresh(cluster.b, bad), 401, "INVALID_TOKEN")
    assert_error(verify(cluster.b, bad, via="cookie"), 401, "INVALID_TOKEN")


def test_oversized_token_is_refused_without_500(cluster):
    # A syntactically plausible 20 KB token, and 20 KB of junk.
    big = [b64url(b'{"alg":"EdDSA","kid":"x"}') + "." + "A" * 20_000 + ".AAAA", "x" * 20_480]
    for tok in big:
        for srv, via in ((cluster.a, "bearer"), (cluster.b, "cookie")):
            r = verify(srv, tok, via=via)
            assert r.status_code in (401, 413, 431), describe(r)
            if r.status_code == 401:
                assert_error(r, 401, "INVALID_TOKEN")
            r = refresh(srv, tok, via=via)
            assert r.status_code in (401, 413, 431), describe(r)
            if r.status_code == 401:
                assert_error(r, 401, "INVALID_TOKEN")
    # The server is still fine.
    assert requests.get(cluster.a.url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200


def test_forged_tokens_are_invalid(cluster):
    env = cluster.env
    iss = login_ok(cluster.a, env)
    claims = dict(iss.claims)
    kid = unverified_header(iss.token)["kid"]
    key = env.private_key
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem_pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    other = Ed25519PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1())

    def ed(k):
        return lambda m: k.sign(m)

    def hs(secret: bytes):
        return lambda m: hmac.new(secret, m, hashlib.sha256).digest()

    def es256(m):
        return jwt.algorithms.ECAlgorithm(jwt.algorithms.ECAlgorithm.SHA256).sign(m, p256)

    # Positive control: the same claims re-signed by the real key are accepted,
    # so each negative case below fails for the one thing it changes.
    control = make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims, ed(key))
    assert_verified(verify(cluster.b, control), "alice", claims["sid"])

    parts = iss.token.split(".")
    tampered_payload = dict(claims, sub="admin")
    forged = {
        "alg none": make_jwt({"alg": "none", "typ": "JWT", "kid": kid}, claims, lambda m: b""),
        "alg None, no kid": make_jwt({"alg": "None", "typ": "JWT"}, claims, lambda m: b""),
        "alg none + real signature": make_jwt({"alg": "none", "kid": kid}, claims, lambda m: b"").rsplit(".", 1)[0]
        + "." + parts[2],
        "HS256 raw public key": make_jwt({"alg": "HS256", "typ": "JWT", "kid": kid}, claims, hs(raw_pub)),
        "HS256 PEM public key": make_jwt({"alg": "HS256", "typ": "JWT", "kid": kid}, claims, hs(pem_pub)),
        "HS256 JWKS x": make_jwt({"alg": "HS256", "typ": "JWT", "kid": kid}, claims, hs(b64url(raw_pub).encode())),
        "HS256 PEM, no kid": make_jwt({"alg": "HS256", "typ": "JWT"}, claims, hs(pem_pub)),
        "EdDSA real key, unknown kid": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": "unknown-kid"}, claims, ed(key)),
        "EdDSA other key, real kid": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid}, claims, ed(other)),
        "EdDSA other key, no kid": make_jwt({"alg": "EdDSA", "typ": "JWT"}, claims, ed(other)),
        "ES256 P-256 key, real kid": make_jwt({"alg": "ES256", "typ": "JWT", "kid": kid}, claims, es256),
        "wrong issuer": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid}, dict(claims, iss="evil"), ed(key)),
        "wrong audience": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid}, dict(claims, aud="other-app"), ed(key)),
        # Signed by the real key, with a header the service never writes.
        "real key, crit": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid, "crit": ["exp"], "exp": 1},
                                   claims, ed(key)),
        "real key, jku": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid,
                                   "jku": "https://127.0.0.1:1/jwks.json"}, claims, ed(key)),
        "real key, x5u": make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid,
                                   "x5u": "https://127.0.0.1:1/cert.pem"}, claims, ed(key)),
        "real key, no typ": make_jwt({"alg": "EdDSA", "kid": kid}, claims, ed(key)),
        "tampered payload": parts[0] + "." + b64url(json.dumps(tampered_payload).encode()) + "." + parts[2],
        "truncated signature": iss.token[:-4],
        "signature of another token": parts[0] + "." + parts[1] + "." + control.split(".")[2][::-1],
    }
    failures = []
    for name, tok in forged.items():
        for srv, call in ((cluster.a, verify), (cluster.b, refresh)):
            r = call(srv, tok)
            try:
                assert_error(r, 401, "INVALID_TOKEN")
            except AssertionError as e:
                failures.append(f"[{name}] {e}")
    assert not failures, "\n\n".join(failures)


def raw_http(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send a request over a bare socket; stop sending the body as soon as the
    server answers (a 413 may come before the body is read). Returns
    (status, headers, body)."""
    deadline = time.monotonic() + timeout
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(head.encode("latin-1"))
        sent = 0
        answered = False
        while sent < len(body):
            r, _, _ = select.select([s], [], [], 0 if sent else 0.3)
            if r:
                answered = True
                break
            try:
                sent += s.send(body[sent:sent + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
            if time.monotonic() > deadline:
                break
        data = b""
        s.settimeout(max(0.1, deadline - time.monotonic()))
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout) as e:
                if not data:
                    raise AssertionError(f"no response (sent {sent}/{len(body)} body bytes, "
                                         f"answered early: {answered}): {e!r}")
                break
            if not chunk:
                break
            data += chunk
            hdr_end = data.find(b"\r\n\r\n")
            if hdr_end >= 0:
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", data[:hdr_end], re.IGNORECASE)
                if m and len(data) >= hdr_end + 4 + int(m.group(1)):
                    break
    finally:
        s.close()
    head_b, _, rest = data.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def test_login_bad_requests(cluster):
    url = cluster.a.url + "/v1/login"
    js = {"Content-Type": "application/json"}
    cases = {
        "garbage": b"{not json",
        "empty body": b"",
        "array": b"[]",
        "string": b'"alice"',
        "empty object": b"{}",
        "no password": json.dumps({"username": "alice"}).encode(),
        "no username": json.dumps({"password": "alice-password"}).encode(),
        "wrong types": json.dumps({"username": 1, "password": ["x"]}).encode(),
        "null fields": json.dumps({"username": None, "password": None}).encode(),
        "truncated": b'{"username":"alice","password":"al',
        "invalid utf-8": b'{"username":"\xff\xfe","password":"x"}',
    }
    failures = []
    for name, data in cases.items():
        r = requests.post(url, data=data, headers=js, timeout=HTTP_TIMEOUT)
        try:
            assert_error(r, 400, "INVALID_REQUEST")
        except AssertionError as e:
            failures.append(f"[{name}] {e}")
    assert not failures, "\n\n".join(failures)


def test_login_body_too_large(cluster):
    """Body too large: 413 with the JSON error shape, code PAYLOAD_TOO_LARGE; never a 500 or a hang."""
    host = f"127.0.0.1:{cluster.a.port}"
    failures = []
    for size in (64 * 1024, 3 * 1024 * 1024):
        big = json.dumps({"username": "alice", "password": "x" * size}).encode()
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 8192]), big[i:i + 8192])
                           for i in range(0, len(big), 8192)) + b"0\r\n\r\n"
        for how, head, body in (
            ("content-length", f"POST /v1/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(big)}\r\nConnection: close\r\n\r\n", big),
            ("chunked", f"POST /v1/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                        f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n", chunked),
        ):
            what = f"[{how}, {len(big)} bytes]"
            status, headers, rbody = raw_http(cluster.a.port, head, body)
            if status != 413:
                failures.append(f"{what} expected 413, got {status} {headers} {rbody[:300]!r}")
                continue
            try:
                code = json.loads(rbody)["error"]["code"]
            except Exception:
                failures.append(f"{what} 413 body is not the JSON error shape: {headers} {rbody[:300]!r}")
                continue
            if code != "PAYLOAD_TOO_LARGE":
                failures.append(f"{what} error.code {code!r} != PAYLOAD_TOO_LARGE")
    assert requests.get(cluster.a.url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200
    assert not failures, "\n".join(failures)


def test_wrong_password_and_unknown_user(cluster):
    r1 = login(cluster.a, "dave", "not-daves-password")
    b1 = assert_error(r1, 401, "INVALID_CREDENTIALS")
    assert not set_cookies(r1) or all(not c.startswith(COOKIE_NAME + "=ey") for c in set_cookies(r1))
    r2 = login(cluster.b, f"nobody-{uuid.uuid4().hex[:8]}", "whatever")
    b2 = assert_error(r2, 401, "INVALID_CREDENTIALS")
    # No user enumeration through the message.
    assert b1["error"]["message"] == b2["error"]["message"], (b1, b2)
    # An empty password is a wrong password (or a bad request), never a login.
    r3 = login(cluster.a, "dave", "")
    assert r3.status_code in (400, 401), describe(r3)


def test_failed_logins_are_throttled(cluster):
    env = cluster.env
    user = "mallory"
    for i in range(5):
        r = login(cluster.a, user, f"wrong-{i}")
        assert_error(r, 401, "INVALID_CREDENTIALS")
    r = login(cluster.a, user, "wrong-6")
    assert_error(r, 429, "TOO_MANY_ATTEMPTS")
    ra = r.headers.get("Retry-After")
    assert ra is not None and ra.strip().isdigit() and int(ra) > 0, f"Retry-After {ra!r}:\n{describe(r)}"
    # The right password does not get through while throttled ...
    r = login(cluster.a, user, env.users[user])
    assert_error(r, 429, "TOO_MANY_ATTEMPTS")
    # ... on the other replica either (the counter lives in the shared store).
    r = login(cluster.b, user, env.users[user])
    assert_error(r, 429, "TOO_MANY_ATTEMPTS")
    assert r.headers.get("Retry-After"), describe(r)
    # Other users are not affected.
    login_ok(cluster.a, env, "erin")


# ==========================================================================
# 10. password hash formats
# ==========================================================================


def test_bcrypt_2y_and_argon2id_users_log_in(cluster):
    env = cluster.env
    users_text = env.users_file.read_text()
    assert "alice:$2y$" in users_text
    assert env.argon2_error is None, f"`tokenpolicy hash-password` failed: {env.argon2_error}"
    assert "bob:$argon2id$" in users_text

    a = login_ok(cluster.a, env, "alice")
    b = login_ok(cluster.b, env, "bob")
    assert_verified(verify(cluster.b, a.token), "alice", a.claims["sid"])
    assert_verified(verify(cluster.a, b.token), "bob", b.claims["sid"])
    assert_error(login(cluster.a, "bob", "not-bobs-password"), 401, "INVALID_CREDENTIALS")


# ==========================================================================
# 11. metrics
# ==========================================================================


def test_metrics_count_logins(cluster):
    env = cluster.env
    login_ok(cluster.a, env, "erin")
    assert_error(login(cluster.a, "erin", "wrong"), 401, "INVALID_CREDENTIALS")
    r = requests.get(cluster.a.url + "/metrics", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200, describe(r)
    ctype = r.headers.get("Content-Type", "")
    assert ctype.startswith("text/plain") or ctype.startswith("application/openmetrics-text"), ctype
    samples = {}
    for line in r.text.splitlines():
        if not line or line.startswith("#"):
            continue
        # name, optional {labels} (label values are quoted and may hold "}"), value
        m = re.match(r'^([A-Za-z_:][A-Za-z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?\s+(\S+)', line)
        assert m, f"not a Prometheus sample line: {line!r}"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    login_samples = {k: v for k, v in samples.items() if "login" in k.split("{")[0]}
    assert login_samples, f"no metric named *login*; names: {sorted({k.split('{')[0] for k in samples})}"
    assert any(v > 0 for v in login_samples.values()), login_samples


# ==========================================================================
# 12. Redis goes away and comes back
# ==========================================================================


def test_redis_outage_gives_503_and_recovers(env, start_redis, start_server):
    policy = dict(session=120, token=4, renew=30, grace=1)
    rds = start_redis("redis-outage")
    srv = start_server("replica-outage", rds.url, policy=policy)

    def ok_login():
        return login_ok(srv, env, "alice", session_len=120, token_len=4)

    t1 = ok_login()
    sleep_until(t1.exp + MARGIN)          # t1: expired, renewable for 30 s
    t2 = ok_login()                        # t2: valid for ~3-4 s
    assert_verified(verify(srv, t2.token), "alice", t2.claims["sid"])  # now "seen"

    rds.stop()
    assert not rds.ping(), "redis still answering after stop"

    # A token already seen is still verified without the store.
    require_before(t2.exp - 0.2, "t2 must still be valid")
    assert_verified(verify(srv, t2.token), "alice", t2.claims["sid"])

    # A refresh needs the store: a fast, clean 503.
    t0 = time.monotonic()
    try:
        r = refresh(srv, t1.token, timeout=8)
    except requests.Timeout:
        pytest.fail("refresh hung for 8 s while Redis was down")
    elapsed = time.monotonic() - t0
    assert_error(r, 503, "STORE_UNAVAILABLE")
    assert elapsed < 5.0, f"503 took {elapsed:.2f}s"
    print(f"outage: refresh answered 503 in {elapsed:.3f}s, Retry-After={r.headers.get('Retry-After')}")

    if time.time() < t2.exp - 0.2:
        assert_verified(verify(srv, t2.token), "alice", t2.claims["sid"])

    # Readiness includes the store.
    rr, _ = poll(lambda: requests.get(srv.url + "/readyz", timeout=HTTP_TIMEOUT),
                 lambda r: r.status_code != 200, timeout=6.0, interval=0.2)
    assert rr.status_code == 503, f"/readyz while Redis is down: {describe(rr)}"

    # Redis comes back on the same port, empty (no persistence); the service
    # reconnects by itself. Whether t1 was refreshed before is lost with
    # Redis's data, so it is not refreshed now (no second refresh, ever):
    # the user signs in again, and new tokens refresh normally.
    rds.start_and_wait()
    outcomes = []

    def try_refresh():
        resp = refresh(srv, t1.token, timeout=8)
        outcomes.append(resp.status_code)
        return resp

    r, elapsed = poll(try_refresh, lambda r: r.status_code != 503, timeout=15.0, interval=0.25)
    print(f"outage: store answered again {elapsed:.3f}s after redis restarted; statuses {outcomes}")
    assert_error(r, 401, "REVOKED_SESSION")
    assert set(outcomes) <= {401, 503}, outcomes
    t3 = ok_login()
    sleep_until(t3.claims["iat"] + 1 + MARGIN)
    new = check_token_body(refresh(srv, t3.token), session_len=120, token_len=4)
    assert new.claims["sid"] == t3.claims["sid"], new.claims
    assert_verified(verify(srv, new.token), "alice", t3.claims["sid"])
    rr, _ = poll(lambda: requests.get(srv.url + "/readyz", timeout=HTTP_TIMEOUT),
                 lambda r: r.status_code == 200, timeout=10.0, interval=0.2)
    assert rr.status_code == 200, f"/readyz after Redis came back: {describe(rr)}"


# ==========================================================================
# 13. live changes of the users file and of the policy (rules 1, 2 and 6)
#     One replica with the in-process store (no --redis).
# ==========================================================================

RELOAD_TIMEOUT = 8.0  # the service notices file changes "at the next check"


def test_password_change_and_user_removal_end_sessions(env, start_server):
    users_file = env.workdir / "users-reload"
    alice_hash = _bcrypt_2y(env.users["alice"])
    erin_hash = _bcrypt_2y(env.users["erin"])
    users_file.write_text(f"alice:{alice_hash}\nerin:{erin_hash}\n")
    srv = start_server("replica-users-reload", None, policy=dict(session=120, token=60, renew=10, grace=1),
                       users_file=users_file)
    a = login_ok(srv, env, "alice", session_len=120, token_len=60)
    e = login_ok(srv, env, "erin", session_len=120, token_len=60)
    assert_verified(verify(srv, a.token), "alice", a.claims["sid"])
    assert_verified(verify(srv, e.token), "erin", e.claims["sid"])

    # alice changes her password, erin is removed.
    users_file.write_text(f"alice:{_bcrypt_2y('alice-new-password')}\n")
    for iss, user in ((a, "alice"), (e, "erin")):
        r, elapsed = poll(lambda: verify(srv, iss.token), lambda r: r.status_code != 200,
                          timeout=RELOAD_TIMEOUT, interval=0.2)
        assert r.status_code == 401, f"{user}'s session survived the users change for {elapsed:.1f}s:\n{describe(r)}"
        assert_error(r, 401, {"REVOKED_SESSION", "INVALID_TOKEN", "INVALID_CREDENTIALS", "EXPIRED_SESSION"})
        assert_error(refresh(srv, iss.token), 401,
                     {"REVOKED_SESSION", "INVALID_TOKEN", "INVALID_CREDENTIALS", "EXPIRED_SESSION"})
    assert_error(login(srv, "alice", env.users["alice"]), 401, "INVALID_CREDENTIALS")
    assert_error(login(srv, "erin", env.users["erin"]), 401, "INVALID_CREDENTIALS")
    a2 = check_token_body(login(srv, "alice", "alice-new-password"), session_len=120, token_len=60)
    assert_verified(verify(srv, a2.token), "alice", a2.claims["sid"])


def test_a_removed_user_added_back_does_not_get_old_sessions_back(env, redis, start_server):
    users_file = env.workdir / "users-removal"
    alice_line = f"alice:{_bcrypt_2y(env.users['alice'])}\n"
    erin_line = f"erin:{_bcrypt_2y(env.users['erin'])}\n"
    users_file.write_text(alice_line + erin_line)
    policy = dict(session=120, token=60, renew=10, grace=1)
    # A prefix of its own: erin's end must not reach the other tests' replicas.
    prefix = ["--redis-prefix", "removal-test"]
    a = start_server("replica-removal-a", redis.url, policy=policy, users_file=users_file, extra_args=prefix)
    old = login_ok(a, env, "erin", session_len=120, token_len=60)
    assert_verified(verify(a, old.token), "erin", old.claims["sid"])

    users_file.write_text(alice_line)
    r, elapsed = poll(lambda: verify(a, old.token), lambda r: r.status_code != 200,
                      timeout=RELOAD_TIMEOUT, interval=0.2)
    assert_error(r, 401, "REVOKED_SESSION")
    # Added back with the very same hash. Each login before the reload is a
    # failed one (at most 5 per user name): ask every 2.5 s.
    users_file.write_text(alice_line + erin_line)
    r, elapsed = poll(lambda: login(a, "erin", env.users["erin"]), lambda r: r.status_code == 200,
                      timeout=RELOAD_TIMEOUT, interval=2.5)
    assert r.status_code == 200, f"erin not back after {elapsed:.1f}s:\n{describe(r)}"
    new = r.json()["access_token"]
    assert verify(a, new).status_code == 200
    # The session from before the removal stays over, here and on a replica
    # that started afterwards (and so never saw erin go): the store says so.
    b = start_server("replica-removal-b", redis.url, policy=policy, users_file=users_file, extra_args=prefix)
    for srv in (a, b):
        assert_error(verify(srv, old.token), 401, "REVOKED_SESSION")
        assert_error(refresh(srv, old.token), 401, "REVOKED_SESSION")
        assert verify(srv, new).status_code == 200


def test_policy_change_applies_to_live_tokens_and_sessions(env, start_server):
    srv = start_server("replica-policy-reload", None, policy=dict(session=60, token=30, renew=0, grace=1))
    iss = login_ok(srv, env, "alice", session_len=60, token_len=30)
    sid = iss.claims["sid"]
    assert_verified(verify(srv, iss.token), "alice", sid)

    # Rule 1: shortening the token lifetime shortens tokens already issued;
    # renew limit 0s: an expired token can never be renewed.
    sleep_until(iss.claims["iat"] + 1 + MARGIN)
    srv.policy_file.write_text(policy_yaml(session=60, token=1, renew=0, grace=1, name="test-shorter"))
    r, elapsed = poll(lambda: verify(srv, iss.token), lambda r: r.status_code != 200,
                      timeout=RELOAD_TIMEOUT, interval=0.2)
    assert r.status_code == 401, f"token still valid {elapsed:.1f}s after the policy shortened it:\n{describe(r)}"
    assert_error(r, 401, "EXPIRED_TOKEN")
    assert "X-New-Token" not in r.headers, describe(r)
    assert_error(refresh(srv, iss.token), 401, "EXPIRED_TOKEN")

    # Rule 2: shortening the session shortens live sessions.
    srv.policy_file.write_text(policy_yaml(session=1, token=1, renew=0, grace=1, name="test-shortest"))
    r, elapsed = poll(lambda: verify(srv, iss.token),
                      lambda r: r.status_code == 401 and r.json().get("error", {}).get("code") == "EXPIRED_SESSION",
                      timeout=RELOAD_TIMEOUT, interval=0.2)
    assert_error(r, 401, "EXPIRED_SESSION")


def test_issuer_and_audience_flags(env, start_server):
    srv = start_server("replica-issuer", None, extra_args=["--issuer", "https://auth.example.test",
                                                           "--audience", "my-app"])
    r = login(srv, "alice", env.users["alice"])
    assert r.status_code == 200, describe(r)
    tok = r.json()["access_token"]
    c = jwt.decode(tok, env.private_key.public_key(), algorithms=["EdDSA"],
                   audience="my-app", issuer="https://auth.example.test")
    assert_verified(verify(srv, tok), "alice", c["sid"])
    # Same key, default issuer/audience: not for this service.
    kid = unverified_header(tok)["kid"]
    for change in ({"iss": ISSUER}, {"aud": AUDIENCE}):
        forged = make_jwt({"alg": "EdDSA", "typ": "JWT", "kid": kid}, dict(c, **change), env.private_key.sign)
        assert_error(verify(srv, forged), 401, "INVALID_TOKEN")


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_signing_keys_dir_follows_the_operators_key_ring(env, start_server, tmp_path):
    """`--signing-keys-dir`: signing.pem signs; next.pem and previous.pem only verify."""
    new = Ed25519PrivateKey.generate()
    before = start_server("ring-before", None)  # signs with the current key
    r = login(before, "alice", env.users["alice"])
    assert r.status_code == 200, describe(r)
    tok_old = r.json()["access_token"]
    old_kid = unverified_header(tok_old)["kid"]

    # Phase 1: the new key is added verify-only. Tokens it signs verify; it signs nothing.
    phase1 = tmp_path / "phase1"
    phase1.mkdir()
    (phase1 / "signing.pem").write_bytes(env.key_file.read_bytes())
    (phase1 / "next.pem").write_bytes(_pem(new))
    mid = start_server("ring-mid", None, extra_args=["--signing-keys-dir", str(phase1)], key_files=[])
    r = login(mid, "alice", env.users["alice"])
    assert unverified_header(r.json()["access_token"])["kid"] == old_kid
    assert len(requests.get(mid.url + "/.well-known/jwks.json", timeout=HTTP_TIMEOUT).json()["keys"]) == 2

    # Phase 2: promoted. The new key signs; the old one still verifies.
    phase2 = tmp_path / "phase2"
    phase2.mkdir()
    (phase2 / "signing.pem").write_bytes(_pem(new))
    (phase2 / "previous.pem").write_bytes(env.key_file.read_bytes())
    after = start_server("ring-after", None, extra_args=["--signing-keys-dir", str(phase2)], key_files=[])
    assert_verified(verify(after, tok_old), "alice", jwt.decode(tok_old, options={"verify_signature": False})["sid"])
    r = login(after, "alice", env.users["alice"])
    tok_new = r.json()["access_token"]
    assert unverified_header(tok_new)["kid"] != old_kid
    # A phase-1 replica already verifies what a promoted replica signs...
    assert verify(mid, tok_new).status_code == 200
    # ...which a replica that never got the new key cannot: the reason for phase 1.
    assert_error(verify(before, tok_new), 401, "INVALID_TOKEN")
