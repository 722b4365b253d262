"""Certificates from a real ACME CA (pebble) with real DNS (knot), all on loopback.

pebble's validation authority resolves the names through knot (A records ->
127.0.0.1) and fetches HTTP-01 tokens from a small token server standing in
for the host nginx on port 80; DNS-01 records go to knot by RFC 2136 (TSIG).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.support import appdb as db
from portal.agent.registry import Context, OpError, docker_factory
from portal.certs.account import ensure_account_key, make_client
from portal.certs.privileged import (acme_configure, cert_issue, cert_renew, cert_status, check_ca_bundle_pem,
                                     write_ca_bundle)
from portal.certs.renew import read_state, renew_due, tlsa_311
from portal.certs.settings import load_acme_settings
from portal.certs.store import read_live
from portal.dns.update import write_secret
from tests.conftest import free_port

from .knot import Knot, KnotKey, Record
from .pebble import Pebble, TokenServer

ZONE = "example.test"
HOST = f"mail.{ZONE}"
NAMES = [HOST, f"mta-sts.{ZONE}", f"autoconfig.{ZONE}"]
KEY = KnotKey("mailstead-acme", base64.b64encode(os.urandom(32)).decode())


def zone_records() -> list[Record]:
    return [Record(n, "A", "127.0.0.1") for n in ("@", "mail", "mta-sts", "autoconfig")]


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    server = Knot(tmp_path_factory.mktemp("knot"), ZONE, zone_records(), key=KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, knot: Knot) -> Iterator[Pebble]:
    ca = Pebble(tmp_path_factory.mktemp("pebble"), knot.port).start()
    yield ca
    ca.stop()


class Appliance:
    def __init__(self, root: Path, pebble: Pebble, knot: Knot) -> None:
        self.state, self.acme_dir, self.pebble, self.knot = root / "state", root / "acme", pebble, knot
        (self.state / "tls").mkdir(parents=True)
        self.acme_dir.mkdir()
        self.reloads: list[str] = []
        self.ctx = Context(state_dir=self.state, docker=docker_factory(f"unix://{root}/no-docker.sock"),
                           nginx_dir=root / "nginx", www_dir=root / "www", reload_nginx=False)
        self.ctx.acme_dir = self.acme_dir
        self.ctx.cert_reload = lambda settings: self.reloads.append(str(settings.cert_path)) or {"test": "ok"}
        # The CA bundle as the agent keeps a pasted one (the only file acme_ca_bundle may name).
        bundle = write_ca_bundle(self.state, check_ca_bundle_pem(pebble.ca_bundle.read_text()))
        self.set(domain=ZONE, mail_host=HOST, acme_directory=pebble.directory_url,
                 acme_ca_bundle=str(bundle), acme_contact=f"postmaster@{ZONE}",
                 dns_resolvers=f"127.0.0.1:{knot.port}", dns_auth_port=str(knot.port))
        self.tokens: TokenServer | None = None

    def set(self, **values: str) -> None:
        db.write_settings(self.state / "state.db", values)

    def use_dns01(self, knot: Knot | None = None) -> None:
        knot = knot or self.knot
        write_secret(self.state, KEY.secret)
        self.set(acme_challenge="dns-01", rfc2136_server="127.0.0.1", rfc2136_port=str(knot.port),
                 rfc2136_key_name=KEY.name, rfc2136_algorithm=KEY.algorithm,
                 dns_resolvers=f"127.0.0.1:{knot.port}", dns_auth_port=str(knot.port))

    def serve_tokens(self, body: bytes | None = None) -> TokenServer:
        self.tokens = TokenServer(self.acme_dir, self.pebble.http_port, body).start()
        return self.tokens

    def live(self) -> tuple[bytes, bytes]:
        pair = read_live(self.state / "tls")
        assert pair is not None, "no live certificate"
        return pair


@pytest.fixture
def box(tmp_path: Path, pebble: Pebble, knot: Knot) -> Iterator[Appliance]:
    appliance = Appliance(tmp_path, pebble, knot)
    yield appliance
    if appliance.tokens:
        appliance.tokens.stop()


def leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def spki(obj) -> bytes:
    key = obj.public_key() if hasattr(obj, "public_key") else obj
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def assert_issued_by_pebble(pair: tuple[bytes, bytes], pebble: Pebble, names: list[str] = NAMES) -> x509.Certificate:
    chain = x509.load_pem_x509_certificates(pair[0])
    root = x509.load_pem_x509_certificate(pebble.root_pem)
    assert len(chain) >= 2, "no chain"
    for child, parent in zip(chain, chain[1:] + [root]):
        child.verify_directly_issued_by(parent)  # raises if not
    assert set(names) <= set(chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
                             .value.get_values_for_type(x509.DNSName))
    key = serialization.load_pem_private_key(pair[1], password=None)
    assert spki(key) == spki(chain[0])
    return chain[0]


def assert_unchanged_after_failure(box: Appliance, before: tuple[bytes, bytes], words: str,
                                   err: OpError) -> None:
    assert words in str(err), str(err)
    assert box.live() == before, "the old certificate was replaced"
    state = read_state(box.state)
    assert state["failures"] == 1 and words in state["last_error"]
    next_attempt = dt.datetime.fromisoformat(state["next_attempt"])
    assert dt.timedelta(minutes=59) < next_attempt - dt.datetime.fromisoformat(state["last_attempt"]) \
        <= dt.timedelta(hours=1)
    # Backing off: the scheduler's daily run does not hammer the CA ...
    assert "backing off" in cert_renew.run(box.ctx)["why"]


# -- issuance -------------------------------------------------------------------------------

def issue(box: Appliance, steps: list[str]) -> dict:
    """cert_issue in this thread (it is a job in the agent), its progress in `steps`."""
    return cert_issue.run(box.ctx, progress=lambda step, detail: steps.append(f"{step}: {detail}"))


def test_http01_issue(box: Appliance, pebble: Pebble) -> None:
    tokens = box.serve_tokens()
    steps: list[str] = []
    result = issue(box, steps)
    cert = assert_issued_by_pebble(box.live(), pebble)
    assert result["serial"] == f"{cert.serial_number:x}" and sorted(result["names"]) == sorted(NAMES)
    assert any(p.startswith("/.well-known/acme-challenge/") for p in tokens.requests)
    assert list(box.acme_dir.iterdir()) == [], "tokens left behind"
    assert [s.split(":")[0] for s in steps][:2] == ["account", "order"]
    assert box.reloads == [str(box.state / "tls" / "live" / "fullchain.pem")]
    secrets = box.state / "secrets" / "acme"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert (secrets / "account-key.pem").stat().st_mode & 0o777 == 0o600
    account = json.loads((secrets / "account.json").read_text())
    assert account["directory"] == pebble.directory_url and account["uri"].startswith("https://127.0.0.1:")
    status = cert_status.run(box.ctx)
    assert status["source"] == "ca" and not status["self_signed"] and status["days_left"] >= 88
    assert status["renewal"]["due"] is False and status["last_error"] is None
    # A second issue finds the same account (ConflictError path) and gets a new certificate.
    again = cert_issue.run(box.ctx)
    assert json.loads((secrets / "account.json").read_text())["uri"] == account["uri"]
    assert again["serial"] != result["serial"]


def test_dns01_issue(box: Appliance, pebble: Pebble, knot: Knot) -> None:
    box.use_dns01()
    steps: list[str] = []
    issue(box, steps)
    assert_issued_by_pebble(box.live(), pebble)
    assert any(s.startswith("propagation:") for s in steps)
    for name in NAMES:
        assert knot.txt(f"_acme-challenge.{name}") == [], "TXT record left behind"


# -- renewal ------------------------------------------------------------------------------------

def test_forced_renewal_is_atomic(box: Appliance, pebble: Pebble) -> None:
    box.serve_tokens()
    first = cert_issue.run(box.ctx)
    old = box.live()
    seen, bad = [0], []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            chain, key = read_live(box.state / "tls") or (b"", b"")
            if spki(serialization.load_pem_private_key(key, None)) != spki(leaf(chain)):
                bad.append(leaf(chain).serial_number)
            seen[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = cert_renew.run(box.ctx, force=True)
    finally:
        stop.set()
        thread.join()
    assert result["renewed"] and result["why"] == "forced"
    assert seen[0] > 10 and bad == []
    new = box.live()
    assert leaf(new[0]).serial_number != leaf(old[0]).serial_number
    assert spki(leaf(new[0])) != spki(leaf(old[0])), "a new key is the default"
    assert (Path(first["installed"]) / "fullchain.pem").read_bytes() == old[0], "old archive kept"
    assert_issued_by_pebble(new, pebble)


def test_reuse_key_keeps_the_public_key(box: Appliance) -> None:
    box.serve_tokens()
    box.set(acme_reuse_key="1")
    cert_issue.run(box.ctx)
    old = box.live()
    result = cert_renew.run(box.ctx, force=True)
    assert result["key_reused"] is True
    assert spki(leaf(box.live()[0])) == spki(leaf(old[0]))
    assert leaf(box.live()[0]).serial_number != leaf(old[0]).serial_number


def test_renewal_asks_pebbles_ari(box: Appliance, pebble: Pebble) -> None:
    assert "renewalInfo" in pebble.directory()
    box.serve_tokens()
    cert_issue.run(box.ctx)
    acme = load_acme_settings(box.state)
    client = make_client(acme, ensure_account_key(box.state))
    decision = renew_due(box.live()[0], client)
    assert decision.source == "ari" and "ARI window" in decision.why and not decision.due
    cert = leaf(box.live()[0])
    assert cert.not_valid_before_utc < decision.when < cert.not_valid_after_utc
    # After the window the same certificate is due.
    assert renew_due(box.live()[0], client, now=cert.not_valid_after_utc).due
    result = cert_renew.run(box.ctx)
    assert result["renewed"] is False and result["source"] == "ari"


# -- failures: the old certificate stays, the failure is recorded with backoff ----------------------

def test_ca_down(tmp_path: Path, knot: Knot, box: Appliance) -> None:
    own = Pebble(tmp_path / "own-pebble", knot.port, http_port=box.pebble.http_port).start()
    try:
        bundle = write_ca_bundle(box.state, check_ca_bundle_pem(own.ca_bundle.read_text()))
        box.set(acme_directory=own.directory_url, acme_ca_bundle=str(bundle))
        box.serve_tokens()
        cert_issue.run(box.ctx)
        before = box.live()
    finally:
        own.stop()
    with pytest.raises(OpError) as err:
        cert_renew.run(box.ctx, force=True)
    assert err.value.field == "acme_directory"
    assert err.value.message == (f"cannot reach the ACME directory {own.directory_url}: connection refused; "
                                 "check the URL and the CA bundle")
    assert_unchanged_after_failure(box, before, "cannot reach the ACME directory", err.value)


def test_refused_http01_challenge(box: Appliance) -> None:
    box.serve_tokens()
    cert_issue.run(box.ctx)
    before = box.live()
    box.tokens.body = b"not the key authorization"
    with pytest.raises(OpError) as err:
        cert_renew.run(box.ctx, force=True)
    assert "could not validate" in str(err.value) and "is port 80 of" in str(err.value)
    assert "(http-01)" in str(err.value)
    assert list(box.acme_dir.iterdir()) == []
    assert_unchanged_after_failure(box, before, "could not validate", err.value)


def test_token_server_down(box: Appliance) -> None:
    box.serve_tokens()
    cert_issue.run(box.ctx)
    before = box.live()
    box.tokens.stop()
    box.tokens = None
    with pytest.raises(OpError) as err:
        cert_renew.run(box.ctx, force=True)
    assert "connection refused" in str(err.value).lower(), str(err.value)
    assert_unchanged_after_failure(box, before, "could not validate", err.value)


def test_unpropagated_txt_record(tmp_path: Path, box: Appliance) -> None:
    """The zone names two servers but the second never answers: the TXT record never
    reaches every authoritative server, so nothing is answered and nothing changes."""
    box.serve_tokens()
    cert_issue.run(box.ctx)
    before = box.live()
    two = Knot(tmp_path / "two-ns", ZONE, zone_records(), ns=[("ns1", "127.0.0.1"), ("ns2", "127.0.0.9")],
               key=KEY).start()
    try:
        box.use_dns01(two)
        box.ctx.dns_propagation_timeout = 2.0
        with pytest.raises(OpError) as err:
            cert_renew.run(box.ctx, force=True)
        assert "is still not served by every authoritative server" in str(err.value)
        assert "ns2.example.test (127.0.0.9" in str(err.value)
        assert two.txt(f"_acme-challenge.{HOST}") == [], "TXT record left behind"
        assert_unchanged_after_failure(box, before, "the DNS-01 record could not be published", err.value)
    finally:
        two.stop()


# -- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, field", [
    ({"directory": "http://127.0.0.1/dir"}, "acme_directory"),
    ({"ca_bundle_pem": "/nonexistent/bundle.pem"}, "acme_ca_bundle_pem"),
    ({"contact": "postmaster"}, "acme_contact"),
    ({"challenge": "dns-01"}, "acme_challenge"),
])
def test_configure_refuses_bad_input(box: Appliance, args: dict, field: str) -> None:
    with pytest.raises(OpError) as err:
        acme_configure.run(box.ctx, **{"directory": box.pebble.directory_url, **args})
    assert err.value.code == "invalid" and str(err.value).startswith(field + ":")
    assert load_acme_settings(box.state).directory == box.pebble.directory_url, "bad input was stored"


def test_configure_stores_good_input(box: Appliance, pebble: Pebble) -> None:
    out = acme_configure.run(box.ctx, directory=pebble.directory_url, contact="hostmaster@example.test",
                         include_apex=True, ca_bundle_pem=pebble.ca_bundle.read_text())
    assert out["names"][-1] == ZONE
    acme = load_acme_settings(box.state)
    assert acme.include_apex and acme.contact == "hostmaster@example.test"


@pytest.mark.parametrize("case", ["closed port", "not acme", "untrusted tls"])
def test_unreachable_directory(box: Appliance, pebble: Pebble, case: str) -> None:
    url = {"closed port": f"https://127.0.0.1:{free_port()}/dir",
           "not acme": f"https://127.0.0.1:{pebble.management_port}/roots/0",
           "untrusted tls": pebble.directory_url}[case]
    box.set(acme_directory=url)
    if case == "untrusted tls":
        box.set(acme_ca_bundle="")
    with pytest.raises(OpError) as err:
        cert_issue.run(box.ctx)
    assert err.value.message.startswith(f"cannot reach the ACME directory {url}: ")
    assert err.value.message.endswith("; check the URL and the CA bundle")
    reason = {"closed port": "connection refused", "not acme": "not an ACME directory",
              "untrusted tls": "TLS error"}[case]
    assert reason in str(err.value)
    assert read_live(box.state / "tls") is None
    assert read_state(box.state)["failures"] == 1


def test_new_key_is_published_in_tlsa_before_the_switch(tmp_path: Path, box: Appliance) -> None:
    """With a TLSA record published and RFC 2136 configured, a renewal with a new key
    adds the new key's 3 1 1 hash next to the old one before live/ switches."""
    placeholder = "3 1 1 " + "ab" * 32
    zone = Knot(tmp_path / "tlsa-zone", ZONE, zone_records() + [Record("_25._tcp.mail", "TLSA", placeholder)],
                key=KEY).start()
    try:
        box.serve_tokens()
        box.use_dns01(zone)
        box.set(acme_challenge="http-01")
        cert_issue.run(box.ctx)
        old = box.live()
        result = cert_renew.run(box.ctx, force=True)
        assert result["tlsa"].startswith("TLSA _25._tcp.mail.example.test")
        served = {rr.to_text() for rrset in zone.query(f"_25._tcp.{HOST}", "TLSA").answer for rr in rrset}
        assert served == {placeholder, tlsa_311(old[0]), tlsa_311(box.live()[0])}
    finally:
        zone.stop()
