"""portal.dns against real knot servers on loopback (started here).

Two authoritative servers share one port on 127.0.0.1 and 127.0.0.2; the zone's
NS records (ns1/ns2) point at them and the "recursive resolver" setting points
at the first (knot answers NS/A for its own zone, which is all the lookup needs).
"""

from __future__ import annotations

import base64
import os
import socket
import socketserver
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.dns.check import RecordCheck, authoritative_servers, check, detect_dnssec, query, wait_until_served
from portal.dns.netcheck import ptr_check, smtp_outbound_check
from portal.dns.records import Record as Record_
from portal.dns.records import records, zone_fragment, zone_records
from portal.dns.settings import DnsSettings, load_dns_settings
from portal.dns.update import DnsError, TsigKey, UpdateTarget, delete_rrset, push, replace_rrset
from tests.conftest import free_port

from .knot import Knot, KnotKey, Record

ZONE = "example.test"
KEY = KnotKey("mailstead-key", base64.b64encode(os.urandom(32)).decode())
NS = [("ns1", "127.0.0.1"), ("ns2", "127.0.0.2")]


def tsig(key: KnotKey = KEY, secret: str | None = None) -> TsigKey:
    return TsigKey.parse(key.name, secret or key.secret, key.algorithm)


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[Knot]:
    """One knot (127.0.0.1) that accepts signed updates for ZONE."""
    server = Knot(tmp_path / "k1", ZONE, [Record("@", "TXT", '"unrelated=1"'), Record("www", "A", "192.0.2.80")],
                  ns=NS[:1], key=KEY).start()
    yield server
    server.stop()


def target_for(server: Knot, key: TsigKey | None = None) -> UpdateTarget:
    return UpdateTarget(server.address, server.port, ZONE, key or tsig(), timeout=3)


def test_replace_and_delete_rrset(knot: Knot) -> None:
    target = target_for(knot)
    name = f"_acme-challenge.mail.{ZONE}"
    replace_rrset(target, name, "TXT", ['"token-1"', '"token-2"'], ttl=60)
    assert sorted(knot.txt(name)) == [b"token-1", b"token-2"]
    replace_rrset(target, name, "TXT", ['"token-3"'])
    assert knot.txt(name) == [b"token-3"]
    delete_rrset(target, name, "TXT")
    assert knot.txt(name) == []
    assert knot.txt(ZONE) == [b"unrelated=1"]


def test_wrong_secret_changes_nothing(knot: Knot) -> None:
    serial = knot.serial()
    bad = tsig(secret=base64.b64encode(b"x" * 32).decode())
    with pytest.raises(DnsError) as err:
        replace_rrset(target_for(knot, bad), f"_acme-challenge.{ZONE}", "TXT", ['"t"'])
    assert "BADSIG" in str(err.value) and "nothing was changed" in str(err.value)
    assert err.value.field == "rfc2136_secret"
    assert bad.secret not in str(err.value)
    assert knot.serial() == serial and knot.txt(f"_acme-challenge.{ZONE}") == []


def test_unknown_key_changes_nothing(knot: Knot) -> None:
    other = TsigKey.parse("other-key", KEY.secret, "hmac-sha256")
    with pytest.raises(DnsError, match="BADKEY|NOTAUTH") as err:
        replace_rrset(target_for(knot, other), f"_acme-challenge.{ZONE}", "TXT", ['"t"'])
    assert "nothing was changed" in str(err.value)
    assert knot.txt(f"_acme-challenge.{ZONE}") == []


def test_update_refused_without_acl(tmp_path: Path) -> None:
    plain = Knot(tmp_path / "plain", ZONE, [], ns=NS[:1]).start()  # no key, no update ACL
    try:
        with pytest.raises(DnsError) as err:
            replace_rrset(target_for(plain), f"_acme-challenge.{ZONE}", "TXT", ['"t"'])
        assert "nothing was changed" in str(err.value)
        assert "REFUSED" in str(err.value) or "NOTAUTH" in str(err.value) or "BADKEY" in str(err.value)
    finally:
        plain.stop()


def test_update_timeout_names_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: connection refused
    target = UpdateTarget("127.0.0.1", port, ZONE, tsig(), timeout=1)
    with pytest.raises(DnsError, match=f"127.0.0.1 port {port}") as err:
        replace_rrset(target, f"_acme-challenge.{ZONE}", "TXT", ['"t"'])
    assert err.value.field == "rfc2136_server"


def test_name_outside_zone_refused(knot: Knot) -> None:
    with pytest.raises(DnsError, match="not inside the zone"):
        replace_rrset(target_for(knot), "_acme-challenge.other.test", "TXT", ['"t"'])


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[Knot, Knot]]:
    """The same zone on 127.0.0.1 and 127.0.0.2 (one port), both accepting updates."""
    port = free_port()
    servers = [Knot(tmp_path / f"k{i}", ZONE, [], address=ip, port=port, ns=NS, key=KEY).start()
               for i, (_, ip) in enumerate(NS, 1)]
    yield servers[0], servers[1]
    for s in servers:
        s.stop()


def test_authoritative_servers(two_servers: tuple[Knot, Knot]) -> None:
    k1, _ = two_servers
    servers = authoritative_servers(ZONE, [(k1.address, k1.port)], auth_port=k1.port)
    assert servers == [(f"ns1.{ZONE}", "127.0.0.1", k1.port), (f"ns2.{ZONE}", "127.0.0.2", k1.port)]
    response = query(servers[1], f"ns2.{ZONE}", "A")
    assert response.flags & 0x0400  # AA: asked the authoritative server itself


def test_authoritative_servers_nxdomain(two_servers: tuple[Knot, Knot]) -> None:
    k1, _ = two_servers
    with pytest.raises(DnsError, match="does not exist") as err:
        authoritative_servers(f"nope.{ZONE}", [(k1.address, k1.port)], auth_port=k1.port)
    assert err.value.field == "domain"


def test_wait_until_served(two_servers: tuple[Knot, Knot]) -> None:
    k1, k2 = two_servers
    servers = authoritative_servers(ZONE, [(k1.address, k1.port)], auth_port=k1.port)
    name = f"_acme-challenge.{ZONE}"
    replace_rrset(target_for(k1), name, "TXT", ['"abc"'])
    with pytest.raises(DnsError) as err:  # only the first server has it
        wait_until_served(name, "TXT", ['"abc"'], servers, timeout=1.5, interval=0.2)
    assert f"ns2.{ZONE} (127.0.0.2 port {k1.port})" in str(err.value)
    assert f"ns1.{ZONE}" not in str(err.value)
    replace_rrset(target_for(k2), name, "TXT", ['"abc"', '"other"'])
    wait_until_served(name, "TXT", ['"abc"'], servers, timeout=5, interval=0.2)


# -- the expected record set: export, check, push ---------------------------------------------

SELECTORS = ("mailstead-rsa", "mailstead-ed25519")


def make_state(tmp: Path, port: int, **extra: str) -> Path:
    from portal.stack import dkim

    state = tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state / "state.db")
    conn.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT)")
    values = {"domain": ZONE, "public_ipv4": "192.0.2.10", "public_ipv6": "2001:db8::10",
              "dns_resolvers": f"127.0.0.1:{port}", "dns_auth_port": str(port), **extra}
    conn.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", values.items())
    conn.commit()
    conn.close()
    dkim.ensure_keys(state / "secrets" / "dkim", SELECTORS)
    return state


def expected(state: Path) -> tuple[DnsSettings, list[Record_]]:
    s = load_dns_settings(state, allow_private=True)
    return s, records(s)


def verdicts(results: list[RecordCheck]) -> dict[tuple[str, str, str], str]:
    return {(c.record.name, c.record.rtype, c.record.value): c.verdict for c in results}


def test_fragment_loads_into_knot_and_checks_ok(tmp_path: Path) -> None:
    port = free_port()
    state = make_state(tmp_path, port)
    s, rs = expected(state)
    fragment = zone_fragment(rs, ZONE)
    servers = [Knot(tmp_path / f"k{i}", ZONE, [], address=ip, port=port, ns=NS, extra_text=fragment).start()
               for i, (_, ip) in enumerate(NS, 1)]
    try:
        for r in zone_records(rs, ZONE):  # every record reads back equal
            got = servers[1].query(r.name, r.rtype).answer
            values = {(b"".join(x.strings).decode() if r.rtype == "TXT" else x.to_text()) for rr in got for x in rr}
            assert r.value in values, (r, values)
        auth = authoritative_servers(ZONE, list(s.resolvers), auth_port=s.auth_port)
        start = time.monotonic()
        results = check(rs, ZONE, auth)
        assert time.monotonic() - start < 2
        bad = [c.as_dict() for c in results if c.verdict != "ok"]
        assert not bad, bad
        assert len(results) == len(zone_records(rs, ZONE))
        assert all(c.visible_by["seconds"] == 0 for c in results)
        assert not detect_dnssec(ZONE, auth)
    finally:
        for k in servers:
            k.stop()


def test_check_verdicts(tmp_path: Path) -> None:
    """missing, different, conflicting (two SPF, extra MX) and disagree, with two servers."""
    port = free_port()
    state = make_state(tmp_path, port)
    _s, rs = expected(state)
    host = f"mail.{ZONE}"
    keep = [r for r in rs if r.rtype in ("MX", "TXT") and r.name in (ZONE, f"_dmarc.{ZONE}")]
    base = zone_fragment([r for r in rs if r not in keep and not (r.name == host and r.rtype == "AAAA")], ZONE)
    common = [Record("@", "MX", f"10 {host}."), Record("@", "MX", "20 backup.example.net."),
              Record("@", "TXT", '"v=spf1 mx -all"'), Record("@", "TXT", '"v=spf1 a -all"'),
              Record("_dmarc", "TXT", '"v=DMARC1; p=none"', ttl=1800)]
    k1 = Knot(tmp_path / "k1", ZONE, common + [Record("mail", "AAAA", "2001:db8::10")], address="127.0.0.1",
              port=port, ns=NS, extra_text=base, soa_minimum=120).start()
    k2 = Knot(tmp_path / "k2", ZONE, common, address="127.0.0.2", port=port, ns=NS, extra_text=base,
              soa_minimum=120).start()
    try:
        servers = authoritative_servers(ZONE, [("127.0.0.1", port)], auth_port=port)
        results = {(c.record.name, c.record.rtype): c for c in check(rs, ZONE, servers)}
        mx, spf = results[(ZONE, "MX")], results[(ZONE, "TXT")]
        assert mx.verdict == "conflicting" and "20 backup.example.net." in mx.message
        assert "remove 20 backup.example.net." in mx.fix
        assert spf.verdict == "conflicting" and "v=spf1 a -all" in spf.fix
        dmarc = results[(f"_dmarc.{ZONE}", "TXT")]
        assert dmarc.verdict == "different" and dmarc.actual == ["v=DMARC1; p=none"]
        assert dmarc.expected.startswith("v=DMARC1; p=quarantine") and dmarc.visible_by["seconds"] == 1800
        aaaa = results[(host, "AAAA")]
        assert aaaa.verdict == "disagree" and "127.0.0.2" in aaaa.message
        assert aaaa.per_server[f"ns2.{ZONE} (127.0.0.2 port {port})"] == []
        assert results[(host, "A")].verdict == "ok"
    finally:
        k1.stop()
        k2.stop()
    # the same zone with the DMARC record gone: missing, visible after the negative TTL
    k1 = Knot(tmp_path / "k3", ZONE, [], address="127.0.0.1", port=port, ns=NS[:1],
              extra_text=zone_fragment([r for r in rs if r.name != f"_dmarc.{ZONE}"], ZONE), soa_minimum=120).start()
    try:
        servers = authoritative_servers(ZONE, [("127.0.0.1", port)], auth_port=port)
        dmarc = next(c for c in check(rs, ZONE, servers) if c.record.name == f"_dmarc.{ZONE}")
        assert dmarc.verdict == "missing" and dmarc.fix.startswith(f"add _dmarc.{ZONE} TXT")
        assert dmarc.visible_by["seconds"] == 120 and "2 min" in dmarc.visible_by["text"]
    finally:
        k1.stop()


def test_check_server_problems(tmp_path: Path) -> None:
    """A silent server (timeout), one that does not host the zone (REFUSED, lame)."""
    port = free_port()
    state = make_state(tmp_path, port)
    _s, rs = expected(state)
    k1 = Knot(tmp_path / "k1", ZONE, [], address="127.0.0.1", port=port, ns=NS[:1],
              extra_text=zone_fragment(rs, ZONE)).start()
    other = Knot(tmp_path / "k2", "other.test", [], address="127.0.0.2", port=port).start()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.3", port))
    try:
        servers = [(f"ns1.{ZONE}", "127.0.0.1", port), (f"ns2.{ZONE}", "127.0.0.2", port),
                   (f"ns3.{ZONE}", "127.0.0.3", port)]
        start = time.monotonic()
        results = check(rs, ZONE, servers, timeout=1)
        assert time.monotonic() - start < 3
        assert {c.verdict for c in results} == {"error"}
        c = results[0]
        assert f"ns3.{ZONE} (127.0.0.3 port {port}) did not answer within 1 s" in c.message
        assert f"ns2.{ZONE} (127.0.0.2 port {port}) refuses queries" in c.message and "lame" in c.message
        assert f"ns2.{ZONE} is listed in the NS records" in c.fix and "remove it from the NS records" in c.fix
        assert c.per_server[f"ns1.{ZONE} (127.0.0.1 port {port})"]  # the good server's answer is shown
    finally:
        silent.close()
        k1.stop()
        other.stop()


@pytest.fixture
def pushable(tmp_path: Path) -> Iterator[tuple[Knot, Path, UpdateTarget]]:
    port = free_port()
    state = make_state(tmp_path, port)
    k = Knot(tmp_path / "k1", ZONE, [Record("@", "TXT", '"google-site-verification=abc"'),
                                     Record("@", "TXT", '"v=spf1 a -all"'), Record("www", "A", "192.0.2.80")],
             address="127.0.0.1", port=port, ns=NS[:1], key=KEY).start()
    yield k, state, UpdateTarget("127.0.0.1", port, ZONE, tsig(), timeout=3)
    k.stop()


def test_push_then_check_ok_and_idempotent(pushable: tuple[Knot, Path, UpdateTarget]) -> None:
    knot, state, target = pushable
    _s, rs = expected(state)
    serial = knot.serial()
    dry = push(target, rs, dry_run=True)
    assert knot.serial() == serial  # dry run changed nothing
    actions = {(c.name, c.rtype): c for c in dry}
    apex = actions[(ZONE, "TXT")]
    assert apex.action == "replace" and '"v=spf1 a -all"' in apex.current
    assert set(apex.wanted) == {'"google-site-verification=abc"', '"v=spf1 mx -all"'}
    assert actions[(f"mail.{ZONE}", "A")].action == "add"
    assert ("10.2.0.192.in-addr.arpa", "PTR") not in actions
    push(target, rs)
    assert knot.serial() != serial
    servers = authoritative_servers(ZONE, [("127.0.0.1", knot.port)], auth_port=knot.port)
    bad = [c.as_dict() for c in check(rs, ZONE, servers) if c.verdict != "ok"]
    assert not bad, bad
    assert sorted(knot.txt(ZONE)) == [b"google-site-verification=abc", b"v=spf1 mx -all"]
    assert knot.query(f"www.{ZONE}", "A").answer[0][0].address == "192.0.2.80"
    serial = knot.serial()
    again = push(target, rs)
    assert {c.action for c in again} == {"unchanged"} and knot.serial() == serial


def test_push_with_wrong_secret_changes_nothing(pushable: tuple[Knot, Path, UpdateTarget]) -> None:
    knot, state, target = pushable
    _s, rs = expected(state)
    serial = knot.serial()
    bad = UpdateTarget(target.server, target.port, ZONE, tsig(secret=base64.b64encode(b"y" * 32).decode()))
    with pytest.raises(DnsError, match="BADSIG.*nothing was changed"):
        push(bad, rs)
    assert knot.serial() == serial and knot.txt(f"_dmarc.{ZONE}") == []


def test_dkim_signatures_verify_after_push(pushable: tuple[Knot, Path, UpdateTarget]) -> None:
    import dkim as dkimpy

    knot, state, target = pushable
    _s, rs = expected(state)
    push(target, rs)

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        name = name.decode() if isinstance(name, bytes) else name
        values = knot.txt(name.rstrip("."))
        return values[0] if values else b""

    message = (f"From: a@{ZONE}\r\nTo: b@example.net\r\nSubject: hi\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
               "Message-ID: <1@x>\r\n\r\nHello.\r\n").encode()
    for selector, algorithm in ((SELECTORS[0], b"rsa-sha256"), (SELECTORS[1], b"ed25519-sha256")):
        key = (state / "secrets" / "dkim" / f"{selector}.key").read_bytes()
        if algorithm == b"ed25519-sha256":  # dkimpy wants the raw 32-byte seed, base64
            from cryptography.hazmat.primitives import serialization
            raw = serialization.load_pem_private_key(key, None).private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
            key = base64.b64encode(raw)
        sig = dkimpy.sign(message, selector.encode(), ZONE.encode(), key, signature_algorithm=algorithm,
                          include_headers=[b"from", b"to", b"subject"])
        assert dkimpy.verify(sig + message, dnsfunc=dnsfunc), selector


# -- network checks ----------------------------------------------------------------------------

def test_ptr_check(tmp_path: Path) -> None:
    reverse = ("$ORIGIN 2.0.192.in-addr.arpa.\n$TTL 300\n"
               f"@ SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 300\n@ NS ns1.{ZONE}.\n"
               f"10 PTR mail.{ZONE}.\n11 PTR vps-11.provider.example.\n")
    k = Knot(tmp_path / "k", ZONE, [], ns=NS[:1], extra_zones={"2.0.192.in-addr.arpa": reverse}).start()
    try:
        resolvers = [(k.address, k.port)]
        ok = ptr_check("192.0.2.10", f"mail.{ZONE}", resolvers)
        assert ok.status == "ok", ok
        other = ptr_check("192.0.2.11", f"mail.{ZONE}", resolvers)
        assert other.status == "different" and "vps-11.provider.example" in other.message
        missing = ptr_check("192.0.2.12", f"mail.{ZONE}", resolvers)
        assert missing.status == "missing"
        assert missing.fix == f"ask your hosting provider to set the reverse DNS of 192.0.2.12 to mail.{ZONE}"
    finally:
        k.stop()


def test_smtp_outbound_check() -> None:
    class Greeter(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"220 test ESMTP\r\n")

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Greeter) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            # port and allow_private exist for this loopback test; net_check never passes them
            ok = smtp_outbound_check("127.0.0.1", timeout=2, port=server.server_address[1], allow_private=True)
            assert ok.status == "ok" and "greets with 220" in ok.message and "test ESMTP" not in ok.message
        finally:
            server.shutdown()
    closed = smtp_outbound_check("127.0.0.1", timeout=2, port=free_port(), allow_private=True)
    assert closed.status == "blocked"
    assert "appears blocked: ask your provider to open it" in closed.message


def test_agent_operations_configure_push_and_check(pushable: tuple[Knot, Path, UpdateTarget]) -> None:
    """The path the wizard and the CLI take: store the TSIG key, dry run, push, check, push again."""
    from portal.agent.registry import REGISTRY, Context, OpError, load_all

    load_all()
    knot, state, _target = pushable
    conn = sqlite3.connect(state / "state.db")
    conn.execute("INSERT OR REPLACE INTO settings VALUES ('dns_allow_private', '1')")
    conn.commit()
    conn.close()
    ctx = Context(state_dir=state)

    def op(name: str, **args: object) -> dict:
        return REGISTRY[name].run_checked(ctx, args)

    with pytest.raises(OpError) as err:  # a secret that is not base64: refused, nothing stored
        op("dns_configure_push", server="127.0.0.1", port=knot.port, key_name=KEY.name, secret="not base64!")
    assert "rfc2136_secret" in str(err.value) and not (state / "secrets" / "rfc2136.key").exists()
    stored = op("dns_configure_push", server="127.0.0.1", port=knot.port, key_name=KEY.name, secret=KEY.secret,
                algorithm=KEY.algorithm)
    assert KEY.secret not in str(stored)
    assert (state / "secrets" / "rfc2136.key").stat().st_mode & 0o777 == 0o600
    serial = knot.serial()
    dry = op("dns_push", dry_run=True)
    assert knot.serial() == serial and any(c["action"] == "add" for c in dry["changes"]), dry
    op("dns_push")
    result = op("dns_check")
    bad = [c for c in result["results"] if c["verdict"] != "ok"]
    assert not bad and result["required_ok"], bad
    serial = knot.serial()
    again = op("dns_push")
    assert {c["action"] for c in again["changes"]} == {"unchanged"} and knot.serial() == serial
    zone_text = op("dns_records")["zone"]
    assert "v=spf1 mx -all" in zone_text and "_mta-sts" in zone_text


def test_servfail_names_the_server_and_the_fix(tmp_path: Path) -> None:
    """A server whose copy of the zone does not load answers SERVFAIL: said per server."""
    port = free_port()
    state = make_state(tmp_path, port)
    _s, rs = expected(state)
    k1 = Knot(tmp_path / "k1", ZONE, [], address="127.0.0.1", port=port, ns=NS[:1],
              extra_text=zone_fragment(rs, ZONE)).start()
    broken = Knot(tmp_path / "k2", "other.test", [], address="127.0.0.2", port=port,
                  extra_zones={ZONE: "this is not a zone file\n"}).start()
    try:
        assert broken.query(f"mail.{ZONE}", "A").rcode() == 2  # SERVFAIL, as a resolver would see it
        servers = [(f"ns1.{ZONE}", "127.0.0.1", port), (f"ns2.{ZONE}", "127.0.0.2", port)]
        results = check(rs, ZONE, servers, timeout=1)
        assert {c.verdict for c in results} == {"error"}
        assert f"ns2.{ZONE} (127.0.0.2 port {port}) answers SERVFAIL for {ZONE}" in results[0].message
        assert results[0].fix
    finally:
        k1.stop()
        broken.stop()


def test_signed_zone_gets_tlsa_and_checks_ok(tmp_path: Path) -> None:
    """A DNSSEC-signed zone is detected, and the TLSA 3 1 1 record of the served key checks ok."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    port = free_port()
    state = make_state(tmp_path, port)
    (state / "tls").mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (state / "tls" / "bootstrap.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    unsigned = records(load_dns_settings(state, allow_private=True, dnssec=False))
    assert not [r for r in unsigned if r.rtype == "TLSA"]
    rs = records(load_dns_settings(state, allow_private=True, dnssec=True))
    tlsa = [r for r in rs if r.rtype == "TLSA"]
    assert [(r.name, r.value.split()[:3]) for r in tlsa] == [(f"_25._tcp.mail.{ZONE}", ["3", "1", "1"])]
    k = Knot(tmp_path / "k1", ZONE, [], address="127.0.0.1", port=port, ns=NS[:1],
             extra_text=zone_fragment(rs, ZONE), dnssec=True).start()
    plain = Knot(tmp_path / "k2", ZONE, [], address="127.0.0.2", port=port, ns=NS[:1],
                 extra_text=zone_fragment(unsigned, ZONE)).start()
    try:
        servers = [(f"ns1.{ZONE}", "127.0.0.1", port)]
        assert detect_dnssec(ZONE, servers) is True
        assert detect_dnssec(ZONE, [(f"ns2.{ZONE}", "127.0.0.2", port)]) is False
        bad = [c.as_dict() for c in check(rs, ZONE, servers) if c.verdict != "ok"]
        assert not bad, bad
    finally:
        k.stop()
        plain.stop()
