"""Logs in N times (one session each) and prints the access tokens, one a line.

    python3 bench/tokens.py PORT USER PASSWORD N
"""
import http.client
import json
import sys
import threading

port, user, password, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
body = json.dumps({"username": user, "password": password})
out, lock = [], threading.Lock()


def worker(count):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    for _ in range(count):
        conn.request("POST", "/v1/login", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            sys.exit(f"login failed: {resp.status} {data[:200]!r}")
        with lock:
            out.append(json.loads(data)["access_token"])


threads = [threading.Thread(target=worker, args=(n // 4 + (i < n % 4),)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if len(out) != n:
    sys.exit(f"got {len(out)} of {n} tokens")
sys.stdout.write("\n".join(out) + "\n")
