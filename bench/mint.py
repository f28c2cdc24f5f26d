"""Mints N valid tokens offline, each of its own session, one a line.

    python3 bench/mint.py KEY_PEM KID USERS_HASH N > tokens

Signs exactly as the service does (EdDSA, `kid`, our claims), with the
service's own signing key, so that each token costs a full verify the first
time the service sees it: the input of bench/memory.sh, where logging in a
million times would take longer than the run itself.
"""
import base64
import hashlib
import json
import sys
import time
import uuid

from cryptography.hazmat.primitives.serialization import load_pem_private_key

key_path, kid, user_hash, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(key_path, "rb") as f:
    key = load_pem_private_key(f.read(), None)


def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


header = b64(json.dumps({"alg": "EdDSA", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode())
pwv = b64(hashlib.sha256(user_hash.encode()).digest()[:9])
now = int(time.time())
out = sys.stdout
for _ in range(n):
    sid = str(uuid.uuid4())
    claims = {"iss": "tokenpolicy", "aud": "tokenpolicy", "sub": "bench", "sid": sid,
              "jti": str(uuid.uuid4()), "iat": now, "exp": now + 1800, "auth_time": now, "pwv": pwv}
    signed = header + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
    out.write(signed + "." + b64(key.sign(signed.encode())) + "\n")
