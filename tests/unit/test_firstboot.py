"""mailstead-firstboot: token, bootstrap certificate, console message."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from portal.agent import firstboot
from portal.agent.firstboot import Paths
from tests.conftest import REPO

HOSTNAME = "mailstead-test"
IP_JSON = json.dumps([
    {"ifname": "lo", "addr_info": [
        {"family": "inet", "local": "127.0.0.1", "scope": "host"},
        {"family": "inet6", "local": "::1", "scope": "host"}]},
    {"ifname": "eth0", "addr_info": [
        {"family": "inet", "local": "192.0.2.10", "scope": "global"},
        {"family": "inet6", "local": "2001:db8::10", "scope": "global"},
        {"family": "inet6", "local": "fe80::1", "scope": "link"}]},
    {"ifname": "eth1", "addr_info": []},
])
FP_RE = re.compile(r"^([0-9A-F]{2}:){31}[0-9A-F]{2}$")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    state = tmp_path / "state"
    return Paths(state_dir=state, db_path=state / "state.db",
                 issue_path=tmp_path / "etc" / "issue.d" / "50-mailstead.issue", group="mailstead")


@pytest.fixture
def text(paths: Paths) -> str:
    return firstboot.run(paths, hostname=HOSTNAME, ip_json=IP_JSON)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def load_cert(paths: Paths) -> x509.Certificate:
    return x509.load_pem_x509_certificate(paths.cert.read_bytes())


def test_token_is_long_and_urlsafe(paths: Paths, text: str) -> None:
    token = paths.token.read_text().strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) >= 16  # >= 128 bits
    assert len(token) >= 43  # token_urlsafe(32): 256 bits


def test_file_modes(paths: Paths, text: str) -> None:
    assert mode(paths.token) == 0o400
    assert mode(paths.key) == 0o600
    assert mode(paths.cert) == 0o644
    assert mode(paths.fingerprint) == 0o644
    assert mode(paths.issue_path) == 0o600


def test_certificate(paths: Paths, text: str) -> None:
    cert = load_cert(paths)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == HOSTNAME
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [HOSTNAME]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "192.0.2.10", "2001:db8::10", "fe80::1")}
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(days=firstboot.CERT_DAYS + 1)
    assert cert.not_valid_before_utc < dt.datetime.now(dt.timezone.utc) < cert.not_valid_after_utc
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_fingerprint_file_matches_the_certificate(paths: Paths, text: str) -> None:
    der = load_cert(paths).public_bytes(serialization.Encoding.DER)
    expected = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert paths.fingerprint.read_text() == expected + "\n"
    assert FP_RE.match(expected)


def test_console_message(paths: Paths, text: str) -> None:
    token = paths.token.read_text().strip()
    fp = paths.fingerprint.read_text().strip()
    lines = text.splitlines()
    assert "Mailstead setup portal: https://192.0.2.10/" in lines
    assert "Mailstead setup portal: https://[2001:db8::10]/" in lines
    assert f"Mailstead setup portal: https://{HOSTNAME}/" in lines
    assert f"Setup token: {token}" in lines
    assert f"Certificate SHA-256 fingerprint: {fp}" in lines
    assert not any("127.0.0.1" in line or "[::1]" in line or "fe80" in line for line in lines)
    assert paths.issue_path.read_text() == text


def test_second_run_changes_nothing(paths: Paths, text: str) -> None:
    files = [paths.token, paths.cert, paths.key, paths.fingerprint, paths.issue_path]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    again = firstboot.run(paths, hostname=HOSTNAME, ip_json=IP_JSON)
    assert again == text
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files} == before
    assert sorted(p.name for p in paths.state_dir.iterdir()) == ["setup-token", "tls"]
    assert sorted(p.name for p in paths.tls_dir.iterdir()) == ["bootstrap.crt", "bootstrap.key", "bootstrap.sha256"]


def test_new_address_updates_the_message_but_not_the_cert(paths: Paths, text: str) -> None:
    cert = paths.cert.read_bytes()
    moved = IP_JSON.replace("192.0.2.10", "192.0.2.77")
    again = firstboot.run(paths, hostname=HOSTNAME, ip_json=moved)
    assert "Mailstead setup portal: https://192.0.2.77/" in again.splitlines()
    assert paths.cert.read_bytes() == cert


def test_missing_key_regenerates_the_pair(paths: Paths, text: str) -> None:
    old_fp = paths.fingerprint.read_text()
    token = paths.token.read_bytes()
    paths.key.unlink()
    firstboot.run(paths, hostname=HOSTNAME, ip_json=IP_JSON)
    assert paths.fingerprint.read_text() != old_fp
    assert paths.token.read_bytes() == token


def test_after_setup_no_token_is_shown(paths: Paths, text: str) -> None:
    with sqlite3.connect(paths.db_path) as conn:
        conn.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO settings VALUES ('setup_complete', '1')")
    conn.close()
    token = paths.token.read_text().strip()
    done = firstboot.run(paths, hostname=HOSTNAME, ip_json=IP_JSON)
    assert "Mailstead is set up: https://192.0.2.10/" in done.splitlines()
    assert token not in done
    assert "Setup token" not in done
    assert "Certificate SHA-256 fingerprint:" in done


def test_unrelated_database_counts_as_not_set_up(paths: Paths) -> None:
    paths.state_dir.mkdir(parents=True)
    sqlite3.connect(paths.db_path).close()  # empty db, no settings table
    assert "Setup token:" in firstboot.run(paths, hostname=HOSTNAME, ip_json=IP_JSON)


def test_local_addresses_always_include_loopback() -> None:
    assert firstboot.local_addresses("[]") == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]


def test_main_as_a_process(tmp_path: Path) -> None:
    """Runs the real `ip -j addr show` and hostname, with paths from the environment."""
    env = {**os.environ, "MAILSTEAD_STATE_DIR": str(tmp_path / "state"),
           "MAILSTEAD_ISSUE_PATH": str(tmp_path / "issue")}
    out = subprocess.run([sys.executable, "-m", "portal.agent.firstboot"], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    token = (tmp_path / "state" / "setup-token").read_text().strip()
    assert f"Setup token: {token}" in out.splitlines()
    assert f"Mailstead setup portal: https://{os.uname().nodename}/" in out.splitlines()
    assert (tmp_path / "issue").read_text() == out
    cert = x509.load_pem_x509_certificate((tmp_path / "state" / "tls" / "bootstrap.crt").read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("::1") in ips


def test_strict_tls_client_accepts_the_certificate(paths: Paths, text: str) -> None:
    """A client that pins the bootstrap certificate (as Python >= 3.13 does, with
    VERIFY_X509_STRICT) completes a real TLS handshake by IP address and by name."""
    import socket
    import ssl
    import threading

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(paths.cert, paths.key)
    client_ctx = ssl.create_default_context(cafile=str(paths.cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT

    for server_name in ("127.0.0.1", HOSTNAME):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]
            errors: list[BaseException] = []

            def serve() -> None:
                conn, _ = listener.accept()
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.sendall(b"hello")
                except (ssl.SSLError, OSError) as exc:
                    errors.append(exc)

            thread = threading.Thread(target=serve)
            thread.start()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                    assert tls.recv(5) == b"hello"
            thread.join(10)
            assert errors == []
