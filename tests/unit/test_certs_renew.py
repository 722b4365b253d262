"""renew_due arithmetic (the one-third rule, ARI identifiers), backoff and the state file."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509

from portal.certs.renew import ari_cert_id, backoff, pick_in_window, read_state, record, renew_due, tlsa_311
from tests.unit.test_certs_support import CA, NOW


def test_one_third_rule() -> None:
    chain, _ = CA().leaf(start=NOW, days=90)
    due, when, why = renew_due(chain, None, NOW + dt.timedelta(days=59))
    assert when == NOW + dt.timedelta(days=60)
    assert not due and "third of the lifetime" in why
    decision = renew_due(chain, None, NOW + dt.timedelta(days=60, seconds=1))
    assert decision.due and decision.source == "lifetime"


def test_one_third_of_a_short_lifetime() -> None:
    chain, _ = CA().leaf(start=NOW, days=6)
    assert renew_due(chain, None, NOW + dt.timedelta(days=3, hours=23)).due is False
    assert renew_due(chain, None, NOW + dt.timedelta(days=4)).due is True


def test_ari_identifier_is_aki_dot_serial() -> None:
    ca = CA()
    chain, _ = ca.leaf(serial=0x87654321)  # high bit set: DER needs a leading zero octet
    cert = x509.load_pem_x509_certificates(chain)[0]
    aki, serial = ari_cert_id(cert).split(".")
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert base64.urlsafe_b64decode(aki + "=" * (-len(aki) % 4)) == ski
    assert base64.urlsafe_b64decode(serial + "=" * (-len(serial) % 4)) == b"\x00\x87\x65\x43\x21"
    assert "=" not in aki + serial


def test_window_pick_is_inside_and_stable() -> None:
    chain, _ = CA().leaf()
    cert = x509.load_pem_x509_certificates(chain)[0]
    start, end = NOW, NOW + dt.timedelta(days=2)
    picked = pick_in_window(start, end, cert)
    assert start <= picked <= end and picked == pick_in_window(start, end, cert)


def test_backoff_doubles_up_to_a_day() -> None:
    assert [backoff(n).total_seconds() / 3600 for n in (1, 2, 3, 4, 5, 6, 9)] == [1, 2, 4, 8, 16, 24, 24]


def test_state_records_failures_and_success(tmp_path: Path) -> None:
    record(tmp_path, NOW, "pebble said no")
    state = record(tmp_path, NOW, "pebble said no again")
    assert state["failures"] == 2 and state["last_error"] == "pebble said no again"
    assert state["next_attempt"] == (NOW + dt.timedelta(hours=2)).isoformat(timespec="seconds")
    assert json.loads((tmp_path / "certs-state.json").read_text()) == read_state(tmp_path)
    state = record(tmp_path, NOW + dt.timedelta(hours=3), None)
    assert state["failures"] == 0 and state["last_error"] is None and state["next_attempt"] is None
    assert state["last_success"] == (NOW + dt.timedelta(hours=3)).isoformat(timespec="seconds")


def test_tlsa_is_the_spki_hash() -> None:
    chain, _ = CA().leaf()
    rdata = tlsa_311(chain)
    assert rdata.startswith("3 1 1 ") and len(rdata.split()[3]) == 64


@pytest.mark.parametrize("garbage", [b"{not json", b"[1, 2]"])
def test_unreadable_state_is_empty(tmp_path: Path, garbage: bytes) -> None:
    (tmp_path / "certs-state.json").write_bytes(garbage)
    assert read_state(tmp_path) == {}
