"""The DNSBL check against a fake blocklist served by a real knot on loopback,
through the configured resolver (the setting dns_resolvers)."""

from __future__ import annotations


import pytest

from portal import checks
from .knot import Knot, Record

from tests.unit.checks_support import write_settings
from tests.unit.test_checks import env_for


checks.load_all()
LISTED, CLEAN = "192.0.2.10", "192.0.2.11"


@pytest.fixture(scope="module")
def blocklist(tmp_path_factory):
    clean_zone = ("$ORIGIN clean.test.\n$TTL 300\n@ SOA ns1.clean.test. h.clean.test. 1 3600 600 86400 300\n"
                  "@ NS ns1.clean.test.\nns1 A 127.0.0.1\n")
    knot = Knot(tmp_path_factory.mktemp("dnsbl"), "dnsbl.test", [
        Record("10.2.0.192", "A", "127.0.0.2"),
        Record("10.2.0.192", "TXT", '"listed for the test"'),
        Record("2.0.0.127", "A", "127.0.0.2"),  # the usual test entry
    ], extra_zones={"clean.test": clean_zone}).start()
    yield knot
    knot.stop()


def dnsbl(state, ip, zones, resolver):
    write_settings(state, public_ipv4=ip, dnsbl_zones=zones, dns_resolvers=resolver)
    result = checks.run_one("dnsbl", env_for(state, net_timeout=1.0))
    assert result.id == "dnsbl"
    return result


def test_a_listed_address_fails_naming_the_zone_and_answer(tmp_path, blocklist):
    r = dnsbl(tmp_path, LISTED, "clean.test, dnsbl.test", f"127.0.0.1:{blocklist.port}")
    assert r.status == "fail" and r.message.startswith(f"{LISTED} is listed on dnsbl.test (127.0.0.2)")
    assert "clean.test" not in r.message and "removal" in r.fix


def test_an_unlisted_address_passes(tmp_path, blocklist):
    r = dnsbl(tmp_path, CLEAN, "clean.test,dnsbl.test", f"127.0.0.1:{blocklist.port}")
    assert (r.status, r.message) == ("ok", f"{CLEAN} is on none of 2 blocklists")


def test_a_blocklist_that_does_not_answer_is_a_warning(tmp_path, blocklist):
    r = dnsbl(tmp_path, CLEAN, "dnsbl.test,refused.test", f"127.0.0.1:{blocklist.port}")
    assert r.status == "warn" and "refused.test" in r.message and "dnsbl.test" not in r.message


def test_missing_settings_are_named(tmp_path, blocklist):
    write_settings(tmp_path, dnsbl_zones="dnsbl.test")
    r = checks.run_one("dnsbl", env_for(tmp_path))
    assert r.status == "warn" and "public_ipv4 is not set" in r.message
    r = dnsbl(tmp_path, CLEAN, "dnsbl.test", "")
    assert r.status == "warn" and "dns_resolvers" in r.message
