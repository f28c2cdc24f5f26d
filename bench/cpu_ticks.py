"""CPU time so far (clock ticks, user + system) of named processes, and of
the machine: `python3 bench/cpu_ticks.py label=PID ...` prints one JSON
object. A process's threads are also summed by name (the part before the
last `-NUMBER`), as `label/threadname`, so that the password-check threads
show apart from the request-serving ones.

`python3 bench/cpu_ticks.py --diff BEFORE AFTER` prints, from two such
objects, each one's share of the machine over the interval (100% = every
core busy), and the share left idle."""

from __future__ import annotations

import json
import os
import re
import sys


def ticks(stat: str) -> tuple[str, int]:
    # comm is in parentheses and may hold spaces: split after the last ')'.
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    # utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    return comm, int(fields[11]) + int(fields[12])


def snapshot(pairs: list[str]) -> dict:
    out: dict[str, int] = {}
    for pair in pairs:
        label, pid = pair.split("=", 1)
        try:
            with open(f"/proc/{pid}/stat") as f:
                out[label] = ticks(f.read())[1]
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    comm, t = ticks(f.read())
                name = re.sub(r"-\d+$", "", comm)
                key = f"{label}/{name}"
                out[key] = out.get(key, 0) + t
        except (FileNotFoundError, ProcessLookupError):
            out[label] = out.get(label, 0)
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    out["machine"] = sum(cpu)
    out["idle"] = cpu[3] + cpu[4]
    return out


def diff(before: dict, after: dict) -> str:
    total = max(after["machine"] - before["machine"], 1)
    parts = []
    for key in after:
        if key in ("machine",):
            continue
        share = 100.0 * (after[key] - before.get(key, 0)) / total
        if "/" in key and share < 1.0:
            continue
        parts.append(f"{key} {share:.0f}%")
    return ", ".join(parts)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--diff"]:
        print(diff(json.loads(sys.argv[2]), json.loads(sys.argv[3])))
    else:
        print(json.dumps(snapshot(sys.argv[1:])))
