"""mailstead-firstboot: setup token, bootstrap TLS certificate, console message.

Idempotent: the token and certificate are made once and never replaced; the
console message is rewritten on every run (addresses can change). Once setup
is finished (the agent made `setup-finished`) no token is ever made again,
whatever the settings say. Every file goes through the safe-write helper.

Environment: MAILSTEAD_STATE_DIR (default /var/lib/mailstead), MAILSTEAD_DB_PATH
(default STATE_DIR/state.db), MAILSTEAD_ISSUE_PATH (default
/etc/issue.d/50-mailstead.issue), MAILSTEAD_GROUP (unused; kept for old units).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portal.core import safefs, store
from portal.core.layout import StateLayout

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CERT_DAYS = 825


@dataclass(frozen=True)
class Paths:
    state_dir: Path
    db_path: Path
    issue_path: Path
    group: str

    @property
    def token(self) -> Path:
        return self.state_dir / "setup-token"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def cert(self) -> Path:
        return self.tls_dir / "bootstrap.crt"

    @property
    def key(self) -> Path:
        return self.tls_dir / "bootstrap.key"

    @property
    def fingerprint(self) -> Path:
        return self.tls_dir / "bootstrap.sha256"

    @classmethod
    def from_env(cls) -> Paths:
        state = Path(os.environ.get("MAILSTEAD_STATE_DIR") or "/var/lib/mailstead")
        return cls(
            state_dir=state,
            db_path=Path(os.environ.get("MAILSTEAD_DB_PATH") or state / "state.db"),
            issue_path=Path(os.environ.get("MAILSTEAD_ISSUE_PATH") or "/etc/issue.d/50-mailstead.issue"),
            group=os.environ.get("MAILSTEAD_GROUP") or "mailstead",
        )


# -- files ----------------------------------------------------------------------------

def write_new(path: Path, data: bytes, mode: int, gid: int | None = None) -> bool:
    """Create `path` atomically with `mode` unless it exists. True if written."""
    safefs.ensure_dir(path.parent, 0o755)
    return safefs.write_new(path, data, mode, None if gid is None else (0, gid))


def write_replace(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically, replacing it; untouched if the content is the same."""
    try:
        with safefs.open_file(path, owner_uid=os.geteuid()) as f:
            if f.read(len(data) + 1) == data and (os.fstat(f.fileno()).st_mode & 0o777) == mode:
                return
    except (FileNotFoundError, safefs.UnsafePathError):
        pass  # missing, a symlink or another user's: replaced, never followed
    safefs.write_bytes(path, data, mode)


# -- setup token ------------------------------------------------------------------------

def setup_finished(paths: Paths) -> bool:
    """Setup was finished once: the marker file, or (older states) the setting."""
    return safefs.lstat(StateLayout(paths.state_dir).setup_finished) is not None or setup_complete(paths.db_path)


def ensure_token(paths: Paths) -> str | None:
    """Make the setup token once (root, 0400: the web asks the agent to check a token),
    never after setup was finished; None then."""
    if setup_finished(paths):
        safefs.remove(paths.token)
        return None
    write_new(paths.token, secrets.token_urlsafe(32).encode() + b"\n", 0o400)
    return safefs.read_text(paths.token).strip()


# -- addresses --------------------------------------------------------------------------

def local_addresses(ip_json: str | None = None) -> list[IPAddress]:
    """Every address on every interface (`ip -j addr show`), loopback included."""
    if ip_json is None:
        try:
            ip_json = subprocess.run(
                ["ip", "-j", "addr", "show"], check=True, capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"mailstead-firstboot: cannot list addresses ({exc}); using loopback only",
                  file=sys.stderr)
            ip_json = "[]"
    found: list[IPAddress] = []
    for iface in json.loads(ip_json or "[]"):
        for info in iface.get("addr_info", []):
            try:
                addr = ipaddress.ip_address(info["local"])
            except (KeyError, ValueError):
                continue
            if addr not in found:
                found.append(addr)
    for loopback in (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")):
        if loopback not in found:
            found.append(loopback)
    return found


def url_addresses(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    """Addresses a browser elsewhere can use: no loopback, no IPv6 link-local."""
    return [a for a in addresses if not a.is_loopback and not a.is_link_local]


def url_host(address: IPAddress | str) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return f"[{address}]"
    return str(address)


# -- bootstrap certificate --------------------------------------------------------------

def make_certificate(hostname: str, addresses: Sequence[IPAddress],
                     now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """Self-signed EC P-256 certificate for `hostname` and `addresses`: (cert PEM, key PEM)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    sans += [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        # Python >= 3.13 clients verify strictly (VERIFY_X509_STRICT) and want this too.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the DER certificate as AB:CD:... (what browsers show)."""
    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def ensure_certificate(paths: Paths, hostname: str, addresses: Sequence[IPAddress]) -> str:
    """Make the bootstrap certificate once (cert and key together); return its fingerprint."""
    safefs.ensure_dir(paths.state_dir, 0o755)
    safefs.ensure_dir(paths.tls_dir, 0o755)
    if safefs.lstat(paths.cert) is None or safefs.lstat(paths.key) is None:
        cert_pem, key_pem = make_certificate(hostname, addresses)
        write_replace(paths.key, key_pem, 0o600)
        write_replace(paths.cert, cert_pem, 0o644)  # written last: its presence means "done"
    fp = fingerprint(safefs.read_bytes(paths.cert))
    write_replace(paths.fingerprint, fp.encode() + b"\n", 0o644)
    return fp


# -- console message --------------------------------------------------------------------

def issue_text(hostname: str, addresses: Sequence[IPAddress], token: str | None,
               fp: str) -> str:
    """The console message. `token` None means setup is complete."""
    hosts = [url_host(a) for a in url_addresses(addresses)] + [hostname]
    lines = [""]
    if token is None:
        lines += [f"Mailstead is set up: https://{h}/" for h in hosts]
    else:
        lines += [f"Mailstead setup portal: https://{h}/" for h in hosts]
        lines.append(f"Setup token: {token}")
    lines.append(f"Certificate SHA-256 fingerprint: {fp}")
    lines.append("")
    return "\n".join(lines) + "\n"


def setup_complete(db_path: Path) -> bool:
    return store.read_setting(db_path.parent, "setup_complete") == "1"


def run(paths: Paths, hostname: str | None = None, ip_json: str | None = None) -> str:
    """Do everything; return the console message."""
    hostname = hostname or socket.gethostname()
    addresses = local_addresses(ip_json)
    fp = ensure_certificate(paths, hostname, addresses)
    token = ensure_token(paths)
    text = issue_text(hostname, addresses, token, fp)
    # The token is a secret: the issue file is for agetty (root) only.
    safefs.ensure_dir(paths.issue_path.parent, 0o755)
    write_replace(paths.issue_path, text.encode(), 0o600)
    return text


def main() -> int:
    text = run(Paths.from_env())
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
