"""A real ACME CA (pebble, Let's Encrypt's test server) on loopback, for the tests.

pebble ships no TLS certificate of its own: `Pebble` makes a throwaway CA and a
leaf for 127.0.0.1/localhost (`ca_bundle` is that CA, for the ACME client).
Its validation authority resolves every name through the DNS server given
(`dns_port`: the tests' knot) and connects to `http_port` for HTTP-01.
Certificates it issues chain to `root_pem`, fetched from the management port
after each start (pebble makes a new root every run).
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port, stop_process

PEBBLE = "/usr/bin/pebble"


def make_server_tls(directory: Path, hosts: tuple[str, ...] = ("localhost",),
                    ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate signed by it: (ca, cert, key) paths."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailstead test pebble TLS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


class Pebble:
    """pebble on 127.0.0.1 (free ports), resolving names through 127.0.0.1:`dns_port`."""

    def __init__(self, workdir: Path, dns_port: int, http_port: int | None = None,
                 validity_seconds: int = 90 * 86400, env: dict[str, str] | None = None,
                 tls_ips: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.workdir, self.dns_port = workdir, dns_port
        self.port, self.management_port = free_port(), free_port()
        self.http_port, self.tls_port = http_port or free_port(), free_port()
        self.validity_seconds = validity_seconds
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        # tls_ips: the addresses clients reach pebble at (a VM guest: 10.0.2.2, qemu's host alias)
        self.ca_bundle, cert, key = make_server_tls(workdir / "tls", ips=tls_ips)
        self.config = workdir / "pebble-config.json"
        self.config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert), "privateKey": str(key),
            "httpPort": self.http_port, "tlsPort": self.tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False,
            "retryAfter": {"authz": 1, "order": 1},
            "certificateValidityPeriod": self.validity_seconds,
        }}, indent=2))
        self.root_pem = b""
        self.intermediate_pem = b""

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def log(self) -> Path:
        return self.workdir / "pebble.log"

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def _get(self, url: str) -> bytes:
        # urllib with an explicit context: no proxy or CA bundle from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=self._ssl()))
        with opener.open(url, timeout=5) as resp:
            return resp.read()

    def start(self) -> Pebble:
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0", **self.extra_env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([PEBBLE, "-config", str(self.config),
                                          "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                self._get(self.directory_url)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("pebble did not start: " + self.log.read_text()[-2000:]) from None
                time.sleep(0.1)
        base = f"https://127.0.0.1:{self.management_port}"
        self.root_pem = self._get(f"{base}/roots/0")
        self.intermediate_pem = self._get(f"{base}/intermediates/0")
        (self.workdir / "root.pem").write_bytes(self.root_pem)
        return self

    def directory(self) -> dict:
        return json.loads(self._get(self.directory_url))

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class TokenServer:
    """What the host nginx does for HTTP-01: serve `root`'s files at
    /.well-known/acme-challenge/ over plain HTTP on 127.0.0.1:`port`."""

    PREFIX = "/.well-known/acme-challenge/"

    def __init__(self, root: Path, port: int, body: bytes | None = None) -> None:
        self.root, self.port, self.body = root, port, body
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                name = self.path[len(TokenServer.PREFIX):] if self.path.startswith(TokenServer.PREFIX) else ""
                path = server.root / name
                if server.body is not None:
                    data: bytes | None = server.body
                elif name and "/" not in name and path.is_file():
                    data = path.read_bytes()
                else:
                    data = None
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> TokenServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
