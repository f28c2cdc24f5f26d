"""Signing in through the real Keycloak in a real browser, behind nginx
(tests/browser/oidc-flow.mjs, whose checks this runs).

A protected app behind nginx (configured as ingress-nginx configures
itself) sends the browser to our sign-in page; it clicks "Sign in with
Keycloak", fills in Keycloak's own login form as alice, and lands on the
page it asked for; the upstream receives the user, email and groups
headers. Keycloak (keycloak_support.py) is started once for the test
session; without it the test fails, it never skips. Screenshots go to
$BROWSER_SCREENSHOTS/oidc.
"""

from __future__ import annotations

import json

import pytest

from browser_support import BROWSER_DIR, SHOTS, run_browser_script
from keycloak_support import USERS, keycloak  # noqa: F401
from nginx_support import start_stack, stop_stack

CALLBACK = "/v1/oidc/callback"


def oidc_policy(kc):
    def text(ingress_url: str) -> str:
        return (
            "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
            "kind: TokenPolicy\n"
            "metadata: {name: browser-keycloak}\n"
            "spec:\n"
            "  sessionExpirationTime: 1h\n"
            "  tokenExpirationTime: 10m\n"
            "  expiredTokenRenewLimit: 5m\n"
            "  cookie: {secure: false}\n"
            f"  externalURL: {ingress_url}\n"
            "  oidc:\n"
            f"    issuerURL: {kc.issuer}\n"
            f"    clientID: {kc.client_id}\n"
            "    clientSecretRef: {name: tokenpolicy-oidc, key: client-secret}\n"
            "    caSecretRef: {name: idp-ca, key: ca.crt}\n"
            "    providerName: Keycloak\n"
        )
    return text


@pytest.fixture(scope="module")
def kc(keycloak):  # noqa: F811
    # Any port of http://127.0.0.1 for our callback (Keycloak's loopback rule).
    keycloak.set_client_redirects([f"http://127.0.0.1{CALLBACK}"])
    return keycloak


@pytest.fixture
def stack(kc, tmp_path):
    secret = tmp_path / "keycloak-client-secret"
    secret.write_text(kc.client_secret + "\n")
    secret.chmod(0o600)
    st = start_stack(tmp_path, policy_yaml=oidc_policy(kc), extra_args=[
        "--oidc-client-secret-file", str(secret), "--oidc-ca-file", str(kc.ca_file)])
    try:
        yield st
    finally:
        stop_stack(st)


def test_a_browser_signs_in_through_keycloaks_own_form_and_lands_on_the_app(kc, stack):
    text = run_browser_script(BROWSER_DIR / "oidc-flow.mjs", {
        "BASE": stack.url,
        "KEYCLOAK": kc.base_url,
        "KC_USERNAME": "alice",
        "KC_PASSWORD": USERS["alice"],
        "EXPECT": json.dumps({"user": "alice", "email": "alice@example.com", "groups": "admins,staff"}),
        "SHOTS": str(SHOTS / "oidc"),
    }, stack, timeout=240)
    # The upstream saw the identity on the page asked for.
    seen = [r for r in stack.echo.requests_seen if r["path"] == "/app/oidc?x=1"]
    assert seen, "the app was never reached"
    assert seen[-1]["headers"]["X-Auth-Request-User"] == "alice"
    assert seen[-1]["headers"]["X-Auth-Request-Groups"] == "admins,staff"
    print(text)
