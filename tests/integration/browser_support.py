"""Runs the browser scripts of tests/browser (Debian's chromium, headless,
driven by playwright-core) for the browser tests.

Needs: chromium (apt), node, and `npm ci --prefix tests/browser`
(tests/run.sh does both). Screenshots go under $BROWSER_SCREENSHOTS
(default /var/tmp/tokenpolicy-browser/screenshots).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

BROWSER_DIR = Path(__file__).resolve().parent.parent / "browser"
SHOTS = Path(os.environ.get("BROWSER_SCREENSHOTS", "/var/tmp/tokenpolicy-browser/screenshots"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def run_browser_script(script: Path, env: dict, stack, timeout: float = 180) -> str:
    """Runs one of tests/browser/*.mjs with node; its output. A failure
    fails the test with the script's output and the stack's logs
    (`stack.mark()` / `stack.report()`)."""
    node = shutil.which("node")
    assert node, "node not found"
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} not found (apt-get install chromium)"
    assert (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), \
        "playwright-core not installed: npm ci --prefix tests/browser"
    stack.mark()
    out = subprocess.run([node, str(script)], cwd=BROWSER_DIR,
                         env={**os.environ, "CHROMIUM": CHROMIUM, **env},
                         capture_output=True, timeout=timeout)
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    assert out.returncode == 0, f"{script.name} failed:\n{text}\n{stack.report()}"
    return text
