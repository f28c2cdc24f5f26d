"""Step 3: a TokenPolicy becomes a running token service on a real API
server: the objects, their owner references, status, events and printer
columns; scaling with a PodDisruptionBudget; a missing Secret as Degraded;
deletion through the garbage collector."""

from __future__ import annotations

import json

from conftest import condition, token_policy, users_secret, wait_ready, wait_until

# Every owned object is named after the policy, never with its bare name.
OWNED = [("secret", "tokenpolicy-{n}-signing-keys"), ("serviceaccount", "tokenpolicy-{n}"),
         ("role", "tokenpolicy-{n}"), ("rolebinding", "tokenpolicy-{n}"), ("service", "tokenpolicy-{n}"),
         ("deployment", "tokenpolicy-{n}"), ("networkpolicy", "tokenpolicy-{n}")]


def redis_secret(ns):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis", "namespace": ns},
            "type": "Opaque", "stringData": {"url": "redis://redis.invalid:6379/0"}}


def test_a_policy_becomes_a_ready_token_service(kube, operator):
    ns = kube.namespace("e2e-reconcile")
    kube.apply(users_secret(ns))
    kube.apply(token_policy(ns, "demo", sessionExpirationTime="8h", tokenExpirationTime="30m",
                            expiredTokenRenewLimit="10m"))
    tp = wait_ready(kube, ns, "demo", replicas=1)
    uid = tp["metadata"]["uid"]
    for kind, name in OWNED:
        obj = kube.get(kind, name.format(n="demo"), ns)
        assert obj, f"{kind} missing"
        refs = obj["metadata"].get("ownerReferences", [])
        assert any(r["uid"] == uid and r.get("controller") for r in refs), (kind, refs)
    st = tp["status"]
    assert st["endpoint"] == "http://tokenpolicy-demo.e2e-reconcile.svc.cluster.local:8080/v1/verify"
    assert st["observedGeneration"] == tp["metadata"]["generation"]
    assert st["readyReplicas"] == 1
    assert condition(tp, "Degraded")["status"] == "False"
    # The Role lets the service read only its own TokenPolicy.
    rule = kube.get("role", "tokenpolicy-demo", ns)["rules"][0]
    assert rule["resourceNames"] == ["demo"] and sorted(rule["verbs"]) == ["get", "list", "watch"]
    # kwok ran the pod: scheduled on the fake node, Ready.
    pods = kube.json("get", "pods", "-n", ns, "-l", "app.kubernetes.io/instance=demo")["items"]
    assert len(pods) == 1 and pods[0]["spec"]["nodeName"] == "kwok-node-0"
    reasons = [e["reason"] for e in kube.events(ns, "demo")]
    assert "SigningKeyCreated" in reasons, reasons

    # Printer columns, with the values the operator wrote.
    out = kube("get", "tp", "demo", "-n", ns).splitlines()
    assert out[0].split() == ["NAME", "SESSION", "TOKEN", "RENEW", "LIMIT", "READY", "ENDPOINT", "AGE"]
    assert out[1].split()[:6] == ["demo", "8h", "30m", "10m", "True", st["endpoint"]]
    wide = kube("get", "tp", "demo", "-n", ns, "-o", "wide").splitlines()
    assert "REPLICAS" in wide[0].split()
    assert wide[1].split()[wide[0].split().index("REPLICAS") - 1] == "1"  # "RENEW LIMIT" is two words


def test_three_replicas_get_a_disruption_budget_and_one_loses_it(kube, operator):
    ns = kube.namespace("e2e-reconcile")
    kube.apply(redis_secret(ns))
    kube("patch", "tp", "demo", "-n", ns, "--type=merge", "-p",
         '{"spec":{"replicas":3,"redis":{"urlSecretRef":{"name":"redis","key":"url"}}}}')
    wait_ready(kube, ns, "demo", replicas=3)
    pdb = kube.get("pdb", "tokenpolicy-demo", ns)
    assert pdb and pdb["spec"]["maxUnavailable"] == 1
    d = kube.get("deployment", "tokenpolicy-demo", ns)
    env = {e["name"]: e for e in d["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    assert env["TOKENPOLICY_REDIS"]["valueFrom"]["secretKeyRef"]["name"] == "redis"
    kube("patch", "tp", "demo", "-n", ns, "--type=merge", "-p", '{"spec":{"replicas":1}}')
    wait_ready(kube, ns, "demo", replicas=1)
    wait_until("PDB deleted", lambda: kube.get("pdb", "tokenpolicy-demo", ns) is None, 30)


def test_redis_tls_secrets_are_awaited_then_mounted_as_files(kube, operator):
    ns = "e2e-reconcile"
    tls = {"caSecretRef": {"name": "redis-ca", "key": "ca.crt"}, "clientSecretName": "redis-client"}
    # A tls block naming nothing is refused by the API server itself.
    empty = token_policy(ns, "demo", redis={"urlSecretRef": {"name": "redis", "key": "url"}, "tls": {}})
    p = kube.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(empty), check=False)
    assert p.returncode != 0 and "redis.tls needs caSecretRef, clientSecretName or both" in p.stderr, \
        p.stderr
    before = kube.get("deployment", "tokenpolicy-demo", ns)["spec"]["template"]
    kube("patch", "tp", "demo", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"redis": {"tls": tls}}}))

    def degraded():
        tp = kube.get("tp", "demo", ns)
        c = condition(tp, "Degraded")
        return c and c["status"] == "True" and c["reason"] == "RedisSecretMissing" and c["message"]
    assert "redis-ca" in wait_until("RedisSecretMissing (CA)", degraded, 30)
    # Nothing applied meanwhile: the running pods keep their template.
    assert kube.get("deployment", "tokenpolicy-demo", ns)["spec"]["template"] == before
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-ca", "namespace": ns},
                "type": "Opaque", "stringData": {"ca.crt": "-----BEGIN CERTIFICATE-----\n"}})
    # Referenced Secrets are re-checked every 30 s; now the client certificate is missing.
    wait_until("RedisSecretMissing (client)", lambda: "redis-client" in (degraded() or ""), 45)
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis-client", "namespace": ns},
                "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": "-----BEGIN CERTIFICATE-----\n",
                               "tls.key": "-----BEGIN PRIVATE KEY-----\n"}})
    wait_ready(kube, ns, "demo", timeout=90)
    pod = kube.get("deployment", "tokenpolicy-demo", ns)["spec"]["template"]["spec"]
    args = " ".join(pod["containers"][0]["args"])
    assert "--redis-ca-file /etc/tokenpolicy/redis-ca/ca.crt" in args, args
    assert ("--redis-client-cert /etc/tokenpolicy/redis-client/tls.crt "
            "--redis-client-key /etc/tokenpolicy/redis-client/tls.key") in args, args
    volumes = {v["name"]: v["secret"] for v in pod["volumes"]}
    assert volumes["redis-ca"]["secretName"] == "redis-ca"
    assert volumes["redis-ca"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    assert [i["key"] for i in volumes["redis-client"]["items"]] == ["tls.crt", "tls.key"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["redis-client"]["readOnly"] is True
    # Back to the system's CAs: the files and flags go away.
    kube("patch", "tp", "demo", "-n", ns, "--type=json", "-p",
         '[{"op":"remove","path":"/spec/redis/tls"}]')
    wait_until("the TLS files removed", lambda: "redis-ca" not in json.dumps(
        kube.get("deployment", "tokenpolicy-demo", ns)["spec"]["template"]), 30)


def test_missing_secrets_degrade_until_they_exist(kube, operator):
    ns = kube.namespace("e2e-missing")
    kube.apply(token_policy(ns, "late", replicas=2,
                            redis={"urlSecretRef": {"name": "redis", "key": "url"}}))

    def degraded(reason):
        def check():
            tp = kube.get("tp", "late", ns)
            c = condition(tp, "Degraded")
            return c and c["status"] == "True" and c["reason"] == reason and tp
        return check
    tp = wait_until("UsersSecretMissing", degraded("UsersSecretMissing"), 30)
    assert condition(tp, "Ready")["status"] == "False"
    assert "users" in condition(tp, "Degraded")["message"]
    assert kube.get("deployment", "tokenpolicy-late", ns) is None
    kube.apply(users_secret(ns))
    # Referenced Secrets are re-checked every 30 s (they are not watched).
    wait_until("RedisSecretMissing", degraded("RedisSecretMissing"), 45)
    kube.apply(redis_secret(ns))
    wait_ready(kube, ns, "late", timeout=60, replicas=2)
    reasons = [e["reason"] for e in kube.events(ns, "late")]
    for r in ("UsersSecretMissing", "RedisSecretMissing", "Recovered"):
        assert r in reasons, reasons


def test_deleting_the_policy_lets_the_garbage_collector_remove_everything(kube, operator):
    ns = "e2e-reconcile"
    assert kube.get("deployment", "tokenpolicy-demo", ns)
    kube("delete", "tp", "demo", "-n", ns, "--wait=true", "--timeout=60s")

    def gone():
        left = [k for k, n in OWNED if kube.get(k, n.format(n="demo"), ns)]
        left += ["pods"] if kube("get", "pods,rs", "-n", ns, "-l", "app.kubernetes.io/instance=demo",
                                  "-o", "name").strip() else []
        return not left or None
    wait_until("owned objects removed", gone, 60, 0.5)
    # The Secrets the user made are the user's: kept.
    assert kube.get("secret", "users", ns) and kube.get("secret", "redis", ns)


def test_deleting_a_namespace_with_its_policy_leaves_the_operator_quiet(kube, operators, operator):
    """The namespace controller deletes the token service's objects while the
    TokenPolicy still exists; the operator must not fight it (re-creating
    them is refused: NamespaceTerminating) nor report that as a failure."""
    ns = "e2e-missing"
    assert kube.get("tp", "late", ns)
    start = operators.log.stat().st_size
    kube("delete", "namespace", ns, "--timeout=120s")
    with open(operators.log, "rb") as f:
        f.seek(start)
        tail = f.read().decode(errors="replace")
    assert "being terminated" not in tail and "reconcile failed" not in tail, tail[-3000:]
