"""Packet reordering in userspace, for the reordering scenario.

This machine's kernel has no ``netem`` qdisc (``tc qdisc add dev v0 root
netem delay 10ms reorder 25% 50%``: "Error: Specified qdisc kind is
unknown."), so the reordering is made by this forwarder on a TUN device
(``/dev/net/tun``, ``IFF_TUN | IFF_NO_PI``) inside one namespace.

The namespace sends the packets it originates for the ``--peer`` addresses
into the TUN device (``ip rule ... iif lo lookup <table>``: only locally
made packets, so what comes back out of the device takes the main table);
this forwarder reads each packet and writes it back into the same device,
where the kernel receives it and forwards it out of ``eth0`` as before
(``ip_forward`` on, ``accept_local`` for its own source address). While
reordering is on (``SIGUSR1``; ``SIGUSR2`` turns it off), a share of the
packets (``--percent``) is held back ``--hold`` seconds on a timer heap and
the rest passes at once, so later TCP segments overtake earlier ones on
the wire. Only the link's packets take this way; every other packet of the
namespace is untouched.

Run as ``ip netns exec <ns> python3 reorder.py --peer IP [--peer IP ...]``.
The counters (packets seen, held back, and overtaken: written after a
later-read packet) are written as JSON to ``--stats`` twice a second and at
exit (``SIGTERM``), which also removes the routes and the device.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def sh(*argv: str) -> None:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")


def sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
        f.write(value)


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def setup(dev: str, peers: list, table: int) -> None:
    sh("ip", "link", "set", dev, "up")
    sysctl("net.ipv4.ip_forward", "1")
    for iface in ("all", dev):
        sysctl(f"net.ipv4.conf.{iface}.rp_filter", "0")
    sysctl(f"net.ipv4.conf.{dev}.accept_local", "1")
    for peer in peers:
        sh("ip", "route", "add", f"{peer}/32", "dev", dev, "table", str(table))
        sh("ip", "rule", "add", "iif", "lo", "to", f"{peer}/32", "lookup", str(table),
           "priority", "100")


def teardown(peers: list, table: int) -> None:
    for peer in peers:
        subprocess.run(["ip", "rule", "del", "iif", "lo", "to", f"{peer}/32", "lookup",
                        str(table), "priority", "100"], capture_output=True, timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev", default="tpro0")
    ap.add_argument("--peer", action="append", required=True)
    ap.add_argument("--table", type=int, default=100)
    ap.add_argument("--percent", type=float, default=25.0)
    ap.add_argument("--hold", type=float, default=0.05)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args()

    fd = open_tun(args.dev)
    setup(args.dev, args.peer, args.table)
    rng = random.Random(args.seed)
    state = {"on": False, "stop": False}
    stats = {"packets": 0, "held": 0, "overtaken": 0, "passed_while_on": 0, "on": False}

    def on(*_):
        state["on"] = True

    def off(*_):
        state["on"] = False

    def stop(*_):
        state["stop"] = True

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def write_stats():
        stats["on"] = state["on"]
        tmp = args.stats + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, args.stats)

    heap: list = []  # (due, seq, packet)
    seq = 0
    written_seq = -1  # the highest read sequence number written so far
    next_stats = 0.0
    print(f"reorder: {args.dev} ready for {', '.join(args.peer)}", flush=True)
    try:
        while not state["stop"]:
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, s, pkt = heapq.heappop(heap)
                if s < written_seq:
                    stats["overtaken"] += 1
                written_seq = max(written_seq, s)
                try:
                    os.write(fd, pkt)
                except OSError:
                    pass
            timeout = 0.5 if not heap else max(0.0, heap[0][0] - now)
            try:
                ready, _, _ = select.select([fd], [], [], min(timeout, 0.5))
            except InterruptedError:
                ready = []
            for _ in range(64 if ready else 0):
                try:
                    pkt = os.read(fd, 65535)
                except BlockingIOError:
                    break
                except OSError:
                    break
                stats["packets"] += 1
                seq += 1
                if state["on"] and rng.random() * 100.0 < args.percent:
                    stats["held"] += 1
                    heapq.heappush(heap, (time.monotonic() + args.hold, seq, pkt))
                    continue
                if state["on"]:
                    stats["passed_while_on"] += 1
                written_seq = max(written_seq, seq)
                try:
                    os.write(fd, pkt)
                except OSError:
                    pass
            if now >= next_stats:
                write_stats()
                next_stats = now + 0.5
        # What is still held goes out before the device does.
        for _, _, pkt in sorted(heap):
            try:
                os.write(fd, pkt)
            except OSError:
                pass
    finally:
        write_stats()
        teardown(args.peer, args.table)
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
