"""What the DNS records are built from: a typed value read from state.db and files."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path

from portal.stack.settings import DEFAULT_PORTS
from portal.dns.names import parse_resolvers
from portal.dns.names import normalize_domain
from portal.dns import DnsError
from portal.dns.names import parse_port

DMARC_POLICIES = ("none", "quarantine", "reject")
LETSENCRYPT_WORDS = ("letsencrypt", "letsencrypt-staging")
LETSENCRYPT_CAA = "letsencrypt.org"


@dataclass(frozen=True)
class DnsSettings:
    domain: str                      # ASCII (punycode); also the zone
    mail_host: str                   # ASCII
    public_ipv4: str | None = None
    public_ipv6: str | None = None
    dmarc_policy: str = "quarantine"
    dmarc_rua: str = ""              # default postmaster@<domain>
    tlsrpt_rua: str = ""             # default postmaster@<domain>
    dkim_dir: Path = Path("/var/lib/mailstead/secrets/dkim")
    dkim_selectors: tuple[str, ...] = ("mailstead-rsa", "mailstead-ed25519")
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    mta_sts_mode: str = "enforce"
    caa_issuer: str | None = None    # None: unknown CA, no CAA record
    acme_account_uri: str | None = None
    resolvers: tuple[tuple[str, int], ...] = ()
    auth_port: int = 53
    dnssec: bool = False
    tls_key: Path | None = None      # for TLSA 3 1 1
    ttl: int = 3600

    @property
    def zone(self) -> str:
        return self.domain

    @property
    def rua(self) -> str:
        return self.dmarc_rua or f"postmaster@{self.domain}"

    @property
    def tls_rua(self) -> str:
        return self.tlsrpt_rua or f"postmaster@{self.domain}"


def check_ip(value: str | None, version: int, field: str, allow_private: bool = False) -> str | None:
    """A public IP of `version` (4 or 6), or None if empty. `allow_private` lets tests
    use loopback / TEST-NET addresses; production keeps the default."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise DnsError(f"'{text[:64]}' is not an IP address; enter this server's public IPv{version} address, "
                       f"e.g. {'203.0.113.10' if version == 4 else '2001:db8::10'}", field) from None
    if ip.version != version:
        raise DnsError(f"'{text}' is an IPv{ip.version} address; enter an IPv{version} address here", field)
    if not allow_private and not ip.is_global:
        raise DnsError(f"'{text}' is a private or reserved address that the internet cannot reach; enter the "
                       "public address your hosting provider gave this server", field)
    return ip.compressed


def check_mailbox(value: str, field: str) -> str:
    """A report address (user@domain) for DMARC / TLS-RPT."""
    text = (value or "").strip().removeprefix("mailto:")
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c in local for c in ' ,;!"<>\\') or not local.isascii():
        raise DnsError(f"'{text[:64]}' is not an email address; enter one such as postmaster@example.org",
                       field)
    return f"{local}@{normalize_domain(domain, field).ascii}"


def caa_issuer_for(directory: str, explicit: str | None) -> str | None:
    """The CAA issuer domain: the explicit setting, else letsencrypt.org for
    Let's Encrypt's directories, else None (unknown CA: no CAA record)."""
    if explicit:
        return normalize_domain(explicit, "acme_caa_issuer").ascii
    d = (directory or "").strip().lower()
    if d in LETSENCRYPT_WORDS or ".api.letsencrypt.org/" in d or d == "" :
        return LETSENCRYPT_CAA
    return None


def read_account_uri(state_dir: Path) -> str | None:
    from portal.core import safefs
    from portal.core.errors import UnsafePathError
    from portal.core.layout import StateLayout

    try:
        data = safefs.read_json(StateLayout(Path(state_dir)).acme_account / "account.json", limit=64 * 1024)
    except (OSError, ValueError, UnsafePathError):
        return None
    uri = data.get("uri") if isinstance(data, dict) else None
    return uri if isinstance(uri, str) and uri.startswith("https://") else None


def flag(values: dict[str, str], key: str) -> bool:
    return (values.get(key) or "").strip().lower() in ("1", "true", "yes", "on")


def load_dns_settings(state_dir: Path, *, allow_private: bool | None = None,
                      dnssec: bool | None = None) -> DnsSettings:
    """DnsSettings from <state>/state.db and the files in <state>/secrets.

    `allow_private` (default: the `dns_allow_private` setting, off) accepts
    loopback, private and TEST-NET addresses as the public ones: for labs and
    tests whose "internet" is a private network, never for a real deployment."""
    from portal.stack.settings import StackSettings
    values = _checked_settings(state_dir)
    if allow_private is None:
        allow_private = flag(values, "dns_allow_private")
    if not values.get("domain", "").strip():
        raise DnsError("domain is not set yet; finish the Domain step of the setup wizard first", "domain")
    domain = normalize_domain(values["domain"], "domain").ascii
    mail_host = normalize_domain(values.get("mail_host", "").strip() or f"mail.{domain}", "mail_host").ascii
    v4 = check_ip(values.get("public_ipv4"), 4, "public_ipv4", allow_private)
    v6 = check_ip(values.get("public_ipv6"), 6, "public_ipv6", allow_private)
    if v4 is None:
        raise DnsError("public_ipv4 is not set; enter this server's public IPv4 address (mail servers "
                       "everywhere need one to reach you)", "public_ipv4")
    policy = (values.get("dmarc_policy") or "quarantine").strip().lower()
    if policy not in DMARC_POLICIES:
        raise DnsError(f"dmarc_policy must be one of {', '.join(DMARC_POLICIES)} (quarantine is the usual "
                       "choice)", "dmarc_policy")
    ports = dict(DEFAULT_PORTS)
    if values.get("stack_ports"):
        try:
            ports.update({str(k): int(v) for k, v in json.loads(values["stack_ports"]).items()})
        except (ValueError, TypeError, AttributeError):
            raise DnsError("stack_ports must be a JSON object of port numbers, e.g. {\"smtp\": 25}",
                           "stack_ports") from None
    mode = (values.get("mta_sts_mode") or "enforce").strip()
    if mode not in ("enforce", "testing", "none"):
        raise DnsError("mta_sts_mode must be enforce, testing or none", "mta_sts_mode")
    resolvers = tuple(parse_resolvers(values["dns_resolvers"])) if values.get("dns_resolvers", "").strip() else ()
    # The key being served (the CA certificate's in tls/live once installed): TLSA publishes its hash.
    tls_key = StackSettings(domain=domain, hostname=mail_host, state_dir=state_dir,
                            tls_key=Path(values["tls_key"]) if values.get("tls_key") else None).key_path
    return DnsSettings(
        domain=domain, mail_host=mail_host, public_ipv4=v4, public_ipv6=v6,
        dmarc_policy=policy,
        dmarc_rua=check_mailbox(values["dmarc_rua"], "dmarc_rua") if values.get("dmarc_rua") else "",
        tlsrpt_rua=check_mailbox(values["tlsrpt_rua"], "tlsrpt_rua") if values.get("tlsrpt_rua") else "",
        dkim_dir=state_dir / "secrets" / "dkim",
        ports=ports, mta_sts_mode=mode,
        caa_issuer=caa_issuer_for(values.get("acme_directory", ""), values.get("acme_caa_issuer")),
        acme_account_uri=read_account_uri(state_dir),
        resolvers=resolvers,
        auth_port=parse_port(values.get("dns_auth_port"), "dns_auth_port"),
        dnssec=flag(values, "dns_dnssec") if dnssec is None else dnssec,
        tls_key=tls_key,
    )


def _checked_settings(state_dir: Path) -> dict[str, str]:
    """The stored settings, each checked again (a bad one is a DnsError naming it)."""
    from portal.core.settings import SettingsError
    from portal.core.store import read_settings

    try:
        return read_settings(state_dir, strict=True)
    except SettingsError as exc:
        raise DnsError(exc.message, exc.field) from None
