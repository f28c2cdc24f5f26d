"""Step 5: two operator processes share the Lease; exactly one reconciles.
SIGKILL the leader (no release): the other takes over once the Lease
expires, and from then on only it writes."""

from __future__ import annotations

import signal
import time
from datetime import datetime

from conftest import SYSTEM_NS, token_policy, users_secret, wait_ready, wait_until

LEASE = "tokenpolicy-operator"
LEASE_SECONDS = 15
RETRY_SECONDS = 5  # how often a standby tries the Lease (src/leader.rs)


def lease(kube):
    return kube.get("lease", LEASE, SYSTEM_NS)["spec"]


def writers(kube, ns, name):
    """(reporting instance, event time) of every Event about the TokenPolicy."""
    return [(e.get("reportingInstance"), e.get("eventTime")) for e in kube.events(ns, name)]


def test_one_leader_reconciles_and_a_standby_takes_over(kube, operators, operator):
    ns = kube.namespace("e2e-leader")
    kube.apply(users_secret(ns))
    wait_until("main operator leads", lambda: lease(kube).get("holderIdentity", "").startswith("op-main-"), 30)
    standby = operators.extra("op-standby").start()
    try:
        time.sleep(RETRY_SECONDS + 1)  # the standby has tried the Lease at least once
        held = lease(kube)
        assert held["holderIdentity"].startswith("op-main-")
        kube.apply(token_policy(ns, "le"))
        wait_ready(kube, ns, "le")
        assert operator.reconciles() > 0
        assert standby.reconciles() == 0, "the standby reconciled while not leading"
        assert {w for w, _ in writers(kube, ns, "le")} == {"op-main"}

        operator.stop(sig=signal.SIGKILL)  # no Lease release
        killed = time.monotonic()
        t = wait_until("standby leads",
                       lambda: lease(kube).get("holderIdentity", "").startswith("op-standby-") and time.monotonic(),
                       LEASE_SECONDS + RETRY_SECONDS + 10, 0.2)
        took = t - killed
        print(f"\n[e2e] takeover {took:.1f}s after SIGKILL (lease {LEASE_SECONDS}s, retry {RETRY_SECONDS}s)")
        now = lease(kube)
        assert now["leaseTransitions"] == held.get("leaseTransitions", 0) + 1
        # Not before the Lease expired, and no later than one retry after.
        renewed = datetime.fromisoformat(held["renewTime"].replace("Z", "+00:00"))
        acquired = datetime.fromisoformat(now["acquireTime"].replace("Z", "+00:00"))
        assert (acquired - renewed).total_seconds() >= LEASE_SECONDS - 1
        assert took <= LEASE_SECONDS + RETRY_SECONDS + 2

        # The new leader acts: a changed spec reaches the Deployment.
        kube("patch", "tp", "le", "-n", ns, "--type=merge", "-p", '{"spec":{"tokenExpirationTime":"5m"}}')
        wait_until("standby reconciles", lambda: standby.reconciles() > 0, 30)
        kube("annotate", "tp", "le", "-n", ns, "auth.tokenpolicy.io/rotate-signing-key=le-1")
        ev = wait_until("SigningKeyAdded by the new leader",
                        lambda: [w for w in kube.events(ns, "le") if w["reason"] == "SigningKeyAdded"], 30)
        assert ev[0]["reportingInstance"] == "op-standby"
        # Every Event has one writer: the main operator before the kill, the standby after.
        kill_time = datetime.fromisoformat(now["acquireTime"].replace("Z", "+00:00"))
        for who, at in writers(kube, ns, "le"):
            when = datetime.fromisoformat(at.replace("Z", "+00:00"))
            assert who == ("op-main" if when < kill_time else "op-standby"), (who, at)
    finally:
        standby.stop()  # releases the Lease at shutdown
        operators.start_main()
        wait_until("main operator leads again",
                   lambda: lease(kube).get("holderIdentity", "").startswith("op-main-"), 30)
        kube("delete", "namespace", ns, "--wait=false")
