"""Step 4: `serve --policy-ref` as the token service's own ServiceAccount
(the Role the operator made), following the TokenPolicy live: a shortened
session ends a live session within 2 s, without a restart; an invalid patch
never reaches it."""

from __future__ import annotations

import json
import time

from conftest import (ROOT, TokenService, refusals, token_policy, users_secret, wait_ready,
                      wait_until)


def test_the_service_follows_its_policy_live(kube, operator, workdir):
    ns = kube.namespace("e2e-live")
    kube.apply(users_secret(ns))
    kube.apply(token_policy(ns, "live", sessionExpirationTime="1h", tokenExpirationTime="10m",
                            expiredTokenRenewLimit="5m"))
    wait_ready(kube, ns, "live")
    kubeconfig = kube.token_kubeconfig(ns, "tokenpolicy-live", workdir / "live.kubeconfig")
    # The service account may read its TokenPolicy, and nothing else.
    sa_kube = dict(kubeconfig=str(kubeconfig))
    assert kube.run("auth", "can-i", "watch", "tokenpolicies/live", "-n", ns, **sa_kube,
                    check=False).stdout.strip() == "yes"
    assert kube.run("auth", "can-i", "get", "secrets", "-n", ns, **sa_kube,
                    check=False).stdout.strip() == "no"
    svc = TokenService("serve-live", kubeconfig, workdir / "serve-live.log", f"{ns}/live",
                       ROOT / "examples" / "users.htpasswd").start()
    try:
        token = svc.login()
        logged_in = time.monotonic()
        assert svc.verify(token) == (200, None)
        pid = svc.p.pid

        # Refused by the API server (CEL: token <= session): the service keeps its policy.
        bad = kube.run("patch", "tp", "live", "-n", ns, "--type=merge", "-p",
                       '{"spec":{"sessionExpirationTime":"2s"}}', check=False)
        assert bad.returncode != 0 and "must not be longer than sessionExpirationTime" in bad.stderr, bad.stderr
        time.sleep(1.0)
        assert svc.verify(token) == (200, None)
        assert "policy changed" not in svc.text()

        # The session is older than 2 s: shortening it to 2 s ends it now.
        time.sleep(max(0.0, logged_in + 2.5 - time.monotonic()))
        patch = {"spec": {"sessionExpirationTime": "2s", "tokenExpirationTime": "1s",
                          "expiredTokenRenewLimit": "0s"}}
        kube("patch", "tp", "live", "-n", ns, "--type=merge", "-p", json.dumps(patch))
        patched = time.monotonic()
        wait_until("EXPIRED_SESSION", lambda: svc.verify(token) == (401, "EXPIRED_SESSION"), 2.0, 0.05)
        print(f"\n[e2e] live policy applied {time.monotonic() - patched:.2f}s after the patch")
        assert svc.p.pid == pid and svc.running(), "no restart"
        assert "policy changed" in svc.text()
        assert not refusals(svc.text()), refusals(svc.text())[:5]
    finally:
        svc.stop()
