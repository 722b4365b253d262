"""Every setting the agent keeps, with the rule its value must follow.

Settings are text in state.db's `settings` table (portal/core/store.py). Each
key is declared here once with a checker that returns the normalized value or
raises SettingsError naming the key and the fix. The store checks every value
when it is written *and* again when it is read, so a value that did not come
through the agent (a damaged file, an old backup) is refused where it is used,
never rendered into a config file. Unknown keys are refused.

The checks here are the ones that keep generated files safe (no newlines, no
scope ids in addresses, no path tricks); the friendlier, domain-specific checks
(IDNA names, public addresses) run before a value gets here.
"""

from __future__ import annotations

import ipaddress
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from portal.core.errors import MailsteadError

MAX_VALUE = 2048
PORT_NAMES = ("smtp", "submissions", "submission", "imaps", "pop3s", "dav", "managesieve")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")
LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
PROJECT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]{1,254}")
EMAIL_LOCAL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}")


class SettingsError(MailsteadError, ValueError):
    """A setting is invalid: names the field and the fix."""

    code = "invalid"

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message, field=field_name)


Checker = Callable[[str, str], str]  # (key, value) -> normalized value


@dataclass(frozen=True)
class Setting:
    key: str
    check: Checker
    # Taken from a backup on restore (False: this machine's own, e.g. test rigs' paths).
    restore: bool = True
    # Shown to the web process (portal_state); False keeps it agent-only.
    public: bool = True


# -- checkers -----------------------------------------------------------------------------

def text(max_len: int = 200) -> Checker:
    def check(key: str, value: str) -> str:
        value = value.strip()
        if len(value) > max_len:
            raise SettingsError(key, f"is longer than {max_len} characters")
        return value
    return check


def dns_name(key: str, value: str, *, allow_empty: bool = False) -> str:
    """An ASCII (punycode) host or domain name: letters, digits, hyphens, two labels or more."""
    name = value.strip().lower().rstrip(".")
    if not name and allow_empty:
        return ""
    labels = name.split(".")
    if (len(name) > 253 or len(labels) < 2 or not all(LABEL.fullmatch(label) for label in labels)
            or labels[-1].isdigit()):  # 192.0.2.1 is an address, not a name
        raise SettingsError(key, f"'{name[:64]}' is not a domain name (letters, digits and hyphens, "
                                 "such as mail.example.org; international names in their xn-- form)")
    return name


def optional_dns_name(key: str, value: str) -> str:
    return dns_name(key, value, allow_empty=True)


def ip(version: int | None = None, allow_empty: bool = False) -> Checker:
    def check(key: str, value: str) -> str:
        value = value.strip()
        if not value and allow_empty:
            return ""
        return _ip(key, value, version)
    return check


def _ip(key: str, value: str, version: int | None = None) -> str:
    # ipaddress accepts an IPv6 scope id ("fe80::1%eth0") of any characters: never here.
    if "%" in value or not value or len(value) > 45:
        raise SettingsError(key, f"'{value[:64]}' is not an IP address (e.g. 192.0.2.10 or 2001:db8::10)")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise SettingsError(key, f"'{value[:64]}' is not an IP address (e.g. 192.0.2.10 or 2001:db8::10)") from None
    if version is not None and addr.version != version:
        raise SettingsError(key, f"'{value}' is not an IPv{version} address")
    return addr.compressed


def ip_list(key: str, value: str, version: int | None = None) -> str:
    items = [a.strip() for a in value.split(",") if a.strip()]
    if len(items) > 16:
        raise SettingsError(key, "give at most 16 addresses")
    return ",".join(_ip(key, a, version) for a in items)


def ipv4_list(key: str, value: str) -> str:
    """IPv4 addresses, comma-separated (the mail stack's network has no IPv6 yet)."""
    return ip_list(key, value, 4)


def resolver_list(key: str, value: str) -> str:
    """Resolvers as the Domain step writes them: "192.0.2.53, [2001:db8::53]:5353, 192.0.2.1:5353"."""
    out = []
    for item in [a.strip() for a in value.split(",") if a.strip()][:16]:
        host, port = item, "53"
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise SettingsError(key, f"'{item[:64]}' is not an address, or [IPv6]:port")
            port = rest[1:] or "53"
        elif item.count(":") == 1:
            host, port = item.split(":")
        addr = _ip(key, host)
        number = _port(key, port)
        out.append(addr if number == 53 else (f"[{addr}]:{number}" if ":" in addr else f"{addr}:{number}"))
    return ", ".join(out)


def _port(key: str, value: str) -> int:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
        raise SettingsError(key, f"'{value[:10]}' is not a port number from 1 to 65535")
    return int(value)


def port(key: str, value: str) -> str:
    return str(_port(key, value.strip()))


def optional_port(key: str, value: str) -> str:
    return port(key, value) if value.strip() else ""


def integer(lo: int, hi: int) -> Checker:
    def check(key: str, value: str) -> str:
        value = value.strip()
        if not value:
            return ""
        if not (value.isascii() and value.lstrip("-").isdigit()) or not lo <= int(value) <= hi:
            raise SettingsError(key, f"must be a whole number from {lo} to {hi}")
        return str(int(value))
    return check


def flag(key: str, value: str) -> str:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return "1"
    if word in FALSE_WORDS:
        return "0"
    raise SettingsError(key, f"'{value[:20]}' is not 0 or 1")


def choice(*words: str, allow_empty: bool = True) -> Checker:
    def check(key: str, value: str) -> str:
        value = value.strip()
        if (value or not allow_empty) and value not in words:
            raise SettingsError(key, f"must be one of {', '.join(words)}")
        return value
    return check


def ports_json(key: str, value: str) -> str:
    if not value.strip():
        return ""
    try:
        data = json.loads(value)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise SettingsError(key, 'must be a JSON object of port numbers, e.g. {"smtp": 25}')
    out = {}
    for name, number in data.items():
        if name not in PORT_NAMES:
            raise SettingsError(key, f"unknown port name '{str(name)[:20]}'; known: {', '.join(PORT_NAMES)}")
        if type(number) is not int or not 1 <= number <= 65535:
            raise SettingsError(key, f"{name} must be a port number from 1 to 65535")
        out[name] = number
    if len(set(out.values())) != len(out):
        raise SettingsError(key, "two services cannot share one host port")
    return json.dumps(out, sort_keys=True)


def private_subnet(key: str, value: str) -> str:
    """The stack network: a private IPv4 network of /16 to /26 in its usual form
    (e.g. 172.31.53.0/24); empty keeps the default."""
    value = value.strip()
    if not value:
        return ""
    try:
        net = ipaddress.IPv4Network(value, strict=True) if len(value) <= 31 else None
    except ValueError:
        net = None
    if net is None or not net.is_private or net.is_loopback or net.is_link_local or not 16 <= net.prefixlen <= 26:
        raise SettingsError(key, f"'{value[:64]}' is not a private IPv4 network of /16 to /26 such as "
                                 "172.31.53.0/24 (its host part all zeros)")
    if str(net) != value:
        raise SettingsError(key, f"write it as {net}")
    return value


def project(key: str, value: str) -> str:
    value = value.strip()
    if value and not PROJECT.fullmatch(value):
        raise SettingsError(key, "must be lower-case letters, digits, '-' and '_' (at most 63), e.g. mailstead")
    return value


def safe_path(key: str, value: str) -> str:
    """An absolute path of plain characters, no '..' or '//' (bind mounts, nginx)."""
    value = value.strip()
    if not value:
        return ""
    if (not SAFE_PATH.fullmatch(value) or "//" in value
            or any(part in (".", "..") for part in value.split("/"))):
        raise SettingsError(key, "must be an absolute path of letters, digits and . _ + - / only, without '..'")
    return value


def email(key: str, value: str) -> str:
    value = value.strip().removeprefix("mailto:")
    if not value:
        return ""
    local, at, domain = value.rpartition("@")
    if not at or not EMAIL_LOCAL.fullmatch(local):
        raise SettingsError(key, f"'{value[:64]}' is not an email address such as postmaster@example.org")
    return f"{local}@{dns_name(key, domain)}"


def url(key: str, value: str) -> str:
    value = value.strip()
    if not value:
        return ""
    if not re.fullmatch(r"https?://[\x21-\x7e]{1,1000}", value) or any(c in value for c in "\"'<>\\`{}|^"):
        raise SettingsError(key, "must be an http(s):// URL without spaces or quotes")
    return value


def feed_url(key: str, value: str) -> str:
    """An update feed: a folder's http(s) URL (plain http too: feeds are signed), with
    no credentials, query, fragment or '%' (systemd-sysupdate reads it as a specifier)."""
    value = url(key, value)
    if not value:
        return ""
    parts = urllib.parse.urlsplit(value)
    if not parts.hostname or parts.username or parts.password or parts.query or parts.fragment or "%" in value:
        raise SettingsError(key, "must be the http(s):// address of the feed's folder, without a user name, "
                                 "password, '?', '#' or '%'")
    return value if value.endswith("/") else value + "/"


TIME_ZONE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,30}(/[A-Za-z0-9_+-]{1,30}){0,2}$")


def time_zone(key: str, value: str) -> str:
    """An IANA time zone name that this system's zone database knows (Europe/Berlin, UTC)."""
    import zoneinfo

    value = value.strip()
    if not value:
        return ""
    try:
        if not TIME_ZONE_RE.match(value):
            raise ValueError(value)
        zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise SettingsError(key, f"'{value[:40]}' is not a time zone this system knows; give a name such as "
                                 "Europe/Berlin, America/New_York or UTC") from None
    return value


def acme_directory(key: str, value: str) -> str:
    value = value.strip()
    if value.lower() in ("", "letsencrypt", "letsencrypt-staging"):
        return value.lower()
    if not value.startswith("https://"):
        raise SettingsError(key, "must be letsencrypt, letsencrypt-staging or an https:// ACME directory URL")
    return url(key, value)


def key_name(key: str, value: str) -> str:
    """A TSIG key name: DNS labels (one is enough), e.g. mailstead-key or k1.example.org."""
    name = value.strip().lower().rstrip(".")
    if not name:
        return ""
    if len(name) > 253 or not all(LABEL.fullmatch(label) for label in name.split(".")):
        raise SettingsError(key, f"'{name[:64]}' is not a key name (letters, digits, hyphens and dots)")
    return name


def host(key: str, value: str) -> str:
    """An IP address or a host name."""
    value = value.strip()
    if not value:
        return ""
    try:
        return _ip(key, value)
    except SettingsError:
        return dns_name(key, value)


def zone_list(key: str, value: str) -> str:
    items = [z.strip() for z in value.split(",") if z.strip()]
    if len(items) > 20:
        raise SettingsError(key, "give at most 20 zones")
    return ",".join(dns_name(key, z) for z in items)


SETTINGS: dict[str, Setting] = {s.key: s for s in (
    # The Domain step.
    Setting("domain", dns_name),
    Setting("mail_host", optional_dns_name),
    Setting("public_ipv4", ip(4, allow_empty=True)),
    Setting("public_ipv6", ip(6, allow_empty=True)),
    Setting("dns_resolvers", resolver_list),
    # DNS records and checks.
    Setting("dns_allow_private", flag),
    Setting("dns_auth_port", optional_port),
    Setting("dns_dnssec", flag),
    Setting("dmarc_policy", choice("none", "quarantine", "reject")),
    Setting("dmarc_rua", email),
    Setting("tlsrpt_rua", email),
    Setting("mta_sts_mode", choice("enforce", "testing", "none")),
    Setting("rfc2136_server", host),
    Setting("rfc2136_port", optional_port),
    Setting("rfc2136_key_name", key_name),
    Setting("rfc2136_algorithm", choice("hmac-sha256", "hmac-sha512")),
    # The mail stack.
    Setting("stack_ports", ports_json),
    Setting("publish_addresses", ip_list),
    Setting("dns_servers", ipv4_list),
    Setting("stack_subnet", private_subnet, restore=False),
    Setting("message_size_limit_mb", integer(1, 1024)),
    Setting("default_quota_mb", integer(0, 10_000_000)),
    Setting("stack_project", project, restore=False),
    Setting("tls_cert", safe_path, restore=False),
    Setting("tls_key", safe_path, restore=False),
    # Certificates.
    Setting("acme_directory", acme_directory),
    Setting("acme_contact", email),
    Setting("acme_challenge", choice("http-01", "dns-01")),
    Setting("acme_ca_bundle", safe_path, restore=False),
    Setting("acme_reuse_key", flag),
    Setting("acme_include_apex", flag),
    Setting("acme_caa_issuer", optional_dns_name),
    # Setup progress and choices.
    Setting("admin_address", email),
    Setting("cert_choice", choice("ca", "self-signed")),
    Setting("dns_status", choice("ok", "problems")),
    Setting("stack_deployed", flag),
    Setting("setup_complete", flag),
    # Maintenance.
    Setting("alert_webhook_url", url),
    Setting("alert_webhook_private", flag, restore=False),
    Setting("dnsbl_zones", zone_list),
    # Image updates (portal/update): where the signed feed is, whether the
    # window installs a newer version by itself ("" = on, the default; "0" = off).
    Setting("update_feed_url", feed_url),
    Setting("update_auto", flag),
    # The owner's time zone: the scheduler's times (the update window, backups) are in it.
    Setting("time_zone", time_zone),
)}


# Settings of features that are gone, which a state.db (or a backup) from before may
# hold: reading leaves them out without a word, so a strict read does not fail on them.
RETIRED = frozenset({
    "upgrade_auto",  # the stack-only upgrade's weekly auto-apply: image updates replaced it
})


def check_setting(key: str, value: object) -> str:
    """The normalized value of setting `key`, or SettingsError naming it."""
    setting = SETTINGS.get(key) if isinstance(key, str) else None
    if setting is None:
        raise SettingsError(str(key)[:40], "is not a Mailstead setting")
    if not isinstance(value, str):
        raise SettingsError(key, "must be text")
    if len(value) > MAX_VALUE:
        raise SettingsError(key, f"is longer than {MAX_VALUE} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SettingsError(key, "must not contain line breaks or other control characters")
    return setting.check(key, value)


def check_settings(values: Mapping[str, object]) -> dict[str, str]:
    return {key: check_setting(key, value) for key, value in values.items()}


def restorable(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k in SETTINGS and SETTINGS[k].restore]


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in TRUE_WORDS
