"""The admin API on a real API server: the operator binds the chart's
token review ClusterRole to the token service's ServiceAccount; `serve
--policy-ref`, as that ServiceAccount, checks a caller's token with a
TokenReview and authorises it with a SubjectAccessReview. A ServiceAccount
holding an ordinary Role on `tokenpolicies/sessions` lists and revokes
(with `tokenpolicy sessions`, by token file and by kubeconfig); one without
it gets 403, decided by the real RBAC; a garbage token or one whose
signature is not the cluster's gets 401. A removed RoleBinding stops
counting within the 10 s the decisions are cached; a deleted TokenPolicy's
ServiceAccount is bound no more."""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import requests

from conftest import (REVIEW_ROLE, ROOT, TokenService, binary_path, child_env, token_policy,
                      users_secret, wait_ready, wait_until)


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    e = child_env(HOME="/nonexistent", **env)
    if "KUBECONFIG" not in env:
        e.pop("KUBECONFIG", None)
    return subprocess.run([str(binary_path()), "sessions", *args], capture_output=True, text=True,
                          timeout=60, env=e)


def session_of(svc: TokenService, token: str) -> str:
    r = requests.get(svc.url + "/v1/verify", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["X-Auth-Request-Session"]


def tampered(token: str) -> str:
    """The same claims, a signature that is not the cluster's."""
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[0] ^= 0xFF
    return f"{head}.{body}." + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


def test_the_cluster_decides_who_may_end_sessions(kube, operator, workdir: Path):
    ns = kube.namespace("e2e-admin")
    kube.apply(users_secret(ns))
    kube.apply(token_policy(ns, "adm"))
    wait_ready(kube, ns, "adm")

    # The operator's grant: the chart's ClusterRole, bound to this service.
    def bound():
        crb = kube.get("clusterrolebinding", REVIEW_ROLE)
        return crb and {"kind": "ServiceAccount", "name": "tokenpolicy-adm", "namespace": ns} \
            in (crb.get("subjects") or []) and crb
    crb = wait_until("the token review binding", bound, 30)
    assert crb["roleRef"]["name"] == REVIEW_ROLE
    assert crb["metadata"]["ownerReferences"][0]["kind"] == "ClusterRole"
    svc_kubeconfig = kube.token_kubeconfig(ns, "tokenpolicy-adm", workdir / "adm.kubeconfig")
    as_svc = dict(kubeconfig=str(svc_kubeconfig), check=False)
    assert kube.run("auth", "can-i", "create", "tokenreviews", **as_svc).stdout.strip() == "yes"
    assert kube.run("auth", "can-i", "create", "subjectaccessreviews", **as_svc).stdout.strip() == "yes"
    assert kube.run("auth", "can-i", "list", "secrets", "-n", ns, **as_svc).stdout.strip() == "no"

    # Who may end sessions is an ordinary Role.
    for sa in ("session-admin", "nobody"):
        kube("create", "serviceaccount", sa, "-n", ns)
    kube("create", "role", "session-admin", "-n", ns, "--verb=list,delete",
         "--resource=tokenpolicies.auth.tokenpolicy.io/sessions", "--resource-name=adm")
    kube("create", "rolebinding", "session-admin", "-n", ns, "--role=session-admin",
         f"--serviceaccount={ns}:session-admin")
    admin_token = kube("create", "token", "session-admin", "-n", ns).strip()
    nobody_token = kube("create", "token", "nobody", "-n", ns).strip()
    admin_file = workdir / "session-admin.token"
    admin_file.write_text(admin_token + "\n")
    nobody_file = workdir / "nobody.token"
    nobody_file.write_text(nobody_token)

    svc = TokenService("serve-admin", svc_kubeconfig, workdir / "serve-admin.log", f"{ns}/adm",
                       ROOT / "examples" / "users.htpasswd").start()
    try:
        t1, t2 = svc.login(), svc.login()
        s1, s2 = session_of(svc, t1), session_of(svc, t2)
        server = ["--server", svc.url]

        out = cli("list", "--user", "demo", "--json", *server, "--token-file", str(admin_file))
        assert out.returncode == 0, out.stderr
        assert [s["sid"] for s in json.loads(out.stdout)["sessions"]] == [s1, s2]

        # Without the Role: 403 from our API, decided by the real RBAC.
        out = cli("list", "--user", "demo", *server, "--token-file", str(nobody_file))
        assert out.returncode == 3 and "403 ADMIN_FORBIDDEN" in out.stderr, out.stderr
        out = cli("revoke", "--sid", s1, *server, "--token-file", str(nobody_file))
        assert out.returncode == 3 and "403 ADMIN_FORBIDDEN" in out.stderr, out.stderr
        assert svc.verify(t1) == (200, None)
        # A garbage token, and a token this cluster did not sign: 401.
        for bad in ("garbage", tampered(admin_token)):
            r = requests.get(svc.url + "/v1/admin/sessions", params={"user": "demo"},
                             headers={"Authorization": f"Bearer {bad}"}, timeout=10)
            assert r.status_code == 401, (r.status_code, r.text)
            assert r.json()["error"]["code"] == "ADMIN_UNAUTHENTICATED"

        out = cli("revoke", "--sid", s1, *server, "--token-file", str(admin_file))
        assert out.returncode == 0, out.stderr
        assert svc.verify(t1) == (401, "REVOKED_SESSION")
        assert svc.verify(t2) == (200, None)

        # The current kubeconfig's credentials, with no --token-file.
        admin_kubeconfig = kube.token_kubeconfig(ns, "session-admin", workdir / "session-admin.kubeconfig")
        out = cli("revoke", "--user", "demo", *server, KUBECONFIG=str(admin_kubeconfig))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "1 session(s) of demo revoked"
        assert svc.verify(t2) == (401, "REVOKED_SESSION")

        # The RoleBinding removed: refused once the cached decision is over (<= 10 s).
        kube("delete", "rolebinding", "session-admin", "-n", ns)
        removed = time.monotonic()
        wait_until("403 after the RoleBinding went", lambda: cli(
            "list", "--user", "demo", *server, "--token-file", str(admin_file)).returncode == 3, 15, 0.5)
        print(f"\n[e2e] RoleBinding removal took effect after {time.monotonic() - removed:.1f}s")
        assert admin_token not in svc.text() and nobody_token not in svc.text(), "no token in the log"
        assert "cannot write the token review binding" not in operator.text()
    finally:
        svc.stop()

    # The TokenPolicy gone, its ServiceAccount is bound no more.
    kube("delete", "tp", "adm", "-n", ns)
    wait_until("the binding without the deleted TokenPolicy's ServiceAccount", lambda: not bound(), 30)
