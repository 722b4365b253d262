"""portal.dns.settings / records: the full expected record set and its export."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import dns.rdata
import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from portal.dns.records import Record, mta_sts_policy_text, records, table, txt_rdata, zone_fragment
from portal.dns.settings import DnsSettings, load_dns_settings
from portal.dns.update import DnsError
from portal.stack import dkim
from tests.support.settings import write_settings

SELECTORS = ("mailstead-rsa", "mailstead-ed25519")




@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    write_settings(state, domain="xn--bcher-kva.example", public_ipv4="192.0.2.10", public_ipv6="2001:db8::10",
                   stack_ports=json.dumps({"submission": 10587}))
    dkim.ensure_keys(state / "secrets" / "dkim", SELECTORS)
    return state


def by(rs: list[Record], name: str, rtype: str) -> list[str]:
    return [r.value for r in rs if r.name == name and r.rtype == rtype]


D = "xn--bcher-kva.example"
HOST = f"mail.{D}"


def test_load_settings_defaults(state: Path) -> None:
    s = load_dns_settings(state, allow_private=True)
    assert (s.domain, s.mail_host) == (D, HOST)
    assert s.rua == f"postmaster@{D}" and s.tls_rua == f"postmaster@{D}"
    assert s.dmarc_policy == "quarantine" and s.caa_issuer == "letsencrypt.org" and s.acme_account_uri is None
    assert s.ports["submission"] == 10587 and s.ports["imaps"] == 993
    assert s.auth_port == 53 and s.resolvers == ()


def test_public_ip_must_be_global_by_default(state: Path) -> None:
    with pytest.raises(DnsError, match="private or reserved") as err:
        load_dns_settings(state)
    assert err.value.field == "public_ipv4"


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("public_ipv4", "2001:db8::1", "is not an IPv4 address"),
    ("public_ipv4", "", "public_ipv4 is not set"),
    ("public_ipv6", "nope", "is not an IP address"),
    ("dmarc_policy", "drop", "must be one of none, quarantine, reject"),
    ("dmarc_rua", "not-an-address", "is not an email address"),
    ("dns_resolvers", "dns.google", "is not an IP address"),
    ("dns_auth_port", "99999", "port number"),
    ("mail_host", "mail_box.example", "is not a domain name"),
])
def test_bad_settings_name_the_field(state: Path, key: str, value: str, fragment: str) -> None:
    write_settings(state, **{key: value})
    with pytest.raises(DnsError) as err:
        load_dns_settings(state, allow_private=True)
    assert fragment in str(err.value) and err.value.field == key


def test_full_record_set(state: Path) -> None:
    write_settings(state, dns_resolvers="127.0.0.1:5353, 127.0.0.2", dns_auth_port="5300",
                   dmarc_rua="dmarc@reports.example", dmarc_policy="reject")
    s = load_dns_settings(state, allow_private=True)
    assert s.resolvers == (("127.0.0.1", 5353), ("127.0.0.2", 53)) and s.auth_port == 5300
    rs = records(s)
    assert by(rs, HOST, "A") == ["192.0.2.10"] and by(rs, HOST, "AAAA") == ["2001:db8::10"]
    assert by(rs, D, "MX") == [f"10 {HOST}."]
    assert by(rs, D, "TXT") == ["v=spf1 mx -all"]
    rsa_txt, ed_txt = (by(rs, f"{sel}._domainkey.{D}", "TXT") for sel in SELECTORS)
    assert rsa_txt == [dkim.dns_txt(state / "secrets" / "dkim" / "mailstead-rsa.key")]
    assert ed_txt[0].startswith("v=DKIM1; k=ed25519; p=")
    assert by(rs, f"_dmarc.{D}", "TXT") == ["v=DMARC1; p=reject; rua=mailto:dmarc@reports.example"]
    policy_id = hashlib.sha256(mta_sts_policy_text(s).encode()).hexdigest()[:20]
    assert by(rs, f"_mta-sts.{D}", "TXT") == [f"v=STSv1; id={policy_id}"]
    assert f"mx: {HOST}" in mta_sts_policy_text(s)
    assert by(rs, f"mta-sts.{D}", "A") == ["192.0.2.10"]
    assert by(rs, f"_smtp._tls.{D}", "TXT") == [f"v=TLSRPTv1; rua=mailto:postmaster@{D}"]
    assert by(rs, f"_submission._tcp.{D}", "SRV") == [f"0 1 10587 {HOST}."]
    assert by(rs, f"_submissions._tcp.{D}", "SRV") == [f"0 1 465 {HOST}."]
    assert by(rs, f"_imaps._tcp.{D}", "SRV") == [f"0 1 993 {HOST}."]
    assert by(rs, f"_pop3s._tcp.{D}", "SRV") == [f"0 1 995 {HOST}."]
    assert by(rs, f"_imap._tcp.{D}", "SRV") == ["0 0 0 ."] == by(rs, f"_pop3._tcp.{D}", "SRV")
    assert by(rs, f"_caldavs._tcp.{D}", "SRV") == [f"0 1 443 {HOST}."]
    assert by(rs, f"_carddavs._tcp.{D}", "TXT") == ["path=/dav/"]
    assert by(rs, f"autoconfig.{D}", "AAAA") == ["2001:db8::10"] and by(rs, f"autodiscover.{D}", "A")
    assert by(rs, D, "CAA") == ['0 issue "letsencrypt.org"', '0 iodef "mailto:dmarc@reports.example"']
    assert not by(rs, f"_25._tcp.{HOST}", "TLSA")
    assert by(rs, "10.2.0.192.in-addr.arpa", "PTR") == [f"{HOST}."]
    ptr = [r for r in rs if r.rtype == "PTR"]
    assert len(ptr) == 2 and not any(r.required for r in ptr)
    assert all(r.required for r in rs if r.rtype in ("MX", "A") and r.name == HOST)


def test_mta_sts_id_follows_the_policy(state: Path) -> None:
    enforce = records(load_dns_settings(state, allow_private=True))
    write_settings(state, mta_sts_mode="testing")
    testing = records(load_dns_settings(state, allow_private=True))
    assert by(enforce, f"_mta-sts.{D}", "TXT") != by(testing, f"_mta-sts.{D}", "TXT")


def test_caa_with_account_and_unknown_issuer(state: Path) -> None:
    acme = state / "secrets" / "acme"
    acme.mkdir(parents=True)
    (acme / "account.json").write_text(json.dumps({"uri": "https://ca.test/acct/7", "directory": "x"}))
    rs = records(load_dns_settings(state, allow_private=True))
    assert by(rs, D, "CAA")[0] == '0 issue "letsencrypt.org; accounturi=https://ca.test/acct/7"'
    write_settings(state, acme_directory="https://ca.test/dir")
    assert not by(records(load_dns_settings(state, allow_private=True)), D, "CAA")
    write_settings(state, acme_caa_issuer="ca.test")
    assert by(records(load_dns_settings(state, allow_private=True)), D, "CAA")[0].startswith('0 issue "ca.test;')


def test_tlsa_only_with_dnssec(state: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    (state / "tls").mkdir()
    (state / "tls" / "bootstrap.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    rs = records(load_dns_settings(state, allow_private=True, dnssec=True))
    assert by(rs, f"_25._tcp.{HOST}", "TLSA") == [f"3 1 1 {hashlib.sha256(spki).hexdigest()}"]


def test_txt_splitting() -> None:
    value = "v=DKIM1; k=rsa; p=" + "A" * 392
    assert len(value) == 410
    strings = dns.rdata.from_text("IN", "TXT", txt_rdata(value)).strings
    assert [len(x) for x in strings] == [255, 155] and b"".join(strings).decode() == value
    tricky = 'say "hi" \\ ok'
    assert txt_rdata(tricky) == '"say \\"hi\\" \\\\ ok"'
    assert dns.rdata.from_text("IN", "TXT", txt_rdata(tricky)).strings == (tricky.encode(),)


def test_zone_fragment_parses_and_table(state: Path) -> None:
    s = load_dns_settings(state, allow_private=True)
    rs = records(s)
    text = zone_fragment(rs, s.domain)
    assert "PTR" not in text and "$TTL 3600" in text
    soa = "@ IN SOA ns1 hostmaster 1 3600 600 86400 300\n@ IN NS ns1\nns1 IN A 192.0.2.53\n"
    zone = dns.zone.from_text(text + soa, origin=s.domain + ".", relativize=False)
    rsa = zone.find_rdataset(f"mailstead-rsa._domainkey.{D}.", "TXT")[0]
    assert len(rsa.strings) == 2 and b"".join(rsa.strings).decode() == by(rs, f"mailstead-rsa._domainkey.{D}", "TXT")[0]
    absolute = zone_fragment(rs, s.domain, relative=False)
    assert any(line.split()[:3] == [f"{HOST}.", "IN", "A"] for line in absolute.splitlines())
    assert dns.zone.from_text(absolute + soa, origin=s.domain + ".", relativize=False)
    rows = table(rs)
    dk = next(r for r in rows if r["name"] == f"mailstead-rsa._domainkey.{D}")
    assert dk["type"] == "TXT" and "".join(dk["strings"]) == dk["value"] and dk["rdata"].count('"') == 4
    assert {"name", "type", "value", "ttl", "purpose", "required"} <= set(rows[0])


def test_missing_domain(tmp_path: Path) -> None:
    with pytest.raises(DnsError, match="Domain step") as err:
        load_dns_settings(tmp_path)
    assert err.value.field == "domain"


def test_settings_is_frozen() -> None:
    s = DnsSettings(domain="example.org", mail_host="mail.example.org")
    with pytest.raises(AttributeError):
        s.domain = "x"  # type: ignore[misc]
