"""The DNS records the appliance needs: a pure function of DnsSettings (and the
DKIM / TLS key files it names), plus their export as a BIND zone fragment and
as a table with copyable values."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from portal.stack import dkim
from portal.stack.settings import StackSettings
from portal.stack.web import DAV_PATH, mta_sts_policy
from portal.dns.settings import DnsSettings
from portal.dns import DnsError

SPF = "v=spf1 mx -all"
DAV_PORT = 443


@dataclass(frozen=True)
class Record:
    name: str       # absolute, ASCII, no trailing dot
    rtype: str
    value: str      # zone-file rdata text (TXT: the whole value unquoted, see rdata())
    ttl: int
    purpose: str
    required: bool

    def rdata(self) -> str:
        """The value as zone-file rdata (TXT: quoted <=255-byte strings)."""
        return txt_rdata(self.value) if self.rtype == "TXT" else self.value


def quote(chunk: str) -> str:
    return '"' + chunk.replace("\\", "\\\\").replace('"', '\\"') + '"'


def txt_rdata(value: str) -> str:
    return " ".join(quote(s) for s in dkim.txt_strings(value))


def mta_sts_policy_text(s: DnsSettings) -> str:
    """The policy file served at https://mta-sts.<domain>/.well-known/mta-sts.txt."""
    return mta_sts_policy(StackSettings(domain=s.domain, hostname=s.mail_host, mta_sts_mode=s.mta_sts_mode))


def mta_sts_id(s: DnsSettings) -> str:
    return hashlib.sha256(mta_sts_policy_text(s).encode()).hexdigest()[:20]


def tlsa_value(key_path: Path) -> str:
    """`3 1 1 <sha256 of the SubjectPublicKeyInfo>` for the TLS key (DANE-EE, SPKI, SHA-256)."""
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as err:
        raise DnsError(f"cannot read the TLS key {key_path} ({err.strerror}); the TLSA record needs it: "
                       "issue or install the certificate first", "tls_key") from None
    except (ValueError, TypeError):
        raise DnsError(f"{key_path} is not an unencrypted PEM private key", "tls_key") from None
    spki = key.public_key().public_bytes(serialization.Encoding.DER,  # type: ignore[union-attr]
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def reverse_name(ip: str) -> str:
    return ipaddress.ip_address(ip).reverse_pointer


def records(s: DnsSettings) -> list[Record]:
    """Every record the appliance expects, in display order."""
    d, host, ttl = s.domain, s.mail_host, s.ttl
    out: list[Record] = []

    def add(name: str, rtype: str, value: str, purpose: str, required: bool = True) -> None:
        out.append(Record(name, rtype, value, ttl, purpose, required))

    def addresses(name: str, purpose: str, required: bool = True) -> None:
        if s.public_ipv4:
            add(name, "A", s.public_ipv4, purpose, required)
        if s.public_ipv6:
            add(name, "AAAA", s.public_ipv6, purpose, required)

    addresses(host, "the mail server's address")
    add(d, "MX", f"10 {host}.", "where other servers deliver mail for the domain")
    add(d, "TXT", SPF, "SPF: only this domain's MX may send its mail")
    for name, value in dkim.selector_records(s.dkim_dir, s.dkim_selectors, d):
        kind = "Ed25519" if "k=ed25519" in value else "RSA"
        add(name, "TXT", value, f"DKIM ({kind}): the public key that signs outgoing mail")
    add(f"_dmarc.{d}", "TXT", f"v=DMARC1; p={s.dmarc_policy}; rua=mailto:{s.rua}",
        "DMARC: what receivers do with mail that fails SPF and DKIM, and where they report")
    add(f"_mta-sts.{d}", "TXT", f"v=STSv1; id={mta_sts_id(s)}",
        "MTA-STS: senders must use TLS (policy version id)", required=False)
    addresses(f"mta-sts.{d}", "MTA-STS: where senders fetch the policy", required=False)
    add(f"_smtp._tls.{d}", "TXT", f"v=TLSRPTv1; rua=mailto:{s.tls_rua}",
        "TLS-RPT: where senders report TLS failures", required=False)
    for service, port in (("_submission", s.ports["submission"]), ("_submissions", s.ports["submissions"]),
                          ("_imaps", s.ports["imaps"]), ("_pop3s", s.ports["pop3s"])):
        add(f"{service}._tcp.{d}", "SRV", f"0 1 {port} {host}.",
            f"mail client setup (RFC 6186): {service[1:]} on port {port}", required=False)
    for service in ("_imap", "_pop3"):
        add(f"{service}._tcp.{d}", "SRV", "0 0 0 .",
            f"mail client setup (RFC 6186): plain {service[1:]} is not offered", required=False)
    for service in ("_caldavs", "_carddavs"):
        add(f"{service}._tcp.{d}", "SRV", f"0 1 {DAV_PORT} {host}.",
            f"calendar/contacts setup (RFC 6764): {service[1:]}", required=False)
        add(f"{service}._tcp.{d}", "TXT", f"path={DAV_PATH}",
            f"calendar/contacts setup (RFC 6764): {service[1:]} path", required=False)
    addresses(f"autoconfig.{d}", "mail client setup (Thunderbird autoconfig)", required=False)
    addresses(f"autodiscover.{d}", "mail client setup (Outlook autodiscover)", required=False)
    if s.caa_issuer:
        issue = s.caa_issuer + (f"; accounturi={s.acme_account_uri}" if s.acme_account_uri else "")
        add(d, "CAA", f'0 issue "{issue}"', "CAA: only this CA (and account) may issue certificates",
            required=False)
        add(d, "CAA", f'0 iodef "mailto:{s.rua}"', "CAA: where CAs report refused requests", required=False)
    if s.dnssec and s.tls_key is not None:
        add(f"_25._tcp.{host}", "TLSA", tlsa_value(s.tls_key),
            "DANE: the mail server's TLS key (zone is DNSSEC-signed)", required=False)
    for ip in (s.public_ipv4, s.public_ipv6):
        if ip:
            add(reverse_name(ip), "PTR", f"{host}.",
                "reverse DNS: set at your hosting provider, not in your zone", required=False)
    return out


def notes(s: DnsSettings) -> list[str]:
    """Things the owner should know about the record set."""
    out = []
    if not s.caa_issuer:
        out.append("No CAA record: the CA's CAA issuer domain is not known; set acme_caa_issuer to add one.")
    elif not s.acme_account_uri:
        out.append("The CAA record names no ACME account yet; it will once a certificate account exists.")
    if not s.dnssec:
        out.append("No TLSA (DANE) record: the zone is not DNSSEC-signed.")
    for what, addr in (("DMARC", s.rua), ("TLS-RPT", s.tls_rua)):
        if not addr.endswith("@" + s.domain) and not addr.endswith("." + s.domain):
            out.append(f"{what} reports go to {addr}: its domain must publish an authorization record "
                       f"(<{s.domain}>._report._dmarc) to accept them." if what == "DMARC" else
                       f"{what} reports go to {addr} (another domain).")
    return out


def in_zone(record: Record, zone: str) -> bool:
    return record.name == zone or record.name.endswith("." + zone)


def zone_records(rs: list[Record], zone: str) -> list[Record]:
    """The records that belong in the zone itself (not PTR, not other zones)."""
    return [r for r in rs if r.rtype != "PTR" and in_zone(r, zone)]


# -- export -----------------------------------------------------------------------------

def _owner(name: str, zone: str, relative: bool) -> str:
    if not relative:
        return name + "."
    if name == zone:
        return "@"
    return name.removesuffix("." + zone)


def zone_fragment(rs: list[Record], zone: str, relative: bool = True) -> str:
    """A BIND zone file fragment ($ORIGIN, $TTL, one line per record; no SOA/NS)."""
    rs = zone_records(rs, zone)
    ttl = rs[0].ttl if rs else 3600
    lines = [f"; Mailstead records for {zone}", f"$ORIGIN {zone}.", f"$TTL {ttl}"]
    width = max((len(_owner(r.name, zone, relative)) for r in rs), default=1)
    for r in rs:
        ttl_text = "" if r.ttl == ttl else f"{r.ttl} "
        lines.append(f"{_owner(r.name, zone, relative):<{width}} {ttl_text}IN {r.rtype:<5} {r.rdata()}")
    return "\n".join(lines) + "\n"


def table(rs: list[Record]) -> list[dict]:
    """Rows to show and copy: name, type, value (TXT as one string), the split
    form (zone-file rdata), ttl, purpose, required."""
    rows = []
    for r in rs:
        row = asdict(r)
        row["type"] = row.pop("rtype")
        row["rdata"] = r.rdata()
        if r.rtype == "TXT":
            row["strings"] = dkim.txt_strings(r.value)
        rows.append(row)
    return rows


def with_dnssec(s: DnsSettings, signed: bool) -> DnsSettings:
    return replace(s, dnssec=signed)

