"""Real local stand-ins for the health checks' tests: a webhook receiver on loopback,
certificates made here, state.db settings (the SMTP sink is tests/support/smtp.py)."""

from __future__ import annotations

import datetime as dt
import json
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import appdb as db
from tests.support.settings import write_settings


class _HookHandler(BaseHTTPRequestHandler):
    server: HookServer

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                  "host": self.headers.get("Host"), "json": json.loads(body)})
        self.send_response(self.server.answer)
        if self.server.location:
            self.send_header("Location", self.server.location)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - a followed redirect arrives as a GET
        self.server.gets.append({"path": self.path, "host": self.headers.get("Host")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


class HookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        """A webhook receiver on loopback; `tls`: (cert, key) to serve HTTPS with."""
        super().__init__(("127.0.0.1", 0), _HookHandler)
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.socket = context.wrap_socket(self.socket, server_side=True)
        self.posts: list[dict[str, Any]] = []
        self.gets: list[dict[str, Any]] = []
        self.answer = 204
        self.location = ""

    @property
    def port(self) -> int:
        return self.server_address[1]


@contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[Any]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# -- certificates ---------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(directory: Path, names: list[str], *, days: float = 60, start_days: float = -1,
              self_signed: bool = False) -> tuple[Path, Path]:
    """A P-256 certificate for `names` valid from now+start_days for `days` days, issued
    by a CA made here (or self-signed). Returns (cert, key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    if self_signed:
        issuer_name, issuer_key = _name(names[0]), key
    else:
        issuer_name, issuer_key = _name("Mailstead Test CA"), ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=start_days))
            .not_valid_after(now + dt.timedelta(days=start_days + days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path
