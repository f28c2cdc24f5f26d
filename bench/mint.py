"""Mints N valid tokens offline, each of its own session, one a line.

    python3 bench/mint.py KEY_PEM KID USERS_HASH N > tokens
    python3 bench/mint.py KEY_PEM KID - N ISSUER > tokens   # OpenID Connect sessions

Signs exactly as the service does (EdDSA, `kid`, our claims), with the
service's own signing key, so that each token costs a full verify the first
time the service sees it: the input of bench/memory.sh, where logging in a
million times would take longer than the run itself.

With ISSUER, each token is one of an OpenID Connect session of that
provider, with the claims the callback writes (no `pwv`; `idp`, `name`,
`email` and `groups`), for a policy whose `spec.oidc.issuerURL` is ISSUER.
"""
import base64
import hashlib
import json
import sys
import time
import uuid

from cryptography.hazmat.primitives.serialization import load_pem_private_key

key_path, kid, user_hash, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
idp = sys.argv[5] if len(sys.argv) > 5 else None
with open(key_path, "rb") as f:
    key = load_pem_private_key(f.read(), None)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode())
pwv = None if idp else b64(hashlib.sha256(user_hash.encode()).digest()[:9])
now = int(time.time())
out = sys.stdout
for _ in range(n):
    sid = str(uuid.uuid4())
    if idp:
        # The provider's subject (Keycloak's user id); field order as the service writes it.
        claims = {"iss": "tokenpolicy", "aud": "tokenpolicy", "sub": "3f6b1c2e-8d4a-4e5f-9a7b-bench0000001",
                  "sid": sid, "jti": str(uuid.uuid4()), "iat": now, "exp": now + 1800,
                  "auth_time": now, "idp": idp, "name": "alice", "email": "alice@example.com",
                  "groups": ["admins", "staff"]}
    else:
        claims = {"iss": "tokenpolicy", "aud": "tokenpolicy", "sub": "bench", "sid": sid,
                  "jti": str(uuid.uuid4()), "iat": now, "exp": now + 1800, "auth_time": now, "pwv": pwv}
    signed = header + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
    out.write(signed + "." + b64(key.sign(signed.encode())) + "\n")
