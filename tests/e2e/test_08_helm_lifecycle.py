"""Step 8: the chart's lifecycle through the real helm CLI: an upgrade with
changed values rolls the operator Deployment; uninstall keeps the CRD and
every TokenPolicy with crds.keep=true, and removes them with false.
Runs last: it stops the operator (uninstall takes its RBAC away)."""

from __future__ import annotations

from conftest import CHART, CRD, RELEASE, SYSTEM_NS, token_policy, users_secret, wait_until

DEPLOY = "tokenpolicy-operator"


def test_upgrade_rolls_the_operator_and_uninstall_honours_crds_keep(kube, operators, release):
    d0 = kube.get("deployment", DEPLOY, SYSTEM_NS)
    kube.helm("upgrade", RELEASE, str(CHART), "-n", SYSTEM_NS, "--reuse-values",
              "--set", "logging.level=debug", "--wait", "--timeout", "2m")
    d1 = kube.get("deployment", DEPLOY, SYSTEM_NS)
    assert d1["metadata"]["generation"] > d0["metadata"]["generation"]
    env = {e["name"]: e.get("value") for e in d1["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RUST_LOG"] == "debug"
    kube("rollout", "status", f"deployment/{DEPLOY}", "-n", SYSTEM_NS, "--timeout=60s")
    rs = kube.json("get", "rs", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/component=operator")["items"]
    assert len(rs) >= 2, "a new ReplicaSet for the changed template"

    # A TokenPolicy that must survive an uninstall with crds.keep=true.
    operators.stop_main()
    ns = kube.namespace("e2e-helm")
    kube.apply(users_secret(ns))
    kube.apply(token_policy(ns, "kept"))
    kube.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "2m")
    assert kube.get("crd", CRD), "crds.keep=true must keep the CRD"
    assert kube.get("tp", "kept", ns), "and with it every TokenPolicy"
    assert kube.get("deployment", DEPLOY, SYSTEM_NS) is None
    assert kube.get("clusterrole", "tokenpolicy-operator") is None

    # Installed again under the same name, now with crds.keep=false.
    kube.helm("install", RELEASE, str(CHART), "-n", SYSTEM_NS, "--set", "image.registry=registry.invalid",
              "--set", "crds.keep=false", "--wait", "--timeout", "2m")
    crd = kube.get("crd", CRD)
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})
    assert kube.get("tp", "kept", ns), "the reinstall adopted the kept CRD"
    kube.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", "--timeout", "2m")
    wait_until("CRD removed", lambda: kube.get("crd", CRD) is None, 60)
    assert "tokenpolicies" not in kube("api-resources", "--api-group=auth.tokenpolicy.io")
