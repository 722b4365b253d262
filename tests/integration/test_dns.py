"""portal.dns against real knot servers on loopback (started here).

Two authoritative servers share one port on 127.0.0.1 and 127.0.0.2; the zone's
NS records (ns1/ns2) point at them and the "recursive resolver" setting points
at the first (knot answers NS/A for its own zone, which is all the lookup needs).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from portal.dns.check import authoritative_servers, query, wait_until_served
from portal.dns.update import DnsError, TsigKey, UpdateTarget, delete_rrset, replace_rrset
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
