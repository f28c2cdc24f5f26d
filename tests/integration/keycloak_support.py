"""A real Keycloak for the integration tests, and a scripted client of its login form.

Keycloak is installed by ``tests/keycloak/install.sh`` (Maven Central, cached
under /var/tmp by version) unless ``KEYCLOAK_HOME`` names an installed home.
It runs ONCE per pytest session (``keycloak`` fixture), on 127.0.0.1 only:

* HTTPS on a free port, with a server certificate for 127.0.0.1/localhost
  from a test CA made at start (``ca_file``); HTTP is disabled;
* ``kc.sh start --optimized`` (the build made at install: dev-file database,
  health endpoints on the main port), a fixed issuer
  ``https://127.0.0.1:<port>/realms/tokenpolicy``;
* the realm ``tests/keycloak/realm.json`` imported at start
  (``--import-realm``), with a client secret drawn at random for the run;
* the admin user bootstrapped from ``KC_BOOTSTRAP_ADMIN_USERNAME/PASSWORD``.

Each session runs from its own copy of the installed home (hard links for the
jars, own ``data/``), so two test runs never share a database.

Environment:
    KEYCLOAK_HOME        an installed Keycloak home (default: run install.sh)
    KEYCLOAK_START_MODE  ``optimized`` (default) or ``dev`` (``start-dev``)
    KEYCLOAK_READY_TIMEOUT  seconds to wait for readiness (default 240)
"""

from __future__ import annotations

import atexit
import datetime
import html.parser
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Optional

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[2]
INSTALL_SH = REPO / "tests" / "keycloak" / "install.sh"
REALM_FILE = REPO / "tests" / "keycloak" / "realm.json"
REALM = "tokenpolicy"
CLIENT_ID = "tokenpolicy"

#: The realm's users: name -> password (as in tests/keycloak/realm.json).
USERS = {"alice": "alice-password", "bob": "bob-password", "carol": "carol-password"}

HTTP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Test CA and server certificate
# --------------------------------------------------------------------------


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """Write ca.pem, server.pem (server + CA) and server-key.pem; return their paths.

    The server certificate names 127.0.0.1, ::1 and localhost, and is valid
    for one day.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenpolicy test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
                x509.DNSName("localhost"),
            ]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server-key.pem"
    ca_file.write_bytes(ca.public_bytes(pem))
    cert_file.write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    key_file.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


# --------------------------------------------------------------------------
# Install
# --------------------------------------------------------------------------


def install() -> tuple[Path, Path]:
    """Return (Keycloak home, JAVA_HOME), running install.sh unless KEYCLOAK_HOME is set."""
    env_home = os.environ.get("KEYCLOAK_HOME")
    if env_home:
        home = Path(env_home)
        if not (home / "bin" / "kc.sh").is_file():
            raise RuntimeError(f"KEYCLOAK_HOME={env_home} has no bin/kc.sh")
    else:
        done = subprocess.run(
            ["bash", str(INSTALL_SH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tests/keycloak/install.sh failed:\n{done.stderr[-4000:]}")
        home = Path(done.stdout.strip().splitlines()[-1])
    java_file = home / ".java_home"
    java_home = Path(java_file.read_text().strip()) if java_file.is_file() else None
    if java_home is None or not (java_home / "bin" / "java").is_file():
        env_java = os.environ.get("JAVA_HOME")
        if not env_java:
            raise RuntimeError(f"no Java for Keycloak: {java_file} is missing and JAVA_HOME is unset")
        java_home = Path(env_java)
    return home, java_home


# --------------------------------------------------------------------------
# The running Keycloak
# --------------------------------------------------------------------------


class Keycloak:
    """One Keycloak process on 127.0.0.1, its realm, and admin helpers."""

    def __init__(self, home: Path, java_home: Path, workdir: Path, mode: Optional[str] = None):
        self.source_home = home
        self.java_home = java_home
        self.workdir = workdir
        self.mode = mode or os.environ.get("KEYCLOAK_START_MODE", "optimized")
        if self.mode not in ("optimized", "dev"):
            raise ValueError(f"KEYCLOAK_START_MODE must be optimized or dev, not {self.mode!r}")
        self.port = free_port()
        self.management_port = free_port()
        self.base_url = f"https://127.0.0.1:{self.port}"
        self.issuer = f"{self.base_url}/realms/{REALM}"
        self.client_id = CLIENT_ID
        self.client_secret = secrets.token_urlsafe(32)
        self.admin_username = "admin"
        self.admin_password = secrets.token_urlsafe(24)
        self.users = dict(USERS)
        self.log_path = workdir / "keycloak.log"
        self.proc: Optional[subprocess.Popen] = None
        self.start_seconds: list[float] = []
        self.ca_file, self.cert_file, self.key_file = make_test_ca(workdir)
        self.home = workdir / "keycloak"
        self._prepare_home()
        self.http = requests.Session()
        # Only the test CA; and no REQUESTS_CA_BUNDLE or proxy from the
        # environment, which would take precedence over `verify`.
        self.http.trust_env = False
        self.http.verify = str(self.ca_file)

    # -- process ------------------------------------------------------------

    def _prepare_home(self) -> None:
        if self.mode == "optimized":
            # `start --optimized` writes nothing under lib/: hard links are
            # enough, and take no time or space.
            subprocess.run(["cp", "-al", str(self.source_home), str(self.home)], check=True)
        else:
            # start-dev rebuilds into lib/quarkus: a real copy.
            subprocess.run(["cp", "-a", str(self.source_home), str(self.home)], check=True)
        for stale in ("data",):
            shutil.rmtree(self.home / stale, ignore_errors=True)
        imports = self.home / "data" / "import"
        imports.mkdir(parents=True)
        realm = json.loads(REALM_FILE.read_text())
        for client in realm["clients"]:
            if client["clientId"] == CLIENT_ID:
                client["secret"] = self.client_secret
        path = imports / "tokenpolicy-realm.json"
        path.write_text(json.dumps(realm))
        path.chmod(0o600)

    def command(self) -> list[str]:
        kc = str(self.home / "bin" / "kc.sh")
        common = [
            f"--hostname={self.base_url}",
            "--http-enabled=false",
            "--http-host=127.0.0.1",
            f"--https-port={self.port}",
            f"--https-certificate-file={self.cert_file}",
            f"--https-certificate-key-file={self.key_file}",
            f"--http-management-port={self.management_port}",
            "--http-management-host=127.0.0.1",
            f"--truststore-paths={self.ca_file}",
            "--cache=local",
            "--import-realm",
        ]
        if self.mode == "optimized":
            return [kc, "start", "--optimized", *common]
        return [kc, "start-dev", "--health-enabled=true",
                "--http-management-health-enabled=false", *common]

    def start(self, timeout: Optional[float] = None) -> float:
        """Start Keycloak and wait until the realm's discovery answers; return the seconds taken."""
        if self.proc is not None and self.proc.poll() is None:
            return 0.0
        timeout = timeout or float(os.environ.get("KEYCLOAK_READY_TIMEOUT", "240"))
        env = dict(os.environ)
        env.update({
            "JAVA_HOME": str(self.java_home),
            "KC_BOOTSTRAP_ADMIN_USERNAME": self.admin_username,
            "KC_BOOTSTRAP_ADMIN_PASSWORD": self.admin_password,
        })
        for leak in ("KC_DB", "KC_HOSTNAME", "KC_HTTP_PORT", "KC_HTTPS_PORT"):
            env.pop(leak, None)
        log = open(self.log_path, "ab")
        began = time.monotonic()
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=self.workdir, start_new_session=True,
        )
        log.close()
        _RUNNING.add(self)
        deadline = began + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Keycloak exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Keycloak not ready after {timeout:.0f} s:\n{self.log_tail()}")
            try:
                ready = self.http.get(f"{self.base_url}/health/ready", timeout=5)
                if ready.status_code == 200:
                    disc = self.http.get(self.discovery_url, timeout=5)
                    if disc.status_code == 200 and disc.json().get("issuer") == self.issuer:
                        break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.5)
        took = time.monotonic() - began
        self.start_seconds.append(took)
        self._admin_token = None
        return took

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Keycloak (SIGTERM to its process group, then SIGKILL)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.proc = None
        _RUNNING.discard(self)

    def rss_kib(self) -> Optional[int]:
        """Resident memory of Keycloak's JVM (the process group's largest member), in KiB."""
        if self.proc is None:
            return None
        best = None
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
                pid = int(status.parent.name)
                if os.getpgid(pid) != self.proc.pid:
                    continue
            except (OSError, ValueError):
                continue
            for line in text.splitlines():
                if line.startswith("VmRSS:"):
                    kib = int(line.split()[1])
                    best = kib if best is None or kib > best else best
        return best

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- endpoints ----------------------------------------------------------

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def discovery(self) -> dict:
        r = self.http.get(self.discovery_url, timeout=HTTP_TIMEOUT)
        r.raise_for_status()
        return r.json()

    # -- admin REST API -----------------------------------------------------

    _admin_token: Optional[str] = None

    def admin_token(self) -> str:
        """An access token of the bootstrapped admin (master realm, admin-cli)."""
        r = self.http.post(
            f"{self.base_url}/realms/master/protocol/openid-connect/token",
            data={"grant_type": "password", "client_id": "admin-cli",
                  "username": self.admin_username, "password": self.admin_password},
            timeout=HTTP_TIMEOUT,
        )
        if r.status_code != 200:
            raise RuntimeError(f"admin token: {r.status_code} {r.text[:300]}")
        return r.json()["access_token"]

    def _admin(self, method: str, path: str, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.admin_token()}"}
        r = self.http.request(method, f"{self.base_url}/admin/realms/{REALM}{path}",
                              headers=headers, timeout=HTTP_TIMEOUT, **kw)
        if r.status_code >= 300:
            raise RuntimeError(f"admin {method} {path}: {r.status_code} {r.text[:300]}")
        return r

    def _client(self) -> dict:
        found = self._admin("GET", "/clients", params={"clientId": CLIENT_ID}).json()
        if len(found) != 1:
            raise RuntimeError(f"client {CLIENT_ID}: {len(found)} found")
        return found[0]

    def _update_client(self, change) -> None:
        client = self._client()
        change(client)
        self._admin("PUT", f"/clients/{client['id']}", json=client)

    def set_client_redirects(self, uris: list[str]) -> None:
        """Replace the client's valid redirect URIs."""
        self._update_client(lambda c: c.__setitem__("redirectUris", list(uris)))

    def set_backchannel_logout_url(self, url: str) -> None:
        """Set the URL Keycloak POSTs a logout_token to when a user's session ends."""
        self._update_client(lambda c: c.setdefault("attributes", {}).__setitem__(
            "backchannel.logout.url", url))

    def create_user(self, name: str, password: str, email: Optional[str] = None) -> str:
        """A new enabled user of the realm with a password (and a verified
        email); answers its id. The realm's own users stay untouched."""
        rep = {"username": name, "enabled": True, "firstName": name.title(), "lastName": "Test",
               "credentials": [{"type": "password", "value": password, "temporary": False}]}
        if email:
            rep.update({"email": email, "emailVerified": True})
        self._admin("POST", "/users", json=rep)
        self.users[name] = password
        return self.user_id(name)

    def user_id(self, name: str) -> str:
        found = self._admin("GET", "/users", params={"username": name, "exact": "true"}).json()
        if len(found) != 1:
            raise RuntimeError(f"user {name}: {len(found)} found")
        return found[0]["id"]

    def _set_enabled(self, name: str, enabled: bool) -> None:
        self._admin("PUT", f"/users/{self.user_id(name)}", json={"enabled": enabled})

    def disable_user(self, name: str) -> None:
        self._set_enabled(name, False)

    def enable_user(self, name: str) -> None:
        self._set_enabled(name, True)

    def logout_user(self, name: str) -> None:
        """Sign the user out of every session (sends back-channel logout to each client)."""
        self._admin("POST", f"/users/{self.user_id(name)}/logout")

    def user_sessions(self, name: str) -> list[dict]:
        return self._admin("GET", f"/users/{self.user_id(name)}/sessions").json()


_RUNNING: set = set()


@atexit.register
def _stop_all() -> None:
    for kc in list(_RUNNING):
        try:
            kc.stop(timeout=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


_SESSION_INSTANCE: Optional[Keycloak] = None


def session_keycloak() -> Keycloak:
    """The one Keycloak of this test session, started on first use."""
    global _SESSION_INSTANCE
    if _SESSION_INSTANCE is None:
        home, java_home = install()
        workdir = Path(tempfile.mkdtemp(prefix="tokenpolicy-keycloak-"))
        kc = Keycloak(home, java_home, workdir)
        try:
            kc.start()
        except Exception:
            kc.stop()
            raise
        _SESSION_INSTANCE = kc
    kc = _SESSION_INSTANCE
    if kc.proc is None:
        kc.start()  # a test stopped it and failed before starting it again
    return kc


@pytest.fixture(scope="session")
def keycloak():
    """The session's Keycloak (see module docstring); stopped at the end of the session.

    Import it into a test module (``from keycloak_support import keycloak``):
    every module gets the same process.
    """
    kc = session_keycloak()
    yield kc
    kc.stop()
    shutil.rmtree(kc.workdir, ignore_errors=True)


# --------------------------------------------------------------------------
# Keycloak's login form, scripted
# --------------------------------------------------------------------------


class _FormParser(html.parser.HTMLParser):
    """Collects the <form id="kc-form-login">: its action and its inputs."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.action: Optional[str] = None
        self.fields: dict[str, str] = {}
        self.in_form = False
        self.found = False
        self.errors: list[str] = []
        self._error_depth = 0

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        if tag == "form" and a.get("id") == "kc-form-login" and not self.found:
            self.found = True
            self.in_form = True
            self.action = a.get("action")
        elif tag == "input" and self.in_form and a.get("name"):
            if a.get("type", "text") in ("checkbox", "radio") and "checked" not in a:
                return
            self.fields[a["name"]] = a.get("value", "")
        if tag == "span" and ("input-error" in a.get("id", "") or "kc-feedback-text" in a.get("class", "")):
            self._error_depth = 1

    def handle_endtag(self, tag):
        if tag == "form" and self.in_form:
            self.in_form = False
        if tag == "span" and self._error_depth:
            self._error_depth = 0

    def handle_data(self, data):
        if self._error_depth and data.strip():
            self.errors.append(data.strip())


class LoginFormMissing(AssertionError):
    """The page has no Keycloak login form."""


def _is_keycloak_url(url: str) -> bool:
    return urllib.parse.urlsplit(url).path.startswith("/realms/")


def _redirect(resp: requests.Response) -> bool:
    return resp.status_code in (301, 302, 303, 307, 308) and "Location" in resp.headers


def login_through_keycloak(http_session: requests.Session, authorize_url: str, username: str,
                           password: str, timeout: float = HTTP_TIMEOUT) -> requests.Response:
    """Sign in through Keycloak's own login form; return the answer that redirects to the callback.

    ``authorize_url`` is Keycloak's authorization endpoint with its query, or
    a URL that redirects there (``/v1/oidc/login``). Redirects are followed
    only while they lead to Keycloak (``/realms/...``); the first redirect
    anywhere else (the callback) is returned without being followed, so a
    test can replay it or change it. When Keycloak already has a session
    for this cookie jar that redirect comes with no form at all.

    On a refused sign-in (wrong password, disabled user) Keycloak answers
    200 with its form again: that page is returned as it is, with
    ``resp.keycloak_errors`` holding the messages it shows.
    """
    # `verify` passed on each request: REQUESTS_CA_BUNDLE in the environment
    # would otherwise replace the session's CA.
    kw = {"allow_redirects": False, "timeout": timeout, "verify": http_session.verify}
    resp = http_session.get(authorize_url, **kw)
    hops = 0
    while _redirect(resp):
        nxt = urllib.parse.urljoin(resp.url, resp.headers["Location"])
        if not _is_keycloak_url(nxt) or hops >= 10:
            return resp  # the callback (Keycloak had a session), or somewhere else
        resp = http_session.get(nxt, **kw)
        hops += 1
    parser = _FormParser()
    parser.feed(resp.text)
    if not parser.found or not parser.action:
        raise LoginFormMissing(
            f"no kc-form-login at {resp.url} ({resp.status_code}): {resp.text[:500]}")
    action = urllib.parse.urljoin(resp.url, parser.action)
    if not _is_keycloak_url(action):
        raise LoginFormMissing(f"the login form posts off Keycloak: {action}")
    fields = dict(parser.fields)
    fields["username"] = username
    fields["password"] = password
    resp = http_session.post(action, data=fields, **kw)
    hops = 0
    # Keycloak may pass through its own pages (a required action) before
    # the callback: follow only those.
    while _redirect(resp) and hops < 10:
        nxt = urllib.parse.urljoin(resp.url, resp.headers["Location"])
        if not _is_keycloak_url(nxt):
            return resp
        resp = http_session.get(nxt, **kw)
        hops += 1
    after = _FormParser()
    after.feed(resp.text)
    resp.keycloak_errors = after.errors
    return resp
