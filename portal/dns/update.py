"""RFC 2136 dynamic updates signed with TSIG (dnspython does the protocol).

`replace_rrset` / `delete_rrset` change one rrset; `plan` / `push` (below)
bring every rrset the appliance owns to its wanted value in one UPDATE.
Errors are `DnsError`s that say what to fix; secrets never appear in them.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from portal.dns import DnsError
from portal.dns.names import parse_port

ALGORITHMS = {"hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha512": dns.tsig.HMAC_SHA512}
SECRET_FILE = "rfc2136.key"


@dataclass(frozen=True)
class TsigKey:
    name: str
    secret: str
    algorithm: str = "hmac-sha256"

    def __repr__(self) -> str:  # never show the secret
        return f"TsigKey(name={self.name!r}, algorithm={self.algorithm!r})"

    @classmethod
    def parse(cls, name: str, secret: str, algorithm: str = "hmac-sha256") -> TsigKey:
        """A checked key: DnsError naming the field for a bad name, secret or algorithm."""
        algorithm = (algorithm or "").strip().lower()
        if algorithm not in ALGORITHMS:
            raise DnsError(f"'{algorithm[:32]}' is not supported; use one of {', '.join(ALGORITHMS)} "
                           "(the algorithm your DNS provider gave with the key)", "rfc2136_algorithm")
        name = (name or "").strip().rstrip(".").lower()
        try:
            if not name:
                raise ValueError
            dns.name.from_text(name)
        except (ValueError, dns.exception.DNSException):
            raise DnsError("enter the TSIG key name your DNS provider gave you, e.g. mailstead-key",
                           "rfc2136_key_name") from None
        secret = "".join((secret or "").split())
        try:
            raw = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not raw:
            raise DnsError("the TSIG secret is not base64 text; paste the secret exactly as your DNS "
                           "provider shows it (letters, digits, + / and = padding)", "rfc2136_secret")
        return cls(name=name, secret=secret, algorithm=algorithm)

    def keyring(self) -> dict[dns.name.Name, dns.tsig.Key]:
        return dns.tsigkeyring.from_text({self.name: (ALGORITHMS[self.algorithm], self.secret)})


@dataclass(frozen=True)
class UpdateTarget:
    server: str
    port: int
    zone: str
    key: TsigKey
    timeout: float = 5.0

    @property
    def where(self) -> str:
        return f"{self.server} port {self.port}"


def _name_in_zone(target: UpdateTarget, name: str) -> dns.name.Name:
    absolute = dns.name.from_text(name.rstrip(".") + ".")
    if not absolute.is_subdomain(dns.name.from_text(target.zone.rstrip(".") + ".")):
        raise DnsError(f"{name} is not inside the zone {target.zone}; it cannot be updated there")
    return absolute


def new_update(target: UpdateTarget) -> dns.update.UpdateMessage:
    key = target.key
    keyname = dns.name.from_text(key.name)
    return dns.update.UpdateMessage(target.zone.rstrip(".") + ".", keyring=key.keyring(), keyname=keyname,
                                    keyalgorithm=ALGORITHMS[key.algorithm])


def send(target: UpdateTarget, update: dns.update.UpdateMessage) -> None:
    """Send one UPDATE over TCP; a refusal is a DnsError that says the zone is unchanged."""
    unchanged = "nothing was changed"
    try:
        response = dns.query.tcp(update, target.server, port=target.port, timeout=target.timeout)
    except dns.tsig.PeerBadKey:
        raise DnsError(f"the DNS server at {target.where} does not know the TSIG key '{target.key.name}' "
                       f"(BADKEY); {unchanged}. Check the key name and algorithm against your DNS provider's "
                       "settings", "rfc2136_key_name") from None
    except (dns.tsig.PeerBadSignature, dns.tsig.BadSignature):
        raise DnsError(f"the DNS server at {target.where} rejected the signature of key '{target.key.name}' "
                       f"(BADSIG: wrong secret or algorithm); {unchanged}. Enter the secret again exactly as "
                       "your DNS provider shows it", "rfc2136_secret") from None
    except (dns.tsig.PeerBadTime, dns.tsig.PeerBadTruncation):
        raise DnsError(f"the DNS server at {target.where} refused the update's signature time (BADTIME); "
                       f"{unchanged}. Check that this machine's clock is correct") from None
    except dns.exception.Timeout:
        raise DnsError(f"the DNS server at {target.where} did not answer within {target.timeout:g} s; "
                       f"{unchanged}. Check the server address and port and that TCP to it is allowed",
                       "rfc2136_server") from None
    except OSError as err:
        raise DnsError(f"cannot reach the DNS server at {target.where} ({err.strerror or err}); {unchanged}. "
                       "Check the server address and port", "rfc2136_server") from None
    except dns.exception.DNSException as err:
        raise DnsError(f"the DNS server at {target.where} sent an answer that could not be read "
                       f"({type(err).__name__}); {unchanged}", "rfc2136_server") from None
    rcode = response.rcode()
    if rcode == dns.rcode.NOERROR:
        return
    tsig_error = getattr(response, "tsig_error", 0)
    hints = {
        dns.rcode.REFUSED: f"refused the update (REFUSED); {unchanged}. Allow updates of zone {target.zone} "
                           f"with key '{target.key.name}' in the server's settings",
        dns.rcode.NOTAUTH: f"does not accept key '{target.key.name}' for zone {target.zone} (NOTAUTH"
                           f"{', TSIG error ' + dns.rcode.to_text(tsig_error) if tsig_error else ''}); "
                           f"{unchanged}. Check the key name, secret and algorithm, and that the server is "
                           f"the primary for {target.zone}",
        dns.rcode.NOTZONE: f"says a name is outside zone {target.zone} (NOTZONE); {unchanged}",
        dns.rcode.SERVFAIL: f"failed to apply the update (SERVFAIL); {unchanged}. Try again later or check "
                            "the server's logs",
    }
    text = hints.get(rcode, f"answered {dns.rcode.to_text(rcode)}; {unchanged}")
    field = "rfc2136_key_name" if rcode == dns.rcode.NOTAUTH else None
    raise DnsError(f"the DNS server at {target.where} {text}", field)


def replace_rrset(target: UpdateTarget, name: str, rdtype: str, rdatas: list[str], ttl: int = 300) -> None:
    """Make `name`/`rdtype` hold exactly `rdatas` (zone-file text, e.g. '"token"' for TXT)."""
    update = new_update(target)
    update.replace(_name_in_zone(target, name), ttl, rdtype, *rdatas)
    send(target, update)


def delete_rrset(target: UpdateTarget, name: str, rdtype: str) -> None:
    """Remove the whole `name`/`rdtype` rrset (no error if it does not exist)."""
    update = new_update(target)
    update.delete(_name_in_zone(target, name), rdtype)
    send(target, update)


# -- configuration --------------------------------------------------------------------

def secret_path(state_dir: Path) -> Path:
    from portal.core.layout import StateLayout

    return StateLayout(Path(state_dir)).rfc2136_key


def write_secret(state_dir: Path, secret: str) -> None:
    """Store the TSIG secret in <state>/secrets/rfc2136.key (0600, folder 0700)."""
    from portal.core import safefs

    safefs.ensure_dir(secret_path(state_dir).parent, 0o700)
    safefs.write_text(secret_path(state_dir), secret + "\n", 0o600)



def load_update_target(state_dir: Path) -> UpdateTarget | None:
    """The RFC 2136 target from the settings and the secret file; None if not configured."""
    values = _checked_settings(state_dir)
    server = values.get("rfc2136_server", "").strip()
    if not server:
        return None
    domain = values.get("domain", "").strip().rstrip(".").lower()
    if not domain:
        raise DnsError("is not set yet; finish the Domain step of the setup wizard first", "domain")
    from portal.core import safefs
    from portal.core.errors import UnsafePathError

    try:
        secret = safefs.read_text(secret_path(state_dir), 4096, owner_uid=os.geteuid()).strip()
    except (OSError, UnsafePathError, UnicodeDecodeError):
        raise DnsError(f"the TSIG secret file {secret_path(state_dir)} is missing or unreadable; "
                       "configure DNS updates again", "rfc2136_secret") from None
    key = TsigKey.parse(values.get("rfc2136_key_name", ""), secret,
                        values.get("rfc2136_algorithm", "") or "hmac-sha256")
    return UpdateTarget(server=server, port=parse_port(values.get("rfc2136_port"), "rfc2136_port"),
                        zone=domain.encode("idna").decode() if not domain.isascii() else domain, key=key)


# -- bringing the zone to the expected records ------------------------------------------

@dataclass(frozen=True)
class Change:
    name: str
    rtype: str
    action: str                 # add | replace | unchanged
    current: tuple[str, ...]    # zone-file rdata text
    wanted: tuple[str, ...]
    ttl: int

    def as_dict(self) -> dict:
        return {"name": self.name, "type": self.rtype, "action": self.action, "current": list(self.current),
                "wanted": list(self.wanted), "ttl": self.ttl}


def _current(target: UpdateTarget, name: str, rdtype: str) -> tuple[dns.rdataset.Rdataset | None, int]:
    from portal.dns.check import query

    try:
        response = query((target.server, target.server, target.port), name, rdtype, target.timeout)
    except dns.exception.Timeout:
        raise DnsError(f"the DNS server at {target.where} did not answer within {target.timeout:g} s; nothing "
                       "was changed. Check the server address and port", "rfc2136_server") from None
    except (OSError, dns.exception.DNSException) as err:
        raise DnsError(f"cannot ask the DNS server at {target.where} ({type(err).__name__}); nothing was "
                       "changed. Check the server address and port", "rfc2136_server") from None
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) or not response.flags & dns.flags.AA:
        raise DnsError(f"the DNS server at {target.where} does not serve the zone {target.zone} "
                       f"({dns.rcode.to_text(rcode)}{'' if response.flags & dns.flags.AA else ', not authoritative'}"
                       "); nothing was changed. Point rfc2136_server at the zone's primary server",
                       "rfc2136_server")
    owner = dns.name.from_text(name.rstrip(".") + ".")
    rrset = response.get_rrset(response.answer, owner, dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
    return (rrset, rrset.ttl) if rrset else (None, 0)


def plan(target: UpdateTarget, records: list, servers: list | None = None) -> list[Change]:
    """Per owned rrset (the names+types of `records` inside the zone, PTR excluded):
    the current value on the target server vs the wanted one. The apex TXT rrset is
    merged: only v=spf1 values are replaced, other TXT values there are kept.
    (`servers` is accepted for symmetry with check; the primary is what is compared.)"""
    from portal.dns.records import zone_records

    zone = target.zone.rstrip(".")
    owned: dict[tuple[str, str], list] = {}
    for r in zone_records(records, zone):
        owned.setdefault((r.name, r.rtype), []).append(r)
    changes = []
    for (name, rtype), rs in owned.items():
        rdtype = dns.rdatatype.from_text(rtype)
        current, ttl = _current(target, name, rtype)
        wanted = {dns.rdata.from_text(dns.rdataclass.IN, rdtype, r.rdata()) for r in rs}
        have = set(current) if current is not None else set()
        if rtype == "TXT" and name == zone:
            spf = {r for r in wanted if b"".join(r.strings).lower().startswith(b"v=spf1")}
            wanted |= {r for r in have if not b"".join(r.strings).lower().startswith(b"v=spf1")} if spf else have
        want_ttl = rs[0].ttl
        action = "add" if not have else "unchanged" if have == wanted and ttl == want_ttl else "replace"
        changes.append(Change(name, rtype, action, tuple(sorted(r.to_text() for r in have)),
                              tuple(sorted(r.to_text() for r in wanted)), want_ttl))
    return changes


def push(target: UpdateTarget, records: list, dry_run: bool = False) -> list[Change]:
    """Apply `plan` in ONE signed UPDATE (all or nothing). Each changed rrset carries a
    prerequisite that it is still as read, so a concurrent edit makes the update fail
    instead of being overwritten. Sends nothing when everything is unchanged."""
    changes = plan(target, records)
    todo = [c for c in changes if c.action != "unchanged"]
    if dry_run or not todo:
        return changes
    update = new_update(target)
    for c in todo:
        owner = _name_in_zone(target, c.name)
        if c.current:
            update.present(owner, dns.rdataset.from_text("IN", c.rtype, 0, *c.current))
        else:
            update.absent(owner, c.rtype)
        update.replace(owner, c.ttl, c.rtype, *c.wanted)
    try:
        send(target, update)
    except DnsError as err:
        if "NXRRSET" in err.message or "YXRRSET" in err.message:
            raise DnsError(f"the zone changed while the update was prepared; nothing was changed. Try again "
                           f"({err.message})") from None
        raise
    return changes


def _checked_settings(state_dir: Path) -> dict[str, str]:
    """The stored settings, each checked again (a bad one is a DnsError naming it)."""
    from portal.core.settings import SettingsError
    from portal.core.store import read_settings

    try:
        return read_settings(state_dir, strict=True)
    except SettingsError as exc:
        raise DnsError(exc.message, exc.field) from None
