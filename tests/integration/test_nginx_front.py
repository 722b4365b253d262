"""The appliance's nginx front (image/extra/etc/nginx/conf.d/mailstead.conf) with
a real nginx in front of the real portal, all on loopback."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from portal.agent.registry import Context
from portal.certs.privileged import reloader
from portal.certs.store import install
from portal.web.token import WRONG_TOKEN
from portal.stack.settings import StackSettings
from portal.stack.web import HSTS_MAX_AGE, NGINX_CONF_NAME, REDIRECT_NAME, WEB_SOCK, write_web_files
from tests.conftest import OS_PRETTY_NAME, csrf_token, free_port, retry, stop_process
from tests.integration.conftest import (NGINX, SHIPPED_CONF, TIMEOUT, Front, localize_nginx_conf,
                                        localize_stack_conf, start_nginx)
from tests.unit.test_certs_support import CA


def assert_no_version_leak(response: requests.Response) -> None:
    assert response.headers.get("Server") == "nginx", response.headers
    assert not re.search(r"nginx/\d", response.text)


def assert_security_headers(response: requests.Response) -> None:
    # Each header may come twice (the portal sets them too): every copy must say the same.
    for name, value in (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY")):
        got = response.raw.headers.getlist(name)
        assert got and all(v == value for v in got), f"{name}: {got}"


# -- port 80 ----------------------------------------------------------------------------

@pytest.mark.parametrize("host", [
    None,  # requests sends "127.0.0.1:PORT"
    "mail.example.com",
    "Mail.Example.COM:8080",
    "evil.example",  # a forged Host must not choose where the browser goes
])
def test_http_redirects_to_https_at_the_address_asked_before_setup(front: Front, host: str | None) -> None:
    """Before the stack is deployed the mail host is not known: the redirect goes to
    the address the request came in on (the port dropped: 443 is meant), keeping
    path and query, whatever the Host header says."""
    headers = {"Host": host} if host else {}
    with front.session() as s:
        r = s.get(f"{front.http_url}/anything/deeper?x=1&y=%20", headers=headers,
                  allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 301
    assert r.headers["Location"] == "https://127.0.0.1/anything/deeper?x=1&y=%20"
    assert_no_version_leak(r)


def test_acme_challenge_is_served_over_http(front: Front) -> None:
    token = "Xk3_9-pQ7vTzLmN0aBcDeFgHiJkLmNoPqRsTuVwXyZ1"
    body = f"{token}.thumbprint-of-the-account-key"
    (front.acme_dir / token).write_text(body)
    with front.session() as s:
        r = s.get(f"{front.http_url}/.well-known/acme-challenge/{token}",
                  allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].split(";")[0] == "text/plain"
    assert r.text == body


def test_missing_acme_token_is_404_not_redirect_nor_portal(front: Front) -> None:
    with front.session() as s:
        r = s.get(f"{front.http_url}/.well-known/acme-challenge/no-such-token",
                  allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 404
    assert "Location" not in r.headers
    assert "Page not found" not in r.text  # the portal's 404 page: nginx must answer itself
    assert_no_version_leak(r)


# -- TLS ----------------------------------------------------------------------------------

def handshake(front: Front, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", front.https_port), timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def test_presents_the_bootstrap_certificate(front: Front) -> None:
    ctx = ssl.create_default_context(cafile=str(front.cert))
    with handshake(front, ctx) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    digest = hashlib.sha256(der).hexdigest().upper()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    assert fingerprint == (front.state_dir / "tls" / "bootstrap.sha256").read_text().strip()


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_modern_tls_is_accepted(front: Front, version: str) -> None:
    ctx = ssl.create_default_context(cafile=str(front.cert))
    ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version.replace(".", "_"))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with handshake(front, ctx) as tls:
        assert tls.version() == version
        assert tls.selected_alpn_protocol() == "h2"  # `http2 on;`


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_tls_is_refused_by_the_server(front: Front, version: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "ssl.TLSVersion.TLSv1 is deprecated"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # Level 0, so that this client does offer TLS 1.0/1.1 and the refusal is the server's.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
    with pytest.raises(ssl.SSLError) as refused:
        handshake(front, ctx).close()
    # The server's protocol_version alert, not "no protocols available" from this client.
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value) or "UNSUPPORTED_PROTOCOL" in str(refused.value), \
        refused.value


# -- the portal behind it -----------------------------------------------------------------

def test_token_gate_through_nginx(front: Front) -> None:
    with front.session() as s:
        page = s.get(f"{front.https_url}/", timeout=TIMEOUT)
        assert page.url == f"{front.https_url}/setup/token", "a new visitor goes to the token gate"
        assert page.status_code == 200
        assert_security_headers(page)
        assert_no_version_leak(page)
        # Flask-WTF wants a same-origin Referer on HTTPS: that needs X-Forwarded-Proto and
        # the Host header with its port (this front is not on 443).
        referer = {"Referer": f"{front.https_url}/setup/token"}
        form = {"csrf_token": csrf_token(page.text)}

        wrong = s.post(f"{front.https_url}/setup/token", data={**form, "token": "not-the-token"},
                       headers=referer, allow_redirects=False, timeout=TIMEOUT)
        assert wrong.status_code == 403, wrong.text
        assert WRONG_TOKEN.split("(")[0].strip() in wrong.text
        assert_security_headers(wrong)

        right = s.post(f"{front.https_url}/setup/token", data={**form, "token": front.token},
                       headers=referer, allow_redirects=False, timeout=TIMEOUT)
        assert right.status_code == 302, right.text
        assert right.headers["Location"] in ("/", f"{front.https_url}/")

        wizard = s.get(f"{front.https_url}/", timeout=TIMEOUT)
        assert wizard.url == f"{front.https_url}/setup/domain"
        assert OS_PRETTY_NAME in wizard.text  # from the agent, behind the portal


def test_csrf_referer_must_match_the_host_and_port(front: Front) -> None:
    with front.session() as s:
        page = s.get(f"{front.https_url}/setup/token", timeout=TIMEOUT)
        other_port = f"https://127.0.0.1:{front.https_port + 1}/setup/token"
        r = s.post(f"{front.https_url}/setup/token",
                   data={"csrf_token": csrf_token(page.text), "token": front.token},
                   headers={"Referer": other_port}, allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert "referrer does not match" in r.text


def test_client_cannot_spoof_its_address_past_the_rate_limit(front: Front) -> None:
    """nginx replaces X-Forwarded-For, so the token gate's limit (5 per minute per
    address) holds even for a client that sends a new address every time."""
    front.portal.stop()  # fresh limiter counters, before and after
    front.portal.start()
    try:
        with front.session() as s:
            page = s.get(f"{front.https_url}/setup/token", timeout=TIMEOUT)
            form = {"csrf_token": csrf_token(page.text), "token": "wrong"}
            codes = [s.post(f"{front.https_url}/setup/token", data=form, timeout=TIMEOUT,
                            headers={"Referer": page.url, "X-Forwarded-For": f"203.0.113.{i}"},
                            allow_redirects=False).status_code
                     for i in range(6)]
        assert codes == [403] * 5 + [429]
    finally:
        front.portal.stop()
        front.portal.start()


def test_portal_down_is_a_quick_502(front: Front) -> None:
    front.portal.stop()
    try:
        with front.session() as s:
            started = time.monotonic()
            r = s.get(f"{front.https_url}/setup/token", timeout=TIMEOUT)
            assert r.status_code == 502
            assert time.monotonic() - started < 3
            assert_security_headers(r)
            assert_no_version_leak(r)
    finally:
        front.portal.start()
    with front.session() as s:
        assert s.get(f"{front.https_url}/healthz", timeout=TIMEOUT).status_code == 200


# -- after the stack's deploy: the agent's includes (portal/stack/web.py) ---------------------

MAIL_HOST, DOMAIN = "mail.example.test", "example.test"


@dataclass
class StackFront:
    """The shipped mailstead.conf plus the include and redirect file the agent writes
    on deploy (write_web_files), each localized to loopback, on a nginx of its own,
    proxying to the `front` fixture's real portal."""

    front: Front
    settings: StackSettings
    ctx: Context
    ngx: Path
    http_port: int
    https_port: int
    proc: subprocess.Popen[bytes] | None = None

    def localize(self) -> None:
        """The agent's include, as it wrote it into ctx.nginx_dir, on this nginx's port."""
        conf = (self.ctx.nginx_dir / NGINX_CONF_NAME).read_text()
        conf = conf.replace(f"unix:{WEB_SOCK}", f"unix:{self.front.portal.sock}")
        (self.ngx / "stack.conf").write_text(localize_stack_conf(conf, self.https_port))

    def reload(self) -> None:
        """As `nginx -s reload` (SIGHUP to the master), after `nginx -t`."""
        self.localize()
        test = subprocess.run([NGINX, "-t", "-p", str(self.ngx), "-c", str(self.ngx / "nginx.conf")],
                              capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, test.stderr
        assert self.proc is not None
        old_workers = self.workers()
        self.proc.send_signal(signal.SIGHUP)
        # Old workers keep accepting on the shared sockets until they see the
        # master's shutdown order, so a request right after the SIGHUP can still
        # meet the old configuration: wait until they are gone.
        retry(lambda: self._gone(old_workers), 15, "nginx's old workers to exit after the reload")

    def workers(self) -> set[int]:
        """The master's worker processes, from /proc."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return {int(pid) for pid in children.split()}

    def _gone(self, pids: set[int]) -> None:
        left = pids & self.workers()
        assert not left, f"old workers still running: {sorted(left)}"


def https_get(port: int, host: str, path: str, method: str = "GET") -> tuple[int, Any, bytes]:
    """(status, headers, the certificate presented): a request to 127.0.0.1 that names
    `host` both in SNI (which picks the certificate) and in Host (which picks the server)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # which certificate it is is checked by the caller
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            length = "Content-Length: 0\r\n" if method == "POST" else ""
            tls.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{length}Connection: close\r\n\r\n".encode())
            response = http.client.HTTPResponse(tls)
            response.begin()
            response.read()
            return response.status, response.headers, der


# Every kind of answer the agent's servers give: the portal, DAV (radicale is not
# running here: a 502), redirects, the static files and their 404s.
STACK_ANSWERS = [
    (MAIL_HOST, "GET", "/"), (MAIL_HOST, "GET", "/setup/token"), (MAIL_HOST, "GET", "/.well-known/caldav"),
    (MAIL_HOST, "GET", "/dav/"), (MAIL_HOST, "GET", "/mail/config-v1.1.xml"),
    (MAIL_HOST, "POST", "/autodiscover/autodiscover.xml"),
    (f"mta-sts.{DOMAIN}", "GET", "/.well-known/mta-sts.txt"), (f"mta-sts.{DOMAIN}", "GET", "/other"),
    (f"autoconfig.{DOMAIN}", "GET", "/mail/config-v1.1.xml"), (f"autoconfig.{DOMAIN}", "GET", "/other"),
]


@pytest.fixture(scope="module")
def stack_front(front: Front, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackFront]:
    root = tmp_path_factory.mktemp("stack-front")
    state, ngx, acme = root / "state", root / "nginx", root / "acme"
    (state / "tls").mkdir(parents=True)
    ngx.mkdir()
    acme.mkdir()
    for name in ("bootstrap.crt", "bootstrap.key", "bootstrap.sha256"):
        shutil.copy(front.state_dir / "tls" / name, state / "tls" / name)
    settings = StackSettings(domain=DOMAIN, hostname=MAIL_HOST, state_dir=state)

    def no_docker() -> Any:
        raise OSError("no docker engine in this test")

    ctx = Context(docker=no_docker, state_dir=state, nginx_dir=ngx / "conf.d", www_dir=root / "www",
                  acme_dir=acme, reload_nginx=False)
    write_web_files(settings, ctx.nginx_dir, ctx.www_dir)  # as stack_deploy does (publish_web)
    assert (ctx.nginx_dir / REDIRECT_NAME).exists()

    http_port, https_port = free_port(), free_port()
    shipped = ngx / "mailstead.conf"
    shipped.write_text(localize_nginx_conf(SHIPPED_CONF.read_text(), http_port=http_port, https_port=https_port,
                                           tls_dir=state / "tls", acme_dir=acme, web_sock=front.portal.sock,
                                           nginx_dir=ctx.nginx_dir, stack_conf=ngx / "stack.conf"))
    site = ngx / "site.conf"
    site.write_text(f"include {shipped};\n")
    env = StackFront(front, settings, ctx, ngx, http_port, https_port)
    env.localize()
    env.proc = proc = start_nginx(ngx, site, ngx / "stack.conf")
    try:
        def listening() -> None:
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {(ngx / 'error.log').read_text(errors='replace')}")
            for port in (http_port, https_port):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()

        retry(listening, 15, "nginx on its loopback ports")
        yield env
    finally:
        stop_process(proc)
        if (ngx / "error.log").exists():
            print(f"--- {ngx / 'error.log'}:\n{(ngx / 'error.log').read_text(errors='replace')[-3000:]}")


@pytest.mark.parametrize("host", [None, MAIL_HOST, f"mta-sts.{DOMAIN}", "evil.example", "Evil.Example:8080",
                                  "127.0.0.1"])
def test_http_redirects_to_the_mail_host_once_deployed(stack_front: StackFront, host: str | None) -> None:
    headers = {"Host": host} if host else {}
    with stack_front.front.session() as s:
        r = s.get(f"http://127.0.0.1:{stack_front.http_port}/anything/deeper?x=1&y=%20", headers=headers,
                  allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 301
    assert r.headers["Location"] == f"https://{MAIL_HOST}/anything/deeper?x=1&y=%20"
    assert_no_version_leak(r)


def test_acme_challenge_is_still_served_over_http_once_deployed(stack_front: StackFront) -> None:
    token = "Zz9-pQ7vTzLmN0aBcDeFgHiJkLmNoPqRsTuVwXyZ1_Xk3"
    (stack_front.ctx.acme_dir / token).write_text(f"{token}.thumbprint")
    with stack_front.front.session() as s:
        r = s.get(f"http://127.0.0.1:{stack_front.http_port}/.well-known/acme-challenge/{token}",
                  headers={"Host": MAIL_HOST}, allow_redirects=False, timeout=TIMEOUT)
    assert (r.status_code, r.text) == (200, f"{token}.thumbprint")


def test_hsts_follows_the_certificate(stack_front: StackFront) -> None:
    """No Strict-Transport-Security while the self-signed bootstrap certificate is
    served (it would lock the owner out of the portal); on every answer once a CA's
    certificate is installed, which the agent's reloader (what certificate
    installation and renewal run) writes into the include; never on the default
    server, which keeps the bootstrap certificate for the portal by address."""
    front, port = stack_front.front, stack_front.https_port
    bootstrap = (front.state_dir / "tls" / "bootstrap.crt").read_bytes()
    bootstrap_der = x509.load_pem_x509_certificate(bootstrap).public_bytes(serialization.Encoding.DER)

    for host, method, path in [*STACK_ANSWERS, ("127.0.0.1", "GET", "/setup/token")]:
        status, headers, der = https_get(port, host, path, method)
        assert der == bootstrap_der, (host, path)
        assert "Strict-Transport-Security" not in headers, (host, method, path, status)

    ca = CA("Mailstead Test CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    chain, key = ca.leaf(names=(MAIL_HOST, f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"),
                         start=now - datetime.timedelta(hours=1))
    install(stack_front.settings.tls_dir, chain, key, [MAIL_HOST], now=now)
    results = reloader(stack_front.ctx, stack_front.settings)()
    assert results["nginx"] == "skipped: reloads are off", results  # this test reloads its own nginx
    stack_front.reload()

    def ca_served() -> None:
        der = https_get(port, MAIL_HOST, "/")[2]
        assert x509.load_der_x509_certificate(der).issuer == ca.name, "nginx still serves the bootstrap certificate"
    retry(ca_served, 15, "nginx to serve the CA's certificate after its reload")

    for host, method, path in STACK_ANSWERS:
        status, headers, der = https_get(port, host, path, method)
        assert x509.load_der_x509_certificate(der).issuer == ca.name, (host, path)
        assert headers.get_all("Strict-Transport-Security") == [f"max-age={HSTS_MAX_AGE}"], \
            (host, method, path, status, headers.items())
    status, headers, der = https_get(port, "127.0.0.1", "/setup/token")
    assert der == bootstrap_der
    assert "Strict-Transport-Security" not in headers, (status, headers.items())
