"""Domain and host names as the owner types them -> the ASCII (punycode) form.

`normalize_domain` is the one rule for names the appliance puts into DNS. It
is a superset of portal.web.steps.domain / portal.stack.accounts.check_domain.
Choices: surrounding spaces are dropped, upper case is lower-cased, and ONE
trailing dot (the fully-qualified form some DNS panels show) is accepted and
removed. International names go to punycode (the `idna` package, IDNA 2008 with
UTS #46 mapping; Python's IDNA 2003 codec if that package is missing); the
Unicode form is kept for display.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from portal.dns import DnsError

try:
    import idna as _idna
except ImportError:  # pragma: no cover - python3-idna is in every Debian/Ubuntu with requests
    _idna = None

DOTS = re.compile("[.\u3002\uff0e\uff61]")  # label separators, RFC 3490 section 3.1
LDH = re.compile(r"[a-z0-9-]+")
RESERVED = {"localhost": "is this machine itself", "local": "is for the local network only (mDNS)",
            "invalid": "never exists"}
EXAMPLE = "example.org"



@dataclass(frozen=True)
class Name:
    ascii: str    # lower case, punycode: what goes into DNS and config files
    unicode: str  # for display

    def __str__(self) -> str:
        return self.ascii


def _show(value: str) -> str:
    return repr(value if len(value) <= 64 else value[:64] + "…")


def _to_ascii(label: str) -> str:
    if label.isascii():
        return label
    if _idna is not None:
        return _idna.encode(label, uts46=True).decode("ascii")
    return label.encode("idna").decode("ascii")


def _to_unicode(label: str) -> str:
    if not label.startswith("xn--"):
        return label
    if _idna is not None:
        return _idna.decode(label)
    return label.encode("ascii").decode("idna")


def normalize_domain(value: str, field: str = "domain", *, allow_underscore: bool = False,
                     min_labels: int = 2) -> Name:
    """The checked Name for `value`; DnsError naming `field` and the fix otherwise.

    `allow_underscore` is for record owner names such as _dmarc.example.org (never
    for host or mail domain names); `min_labels=2` refuses single-label names."""
    def fail(message: str) -> DnsError:
        return DnsError(message, field)

    if not isinstance(value, str) or not value.strip():
        raise fail(f"{field} is required; enter a domain name such as {EXAMPLE}")
    text = value.strip()
    if any(ch.isspace() for ch in text):
        raise fail(f"{field} {_show(text)} contains a space; a domain name has none, e.g. {EXAMPLE}")
    if "@" in text:
        raise fail(f"{field} {_show(text)} is an email address; enter only the part after the @, "
                   f"e.g. {EXAMPLE}")
    if "/" in text or "://" in text:
        raise fail(f"{field} {_show(text)} looks like a web address; enter only the name, without "
                   f"http:// or slashes, e.g. {EXAMPLE}")
    try:
        ipaddress.ip_address(text.strip("[]"))
        is_ip = True
    except ValueError:
        is_ip = False
    if is_ip:
        raise fail(f"{field} {_show(text)} is an IP address; enter a domain name such as {EXAMPLE} "
                   "(the IP address goes into the A/AAAA records)")
    if ":" in text:
        raise fail(f"{field} {_show(text)} contains ':'; enter the name without a port, e.g. {EXAMPLE}")
    if DOTS.fullmatch(text[-1]):
        text = text[:-1]  # the fully-qualified form: accepted
    labels = DOTS.split(text.lower())
    if labels[-1] == "localhost":
        raise fail(f"{field} {_show(text)} is this machine itself (localhost), which the internet cannot "
                   f"reach; enter a domain you registered, e.g. {EXAMPLE}")
    if "" in labels:
        raise fail(f"{field} {_show(value.strip())} has an empty part between dots; remove the extra dot")
    ascii_labels: list[str] = []
    for label in labels:
        if "_" in label:
            if not allow_underscore:
                raise fail(f"{field}: the part {_show(label)} contains '_', which host and domain names "
                           f"cannot have (only service records such as _dmarc do); use '-' instead")
            if not re.fullmatch(r"_?[a-z0-9-]*", label) or label.count("_") != 1 and label != "_":
                raise fail(f"{field}: the part {_show(label)} may only start with '_'; "
                           f"use letters, digits and '-' after it")
        if label == "*":
            raise fail(f"{field}: wildcards ('*') are not allowed; enter one name, e.g. {EXAMPLE}")
        try:
            a = _to_ascii(label).lower()
            _to_unicode(a)  # refuses broken punycode
        except (UnicodeError, ValueError):
            raise fail(f"{field}: the part {_show(label)} is not a valid international domain name; "
                       "check its spelling") from None
        if not LDH.fullmatch(a.lstrip("_") or "x"):
            raise fail(f"{field}: the part {_show(label)} contains characters that are not allowed; "
                       f"use only letters, digits and hyphens between the dots, e.g. {EXAMPLE}")
        if len(a) > 63:
            raise fail(f"{field}: the part {_show(label)} is {len(a)} characters long; each part between "
                       "dots may have at most 63 (after conversion to punycode); shorten it")
        if a.startswith("-") or a.endswith("-"):
            raise fail(f"{field}: the part {_show(label)} starts or ends with a hyphen; remove or move "
                       "the hyphen")
        ascii_labels.append(a)
    if len(ascii_labels) < min_labels:
        raise fail(f"{field} {_show(text)} is a single name without a dot; enter the full domain name, "
                   f"e.g. {text.lower()}.org or mail.{EXAMPLE}")
    if ascii_labels[-1].isdigit():
        raise fail(f"{field} {_show(text)} looks like an IP address; enter a domain name such as {EXAMPLE}")
    tld = ascii_labels[-1]
    if tld in RESERVED:
        raise fail(f"{field} {_show(text)} cannot receive mail from the internet: .{tld} {RESERVED[tld]}; "
                   f"enter a domain you registered, e.g. {EXAMPLE}")
    ascii_name = ".".join(ascii_labels)
    if len(ascii_name) > 253:
        raise fail(f"{field} is {len(ascii_name)} characters long (in punycode); a domain name has at most "
                   "253; use a shorter name")
    return Name(ascii_name, ".".join(_to_unicode(label) for label in ascii_labels))

def parse_resolvers(text: str, field: str = "dns_resolvers") -> list[tuple[str, int]]:
    """'ip' or 'ip:port' (IPv6: '[ip]:port'), comma separated -> [(ip, port)]."""
    import ipaddress

    out: list[tuple[str, int]] = []
    for item in (p.strip() for p in (text or "").split(",")):
        if not item:
            continue
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                port = int(rest.lstrip(":")) if rest.lstrip(":").isdigit() else 0
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            port = int(p) if p.isdigit() else 0
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise DnsError(f"'{item[:64]}' is not an IP address (or ip:port); enter your recursive resolver's "
                           "address, e.g. 9.9.9.9 or 127.0.0.1:5353", field) from None
        if not 1 <= port <= 65535:
            raise DnsError(f"'{item[:64]}' has no valid port; use ip:port with a port from 1 to 65535", field)
        out.append((host, port))
    if not out:
        raise DnsError("give at least one recursive resolver, e.g. 9.9.9.9", field)
    return out


def parse_port(value: str | int | None, field: str, default: int = 53) -> int:
    if value in (None, ""):
        return default
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535:
        raise DnsError("must be a port number from 1 to 65535 (usually 53)", field)
    return port
