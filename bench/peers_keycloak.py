"""The real Keycloak of the tests, for bench/peers.sh: installs it (cached,
tests/keycloak/install.sh), starts it on a free loopback port with the
tests' realm, lets both relying parties (ours and oauth2-proxy) redirect
back to any loopback port, and lengthens the realm's access-token life to
an hour, so that oauth2-proxy's sessions (which end with the provider's
token) outlive the run.

    python3 bench/peers_keycloak.py INFO_JSON

Writes INFO_JSON (issuer, client id and secret, CA file, start seconds)
once Keycloak is ready, then runs until stdin closes or it gets SIGTERM,
and stops Keycloak.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
import keycloak_support as ks  # noqa: E402


def main() -> None:
    info_path = Path(sys.argv[1])
    home, java_home = ks.install()
    workdir = Path(tempfile.mkdtemp(prefix="tokenpolicy-peers-keycloak-"))
    kc = ks.Keycloak(home, java_home, workdir)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        took = kc.start()
        kc.set_client_redirects(["http://127.0.0.1/v1/oidc/callback",
                                 "http://127.0.0.1/oauth2/callback"])
        # No back-channel logout calls to a replica that is not there.
        kc.set_backchannel_logout_url("")
        kc._admin("PUT", "", json={"accessTokenLifespan": 3600})
        info = {"issuer": kc.issuer, "client_id": kc.client_id,
                "client_secret": kc.client_secret, "ca_file": str(kc.ca_file),
                "start_seconds": round(took, 1), "pid": kc.proc.pid if kc.proc else None,
                "version": home.name.removeprefix("keycloak-")}
        tmp = info_path.with_suffix(".part")
        tmp.write_text(json.dumps(info))
        os.chmod(tmp, 0o600)
        tmp.rename(info_path)
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        done.wait()
    finally:
        kc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
