"""Step 6: signing-key rotation as a user asks for it (a new value of the
`auth.tokenpolicy.io/rotate-signing-key` annotation), against token-service
processes that read the real Secret's contents, as the pods would after
each rollout: the new key is published verify-only, promoted only once the
rollout that carries it is complete, and the old key is retired once no
token it signed can be used (tokenExpirationTime + expiredTokenRenewLimit
after promotion). A token signed before the rotation verifies throughout."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import requests

from conftest import (ROOT, TokenService, secret_data, token_policy, users_secret, wait_ready,
                      wait_until)

TOKEN_S, RENEW_S = 30, 5
KEYS = "auth.tokenpolicy.io/signing-keys"


def kid(token: str) -> str:
    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]


def kwok_pid() -> int:
    state = Path(os.environ.get("TOKENPOLICY_E2E_STATE", "/var/tmp/tokenpolicy-e2e"))
    return int((state / "pids" / "kwok.pid").read_text())


def test_rotation_adds_promotes_after_rollout_and_retires(kube, operator, workdir):
    ns = kube.namespace("e2e-rot")
    kube.apply(users_secret(ns))
    kube.apply(token_policy(ns, "rot", sessionExpirationTime="1h", tokenExpirationTime=f"{TOKEN_S}s",
                            expiredTokenRenewLimit=f"{RENEW_S}s"))
    wait_ready(kube, ns, "rot")
    kubeconfig = kube.token_kubeconfig(ns, "tokenpolicy-rot", workdir / "rot.kubeconfig")
    users = ROOT / "examples" / "users.htpasswd"

    def secret():
        s = kube.get("secret", "tokenpolicy-rot-signing-keys", ns)
        return secret_data(s), s["metadata"].get("annotations", {})

    def template_kids():
        d = kube.get("deployment", "tokenpolicy-rot", ns)
        return d["spec"]["template"]["metadata"]["annotations"][KEYS]

    services = []

    def pod(name, data):
        """A token service started from the Secret as it is now."""
        d = workdir / name
        d.mkdir()
        for f, pem in data.items():
            (d / f).write_bytes(pem)
            (d / f).chmod(0o600)
        s = TokenService(name, kubeconfig, workdir / f"{name}.log", f"{ns}/rot", users, d).start()
        services.append(s)
        return s

    try:
        s0, _ = secret()
        assert set(s0) == {"signing.pem"}
        p0 = pod("rot-0", s0)
        old = p0.login()
        kid_a = kid(old)
        assert template_kids() == kid_a

        # Hold the rollout: kwok stops making pods Ready.
        kwok = kwok_pid()
        os.kill(kwok, signal.SIGSTOP)
        try:
            kube("annotate", "tp", "rot", "-n", ns, "auth.tokenpolicy.io/rotate-signing-key=2026-1")
            s1 = wait_until("next key published", lambda: "next.pem" in secret()[0] and secret()[0], 20)
            assert s1["signing.pem"] == s0["signing.pem"]
            p1 = pod("rot-1", s1)
            kid_b = requests.get(p1.url + "/.well-known/jwks.json", timeout=5).json()
            kid_b = [k["kid"] for k in kid_b["keys"] if k["kid"] != kid_a][0]
            wait_until("pods rolled to verify the new key",
                       lambda: template_kids() == f"{kid_a},{kid_b}", 20)
            assert kid(p1.login()) == kid_a, "a verify-only key must not sign"
            # The rollout cannot complete: the new key is not promoted.
            time.sleep(4)
            held, _ = secret()
            assert held["signing.pem"] == s0["signing.pem"] and "next.pem" in held
            for p in (p0, p1):
                assert p.verify(old) == (200, None), p.name
        finally:
            os.kill(kwok, signal.SIGCONT)

        s2, ann = wait_until("promotion after the rollout",
                             lambda: "previous.pem" in secret()[0] and secret(), 60)
        assert s2["signing.pem"] == s1["next.pem"] and s2["previous.pem"] == s0["signing.pem"]
        assert "next.pem" not in s2
        promoted_at = int(ann["auth.tokenpolicy.io/promoted-at"])
        p2 = pod("rot-2", s2)
        new = p2.login()
        assert kid(new) == kid_b
        # Old and new tokens verify on every generation of pods that may still run.
        for p in (p0, p1, p2):
            assert p.verify(old) == (200, None), p.name
        for p in (p1, p2):
            assert p.verify(new) == (200, None), p.name
        wait_until("pods rolled to sign with the new key", lambda: template_kids() == f"{kid_b},{kid_a}", 30)

        # Retired after its time, not before.
        retire_at = promoted_at + TOKEN_S + RENEW_S

        def retired():
            data, _ = secret()
            if "previous.pem" in data:
                return None
            return time.time()
        gone = wait_until("old key retired", retired, max(5, retire_at - time.time()) + 20, 0.5)
        print(f"\n[e2e] old key retired {gone - retire_at:+.1f}s from its earliest time")
        assert gone >= retire_at - 1
        s3, _ = secret()
        assert set(s3) == {"signing.pem"} and s3["signing.pem"] == s2["signing.pem"]
        wait_until("pods rolled without the old key", lambda: template_kids() == kid_b, 30)
        p3 = pod("rot-3", s3)
        # `new` may be past its own renew limit by now (it was issued just
        # after promotion, and retirement waits out exactly that window):
        # a token the new key signs now shows the new key alone verifies.
        newest = p2.login()
        assert kid(newest) == kid_b
        assert p3.verify(newest) == (200, None)
        # The old key is gone: refused for its key, whatever its times.
        assert p3.verify(old) == (401, "INVALID_TOKEN")
        reasons = [e["reason"] for e in kube.events(ns, "rot")]
        for r in ("SigningKeyAdded", "SigningKeyPromoted", "SigningKeyRetired"):
            assert r in reasons, reasons
    finally:
        for s in services:
            s.stop()
        kube("delete", "namespace", ns, "--wait=false")
