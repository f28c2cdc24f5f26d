"""Test hosts of our own: network namespaces on a bridge, and the faults
injected between them.

Each run has names and addresses of its own, so that two runs on one
machine (a CI run beside a developer's) never meet: a random run id
(``tpnf`` and four hex digits) prefixes the bridge (``<run>-br``), the
namespaces (``<run>-<host>``) and the host ends of the veth pairs
(``<run>v<n>``), and the run takes a /24 of 10.77.0.0/16 that no address
of this host is in yet (the bridge gets ``.1``, the hosts ``.10`` on). The
end of each veth pair inside its namespace is named ``eth0``. No namespace
has a default route: nothing leaves the machine.

Faults are nftables rules inside a namespace, in its own table
(``inet tpnf``): a silent partition (``drop``), a refused link (``reject``
with a TCP reset), random packet loss (``numgen random``), or one TCP
connection cut by its port. This machine's kernel has no ``netem`` qdisc
(``tc qdisc add dev eth0 root netem delay 10ms``: "Error: Specified qdisc
kind is unknown."), so delays are made by holding packets in a relay on
this host (``relay.py``) rather than by ``tc netem``, and packets are
reordered by a forwarder on a TUN device in each namespace of the link
(``reorder.py``).

A live run keeps its process id in ``/run/tpnf/<run>``; :func:`clean_stale`
removes what runs that are no longer alive left behind (their processes,
namespaces and links) and leaves every live run's alone.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PREFIX = "tpnf"
#: The /16 the runs take their /24 from.
SPACE = ipaddress.ip_network("10.77.0.0/16")
TABLE = "tpnf"
#: One file per live run, holding its process id; and the lock under which
#: a run picks its subnet.
OWNERS = Path("/run/tpnf")
#: The names of a run's namespaces and links: the run id, then the rest.
_OWNED = re.compile(rf"^({PREFIX}[0-9a-f]{{4}})(?:-|v[0-9]+$)")


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


def _run_of(name: str) -> Optional[str]:
    m = _OWNED.match(name)
    return m.group(1) if m else None


def _alive(run_id: str) -> bool:
    """Whether the run that made ``run_id``'s names is still running."""
    try:
        pid = int((OWNERS / run_id).read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _names() -> list[str]:
    out = run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _links() -> list[str]:
    out = run("ip", "-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def _kill_in(ns: str) -> None:
    pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _remove(run_ids) -> None:
    """Stops the processes in the namespaces of ``run_ids`` and removes
    those namespaces, their links and their owner files."""
    run_ids = set(run_ids)
    for ns in _names():
        if _run_of(ns) in run_ids:
            _kill_in(ns)
            run("ip", "netns", "del", ns, check=False)
    for link in _links():
        if _run_of(link) in run_ids:
            run("ip", "link", "del", link, check=False)
    for r in run_ids:
        try:
            (OWNERS / r).unlink()
        except OSError:
            pass


def clean_stale() -> None:
    """Removes every namespace and link of runs no longer alive, with the
    processes still running in those namespaces; live runs keep theirs."""
    runs = {_run_of(n) for n in _names() + _links()} - {None}
    _remove(r for r in runs if not _alive(r))


def _used_subnets() -> set:
    """The /24s of 10.77.0.0/16 that an address of this host, or a route
    inside that /16, is in."""
    used = set()
    addrs = run("ip", "-o", "-4", "addr", "show", check=False).stdout
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", addrs):
        addr = ipaddress.ip_address(m.group(1))
        if addr in SPACE:
            used.add(int(addr.packed[2]))
    for line in run("ip", "-4", "route", "show", check=False).stdout.splitlines():
        try:
            dest = ipaddress.ip_network(line.split()[0], strict=False)
        except (IndexError, ValueError):
            continue  # "default" and the like
        # A route inside the /16 (a broader one loses to the bridge's /24).
        if dest.prefixlen > SPACE.prefixlen and dest.subnet_of(SPACE):
            for n in range(256):
                if ipaddress.ip_network(f"10.77.{n}.0/24").overlaps(dest):
                    used.add(n)
    return used


@dataclass
class Host:
    """One namespace on the bridge."""

    name: str
    ip: str
    ns: str

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
        self.run_id = f"{PREFIX}{secrets.token_hex(2)}"
        self.bridge = f"{self.run_id}-br"
        self.subnet: Optional[ipaddress.IPv4Network] = None

    @property
    def host_ip(self) -> str:
        """This host's address on the bridge."""
        assert self.subnet is not None, "the bridge is not up"
        return str(self.subnet.network_address + 1)

    def start(self) -> "Net":
        OWNERS.mkdir(parents=True, exist_ok=True)
        with open(OWNERS / ".lock", "w") as lock:
            # One run at a time picks its subnet and claims it with its bridge.
            fcntl.flock(lock, fcntl.LOCK_EX)
            clean_stale()
            while _alive(self.run_id) or any(_run_of(n) == self.run_id
                                             for n in _names() + _links()):
                self.run_id = f"{PREFIX}{secrets.token_hex(2)}"
                self.bridge = f"{self.run_id}-br"
            (OWNERS / self.run_id).write_text(f"{os.getpid()}\n")
            free = sorted(set(range(1, 255)) - _used_subnets())
            if not free:
                raise NetnsError("no free /24 left in 10.77.0.0/16")
            third = free[secrets.randbelow(len(free))]
            self.subnet = ipaddress.ip_network(f"10.77.{third}.0/24")
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
            run("ip", "link", "set", self.bridge, "up")
        self.up = True
        return self

    def add(self, name: str) -> Host:
        assert self.subnet is not None, "the bridge is not up"
        ip = str(self.subnet.network_address + self._next)
        outer = f"{self.run_id}v{self._next}"
        self._next += 1
        h = Host(name, ip, f"{self.run_id}-{name}")
        run("ip", "netns", "add", h.ns)
        run("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
        run("ip", "link", "set", outer, "master", self.bridge)
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
        _remove([self.run_id])
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
