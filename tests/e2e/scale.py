"""Scale benchmark (not a test, no timed assertion): N TokenPolicies on a
real API server with kwok, one operator as the chart's ServiceAccount.

Reports the time until all are Ready, the API requests per TokenPolicy
(kube-apiserver's apiserver_request_total, before/after, by verb and
resource; every client counted: operator, controller-manager, scheduler,
kwok), the operator's peak RSS, and the same API server's raw write rate
(N ConfigMaps created by one kubectl in the same run) for comparison.

    bash tests/e2e/scale.sh [N]      # default 1000
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import conftest as e2e  # noqa: E402

REQ = re.compile(r'^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$', re.M)


def requests_by(kube) -> collections.Counter:
    c = collections.Counter()
    for labels, value in REQ.findall(kube.metrics()):
        lab = dict(kv.split("=", 1) for kv in re.findall(r'(\w+="[^"]*")', labels))
        lab = {k: v.strip('"') for k, v in lab.items()}
        c[(lab.get("verb", ""), lab.get("resource", ""))] += float(value)
    return c


def rss_peak(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])  # kB
    return 0


def main(n: int, kubeconfig: str, bin_dir: str, workdir: Path) -> None:
    kube = e2e.Kube(kubeconfig, bin_dir)
    kube.helm("upgrade", "--install", e2e.RELEASE, str(e2e.CHART), "-n", e2e.SYSTEM_NS,
              "--create-namespace", "--set", "image.registry=registry.invalid", "--wait")
    ops = e2e.Operators(kube, workdir)
    op = ops.start_main()
    ns = kube.namespace("scale")
    kube.apply(e2e.users_secret(ns))

    # The API server's raw write rate: N ConfigMaps, one kubectl, sequential POSTs.
    cms = {"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"cm-{i}", "namespace": ns},
         "data": {"k": "v"}} for i in range(n)]}
    t = time.monotonic()
    kube("create", "-f", "-", input=json.dumps(cms), timeout=900)
    cm_s = time.monotonic() - t

    before = requests_by(kube)
    tps = {"apiVersion": "v1", "kind": "List", "items": [
        e2e.token_policy(ns, f"tp-{i}") for i in range(n)]}
    t0 = time.monotonic()
    kube("create", "-f", "-", input=json.dumps(tps), timeout=900)
    created = time.monotonic() - t0
    peak = 0
    ready = 0
    while True:
        peak = max(peak, rss_peak(op.p.pid))
        items = kube.json("get", "tp", "-n", ns, timeout=300)["items"]
        ready = sum(1 for tp in items if (e2e.condition(tp, "Ready") or {}).get("status") == "True")
        if ready == n or time.monotonic() - t0 > 1800:
            break
        time.sleep(2)
    all_ready = time.monotonic() - t0
    time.sleep(5)  # let the last status writes and events land
    after = requests_by(kube)
    peak = max(peak, rss_peak(op.p.pid))
    delta = after - before
    total = sum(delta.values())
    print(f"\nTokenPolicies: {n}, Ready: {ready}")
    print(f"created by kubectl in {created:.1f}s; all Ready {all_ready:.1f}s after the first create "
          f"({n / all_ready:.1f} TokenPolicies/s)")
    print(f"raw write rate: {n} ConfigMaps by one kubectl in {cm_s:.1f}s ({n / cm_s:.1f}/s); "
          f"TokenPolicy to Ready vs ConfigMap create: {all_ready / cm_s:.1f}x the time")
    print(f"API requests while reconciling (all clients): {total:.0f}, {total / n:.1f} per TokenPolicy")
    for (verb, res), v in sorted(delta.items(), key=lambda kv: -kv[1])[:25]:
        print(f"  {verb:8} {res or '-':28} {v:8.0f}  {v / n:6.2f}/TP")
    print(f"operator peak RSS: {peak / 1024:.1f} MiB; reconciles: {op.reconciles()}")
    op.stop()
    kube("delete", "namespace", ns, "--wait=false")


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    main(n, sys.argv[2], sys.argv[3], Path(sys.argv[4]))
