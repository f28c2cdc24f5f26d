"""One forward-auth stack per proxy, behind one interface, for the scenario
in test_forward_auth_proxies.py (and the browser test):

* ``nginx``: nginx configured as ingress-nginx configures itself
  (nginx_support.py, examples/forward-auth/ingress-nginx.conf.template);
* ``traefik``: Traefik built from the Go module proxy by
  tests/proxies/build.sh, forwardAuth from a file provider
  (examples/forward-auth/traefik-dynamic.yaml.template);
* ``caddy``: Caddy's ``forward_auth`` (examples/forward-auth/Caddyfile.template).

Each stack is one ``tokenpolicy serve`` (in-process store), the echo
upstream of nginx_support.py and the proxy, all on 127.0.0.1. The sign-in
redirect comes from ingress-nginx's ``auth-signin`` behind nginx, and from
the service's ``--signin-url`` behind Traefik and Caddy, which hand a failed
check's answer to the client as it is.

Environment:
    TRAEFIK  the traefik binary (default: what tests/proxies/build.sh prints,
             built if missing)
    CADDY    the caddy binary (default: Debian's, `caddy` on PATH)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from conftest import binary_path, free_port
from nginx_support import (
    HOST,
    POLICY,
    EchoUpstream,
    Proc,
    child_env,
    read_tail,
    size_of,
    start_stack as start_nginx_stack,
    stop_stack as stop_nginx_stack,
    wait_http,
)

HERE = Path(__file__).resolve().parent
PROXIES = HERE.parent / "proxies"
# The configurations the book shows (docs/src/forward-auth.md includes them).
EXAMPLES = HERE.parents[1] / "examples" / "forward-auth"
BUILD = PROXIES / "build.sh"

#: Every proxy the scenario runs behind.
ALL = ["nginx", "traefik", "caddy"]


@dataclass
class ProxyStack:
    name: str
    version: str
    url: str                 # the proxy, as clients see it
    service_url: str         # the token service, directly
    signin_url: str
    echo: EchoUpstream
    username: str
    password: str
    #: Whether the Set-Cookie of a successful check reaches the client. When
    #: it does not, the service runs with --no-renew-on-verify.
    renews_on_the_fly: bool
    config_file: Path
    log_files: dict[str, Path]
    _stop: Callable[[], None]
    _offsets: dict = field(default_factory=dict)

    def mark(self) -> None:
        self._offsets = {k: size_of(p) for k, p in self.log_files.items()}

    def report(self) -> str:
        parts = [f"----- {name} ({path}) since test start -----\n"
                 f"{read_tail(path, self._offsets.get(name, 0))}" for name, path in self.log_files.items()]
        parts.append(f"----- {self.name} configuration: {self.config_file} -----")
        return "\n".join(parts)

    def stop(self) -> None:
        self._stop()


def proxy_binary(name: str) -> str:
    """The binary of `name`: $TRAEFIK / $CADDY; else Debian's caddy, or the
    Traefik that tests/proxies/build.sh builds (or finds in its cache)."""
    env = os.environ.get(name.upper())
    if env:
        return env
    if name == "caddy":
        path = shutil.which("caddy") or "/usr/bin/caddy"
        if not os.access(path, os.X_OK):
            raise RuntimeError("caddy not found (apt-get install caddy, or set CADDY)")
        return path
    out = subprocess.run(["bash", str(BUILD), name], capture_output=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"tests/proxies/build.sh {name} failed:\n{out.stderr.decode(errors='replace')[-4000:]}")
    return out.stdout.decode().strip().splitlines()[-1]


def version_of(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, timeout=30)
    return (out.stdout or out.stderr).decode(errors="replace").strip()


def _users_and_policy(workdir: Path, username: str, password: str) -> tuple[Path, Path]:
    out = subprocess.run([str(binary_path()), "hash-password"], input=password.encode(),
                         capture_output=True, timeout=60, env=child_env())
    if out.returncode != 0:
        raise RuntimeError(f"hash-password: {out.stderr.decode(errors='replace')}")
    users = workdir / "users"
    users.write_text(f"{username}:{out.stdout.decode().strip()}\n")
    p = POLICY
    policy = workdir / "policy.yaml"
    policy.write_text(
        "apiVersion: auth.tokenpolicy.io/v1alpha1\n"
        "kind: TokenPolicy\n"
        "metadata: {name: proxy-forward-auth}\n"
        f"spec: {{sessionExpirationTime: {p['session']}s, tokenExpirationTime: {p['token']}s, "
        f"expiredTokenRenewLimit: {p['renew']}s, refreshGracePeriod: {p['grace']}s, "
        "cookie: {secure: false}}\n")
    return users, policy


def _fill(template: Path, subs: dict[str, str]) -> str:
    text = template.read_text()
    for k, v in subs.items():
        text = text.replace(k, v)
    assert "@@" not in text, f"unfilled placeholder in {template}: {text[text.index('@@') - 40:][:100]!r}"
    return text


def _start_nginx(workdir: Path, username: str, password: str) -> ProxyStack:
    st = start_nginx_stack(workdir, username=username, password=password)
    version = version_of([st.nginx.argv[0], "-v"]).replace("nginx version: ", "")
    return ProxyStack(
        name="nginx", version=version, url=st.url, service_url=st.service_url,
        signin_url=st.signin_url, echo=st.echo, username=username, password=password,
        renews_on_the_fly=True, config_file=st.nginx_prefix / "nginx.conf", log_files=st.logs(),
        _stop=lambda: stop_nginx_stack(st))


def _start_generic(name: str, workdir: Path, username: str, password: str,
                   renews_on_the_fly: bool) -> ProxyStack:
    """tokenpolicy serve + echo + Traefik or Caddy."""
    binary = proxy_binary(name)
    users, policy = _users_and_policy(workdir, username, password)
    service_port, proxy_port = free_port(), free_port()
    url = f"http://{HOST}:{proxy_port}"
    signin_url = f"{url}/v1/login"
    service_log = workdir / "tokenpolicy.log"
    argv = [
        str(binary_path()), "serve",
        "--policy", str(policy),
        "--users", str(users),
        "--listen", f"{HOST}:{service_port}",
        "--trusted-proxies", "127.0.0.0/8",
        # Traefik and Caddy set X-Forwarded-Host/-Proto/-Uri themselves
        # (replacing the client's): the original URL for `rd` comes from them.
        "--trust-forwarded-headers",
        # The proxy hands a failed check's answer to the client as it is: a
        # browser gets the service's own 302 to the sign-in page.
        "--signin-url", signin_url,
    ]
    if not renews_on_the_fly:
        # The proxy drops a successful check's Set-Cookie: a renewal there
        # would spend the token's one refresh where the client never sees it.
        argv.append("--no-renew-on-verify")
    service = Proc("tokenpolicy", argv, service_log)
    echo = EchoUpstream().start()
    subs = {
        "@@SERVICE_ADDR@@": f"{HOST}:{service_port}",
        "@@ECHO_ADDR@@": echo.addr,
    }
    env = child_env()
    if name == "traefik":
        conf = workdir / "traefik-dynamic.yaml"
        conf.write_text(_fill(EXAMPLES / "traefik-dynamic.yaml.template", subs))
        access_log = workdir / "traefik-access.log"
        proxy_argv = [
            binary,
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            f"--entryPoints.web.address={HOST}:{proxy_port}",
            f"--providers.file.filename={conf}",
            "--providers.file.watch=false",
            "--log.level=INFO",
            "--accessLog=true",
            f"--accessLog.filePath={access_log}",
        ]
        version = version_of([binary, "version"])
        version = next((l.split(":", 1)[1].strip() for l in version.splitlines()
                        if l.strip().startswith("Version:")), version)
    else:
        conf = workdir / "Caddyfile"
        access_log = workdir / "caddy-access.log"
        conf.write_text(_fill(EXAMPLES / "Caddyfile.template",
                              {**subs, "@@LISTEN_PORT@@": str(proxy_port), "@@ACCESS_LOG@@": str(access_log)}))
        proxy_argv = [binary, "run", "--config", str(conf), "--adapter", "caddyfile"]
        # Caddy keeps its state under $HOME/$XDG_*: keep it in the test's dir.
        env.update(HOME=str(workdir), XDG_CONFIG_HOME=str(workdir / "config"),
                   XDG_DATA_HOME=str(workdir / "data"))
        version = version_of([binary, "version"]).split()[0]
    proxy_log = workdir / f"{name}.log"
    proxy = Proc(name, proxy_argv, proxy_log, env=env)

    def stop() -> None:
        for step in (proxy.stop, service.stop, echo.stop):
            try:
                step()
            except Exception:
                pass

    stack = ProxyStack(
        name=name, version=version, url=url, service_url=f"http://{HOST}:{service_port}",
        signin_url=signin_url, echo=echo, username=username, password=password,
        renews_on_the_fly=renews_on_the_fly, config_file=conf,
        log_files={"tokenpolicy serve": service_log, name: proxy_log, f"{name} access log": access_log},
        _stop=stop)
    try:
        service.start()
        proxy.start()
        wait_http(f"{stack.service_url}/readyz", service)
        # Routes are loaded when the sign-in page answers through the proxy
        # and the application is guarded (401, not 404).
        wait_http(f"{url}/v1/login", proxy)
        wait_http(f"{url}/api/ready", proxy, status=401, headers={"Accept": "application/json"})
    except BaseException as e:
        report = stack.report()
        stop()
        raise RuntimeError(f"{name} forward-auth stack did not start: {e}\n{report}") from e
    return stack


def start_proxy_stack(name: str, workdir: Path, username: str = "carol",
                      password: str = "carol-password") -> ProxyStack:
    if name == "nginx":
        return _start_nginx(workdir, username, password)
    if name == "traefik":
        return _start_generic("traefik", workdir, username, password, renews_on_the_fly=True)
    if name == "caddy":
        return _start_generic("caddy", workdir, username, password, renews_on_the_fly=False)
    raise ValueError(f"unknown proxy {name!r}")
