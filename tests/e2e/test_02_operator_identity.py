"""Step 2: the operator runs as the chart's ServiceAccount, with nothing but
a TokenRequest token, so the chart's RBAC is what authorizes it. Without one
verb of its ClusterRole, the step that needs it fails visibly on the
TokenPolicy (a Warning event naming the refused request)."""

from __future__ import annotations

import json

import yaml

from conftest import (CLUSTER_ROLE, OPERATOR_SA, SYSTEM_NS, refusals, token_policy, users_secret, wait_ready,
                      wait_until)


def test_the_operator_holds_only_a_service_account_token(kube, operators, operator):
    cfg = yaml.safe_load(operators.kubeconfig.read_text())
    user = cfg["users"][0]["user"]
    assert set(user) == {"token"}, "the operator's kubeconfig must carry no client certificate"
    who = json.loads(kube("auth", "whoami", "-o", "json", kubeconfig=str(operators.kubeconfig)))
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR_SA}"
    # And it is not an admin: it may not, e.g., delete namespaces.
    can = kube.run("auth", "can-i", "delete", "namespaces", kubeconfig=str(operators.kubeconfig), check=False)
    assert can.stdout.strip() == "no"


def _rules(kube):
    return kube.get("clusterrole", CLUSTER_ROLE)["rules"]


def test_a_missing_verb_fails_with_a_warning_event_and_recovers(kube, operators, workdir):
    """Remove `create` on serviceaccounts: a new TokenPolicy cannot get its
    ServiceAccount, and says so in an event; restored, it becomes Ready.
    This runs its own operator process (its log shows the 403s); the main
    operator, whose log must stay free of them, is stopped meanwhile."""
    ns = kube.namespace("e2e-rbac")
    kube.apply(users_secret(ns))
    rules = _rules(kube)
    idx = next(i for i, r in enumerate(rules) if "serviceaccounts" in r.get("resources", []))
    assert "create" in rules[idx]["verbs"]
    reduced = [v for v in rules[idx]["verbs"] if v != "create"]
    operators.stop_main()
    op = operators.extra("op-rbac")
    patch = [{"op": "replace", "path": f"/rules/{idx}/verbs", "value": reduced}]
    kube("patch", "clusterrole", CLUSTER_ROLE, "--type=json", "-p", json.dumps(patch))
    try:
        op.start()
        kube.apply(token_policy(ns, "needs-sa"))

        def refused():
            for e in kube.events(ns, "needs-sa"):
                if e["reason"] == "ReconcileFailed" and e["type"] == "Warning":
                    return e
        event = wait_until("ReconcileFailed event", refused, 60)
        note = event["note"]
        assert "forbidden" in note and "serviceaccounts" in note and "create" in note, note
        assert kube.get("serviceaccount", "tokenpolicy-needs-sa", ns) is None
        assert kube.get("deployment", "tokenpolicy-needs-sa", ns) is None
    finally:
        restore = [{"op": "replace", "path": f"/rules/{idx}/verbs", "value": rules[idx]["verbs"]}]
        kube("patch", "clusterrole", CLUSTER_ROLE, "--type=json", "-p", json.dumps(restore))
    try:
        tp = wait_ready(kube, ns, "needs-sa", timeout=90)
        assert tp["status"]["readyReplicas"] == 1
        assert kube.get("serviceaccount", "tokenpolicy-needs-sa", ns)
        assert refusals(op.text()), "the reduced RBAC should have been refused"
    finally:
        op.stop()
        operators.start_main()
        kube("delete", "namespace", ns, "--wait=false")
