"""Login under attack, against real `tokenpolicy serve` processes.

* Racing guesses: however many wrong guesses race (one replica, or two
  replicas sharing Redis), at most the per-user limit of them are checked;
  the rest get 429 TOO_MANY_ATTEMPTS, or 503 SERVICE_BUSY when the hashing
  line was already full when they arrived.
* A burst of argon2id logins keeps the process's peak resident memory (read
  from /proc) under a 128 MiB pod limit, and every answer is 200, 401, 429
  or 503 with Retry-After.
* A burst of 100 people's correct argon2id logins at once waits its turn:
  a login is turned away (503 SERVICE_BUSY with Retry-After, at once) only
  when it could not start its check within `--login-max-wait`.
* An unknown user name costs what a known one costs, whatever hash kinds
  the users file mixes (medians compared as ratios, not absolute times).
* Empty passwords and bcrypt passwords past 72 bytes never log in.
* Successful logins are limited per user, across replicas sharing Redis
  (429 TOO_MANY_ATTEMPTS with Retry-After past the limit).
* Logouts past the in-process store's bound on revocations held in memory
  (`--max-cached-revocations`) stay revoked, and so do those past the
  Redis store's cache bound, on every replica.

Every loop here is bounded in count and every wait has a deadline.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from conftest import _argon2_via_binary, _bcrypt_2y, binary_path, child_env

LIMIT = 5  # the per-user default
BURST = 200
MIB = 1024 * 1024
POD_LIMIT = 128 * MIB


def login(url: str, user: str, password: str, timeout: float = 60.0) -> requests.Response:
    return requests.post(url + "/v1/login", json={"username": user, "password": password},
                         timeout=timeout)


def fire(requests_to_send: list[tuple[str, str, str]]) -> list[requests.Response]:
    """Sends every (url, user, password) login at once (threads released by
    one barrier) and returns the answers in order."""
    barrier = threading.Barrier(len(requests_to_send))

    def one(item):
        url, user, pw = item
        barrier.wait(timeout=30)
        return login(url, user, pw)

    with ThreadPoolExecutor(max_workers=len(requests_to_send)) as pool:
        return list(pool.map(one, requests_to_send))


def users_file(env, name: str, lines: list[str]):
    path = env.workdir / f"users-{name}-{uuid.uuid4().hex[:6]}"
    path.write_text("\n".join(lines) + "\n")
    return path


def error_code(r: requests.Response) -> str:
    try:
        return r.json()["error"]["code"]
    except Exception:
        return f"<not JSON: {r.text[:100]!r}>"


# ==========================================================================
# 1. racing guesses
# ==========================================================================


def assert_at_most_limit_checked(answers: list[requests.Response], right_index: int):
    checked = [r for r in answers if r.status_code in (200, 401)]
    others = [r for r in answers if r.status_code not in (200, 401)]
    summary = {s: sum(1 for r in answers if r.status_code == s) for s in {r.status_code for r in answers}}
    # The limit is on wrong passwords: at most LIMIT of them reach the
    # check. The right one, if it is checked, gives its attempt back (a
    # user's own logins never lock them out), and a wrong guess still in
    # flight may take that place; the count of wrong ones checked stays
    # within the limit either way.
    wrong = [r for r in checked if r.status_code == 401]
    assert len(wrong) <= LIMIT, f"{len(wrong)} wrong guesses checked (limit {LIMIT}): {summary}"
    assert len(checked) - len(wrong) <= 1, summary
    # A login takes its place in the hashing line before it asks the
    # throttle: one that finds the line full is turned away at once (503,
    # never checked, no attempt taken); one that gets a place and finds the
    # user's attempts spent gets 429. Both say when to come back.
    for r in others:
        assert (r.status_code, error_code(r)) in ((429, "TOO_MANY_ATTEMPTS"), (503, "SERVICE_BUSY")), \
            (r.status_code, r.text[:200])
        assert r.headers.get("Retry-After", "").isdigit(), dict(r.headers)
    # The line holds more logins than the limit, so it is the throttle,
    # not the line, that kept the checks within it.
    assert summary.get(429, 0) >= 1, summary
    assert all(error_code(r) == "INVALID_CREDENTIALS" for r in checked if r.status_code == 401)
    if answers[right_index].status_code == 200:
        assert sum(1 for r in answers if r.status_code == 200) == 1


def racing_guesses(urls: list[str], user: str, right: str) -> list[tuple[str, str, str]]:
    items = [(urls[i % len(urls)], user, f"wrong-{i}") for i in range(BURST)]
    items.insert(BURST // 2, (urls[0], user, right))
    return items


def test_racing_guesses_on_one_replica_check_at_most_the_limit(env, start_server):
    users = users_file(env, "race1", [f"victim:{_bcrypt_2y('victim-password')}"])
    srv = start_server("race-one", None, users_file=users,
                       extra_args=["--max-failed-logins-per-address", "100000"])
    answers = fire(racing_guesses([srv.url], "victim", "victim-password"))
    assert_at_most_limit_checked(answers, BURST // 2)


def test_racing_guesses_across_two_replicas_check_at_most_the_limit(env, start_server, start_redis):
    redis = start_redis("redis-race")
    users = users_file(env, "race2", [f"victim:{_bcrypt_2y('victim-password')}"])
    extra = ["--max-failed-logins-per-address", "100000"]
    a = start_server("race-a", redis.url, users_file=users, extra_args=extra, wait=False)
    b = start_server("race-b", redis.url, users_file=users, extra_args=extra, wait=False)
    a.wait_ready()
    b.wait_ready()
    answers = fire(racing_guesses([a.url, b.url], "victim", "victim-password"))
    assert_at_most_limit_checked(answers, BURST // 2)
    # The limit holds afterwards too, on both replicas, for the right password.
    for s in (a, b):
        r = login(s.url, "victim", "victim-password")
        assert r.status_code == 429 and error_code(r) == "TOO_MANY_ATTEMPTS", r.text[:200]


# ==========================================================================
# 2. memory under a login burst
# ==========================================================================


def rss(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def test_argon2id_login_burst_stays_under_the_pod_memory_limit(env, start_server):
    phc = _argon2_via_binary("builder")
    assert "m=19456" in phc, phc  # the default memory cost: 19 MiB per check
    users = users_file(env, "burst", [f"bob:{phc}"])
    # One user, so the per-user throttle (which counts checks in progress)
    # is lifted: every login here reaches the password check or the line.
    srv = start_server("burst", None, users_file=users, extra_args=[
        "--max-failed-logins-per-user", "100000", "--max-failed-logins-per-address", "100000"])
    idle = rss(srv.pid)["VmRSS"]
    peak_sampled = [idle]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak_sampled.append(rss(srv.pid)["VmRSS"])
            except OSError:
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        answers = fire([(srv.url, "bob", "builder")] * BURST)
    finally:
        stop.set()
        sampler.join(timeout=5)
    took = time.monotonic() - started
    time.sleep(0.5)
    after = rss(srv.pid)
    statuses = {s: sum(1 for r in answers if r.status_code == s) for s in {r.status_code for r in answers}}
    figures = (f"idle {idle / MIB:.1f} MiB, peak sampled {max(peak_sampled) / MIB:.1f} MiB, "
               f"VmHWM {after['VmHWM'] / MIB:.1f} MiB, after {after['VmRSS'] / MIB:.1f} MiB, "
               f"{BURST} logins in {took:.1f}s: {statuses}")
    print("\n[login burst] " + figures)
    assert srv.running(), figures
    for r in answers:
        assert r.status_code in (200, 401, 429, 503), f"{r.status_code} {r.text[:200]!r}; {figures}"
        if r.status_code == 503:
            assert error_code(r) == "SERVICE_BUSY", r.text[:200]
            assert r.headers.get("Retry-After", "").isdigit(), dict(r.headers)
    assert statuses.get(200, 0) >= 1, figures
    assert after["VmHWM"] <= POD_LIMIT, figures
    assert max(peak_sampled) <= POD_LIMIT, figures
    # The service still logs in afterwards.
    deadline = time.monotonic() + 30
    while True:
        r = login(srv.url, "bob", "builder")
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text[:200]


def timed_fire(items: list[tuple[str, str, str]]) -> list[tuple[requests.Response, float]]:
    """Like fire, with each answer's time from the barrier's release."""
    barrier = threading.Barrier(len(items))

    def one(item):
        url, user, pw = item
        barrier.wait(timeout=30)
        t0 = time.monotonic()
        r = login(url, user, pw)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(one, items))


SHIFT = 100  # people logging in at once


def test_a_burst_of_correct_logins_waits_its_turn_rather_than_being_turned_away(env, start_server):
    # 100 people, one argon2id hash each at the default cost (the same
    # password, so one hash string serves them all). They all come from
    # 127.0.0.1 here, so the per-address limit is lifted: it is the line,
    # not the throttle, that is under test.
    phc = _argon2_via_binary("nine-o-clock")
    users = users_file(env, "shift", [f"worker{i}:{phc}" for i in range(SHIFT)])
    max_wait = 3.0
    srv = start_server("shift", None, users_file=users, extra_args=[
        "--login-max-wait", f"{max_wait:.0f}s", "--max-failed-logins-per-address", "100000"])
    answers = timed_fire([(srv.url, f"worker{i}", "nine-o-clock") for i in range(SHIFT)])
    ok = [t for r, t in answers if r.status_code == 200]
    shed = [(r, t) for r, t in answers if r.status_code == 503]
    figures = (f"{len(ok)} logged in (slowest {max(ok, default=0):.2f}s), {len(shed)} turned away "
               f"(slowest {max((t for _, t in shed), default=0):.2f}s, Retry-After "
               f"{sorted({r.headers.get('Retry-After') for r, _ in shed})})")
    print("\n[login shift] " + figures)
    assert all(r.status_code in (200, 503) for r, _ in answers), \
        [(r.status_code, r.text[:120]) for r, _ in answers if r.status_code not in (200, 503)]
    assert len(ok) >= SHIFT // 2, figures
    for r, took in shed:
        assert error_code(r) == "SERVICE_BUSY", r.text[:200]
        assert r.headers.get("Retry-After", "").isdigit() and int(r.headers["Retry-After"]) >= 1, dict(r.headers)
        # Turned away without waiting past the deadline first.
        assert took <= max_wait + 1.0, figures
    # Every session is real: each token verifies.
    tokens = [r.json()["access_token"] for r, _ in answers if r.status_code == 200]
    for t in tokens[:10]:
        v = requests.get(srv.url + "/v1/verify", headers={"Authorization": f"Bearer {t}"}, timeout=10)
        assert v.status_code == 200, v.text[:200]


def test_login_max_wait_out_of_bounds_is_refused_at_start(env):
    for bad in ("0s", "61s", "soon"):
        out = subprocess.run([str(binary_path()), "serve", "--login-max-wait", bad],
                             capture_output=True, timeout=30, env=child_env())
        assert out.returncode != 0, bad
        assert b"--login-max-wait" in out.stderr, out.stderr[-400:]


# ==========================================================================
# 3. unknown names cost what known ones cost
# ==========================================================================


def login_time(url: str, user: str) -> float:
    t0 = time.perf_counter()
    r = login(url, user, "not-the-password")
    took = time.perf_counter() - t0
    assert r.status_code == 401, f"{user}: {r.status_code} {r.text[:200]!r}"
    return took


def test_unknown_names_cost_what_known_names_cost(env, start_server):
    # Two hash kinds whose costs differ several-fold: bcrypt cost 11 and
    # argon2id at the defaults.
    users = users_file(env, "timing", [
        f"carol:{_bcrypt_2y('carol-password', rounds=11)}",
        f"bob:{_argon2_via_binary('bob-password')}",
    ])
    srv = start_server("timing", None, users_file=users, extra_args=[
        "--max-failed-logins-per-user", "100000", "--max-failed-logins-per-address", "100000"])
    login(srv.url, "warm-up", "x")
    known_users = {"bcrypt": "carol", "argon2id": "bob"}
    unknown = [f"nobody-{i}-{uuid.uuid4().hex[:6]}" for i in range(12)]
    samples = {n: [] for n in list(known_users.values()) + unknown}
    # Rounds that take every name once, so that a change in the machine's
    # load hits known and unknown names alike; medians over the rounds.
    for _ in range(9):
        for name in samples:
            samples[name].append(login_time(srv.url, name))
    known = {k: statistics.median(samples[u]) for k, u in known_users.items()}
    ms = {k: round(v * 1000, 1) for k, v in known.items()}
    assert max(known.values()) / min(known.values()) > 2.5, \
        f"the two kinds must differ clearly for this test: {ms} ms"
    matched = {k: 0 for k in known}
    report = []
    for name in unknown:
        t = statistics.median(samples[name])
        ratios = {k: t / v for k, v in known.items()}
        report.append(f"{name}: {t * 1000:.1f} ms, ratio to each kind {ratios}")
        nearest = min(ratios, key=lambda k: abs(math.log(ratios[k])))
        assert 0.5 <= ratios[nearest] <= 2.0, \
            f"unknown name {name} costs {t * 1000:.1f} ms, like no known user ({ms} ms)"
        matched[nearest] += 1
    print(f"\n[timing] known medians {ms} ms\n" + "\n".join(report))
    # Unknown names take each kind's cost, as known names do: no cost gives
    # away that a name is unknown (with one user per kind, 12 names all
    # missing one kind has probability 2^-11).
    assert all(n > 0 for n in matched.values()), f"unknown names matched {matched}:\n" + "\n".join(report)


# ==========================================================================
# 4. passwords that must never log in
# ==========================================================================


def test_empty_password_never_logs_in(env, start_server):
    users = users_file(env, "pw", [f"blank:{_bcrypt_2y('')}"])
    srv = start_server("passwords", None, users_file=users,
                       extra_args=["--max-failed-logins-per-address", "100000"])
    # An empty password: refused alike for a user whose hash is of "" and
    # for an unknown name.
    r_known = login(srv.url, "blank", "")
    r_unknown = login(srv.url, "nobody-blank", "")
    assert r_known.status_code in (400, 401), r_known.text[:200]
    assert (r_known.status_code, r_known.text) == (r_unknown.status_code, r_unknown.text)


def test_bcrypt_password_past_72_bytes_never_logs_in(env, start_server):
    long_pw = "L" * 72
    users = users_file(env, "pw72", [f"longpw:{_bcrypt_2y(long_pw)}"])
    srv = start_server("passwords-72", None, users_file=users,
                       extra_args=["--max-failed-logins-per-address", "100000"])
    # bcrypt reads only 72 bytes: a longer password must not match on its prefix.
    assert login(srv.url, "longpw", long_pw).status_code == 200
    r = login(srv.url, "longpw", long_pw + "-anything-after-72-bytes")
    assert r.status_code == 401 and error_code(r) == "INVALID_CREDENTIALS", r.text[:200]


def test_hash_password_refuses_the_empty_password():
    for stdin in (b"", b"\n"):
        out = subprocess.run([str(binary_path()), "hash-password"], input=stdin,
                             capture_output=True, timeout=60, env=child_env())
        assert out.returncode != 0 and out.stdout == b"", out
        assert b"empty password" in out.stderr, out.stderr


# ==========================================================================
# 5. successful logins and the revocations they cost
# ==========================================================================


def test_successful_logins_are_limited_per_user_across_replicas(env, start_server, start_redis):
    redis = start_redis("redis-logins")
    users = users_file(env, "logins", [f"busy:{_bcrypt_2y('busy-password')}",
                                       f"calm:{_bcrypt_2y('calm-password')}"])
    extra = ["--max-logins-per-user", "3", "--login-window", "1m"]
    a = start_server("logins-a", redis.url, users_file=users, extra_args=extra, wait=False)
    b = start_server("logins-b", redis.url, users_file=users, extra_args=extra, wait=False)
    a.wait_ready()
    b.wait_ready()
    answers = [login((a, b)[i % 2].url, "busy", "busy-password") for i in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429], \
        [(r.status_code, r.text[:200]) for r in answers]
    for r in answers[3:]:
        assert error_code(r) == "TOO_MANY_ATTEMPTS", r.text[:200]
        assert 1 <= int(r.headers["Retry-After"]) <= 60, r.headers
        assert "access_token" not in r.text
    # Another user is not held back.
    assert login(b.url, "calm", "calm-password").status_code == 200


def test_logouts_past_the_in_memory_bound_stay_revoked(env, start_server):
    users = users_file(env, "revoked", [f"cycler:{_bcrypt_2y('cycler-password')}",
                                        f"other:{_bcrypt_2y('other-password')}"])
    srv = start_server("revocations", None, users_file=users,
                       extra_args=["--max-cached-revocations", "2"])

    def token(user: str) -> str:
        r = login(srv.url, user, f"{user}-password")
        assert r.status_code == 200, r.text[:200]
        return r.json()["access_token"]

    def verify(tok: str) -> requests.Response:
        return requests.get(srv.url + "/v1/verify", headers={"Authorization": f"Bearer {tok}"},
                            timeout=30)

    other = token("other")
    out = []
    for i in range(6):
        tok = token("cycler")
        assert verify(tok).status_code == 200, f"login {i}"
        r = requests.post(srv.url + "/v1/logout", headers={"Authorization": f"Bearer {tok}"},
                          timeout=30)
        assert r.status_code in (200, 204), r.text[:200]
        out.append(tok)
        for j, old in enumerate(out):
            v = verify(old)
            assert v.status_code == 401 and error_code(v) == "REVOKED_SESSION", \
                (i, j, v.status_code, v.text[:200])
    assert verify(other).status_code == 200
    assert verify(token("cycler")).status_code == 200


def test_logouts_past_the_cache_bound_stay_revoked_on_every_replica(env, start_server, start_redis):
    redis = start_redis("redis-revocations")
    users = users_file(env, "revoked-redis", [f"cycler:{_bcrypt_2y('cycler-password')}"])
    extra = ["--max-cached-revocations", "1", "--session-cache-size", "1"]
    a = start_server("revocations-a", redis.url, users_file=users, extra_args=extra, wait=False)
    b = start_server("revocations-b", redis.url, users_file=users, extra_args=extra, wait=False)
    a.wait_ready()
    b.wait_ready()

    def verify(srv, tok: str) -> requests.Response:
        return requests.get(srv.url + "/v1/verify", headers={"Authorization": f"Bearer {tok}"},
                            timeout=30)

    tokens = []
    for i in range(5):
        r = login(a.url, "cycler", "cycler-password")
        assert r.status_code == 200, r.text[:200]
        tokens.append(r.json()["access_token"])
    for tok in tokens:
        assert verify(b, tok).status_code == 200
    for tok in tokens:
        r = requests.post(a.url + "/v1/logout", headers={"Authorization": f"Bearer {tok}"},
                          timeout=30)
        assert r.status_code in (200, 204), r.text[:200]
    for srv in (a, b):
        for i, tok in enumerate(tokens):
            v = verify(srv, tok)
            assert v.status_code == 401 and error_code(v) == "REVOKED_SESSION", \
                (srv, i, v.status_code, v.text[:200])
