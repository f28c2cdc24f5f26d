"""Child processes for the black-box suites, and the waits around them.

Every process writes stdout+stderr to its own log file, runs in a session
of its own (so a signal reaches its children too), and is stopped at
interpreter exit as a safety net. Every wait has a ``time.monotonic``
deadline and fails with what it waited for and the last thing it saw.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import requests


def binary_path() -> Path:
    """The tokenpolicy binary under test: ``TOKENPOLICY_BIN``, else the debug
    build in ``${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}``."""
    env = os.environ.get("TOKENPOLICY_BIN")
    if env:
        return Path(env)
    target = os.environ.get("CARGO_TARGET_DIR") or "/var/tmp/tokenpolicy-target"
    return Path(target) / "debug" / "tokenpolicy"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """The environment for child processes: ours minus any TOKENPOLICY_*
    setting (every serve flag can come from one, and a stray value would
    change what is under test), with readable logs, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPOLICY_")}
    env.setdefault("RUST_LOG", "info,tokenpolicy=debug")
    env.setdefault("RUST_BACKTRACE", "1")
    env.setdefault("NO_COLOR", "1")
    env.update(extra)
    return env


def log_tail(path: Path, offset: int = 0, limit: int = 12000) -> str:
    """What a log holds from ``offset``, cut to its last ``limit`` characters."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    if len(text) > limit:
        text = f"... [{len(text) - limit} chars cut] ...\n" + text[-limit:]
    return text or "<empty>"


class ProcessExited(RuntimeError):
    """A process that a wait depends on has exited: waiting longer is pointless."""


_ALL: list["Process"] = []


def _stop_all_at_exit() -> None:
    for p in list(_ALL):
        try:
            p.stop(timeout=2.0)
        except Exception:
            pass


atexit.register(_stop_all_at_exit)


class Process:
    """A child process whose stdout+stderr are appended to ``log_path``."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Optional[dict] = None):
        self.name = name
        self.argv = argv
        self.log_path = Path(log_path)
        self.env = env if env is not None else child_env()
        self.proc: Optional[subprocess.Popen] = None
        self.started_at = 0.0
        _ALL.append(self)

    def start(self):
        assert not self.running(), f"{self.name} already running"
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    # The e2e suite's names for the same things.
    @property
    def p(self) -> Optional[subprocess.Popen]:
        return self.proc

    @property
    def log(self) -> Path:
        return self.log_path

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """``sig`` (SIGTERM), then SIGKILL after ``timeout`` seconds."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(sig)
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        except ProcessLookupError:
            pass

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_text(self, offset: int = 0, limit: int = 12000) -> str:
        return log_tail(self.log_path, offset, limit)

    def text(self) -> str:
        """The whole log."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def check_running(self, log: Optional[Path] = None) -> None:
        """Raises ProcessExited, with the end of its log (or of ``log``, where
        the process writes its errors elsewhere), unless running."""
        if not self.running():
            code = self.proc.returncode if self.proc else None
            tail = log_tail(log or self.log_path, limit=4000)
            raise ProcessExited(f"{self.name} exited with {code}:\n{tail}")


def wait_until(what: str, fn: Callable[[], object], timeout: float, every: float = 0.25):
    """Calls ``fn`` until it returns something truthy, and returns that. An
    exception from ``fn`` counts as not yet, except ProcessExited, which ends
    the wait at once."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = fn()
            if last:
                return last
        except ProcessExited:
            raise
        except Exception as e:
            last = e
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(every)


def wait_http(url: str, proc: Optional[Process] = None, timeout: float = 15.0, status: int = 200,
              headers: Optional[dict] = None, every: float = 0.05,
              log: Optional[Path] = None) -> requests.Response:
    """Waits until ``url`` answers ``status``; fails at once with the log
    (``log``, else the process's own) when ``proc``, the process that should
    answer, has exited."""

    got: list[requests.Response] = []

    def answered():
        if proc is not None:
            proc.check_running(log)
        r = requests.get(url, timeout=1.0, headers=headers or {})
        if r.status_code != status:
            return _Unexpected(r)
        # A Response is falsy for a 4xx/5xx status: keep it aside.
        got.append(r)
        return True

    wait_until(f"{url} to answer {status}", answered, timeout, every)
    return got[-1]


class _Unexpected:
    """An answer with another status: falsy, and shown as the last seen."""

    def __init__(self, r: requests.Response):
        self.text = f"{r.status_code} {r.text[:200]!r}"

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.text
