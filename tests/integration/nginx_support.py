"""Helpers for test_nginx_forward_auth.py: a real nginx configured as
ingress-nginx configures itself (examples/forward-auth/ingress-nginx.conf.template), a
tiny echo upstream, and one `tokenpolicy serve` with the in-process store.

Self-contained on purpose (conftest.py belongs to the main integration
suite); the only shared convention is the TOKENPOLICY_BIN variable.

Environment:
    TOKENPOLICY_BIN  the binary (default
                     ${CARGO_TARGET_DIR:-/var/tmp/tokenpolicy-target}/debug/tokenpolicy)
    NGINX            the nginx binary (default: `nginx` on PATH, else /usr/sbin/nginx)
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional, Sequence


from conftest import binary_path, child_env, free_port
from support.procs import Process as Proc
from support.procs import log_tail as read_tail
from support.procs import wait_http

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE.parents[1] / "examples" / "forward-auth" / "ingress-nginx.conf.template"

HOST = "127.0.0.1"
COOKIE = "tokenpolicy"
#: The annotation values of the Ingresses the template models.
AUTH_RESPONSE_HEADERS = ["X-Auth-Request-User", "X-Auth-Request-Session", "Remote-User",
                         "X-Auth-Request-Email", "X-Auth-Request-Groups"]
#: Paths of the Ingresses (after ingress-nginx's Prefix normalisation).
APP_PATH = "/app/"   # auth-url + auth-response-headers + auth-signin
API_PATH = "/api/"   # auth-url + auth-response-headers
POLICY = dict(session=8, token=2, renew=3, grace=1)

READY_TIMEOUT = 15.0




def nginx_path() -> str:
    return os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"




def jwt_claims(token: str) -> dict:
    """The payload of a JWT, unverified (the service verifies; we only read
    iat/exp/sid/jti to schedule and compare)."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def sleep_until(wall: float) -> None:
    delay = wall - time.time()
    if delay > 0:
        time.sleep(delay)


# --------------------------------------------------------------------------
# ingress-nginx naming rules (internal/ingress/controller/template/template.go)
# --------------------------------------------------------------------------


def auth_location(path: str, path_type: str = "Prefix") -> str:
    """buildAuthLocation()."""
    b64 = base64.urlsafe_b64encode(path.encode()).decode().rstrip("=")
    return f"/_external-auth-{b64}-{path_type}"


def signin_location(path: str, signin_url: str) -> str:
    """buildAuthSignURLLocation()."""
    return "@" + hashlib.sha1((path + signin_url).encode()).hexdigest()


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------
# The echo upstream
# --------------------------------------------------------------------------


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ECHOED = ["X-Auth-Request-User", "X-Auth-Request-Session", "Remote-User", "X-Auth-Request-Email",
              "X-Auth-Request-Groups", "Authorization", "Cookie", "Host", "X-Forwarded-Host", "X-Forwarded-For"]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({
            "method": self.command,
            "path": self.path,
            "headers": {h: self.headers.get(h) for h in self.ECHOED},
            # Every header name the app saw, to check no identity header is duplicated.
            "header_names": [k.lower() for k in self.headers.keys()],
        }).encode()
        seen = json.loads(body)
        ctype = "application/json"
        if "text/html" in (self.headers.get("Accept") or ""):
            # A browser: the same JSON in a page, with a sign-out button.
            ctype = "text/html; charset=utf-8"
            body = (
                "<!doctype html><html><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width\"><title>App</title></head><body>"
                f"<h1>App</h1><pre id=\"echo\">{html.escape(body.decode())}</pre>"
                "<form method=\"post\" action=\"/v1/logout\"><button type=\"submit\">Sign out</button></form>"
                "</body></html>").encode()
        # Recorded before the answer goes out: a client that has its answer
        # finds its request in the list.
        self.server.requests_seen.append(seen)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _answer

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass


class EchoUpstream:
    """The protected application: answers every request with the identity
    headers it received, as JSON (inside a page with a sign-out button when
    the client accepts text/html)."""

    def __init__(self):
        self.server = ThreadingHTTPServer((HOST, 0), _EchoHandler)
        self.server.daemon_threads = True
        self.server.requests_seen = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, name="echo-upstream",
                                       daemon=True)

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.server.server_address[1]}"

    @property
    def requests_seen(self) -> list:
        return self.server.requests_seen  # type: ignore[attr-defined]

    def start(self) -> "EchoUpstream":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# The whole stack
# --------------------------------------------------------------------------


def set_misc_modules() -> list[Path]:
    """The NDK + set-misc dynamic modules (Debian: libnginx-mod-http-ndk,
    libnginx-mod-http-set-misc), when installed: then `set_escape_uri` runs as
    in the ingress-nginx image."""
    for d in (Path("/usr/lib/nginx/modules"), Path("/usr/share/nginx/modules")):
        ndk, sm = d / "ndk_http_module.so", d / "ngx_http_set_misc_module.so"
        if ndk.exists() and sm.exists():
            return [ndk, sm]
    return []


def render_nginx_conf(prefix: Path, listen_port: int, service_port: int, echo_addr: str) -> tuple[str, bool]:
    """The template with its placeholders filled in; also whether the real
    `set_escape_uri` is used."""
    text = TEMPLATE.read_text()
    auth_url = f"http://{HOST}:{service_port}/v1/verify"
    signin_url = f"http://{HOST}:{listen_port}/v1/login"
    modules = set_misc_modules()
    if modules:
        load = "\n".join(f"load_module {m};" for m in modules)
    else:
        load = "# (set-misc not installed: see set_escape_uri below)"
        line = "set_escape_uri $escaped_request_uri $request_uri;"
        assert line in text, "template lost its set_escape_uri line"
        text = text.replace(line, "set $escaped_request_uri $request_uri;")
    # The master drops to `user` (default nobody) for workers only when root;
    # nobody cannot enter pytest's 0700 tmp dirs.
    user = "user root;" if os.geteuid() == 0 else "# (not root: workers keep our user)"
    # The names must be what the template hard-codes (derived as ingress-nginx derives them).
    assert auth_location(APP_PATH) in text and auth_location(API_PATH) in text
    subs = {
        "@@LOAD_MODULES@@": load,
        "@@USER_DIRECTIVE@@": user,
        "@@PREFIX@@": str(prefix),
        "@@LISTEN_ADDR@@": f"{HOST}:{listen_port}",
        "@@ECHO_ADDR@@": echo_addr,
        "@@SERVICE_ADDR@@": f"{HOST}:{service_port}",
        "@@AUTH_HOST@@": HOST,
        "@@AUTH_URL@@": auth_url,
        "@@SIGNIN_LOCATION_APP@@": signin_location(APP_PATH, signin_url),
        "@@SIGNIN_URL@@": signin_url,
    }
    for k, v in subs.items():
        text = text.replace(k, v)
    assert "@@" not in text, f"unfilled placeholder: {text[text.index('@@') - 40:][:100]!r}"
    return text, bool(modules)


@dataclass
class Stack:
    workdir: Path
    username: str
    password: str
    service: Proc
    service_port: int
    service_log: Path
    nginx: Proc
    nginx_port: int
    nginx_prefix: Path
    echo: EchoUpstream
    real_set_escape_uri: bool
    _offsets: dict = field(default_factory=dict)

    @property
    def service_url(self) -> str:
        return f"http://{HOST}:{self.service_port}"

    @property
    def url(self) -> str:
        """The ingress, as clients see it."""
        return f"http://{HOST}:{self.nginx_port}"

    @property
    def signin_url(self) -> str:
        return f"{self.url}/v1/login"

    def logs(self) -> dict[str, Path]:
        return {
            "tokenpolicy serve": self.service_log,
            "nginx error.log": self.nginx_prefix / "error.log",
            "nginx access.log": self.nginx_prefix / "access.log",
            "nginx stdout/stderr": self.nginx_prefix / "nginx.out",
        }

    def mark(self) -> None:
        self._offsets = {k: size_of(p) for k, p in self.logs().items()}

    def report(self) -> str:
        parts = []
        for name, path in self.logs().items():
            parts.append(f"----- {name} ({path}) since test start -----\n"
                         f"{read_tail(path, self._offsets.get(name, 0))}")
        parts.append(f"----- nginx.conf: {self.nginx_prefix / 'nginx.conf'} -----")
        return "\n".join(parts)


def start_stack(workdir: Path, username: str = "carol", password: str = "carol-password",
                policy_yaml: Optional[Callable[[str], str]] = None,
                extra_args: Sequence[str] = ()) -> Stack:
    """tokenpolicy serve (in-process store), the echo upstream and nginx;
    each waited for. The caller stops it with stop_stack().

    ``policy_yaml``: given the ingress URL, the policy file's text (default:
    POLICY's times); ``extra_args``: more ``tokenpolicy serve`` flags."""
    binary = binary_path()
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"tokenpolicy binary not found at {binary} (set TOKENPOLICY_BIN)")
    nginx = nginx_path()
    if not os.access(nginx, os.X_OK):
        raise RuntimeError(f"nginx not found at {nginx} (set NGINX)")

    out = subprocess.run([str(binary), "hash-password"], input=password.encode(),
                         capture_output=True, timeout=60, env=child_env())
    if out.returncode != 0:
        raise RuntimeError(f"hash-password: {out.stderr.decode(errors='replace')}")
    phc = out.stdout.decode().strip()
    users = workdir / "users"
    users.write_text(f"{username}:{phc}\n")
    p = POLICY
    policy = workdir / "policy.yaml"
    policy.write_text(
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: nginx-forward-auth}\n"
        f"spec: {{sessionExpirationTime: {p['session']}s, tokenExpirationTime: {p['token']}s, "
        f"expiredTokenRenewLimit: {p['renew']}s, refreshGracePeriod: {p['grace']}s, "
        "cookie: {secure: false}}\n")

    service_port, nginx_port = free_port(), free_port()
    if policy_yaml is not None:
        policy.write_text(policy_yaml(f"http://{HOST}:{nginx_port}"))
    service_log = workdir / "tokenpolicy.log"
    service = Proc("tokenpolicy", [
        str(binary), "serve",
        "--policy", str(policy),
        "--users", str(users),
        "--listen", f"{HOST}:{service_port}",
        # Behind the ingress (on loopback): the client address is the
        # X-Forwarded-For hop it appended.
        "--trusted-proxies", "127.0.0.0/8",
        # No --signin-url: with ingress-nginx, `auth-signin` does the
        # redirect; the auth answer must stay 200/401 (auth_request turns
        # anything else into a 500).
        *extra_args,
    ], service_log)
    echo = EchoUpstream().start()
    prefix = workdir / "nginx"
    prefix.mkdir()
    conf_text, real_escape = render_nginx_conf(prefix, nginx_port, service_port, echo.addr)
    conf = prefix / "nginx.conf"
    conf.write_text(conf_text)
    ngx = Proc("nginx", [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
               prefix / "nginx.out")

    stack = Stack(workdir=workdir, username=username, password=password, service=service,
                  service_port=service_port, service_log=service_log, nginx=ngx,
                  nginx_port=nginx_port, nginx_prefix=prefix, echo=echo,
                  real_set_escape_uri=real_escape)
    try:
        service.start()
        check = subprocess.run([nginx, "-t", "-q", "-p", str(prefix), "-c", str(conf),
                                "-e", str(prefix / "error.log")], capture_output=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {conf}:\n{check.stderr.decode(errors='replace')}")
        ngx.start()
        wait_http(f"{stack.service_url}/readyz", service, READY_TIMEOUT)
        wait_http(f"{stack.url}/healthz", ngx, READY_TIMEOUT, log=prefix / "error.log")
    except BaseException as e:
        report = stack.report()
        stop_stack(stack)
        raise RuntimeError(f"forward-auth stack did not start: {e}\n{report}") from e
    return stack


def stop_stack(stack: Stack) -> None:
    for step in (stack.nginx.stop, stack.service.stop, stack.echo.stop):
        try:
            step()
        except Exception:
            pass
