"""What the owner chose for certificates (settings table keys acme_*), typed and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509

from portal.stack.settings import SettingsError
from portal.core.store import read_settings
from portal.stack.store import load_settings
from portal.certs import CertError

LETSENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETSENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
DIRECTORY_WORDS = {"letsencrypt": LETSENCRYPT, "letsencrypt-staging": LETSENCRYPT_STAGING}
CHALLENGES = ("http-01", "dns-01")
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")
DEFAULT_ACME_DIR = Path("/var/lib/mailstead-acme")


@dataclass(frozen=True)
class AcmeSettings:
    directory: str = LETSENCRYPT
    names: tuple[str, ...] = ()
    challenge: str = "http-01"
    contact: str | None = None
    ca_bundle: Path | None = None
    reuse_key: bool = False
    include_apex: bool = False
    caa_issuer: str | None = None

    @property
    def verify(self) -> str | bool:
        """What requests verifies the CA's TLS with: the bundle, or the system's."""
        return str(self.ca_bundle) if self.ca_bundle else True


def acme_names(domain: str, mail_host: str, include_apex: bool) -> tuple[str, ...]:
    """The names the certificate covers: the mail host first (the CN), then the
    web names the appliance answers for, and the domain itself if asked."""
    names = [mail_host, f"mta-sts.{domain}", f"autoconfig.{domain}"] + ([domain] if include_apex else [])
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names))


def directory_url(value: str) -> str:
    value = (value or "").strip()
    if not value:
        return LETSENCRYPT
    if value.lower() in DIRECTORY_WORDS:
        return DIRECTORY_WORDS[value.lower()]
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise CertError(f"acme_directory: '{value[:100]}' is not an https URL; give the CA's ACME directory "
                        "URL (https://...) or the word letsencrypt or letsencrypt-staging", "acme_directory")
    return value


def check_ca_bundle(value: str, state_dir: Path) -> Path | None:
    """The stored CA bundle: only the file the agent wrote from pasted text (it reads no
    other path as root, and says nothing about whether one exists)."""
    if not (value or "").strip():
        return None
    from portal.core import safefs

    path = Path(state_dir) / "acme-ca-bundle.pem"
    fix = "paste the CA's root certificate(s) again in the certificate settings"
    if Path(value.strip()) != path:
        raise CertError(f"acme_ca_bundle: a CA bundle can only be pasted as text; {fix}", "acme_ca_bundle")
    try:
        data = safefs.read_bytes(path, 64 * 1024)
    except (OSError, safefs.UnsafePathError):
        raise CertError(f"acme_ca_bundle: the stored bundle is missing or unreadable; {fix}",
                        "acme_ca_bundle") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertError(f"acme_ca_bundle: the stored bundle holds no PEM certificate; {fix}",
                        "acme_ca_bundle") from None
    return path


def check_contact(value: str) -> str | None:
    value = (value or "").strip()
    if value.lower().startswith("mailto:"):
        value = value[7:]
    if not value:
        return None
    if not EMAIL.fullmatch(value) or len(value) > 254:
        raise CertError(f"acme_contact: '{value[:100]}' is not an email address; give one such as "
                        "postmaster@example.org, or leave it empty", "acme_contact")
    return value


def flag(values: dict[str, str], key: str) -> bool:
    value = values.get(key, "0").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise CertError(f"{key}: '{value[:20]}' is not 0 or 1", key)


def rfc2136_configured(values: dict[str, str], state_dir: Path) -> bool:
    return bool(values.get("rfc2136_server", "").strip() and values.get("rfc2136_key_name", "").strip()
                and (state_dir / "secrets" / "rfc2136.key").is_file())


def parse_acme_settings(values: dict[str, str], domain: str, mail_host: str, state_dir: Path) -> AcmeSettings:
    """AcmeSettings from settings-table values; CertError names the bad field and the fix."""
    challenge = (values.get("acme_challenge") or "http-01").strip().lower()
    if challenge not in CHALLENGES:
        raise CertError(f"acme_challenge: '{challenge[:20]}' is not http-01 or dns-01", "acme_challenge")
    if challenge == "dns-01" and not rfc2136_configured(values, state_dir):
        raise CertError("acme_challenge: dns-01 needs RFC 2136 updates to the zone; set rfc2136_server, "
                        "rfc2136_key_name and the key secret first, or use http-01", "acme_challenge")
    caa = (values.get("acme_caa_issuer") or "").strip().lower() or None
    if caa is not None and not re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", caa):
        raise CertError(f"acme_caa_issuer: '{caa[:64]}' is not a domain name such as letsencrypt.org",
                        "acme_caa_issuer")
    include_apex = flag(values, "acme_include_apex")
    return AcmeSettings(
        directory=directory_url(values.get("acme_directory", "")),
        names=acme_names(domain, mail_host, include_apex),
        challenge=challenge,
        contact=check_contact(values.get("acme_contact", "")),
        ca_bundle=check_ca_bundle(values.get("acme_ca_bundle", ""), state_dir),
        reuse_key=flag(values, "acme_reuse_key"),
        include_apex=include_apex,
        caa_issuer=caa,
    )


def load_acme_settings(state_dir: Path) -> AcmeSettings:
    """AcmeSettings from <state_dir>/state.db (domain and mail host from the stack's settings)."""
    try:
        stack = load_settings(state_dir)
    except SettingsError as exc:
        raise CertError(f"{exc.field}: {exc.message}", exc.field) from None
    return parse_acme_settings(read_settings(state_dir, strict=True), stack.domain, stack.hostname,
                               state_dir)
