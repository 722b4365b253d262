"""Installing a certificate: verified first, then switched in atomically.

Layout of <state>/tls/:
    bootstrap.crt / bootstrap.key / bootstrap.sha256   made by firstboot, never touched here
    archive/<UTC time>-<serial>/fullchain.pem (0644), privkey.pem (0600)
    live -> archive/<...>                              relative symlink, replaced in one rename

nginx, postfix and dovecot read live/fullchain.pem and live/privkey.pem (the
containers get the whole tls folder, read-only, so they see a new live/ too).
A reader that wants a matching pair opens `live` once and reads both files
relative to it (`read_live`), as the switch only ever replaces the link.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID

from portal.certs import CertError
from portal.core import safefs

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


def read_live(tls: Path) -> tuple[bytes, bytes] | None:
    """(fullchain PEM, key PEM) of live/, read through one open of the folder so the
    two always belong together; None if there is no live certificate. The tls folder
    is walked without following a symlink; `live` is the one link followed (it is the
    agent's own, switched by `install`), the files in it are not links."""
    try:
        with safefs.open_dir(tls) as tfd:
            dfd = os.open("live", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=tfd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        out = []
        for name in ("fullchain.pem", "privkey.pem"):
            with safefs.open_file(name, dir_fd=dfd) as f:
                out.append(f.read())
        return out[0], out[1]
    finally:
        os.close(dfd)


def install(tls: Path, fullchain_pem: bytes, key_pem: bytes, names: tuple[str, ...] | list[str],
            now: dt.datetime | None = None, keep: int = KEEP_ARCHIVES) -> Installed:
    """Verify the pair, write it to a new archive folder, and switch live/ to it in one
    rename of a symlink. Nothing changes for readers unless every check passed. Every
    file and folder goes through the safe-write helper."""
    now = now or dt.datetime.now(dt.timezone.utc)
    chain = verify_pair(fullchain_pem, key_pem, names, now)
    leaf = chain[0]
    safefs.ensure_dir(tls, 0o755)
    archive = safefs.ensure_dir(tls / "archive", 0o755)
    serial = f"{leaf.serial_number:x}"
    folder = archive / f"{now:%Y%m%dT%H%M%S}Z-{serial[:16]}"
    safefs.remove_tree(folder)
    safefs.new_dir(folder, 0o755)
    bootstrap_key = safefs.lstat(tls / "bootstrap.key")
    owner = (0, bootstrap_key.st_gid) if bootstrap_key is not None and os.geteuid() == 0 else None
    try:
        safefs.write_new(folder / "fullchain.pem", fullchain_pem, 0o644)
        safefs.write_new(folder / "privkey.pem", key_pem, 0o600, owner)
        # What is on disk is what gets served: check it once more as written.
        verify_pair(safefs.read_bytes(folder / "fullchain.pem"), safefs.read_bytes(folder / "privkey.pem"), names, now)
    except BaseException:
        safefs.remove_tree(folder)
        raise
    live = tls / "live"
    st = safefs.lstat(live)
    if st is not None and not stat.S_ISLNK(st.st_mode):
        raise CertError(f"{live} is not a symlink; move it away so that certificates can be switched atomically")
    safefs.replace_symlink(live, os.path.relpath(folder, tls))
    prune(tls, keep)
    return Installed(folder, serial, leaf.not_valid_after_utc, cert_names(leaf))


def _live_target(tls: Path) -> str | None:
    """The archive folder name live/ points at (its link text, never followed)."""
    try:
        with safefs.open_dir(tls) as tfd:
            target = os.readlink("live", dir_fd=tfd)
    except (FileNotFoundError, OSError):
        return None
    parts = Path(target).parts
    return parts[1] if len(parts) == 2 and parts[0] == "archive" else None


def prune(tls: Path, keep: int = KEEP_ARCHIVES) -> list[Path]:
    """Remove all but the newest `keep` archive folders (never the live one)."""
    archive = tls / "archive"
    try:
        with safefs.open_dir(archive) as afd:
            names = [n for n in os.listdir(afd) if not n.startswith(".")
                     and stat.S_ISDIR(os.stat(n, dir_fd=afd, follow_symlinks=False).st_mode)]
    except FileNotFoundError:
        return []
    live = _live_target(tls)
    removed = []
    for name in sorted(names, reverse=True)[keep:]:
        if name != live:
            safefs.remove_tree(archive / name)
            removed.append(archive / name)
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
