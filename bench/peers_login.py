"""Real sessions through Keycloak's own login form, for bench/peers.sh.

Each login is a fresh cookie jar (a new browser): the relying party's login
route, Keycloak's form (user and password), then the relying party's
callback, which sets its session cookie. LOGIN_THREADS logins (default 4)
run at a time; 1 for timings that no other login disturbs.

    KEYCLOAK_CA=ca.pem python3 bench/peers_login.py ours BASE_URL N COOKIES TIMES  # tokenpolicy
    KEYCLOAK_CA=ca.pem python3 bench/peers_login.py peer BASE_URL N COOKIES TIMES  # oauth2-proxy
    python3 bench/peers_login.py provider INFO_JSON N TIMES      # Keycloak alone
    python3 bench/peers_login.py timing INFO_JSON OURS_URL PEER_URL N TIMES

`ours` writes the session cookies' values (one a line) to COOKIES, and to
TIMES the seconds that each callback took: our code exchange at the token
endpoint, the ID token's checks, the session in Redis and our first token.
`peer` does the same through oauth2-proxy's /oauth2/start and callback.
`provider` makes the same flow with Keycloak directly, as a client that
keeps its connection to the token endpoint open (as ours does), and writes
per line the seconds of the token endpoint's answer and of a JWKS fetch:
the provider's part of a callback (ours caches the JWKS, so a callback
fetches it only on an unknown key). `timing` does the three in turn, one
login at a time, N times, so that each line (our callback, oauth2-proxy's
callback, the token endpoint, the JWKS, in seconds) saw the same machine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from keycloak_support import USERS, login_through_keycloak  # noqa: E402

USER = "alice"
THREADS = int(os.environ.get("LOGIN_THREADS", "4"))


def jar(verify) -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    s.verify = verify
    return s


def to_callback(s: requests.Session, start_url: str) -> str:
    r = login_through_keycloak(s, start_url, USER, USERS[USER])
    if r.status_code not in (302, 303):
        raise SystemExit(f"sign-in at Keycloak failed: {r.status_code} "
                         f"{getattr(r, 'keycloak_errors', None)} {r.text[:200]!r}")
    return urllib.parse.urljoin(r.url, r.headers["Location"])


def login_ours(base: str, verify) -> tuple[str, float]:
    s = jar(verify)
    cb = to_callback(s, f"{base}/v1/oidc/login?rd=/")
    t0 = time.perf_counter()
    r = s.get(cb, allow_redirects=False, timeout=30)
    took = time.perf_counter() - t0
    cookie = s.cookies.get("tokenpolicy")
    if r.status_code != 302 or not cookie:
        raise SystemExit(f"our callback: {r.status_code} {r.text[:300]!r}")
    return cookie, took


def login_peer(base: str, verify) -> tuple[str, float]:
    s = jar(verify)
    cb = to_callback(s, f"{base}/oauth2/start?rd=/")
    t0 = time.perf_counter()
    r = s.get(cb, allow_redirects=False, timeout=30)
    took = time.perf_counter() - t0
    cookie = s.cookies.get("_oauth2_proxy")
    if r.status_code != 302 or not cookie:
        raise SystemExit(f"oauth2-proxy callback: {r.status_code} {r.text[:300]!r}")
    return cookie, took


def b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def provider_flow(info: dict, disc: dict, keep: requests.Session) -> tuple[float, float]:
    """One code flow at Keycloak itself: (token endpoint seconds, JWKS seconds)."""
    s = jar(info["ca_file"])
    verifier = b64(secrets.token_bytes(32))
    redirect = "http://127.0.0.1:9/v1/oidc/callback"
    q = {"response_type": "code", "client_id": info["client_id"], "redirect_uri": redirect,
         "scope": "openid email profile", "state": b64(secrets.token_bytes(16)),
         "nonce": b64(secrets.token_bytes(16)), "code_challenge_method": "S256",
         "code_challenge": b64(hashlib.sha256(verifier.encode()).digest())}
    cb = to_callback(s, disc["authorization_endpoint"] + "?" + urllib.parse.urlencode(q))
    code = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(cb).query))["code"]
    t0 = time.perf_counter()
    r = keep.post(disc["token_endpoint"], data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": redirect,
        "code_verifier": verifier}, auth=(info["client_id"], info["client_secret"]), timeout=30)
    token_s = time.perf_counter() - t0
    if r.status_code != 200 or "id_token" not in r.json():
        raise SystemExit(f"token endpoint: {r.status_code} {r.text[:300]!r}")
    t0 = time.perf_counter()
    j = keep.get(disc["jwks_uri"], timeout=30)
    jwks_s = time.perf_counter() - t0
    if j.status_code != 200:
        raise SystemExit(f"JWKS: {j.status_code}")
    return token_s, jwks_s


def run(n: int, one) -> list:
    out, lock, errors = [], threading.Lock(), []

    def worker(count: int) -> None:
        try:
            for _ in range(count):
                got = one()
                with lock:
                    out.append(got)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n // THREADS + (i < n % THREADS),))
               for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} of {THREADS} login threads failed: {errors[0]}")
    return out


def main() -> None:
    mode, target = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if mode != "timing" else 0
    if mode in ("ours", "peer"):
        fn = login_ours if mode == "ours" else login_peer
        # The test CA that Keycloak's certificate is signed by.
        ca = os.environ["KEYCLOAK_CA"]
        got = run(n, lambda: fn(target, ca))
        Path(sys.argv[4]).write_text("".join(c + "\n" for c, _ in got))
        if len(sys.argv) > 5:
            Path(sys.argv[5]).write_text("".join(f"{t:.6f}\n" for _, t in got))
    elif mode == "provider":
        info = json.loads(Path(target).read_text())
        disc = jar(info["ca_file"]).get(
            info["issuer"] + "/.well-known/openid-configuration", timeout=30).json()
        keeps = threading.local()

        def one():
            if not hasattr(keeps, "s"):
                keeps.s = jar(info["ca_file"])
            return provider_flow(info, disc, keeps.s)

        got = run(n, one)
        Path(sys.argv[4]).write_text("".join(f"{a:.6f} {b:.6f}\n" for a, b in got))
    elif mode == "timing":
        info = json.loads(Path(target).read_text())
        ca = info["ca_file"]
        ours, peer, n, out = sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
        disc = jar(ca).get(info["issuer"] + "/.well-known/openid-configuration", timeout=30).json()
        keep = jar(ca)
        lines = []
        for _ in range(n):
            _, o = login_ours(ours, ca)
            _, p = login_peer(peer, ca)
            t, j = provider_flow(info, disc, keep)
            lines.append(f"{o:.6f} {p:.6f} {t:.6f} {j:.6f}\n")
        Path(out).write_text("".join(lines))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
