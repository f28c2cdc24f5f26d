"""A real browser through the sign-in flow behind nginx (configured as
ingress-nginx configures itself): Debian's chromium, headless, driven by
playwright-core (tests/browser/signin-flow.mjs, whose checks this runs).

The browser opens the app and is sent to sign in; the sign-in page is
shown with a wrong password and after too many attempts; it signs in and
lands on the page it asked for; it keeps using the app across token
expiries, renewed through the cookie with no redirect; at the session end
it is sent to sign in and told its session expired; it signs in again,
signs out with the app's button, and is told it signed out. With
JavaScript off, in a 390x844 viewport. Screenshots go to
$BROWSER_SCREENSHOTS (default /var/tmp/tokenpolicy-browser/screenshots).

The account page (tests/browser/account-flow.mjs): two browsers sign in as
one user; one sees both sessions at /v1/account, signs the other out (whose
cookie is refused from then on) and signs out everywhere. Its screenshot at
phone width is docs/src/images/account.png.

Needs: chromium (apt), node, and `npm ci --prefix tests/browser`
(tests/run.sh does both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from browser_support import BROWSER_DIR, CHROMIUM, SHOTS, run_browser_script
from nginx_support import POLICY, start_stack, stop_stack
from proxy_support import start_proxy_stack

SCRIPT = BROWSER_DIR / "signin-flow.mjs"
ACCOUNT_SCRIPT = BROWSER_DIR / "account-flow.mjs"


@pytest.fixture(scope="module")
def nginx_stack(tmp_path_factory):
    st = start_proxy_stack("nginx", tmp_path_factory.mktemp("browser-nginx"))
    try:
        yield st
    finally:
        st.stop()


def account_policy(ingress_url: str) -> str:
    # Long enough for the whole flow: no session or token runs out during it.
    return ("apiVersion: auth.tokenpolicy.io/v1alpha1\n"
            "kind: TokenPolicy\n"
            "metadata: {name: account-page}\n"
            "spec: {sessionExpirationTime: 1h, tokenExpirationTime: 10m, "
            "expiredTokenRenewLimit: 5m, cookie: {secure: false}}\n")


def test_a_person_sees_their_sessions_and_signs_one_out_and_then_all(tmp_path):
    st = start_stack(tmp_path, username="dora", password="dora-password", policy_yaml=account_policy)
    try:
        shots = SHOTS / "account"
        for old in shots.glob("*.png"):
            old.unlink()
        text = run_browser_script(ACCOUNT_SCRIPT, {
            "BASE": st.url, "USERNAME": st.username, "PASSWORD": st.password, "SHOTS": str(shots),
        }, st)
        assert (shots / "account.png").is_file()
        print(text)
    finally:
        stop_stack(st)


def test_a_person_in_a_browser_signs_in_keeps_working_and_is_told_why_they_must_sign_in_again(nginx_stack):
    node = shutil.which("node")
    assert node, "node not found"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not found (apt-get install chromium)"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), \
        "playwright-core not installed: npm ci --prefix tests/browser"
    for old in SHOTS.glob("*.png"):
        old.unlink()
    env = {**os.environ, "BASE": nginx_stack.url, "USERNAME": nginx_stack.username,
           "PASSWORD": nginx_stack.password, "SHOTS": str(SHOTS), "POLICY": json.dumps(POLICY),
           "CHROMIUM": CHROMIUM}
    nginx_stack.mark()
    out = subprocess.run([node, str(SCRIPT)], cwd=BROWSER_DIR, env=env, capture_output=True, timeout=180)
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    assert out.returncode == 0, f"browser flow failed:\n{text}\n{nginx_stack.report()}"
    shots = sorted(p.name for p in SHOTS.glob("*.png"))
    assert shots == sorted(["signin.png", "signin-wrong-password.png", "signin-too-many-attempts.png",
                            "signin-session-expired.png", "signin-signed-out.png"]), shots
    print(text)
