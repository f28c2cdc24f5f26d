"""A small OpenID Connect provider for the negative cases and start-up.

It serves discovery, a JWKS (one RSA key), an authorization endpoint that
redirects straight back with a code, and a token endpoint that checks the
client secret, the PKCE verifier and that each code is used once. It can be
told to mint a bad ID token one way at a time (``Fake.mode``): a real
provider never signs those.

Runs in the test process, on 127.0.0.1, plain http (the policy file allows
http for a loopback issuer).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CLIENT_ID = "tokenpolicy-test"
CLIENT_SECRET = "s3cret-for-tests-only"

#: Each way to mint a bad ID token; "good" mints a good one.
MODES = ("good", "wrong_iss", "wrong_aud", "wrong_nonce", "expired", "alg_none",
         "hs256_pubkey", "unknown_kid")

#: Each way to mint a bad back-channel logout token (one rule broken at a
#: time); "good" mints a good one.
LOGOUT_MODES = ("good", "wrong_iss", "wrong_aud", "iat_future", "iat_old", "expired",
                "no_events", "other_event", "with_nonce", "no_sid_no_sub", "no_jti",
                "alg_none", "hs256_pubkey", "unknown_kid", "other_key", "tampered")


def service_policy(issuer: str, external: str, token: str = "10m", extra: str = "") -> str:
    """A policy that signs in through the provider at ``issuer``; ``extra``
    adds lines under ``spec.oidc``."""
    return (
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: oidc}\n"
        "spec:\n"
        "  sessionExpirationTime: 1h\n"
        f"  tokenExpirationTime: {token}\n"
        "  expiredTokenRenewLimit: 5m\n"
        "  cookie: {secure: false}\n"
        f"  externalURL: {external}\n"
        "  oidc:\n"
        f"    issuerURL: {issuer}\n"
        f"    clientID: {CLIENT_ID}\n"
        "    clientSecretRef: {name: unused, key: unused}\n"
        "    providerName: Fake IdP\n"
        f"{extra}"
    )


def start_service(env, issuer: str, name: str, redis_url=None, external=None,
                  token: str = "10m", extra: str = "", wait: bool = True):
    """A token service (``conftest.Server``) that signs in through the
    provider at ``issuer`` (which need not be up yet: ``wait=False``)."""
    from conftest import Server, free_port

    port = free_port()
    pfile = env.workdir / f"policy-{name}.yaml"
    pfile.write_text(service_policy(issuer, external or f"http://127.0.0.1:{port}", token, extra))
    secret = env.workdir / "oidc-client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    srv = Server(name, env.workdir, pfile, env.users_file, [env.key_file], redis_url,
                 ["--oidc-client-secret-file", str(secret)])
    srv.port = port
    i = srv.argv.index("--listen")
    srv.argv[i + 1] = f"127.0.0.1:{port}"
    return srv.launch(wait)

LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Fake:
    def __init__(self, port: int):
        self.port = port
        self.issuer = f"http://127.0.0.1:{port}"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        self.mode = "good"
        self.claims: dict = {}  # extra claims for the next ID tokens
        self.codes: dict = {}  # code -> (nonce, challenge, redirect_uri)
        self.used: set = set()
        self.jwks_fetches = 0
        self.token_requests = 0
        #: refresh_token grants seen, and what to answer them: None (a new
        #: refresh token), or an OAuth error code such as "invalid_grant".
        self.refresh_grants: list[str] = []
        self.refresh_answer: str | None = None
        #: every refresh token handed out, in order
        self.refresh_tokens: list[str] = []
        self.server = None
        self.thread = None

    # -- control ----------------------------------------------------------
    def start(self) -> "Fake":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.handle_get(self)

            def do_POST(self):
                fake.handle_post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- keys and tokens --------------------------------------------------
    def jwk(self) -> dict:
        n = self.key.public_key().public_numbers()
        to_b = lambda i: i.to_bytes((i.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                "n": b64(to_b(n.n)), "e": b64(to_b(n.e))}

    def id_token(self, nonce: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": CLIENT_ID, "sub": "fake-sub-1",
                  "preferred_username": "fakeuser", "email": "fake@example.com",
                  "email_verified": True, "groups": ["staff", "dev"],
                  "iat": now, "exp": now + 300, "nonce": nonce}
        claims.update(self.claims)
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        mode = self.mode
        if mode == "wrong_iss":
            claims["iss"] = "http://127.0.0.1:1/other"
        elif mode == "wrong_aud":
            claims["aud"] = "another-client"
        elif mode == "wrong_nonce":
            claims["nonce"] = "not-the-flows-nonce"
        elif mode == "expired":
            claims["iat"], claims["exp"] = now - 400, now - 200
        elif mode == "unknown_kid":
            header["kid"] = "forged-" + secrets.token_hex(4)
        if mode == "alg_none":
            header = {"alg": "none", "typ": "JWT"}
        elif mode == "hs256_pubkey":
            header = {"alg": "HS256", "typ": "JWT", "kid": self.kid}
        signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        if mode == "alg_none":
            return signed + "."
        if mode == "hs256_pubkey":
            pem = self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            return signed + "." + b64(hmac.new(pem, signed.encode(), hashlib.sha256).digest())
        sig = self.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signed + "." + b64(sig)

    def new_refresh_token(self) -> str:
        rt = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens.append(rt)
        return rt

    def sign(self, header: dict, claims: dict, key=None) -> str:
        signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        sig = (key or self.key).sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signed + "." + b64(sig)

    def logout_token(self, mode: str = "good", sid: str | None = None,
                     sub: str | None = "fake-sub-1", jti: str | None = None) -> str:
        """A back-channel logout token, wrong in the one way `mode` says."""
        now = int(time.time())
        claims = {"iss": self.issuer, "aud": CLIENT_ID, "iat": now, "exp": now + 120,
                  "jti": jti or secrets.token_urlsafe(12), "events": {LOGOUT_EVENT: {}}}
        if sub is not None:
            claims["sub"] = sub
        if sid is not None:
            claims["sid"] = sid
        header = {"alg": "RS256", "typ": "logout+jwt", "kid": self.kid}
        if mode == "wrong_iss":
            claims["iss"] = "http://127.0.0.1:1/other"
        elif mode == "wrong_aud":
            claims["aud"] = "another-client"
        elif mode == "iat_future":
            claims["iat"] = now + 600
        elif mode == "iat_old":
            claims["iat"], claims["exp"] = now - 3600, now + 120
        elif mode == "expired":
            claims["exp"] = now - 300
        elif mode == "no_events":
            del claims["events"]
        elif mode == "other_event":
            claims["events"] = {"http://schemas.openid.net/event/other": {}}
        elif mode == "with_nonce":
            claims["nonce"] = "n-1"
        elif mode == "no_sid_no_sub":
            claims.pop("sid", None)
            claims.pop("sub", None)
        elif mode == "no_jti":
            del claims["jti"]
        elif mode == "unknown_kid":
            header["kid"] = "forged-" + secrets.token_hex(4)
        if mode == "alg_none":
            return f"{b64(json.dumps({'alg': 'none'}).encode())}.{b64(json.dumps(claims).encode())}."
        if mode == "hs256_pubkey":
            header = {"alg": "HS256", "kid": self.kid}
            signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
            pem = self.key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            return signed + "." + b64(hmac.new(pem, signed.encode(), hashlib.sha256).digest())
        if mode == "other_key":
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self.sign(header, claims, other)
        token = self.sign(header, claims)
        if mode == "tampered":
            h, _, sig = token.split(".")
            claims["sub"] = "someone-else"
            return f"{h}.{b64(json.dumps(claims).encode())}.{sig}"
        return token

    # -- HTTP -------------------------------------------------------------
    @staticmethod
    def send(h, status: int, body=None, headers=()):
        data = b"" if body is None else json.dumps(body).encode()
        h.send_response(status)
        if body is not None:
            h.send_header("Content-Type", "application/json")
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle_get(self, h):
        url = urllib.parse.urlsplit(h.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/.well-known/openid-configuration":
            return self.send(h, 200, {
                "issuer": self.issuer,
                "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token",
                "jwks_uri": self.issuer + "/jwks",
                "response_types_supported": ["code"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
                "code_challenge_methods_supported": ["S256"],
            })
        if url.path == "/jwks":
            self.jwks_fetches += 1
            return self.send(h, 200, {"keys": [self.jwk()]})
        if url.path == "/authorize":
            ok = (q.get("response_type") == "code" and q.get("client_id") == CLIENT_ID
                  and q.get("code_challenge_method") == "S256" and q.get("code_challenge")
                  and q.get("state") and q.get("nonce") and "openid" in q.get("scope", "").split())
            if not ok:
                return self.send(h, 400, {"error": "invalid_request"})
            code = secrets.token_urlsafe(16)
            self.codes[code] = (q["nonce"], q["code_challenge"], q["redirect_uri"])
            back = q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q["state"]})
            return self.send(h, 302, None, [("Location", back)])
        self.send(h, 404, {"error": "not_found"})

    def handle_post(self, h):
        if urllib.parse.urlsplit(h.path).path != "/token":
            return self.send(h, 404, {"error": "not_found"})
        self.token_requests += 1
        length = int(h.headers.get("Content-Length") or 0)
        form = dict(urllib.parse.parse_qsl(h.rfile.read(length).decode()))
        auth = h.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if auth != expected:
            return self.send(h, 401, {"error": "invalid_client"})
        if form.get("grant_type") == "refresh_token":
            self.refresh_grants.append(form.get("refresh_token", ""))
            if self.refresh_answer:
                return self.send(h, 400, {"error": self.refresh_answer})
            return self.send(h, 200, {"access_token": secrets.token_urlsafe(16),
                                      "token_type": "Bearer", "expires_in": 300,
                                      "refresh_token": self.new_refresh_token()})
        code = form.get("code", "")
        if form.get("grant_type") != "authorization_code" or code not in self.codes or code in self.used:
            return self.send(h, 400, {"error": "invalid_grant"})
        nonce, challenge, redirect_uri = self.codes[code]
        verifier = form.get("code_verifier", "")
        if b64(hashlib.sha256(verifier.encode()).digest()) != challenge:
            return self.send(h, 400, {"error": "invalid_grant"})
        if form.get("redirect_uri") != redirect_uri:
            return self.send(h, 400, {"error": "invalid_grant"})
        self.used.add(code)
        self.send(h, 200, {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
                           "expires_in": 300, "id_token": self.id_token(nonce),
                           "refresh_token": self.new_refresh_token()})
