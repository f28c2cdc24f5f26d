"""A TokenPolicy that signs users in through an OpenID Connect provider, on a
real API server: Degraded while the client Secret is missing, then a
Deployment that mounts only the named keys and passes their files to serve.
(An http issuer is refused by the API server's CEL: tests/invalid, step 1.)"""

from __future__ import annotations

from conftest import condition, token_policy, wait_ready, wait_until


def oidc_policy(ns: str, name: str) -> dict:
    tp = token_policy(ns, name, externalURL="https://auth.example.com",
                      oidc={"issuerURL": "https://idp.example.com/realms/team", "clientID": "tokenpolicy",
                            "clientSecretRef": {"name": "oidc-client", "key": "secret"},
                            "caSecretRef": {"name": "idp-ca", "key": "ca.pem"},
                            "providerName": "Keycloak"})
    del tp["spec"]["users"]  # the provider signs users in: no users file
    return tp


def secret(ns: str, name: str, **data: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
            "type": "Opaque", "stringData": {"unrelated": "must not be mounted", **data}}


def test_an_oidc_policy_waits_for_its_secrets_then_mounts_only_their_keys(kube, operator):
    ns = kube.namespace("e2e-oidc")
    kube.apply(oidc_policy(ns, "sso"))

    def degraded():
        tp = kube.get("tp", "sso", ns)
        c = condition(tp, "Degraded")
        return c and c["status"] == "True" and c["reason"] == "OidcSecretMissing" and c
    c = wait_until("OidcSecretMissing", degraded, 30)
    assert c["message"] == "Secret oidc-client not found", c
    assert kube.get("deployment", "tokenpolicy-sso", ns) is None

    kube.apply(secret(ns, "oidc-client", secret="s3cret-value"))
    # Referenced Secrets are re-checked every 30 s; the CA is named too.
    c = wait_until("the CA missing", lambda: (c := condition(kube.get("tp", "sso", ns), "Degraded"))
                   and c["message"] == "Secret idp-ca not found" and c, 45)
    assert c["reason"] == "OidcSecretMissing"
    kube.apply(secret(ns, "idp-ca", **{"ca.pem": "-----BEGIN CERTIFICATE-----\n"}))
    wait_ready(kube, ns, "sso", timeout=60, replicas=1)

    pod = kube.get("deployment", "tokenpolicy-sso", ns)["spec"]["template"]["spec"]
    args = " ".join(pod["containers"][0]["args"])
    assert "--oidc-client-secret-file /etc/tokenpolicy/oidc/client-secret" in args, args
    assert "--oidc-ca-file /etc/tokenpolicy/oidc-ca/ca.crt" in args, args
    assert "--users" not in args, args
    assert "s3cret-value" not in str(pod), "the secret's value is never in the pod spec"
    volumes = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert volumes["oidc"]["secretName"] == "oidc-client"
    assert volumes["oidc"]["items"] == [{"key": "secret", "path": "client-secret"}]
    assert volumes["oidc-ca"]["items"] == [{"key": "ca.pem", "path": "ca.crt"}]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["oidc"]["readOnly"] and mounts["oidc"]["mountPath"] == "/etc/tokenpolicy/oidc"
    reasons = [e["reason"] for e in kube.events(ns, "sso")]
    assert "OidcSecretMissing" in reasons and "Recovered" in reasons, reasons
