"""Installing a certificate: verified first, then switched in atomically.

Layout of <state>/tls/:
    bootstrap.crt / bootstrap.key / bootstrap.sha256   made by firstboot, never touched here
    archive/<UTC time>-<serial>/fullchain.pem (0644), privkey.pem (0600)
    live -> archive/<...>                              relative symlink, replaced with os.replace

nginx, postfix and dovecot read live/fullchain.pem and live/privkey.pem (the
containers get the whole tls folder, read-only, so they see a new live/ too).
A reader that wants a matching pair opens `live` once and reads both files
relative to it (`read_live`), as the switch only ever replaces the link.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID

from portal.certs import CertError

KEEP_ARCHIVES = 3


@dataclass(frozen=True)
class Installed:
    path: Path           # the archive folder live points at
    serial: str
    not_after: dt.datetime
    names: tuple[str, ...]


def tls_dir(state_dir: Path) -> Path:
    return state_dir / "tls"


def cert_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))


def spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify_pair(fullchain_pem: bytes, key_pem: bytes, names: tuple[str, ...] | list[str],
                now: dt.datetime | None = None) -> list[x509.Certificate]:
    """The chain [leaf, issuer, ...] if it is fit to serve `names`: parses, the key
    matches the leaf, every name is covered, valid now, the issuer is in the chain
    and signed the leaf. CertError says what is wrong otherwise."""
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        chain = x509.load_pem_x509_certificates(fullchain_pem)
    except ValueError:
        raise CertError("the new certificate does not parse as PEM; the current certificate stays in place") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertError("the new private key does not parse; the current certificate stays in place") from None
    if spki(key.public_key()) != spki(leaf.public_key()):
        raise CertError("the new private key does not match the certificate; the current certificate stays in place")
    missing = [n for n in names if n.lower() not in cert_names(leaf)]
    if missing:
        raise CertError(f"the new certificate does not cover {', '.join(missing)}; the current certificate "
                        "stays in place")
    if leaf.not_valid_after_utc <= now:
        raise CertError(f"the new certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                        "the current certificate stays in place")
    if leaf.not_valid_before_utc > now + dt.timedelta(minutes=5):
        raise CertError(f"the new certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                        "UTC; check the system clock; the current certificate stays in place")
    if len(chain) < 2:
        raise CertError("the new certificate comes without its issuer's certificate (no chain); "
                        "the current certificate stays in place")
    try:
        leaf.verify_directly_issued_by(chain[1])
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature is not a ValueError
        raise CertError(f"the new certificate was not issued by the next certificate of its chain "
                        f"({type(exc).__name__}); the current certificate stays in place") from None
    return chain


def _write(path: Path, data: bytes, mode: int, gid: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        if gid is not None and os.geteuid() == 0:
            os.fchown(f.fileno(), 0, gid)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_live(tls: Path) -> tuple[bytes, bytes] | None:
    """(fullchain PEM, key PEM) of live/, read through one open of the folder so the
    two always belong together; None if there is no live certificate."""
    try:
        dfd = os.open(tls / "live", os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        out = []
        for name in ("fullchain.pem", "privkey.pem"):
            fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            with os.fdopen(fd, "rb") as f:
                out.append(f.read())
        return out[0], out[1]
    finally:
        os.close(dfd)


def install(tls: Path, fullchain_pem: bytes, key_pem: bytes, names: tuple[str, ...] | list[str],
            now: dt.datetime | None = None, keep: int = KEEP_ARCHIVES) -> Installed:
    """Verify the pair, write it to a new archive folder, and switch live/ to it in one
    os.replace of a symlink. Nothing changes for readers unless every check passed."""
    now = now or dt.datetime.now(dt.timezone.utc)
    chain = verify_pair(fullchain_pem, key_pem, names, now)
    leaf = chain[0]
    archive = tls / "archive"
    archive.mkdir(mode=0o755, parents=True, exist_ok=True)
    serial = f"{leaf.serial_number:x}"
    folder = archive / f"{now:%Y%m%dT%H%M%S}Z-{serial[:16]}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    bootstrap_key = tls / "bootstrap.key"
    gid = bootstrap_key.stat().st_gid if bootstrap_key.exists() else None
    try:
        _write(folder / "fullchain.pem", fullchain_pem, 0o644)
        _write(folder / "privkey.pem", key_pem, 0o600, gid)
        _fsync_dir(folder)
        # What is on disk is what gets served: check it once more as written.
        verify_pair((folder / "fullchain.pem").read_bytes(), (folder / "privkey.pem").read_bytes(), names, now)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    live = tls / "live"
    if live.exists() and not live.is_symlink():
        raise CertError(f"{live} is not a symlink; move it away so that certificates can be switched atomically")
    tmp = tls / f".live.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(folder, tls), tmp)
    os.replace(tmp, live)
    _fsync_dir(tls)
    prune(tls, keep)
    return Installed(folder, serial, leaf.not_valid_after_utc, cert_names(leaf))


def prune(tls: Path, keep: int = KEEP_ARCHIVES) -> list[Path]:
    """Remove all but the newest `keep` archive folders (never the live one)."""
    archive = tls / "archive"
    if not archive.is_dir():
        return []
    live = (tls / "live").resolve() if (tls / "live").is_symlink() else None
    folders = sorted((p for p in archive.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.name, reverse=True)
    removed = []
    for old in folders[keep:]:
        if old.resolve() != live:
            shutil.rmtree(old)
            removed.append(old)
    return removed


def fingerprint(cert: x509.Certificate) -> str:
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


# -- reloading the services that serve the certificate ---------------------------------

Reloader = Callable[[], str]


def reload_nginx(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> str:
    """`nginx -t`, then `systemctl reload nginx`; raises CertError with nginx's words."""
    test = run(["nginx", "-t"], capture_output=True, text=True, check=False, timeout=60)
    if test.returncode != 0:
        raise CertError("nginx refused its configuration, so it was not reloaded: "
                        + " ".join((test.stderr or "").split())[-300:])
    done = run(["systemctl", "reload", "nginx"], capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise CertError("systemctl reload nginx failed: " + " ".join((done.stderr or "").split())[-300:])
    return "reloaded"


MAIL_RELOADS = {"postfix": ["postfix", "reload"], "dovecot": ["doveadm", "reload"]}


def reload_containers(client: Any, project: str) -> dict[str, str]:
    """postfix reload / doveadm reload in the running mail containers (docker SDK exec);
    containers that are not running are skipped and said so."""
    import docker.errors

    results: dict[str, str] = {}
    for service, cmd in MAIL_RELOADS.items():
        name = f"{project}-{service}"
        try:
            container = client.containers.get(name)
        except docker.errors.NotFound:
            results[service] = "skipped: no container"
            continue
        if container.status != "running":
            results[service] = f"skipped: container is {container.status}"
            continue
        code, output = container.exec_run(cmd)
        if code != 0:
            text = " ".join((output or b"").decode(errors="replace").split())[-300:]
            results[service] = f"failed ({' '.join(cmd)} exited {code}): {text}"
        else:
            results[service] = "reloaded"
    return results
