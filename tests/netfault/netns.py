"""Test hosts of our own: network namespaces on a bridge, and the faults
injected between them.

One bridge (``tpnf-br``, 10.77.0.1/24 on this host) and one namespace per
host (``tpnf-<name>``), each joined to the bridge by a veth pair, its end
inside named ``eth0`` with an address in 10.77.0.0/24. No namespace has a
default route: nothing leaves the machine.

Faults are nftables rules inside a namespace, in its own table
(``inet tpnf``): a silent partition (``drop``), a refused link (``reject``
with a TCP reset), random packet loss (``numgen random``), or one TCP
connection cut by its port. This machine's kernel has no ``netem`` qdisc
(``CONFIG_NET_SCH_NETEM`` is off), so delays are made by holding packets in
a relay on this host (``relay.py``) rather than by ``tc netem``.

Everything is named with the ``tpnf`` prefix, and :func:`clean_stale`
removes whatever a killed run left behind (its processes, namespaces and
links) before a new one starts.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

PREFIX = "tpnf"
BRIDGE = f"{PREFIX}-br"
NET = ipaddress.ip_network("10.77.0.0/24")
HOST_IP = "10.77.0.1"
TABLE = "tpnf"


class NetnsError(RuntimeError):
    pass


def run(*argv: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=30)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p


def missing_tools() -> list[str]:
    return [t for t in ("ip", "nft") if shutil.which(t) is None]


def can_run() -> Optional[str]:
    """Why this machine cannot run the scenarios (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = missing_tools()
    if missing:
        return f"missing tools: {', '.join(missing)} (Debian: iproute2, nftables)"
    return None


def _names() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX + "-")]


def _kill_in(ns: str) -> None:
    pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def clean_stale() -> None:
    """Removes every namespace and link named with the prefix, and stops the
    processes still running in those namespaces."""
    for ns in _names():
        _kill_in(ns)
        run("ip", "netns", "del", ns, check=False)
    out = run("ip", "-o", "link", "show", check=False).stdout
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        if name.startswith(PREFIX + "-"):
            run("ip", "link", "del", name, check=False)


@dataclass
class Host:
    """One namespace on the bridge."""

    name: str
    ip: str
    ns: str = field(init=False)

    def __post_init__(self):
        self.ns = f"{PREFIX}-{self.name}"

    def argv(self, *cmd: str) -> list[str]:
        """``cmd`` run inside this namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]

    def sh(self, *cmd: str, check: bool = True, input: Optional[str] = None):
        return run(*self.argv(*cmd), check=check, input=input)

    def nft(self, script: str) -> None:
        self.sh("nft", "-f", "-", input=script)


class Net:
    """The bridge and its hosts, and the faults between them."""

    def __init__(self):
        self.hosts: dict[str, Host] = {}
        self._next = 10
        self.up = False

    def start(self) -> "Net":
        clean_stale()
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        self.up = True
        return self

    def add(self, name: str) -> Host:
        ip = str(NET.network_address + self._next)
        self._next += 1
        h = Host(name, ip)
        outer = f"{PREFIX}-{name}"[:15]
        run("ip", "netns", "add", h.ns)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
        run("ip", "link", "set", outer, "master", BRIDGE)
        run("ip", "link", "set", outer, "up")
        h.sh("ip", "link", "set", "lo", "up")
        h.sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        h.sh("ip", "link", "set", "eth0", "up")
        # The fault table: empty chains, filled and flushed by the faults.
        h.nft(
            f"table inet {TABLE} {{\n"
            "  chain in { type filter hook input priority 0; policy accept; }\n"
            "  chain out { type filter hook output priority 0; policy accept; }\n"
            "}\n"
        )
        self.hosts[name] = h
        return h

    def stop(self) -> None:
        for h in self.hosts.values():
            _kill_in(h.ns)
        clean_stale()
        self.hosts.clear()
        self.up = False

    # -- faults ------------------------------------------------------------

    def heal(self, host: Host) -> None:
        """Removes every fault rule of ``host``."""
        host.nft(f"flush chain inet {TABLE} in\nflush chain inet {TABLE} out\n")

    def drop(self, host: Host, peer: Host) -> None:
        """A silent partition between ``host`` and ``peer``: every packet
        either way is dropped, nobody is told."""
        host.nft(
            f"add rule inet {TABLE} out ip daddr {peer.ip} drop\n"
            f"add rule inet {TABLE} in ip saddr {peer.ip} drop\n"
        )

    def reject(self, host: Host, peer: Host) -> None:
        """A refused link: ``host``'s packets to ``peer`` are answered with a
        TCP reset (or ICMP unreachable), and ``peer``'s are dropped."""
        host.nft(
            f"add rule inet {TABLE} out ip daddr {peer.ip} ip protocol tcp reject with tcp reset\n"
            f"add rule inet {TABLE} out ip daddr {peer.ip} reject\n"
            f"add rule inet {TABLE} in ip saddr {peer.ip} drop\n"
        )

    def loss(self, host: Host, peer: Host, percent: int) -> None:
        """``percent`` of the packets between ``host`` and ``peer`` lost,
        each way, at random."""
        host.nft(
            f"add rule inet {TABLE} out ip daddr {peer.ip} numgen random mod 100 < {percent} drop\n"
            f"add rule inet {TABLE} in ip saddr {peer.ip} numgen random mod 100 < {percent} drop\n"
        )

    def cut_connection(self, host: Host, peer: Host, local_port: int) -> None:
        """Silently drops one TCP connection of ``host`` to ``peer``, the one
        from ``local_port``; ``host``'s other connections stay up."""
        host.nft(
            f"add rule inet {TABLE} out ip daddr {peer.ip} tcp sport {local_port} drop\n"
            f"add rule inet {TABLE} in ip saddr {peer.ip} tcp dport {local_port} drop\n"
        )

    def redirect(self, host: Host, peer: Host, port: int, to_ip: str, to_port: int) -> None:
        """Sends ``host``'s new connections to ``peer:port`` to
        ``to_ip:to_port`` instead (a relay): an nftables ``dnat``."""
        host.nft(
            "table ip tpnf_nat {\n"
            "  chain out { type nat hook output priority -100; policy accept;\n"
            f"    ip daddr {peer.ip} tcp dport {port} dnat to {to_ip}:{to_port}\n"
            "  }\n"
            "}\n"
        )


def wait_port(host_ip: str, port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    last: Optional[Exception] = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host_ip, port), timeout=0.5):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise NetnsError(f"{host_ip}:{port} did not open within {timeout}s ({last})")
