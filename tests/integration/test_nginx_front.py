"""The appliance's nginx front (image/extra/etc/nginx/conf.d/mailstead.conf) with
a real nginx in front of the real portal, all on loopback."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import time
import warnings

import pytest
import requests

from portal.web.token import WRONG_TOKEN
from tests.conftest import OS_PRETTY_NAME, csrf_token
from tests.integration.conftest import TIMEOUT, Front


def assert_no_version_leak(response: requests.Response) -> None:
    assert response.headers.get("Server") == "nginx", response.headers
    assert not re.search(r"nginx/\d", response.text)


def assert_security_headers(response: requests.Response) -> None:
    # Each header may come twice (the portal sets them too): every copy must say the same.
    for name, value in (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY")):
        got = response.raw.headers.getlist(name)
        assert got and all(v == value for v in got), f"{name}: {got}"


# -- port 80 ----------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "location_host"), [
    (None, "127.0.0.1"),  # requests sends "127.0.0.1:PORT": the port is dropped (443 is meant)
    ("mail.example.com", "mail.example.com"),
    ("Mail.Example.COM:8080", "mail.example.com"),
])
def test_http_redirects_to_https_keeping_host_path_and_query(
        front: Front, host: str | None, location_host: str) -> None:
    headers = {"Host": host} if host else {}
    with front.session() as s:
        r = s.get(f"{front.http_url}/anything/deeper?x=1&y=%20", headers=headers,
                  allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 301
    assert r.headers["Location"] == f"https://{location_host}/anything/deeper?x=1&y=%20"
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
