"""A CA certificate reaches the running mail services: issued by pebble through the
agent operations, the stack switches from the bootstrap certificate to it (a
redeploy), and a forced renewal is picked up by postfix and dovecot with a
reload only. Real stack on the host docker engine, real pebble, real knot."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.support import appdb as db
from portal.agent.registry import REGISTRY, Context, load_all
from portal.certs.store import read_live
from portal.stack import deploy as deploy_mod
from portal.stack.settings import DEFAULT_PORTS
from portal.stack.store import load_settings
from tests.conftest import retry

from .knot import Knot, Record
from .pebble import Pebble, TokenServer
from .stackharness import DOMAIN, HOSTNAME, IMAGES_DIR, SHARED_DKIM, ensure_images, make_tls, shared_dns

load_all()
PROJECT, PORT_BASE = "mstest-certs", 28000
PORTS = {name: PORT_BASE + port % 1000 for name, port in DEFAULT_PORTS.items()}


class Box:
    """An appliance's state folder driven through the agent's operations."""

    def __init__(self, root: Path) -> None:
        self.state = root / "state"
        tls = self.state / "tls"
        cert, key = make_tls(root / "bootstrap", [HOSTNAME])
        tls.mkdir(parents=True)
        shutil.copy(cert, tls / "bootstrap.crt")
        shutil.copy(key, tls / "bootstrap.key")
        shutil.copytree(SHARED_DKIM, self.state / "secrets" / "dkim")  # what the test DNS publishes
        (root / "acme").mkdir()
        self.ctx = Context(state_dir=self.state, images_dir=IMAGES_DIR, nginx_dir=root / "nginx",
                           www_dir=root / "www", reload_nginx=False, acme_dir=root / "acme")
        self.set(domain=DOMAIN, mail_host=HOSTNAME, publish_addresses="127.0.0.1", stack_project=PROJECT,
                 stack_ports=json.dumps(PORTS), dns_servers=shared_dns().address)

    def set(self, **values: str) -> None:
        db.write_settings(self.state / "state.db", values)

    def op(self, name: str, **args: object) -> dict:
        """As the agent runs it (arguments checked; a job's function run to its end here)."""
        return REGISTRY[name].run_checked(self.ctx, args)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    # pebble's validation authority resolves the names to 127.0.0.1 through its own knot.
    zone = Knot(tmp_path_factory.mktemp("knot"), DOMAIN,
                [Record(n, "A", "127.0.0.1") for n in ("mail", "mta-sts", "autoconfig")]).start()
    pebble = Pebble(tmp_path_factory.mktemp("pebble"), zone.port).start()
    tokens = TokenServer(tmp_path_factory.getbasetemp() / "tokens", pebble.http_port)
    try:
        yield pebble, tokens
    finally:
        pebble.stop()
        zone.stop()


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory, ca) -> Iterator[Box]:
    import docker

    ensure_images(docker.from_env(timeout=120))
    b = Box(tmp_path_factory.mktemp("certs-stack"))
    pebble, tokens = ca
    tokens.root = b.ctx.acme_dir  # the token server stands in for the host nginx on port 80
    tokens.start()
    try:
        yield b
    finally:
        tokens.stop()
        deploy_mod.down(load_settings(b.state), volumes=True)


def served_leaf(port: int, implicit: bool = True) -> x509.Certificate:
    """The certificate a TLS client gets on 127.0.0.1:`port` (465/993: TLS at once; 587: STARTTLS)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # verified by the caller against pebble's root
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if not implicit:
            f = raw.makefile("rb")
            f.readline()
            raw.sendall(b"EHLO test.example\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220")
        with ctx.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def verifies_for_mail_host(port: int, root_pem: bytes) -> None:
    """A client trusting only pebble's root accepts the mail host's certificate on `port`."""
    ctx = ssl.create_default_context(cadata=root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=HOSTNAME):
            pass


def live_leaf(state: Path) -> x509.Certificate:
    pair = read_live(state / "tls")
    assert pair is not None, "no live certificate installed"
    return x509.load_pem_x509_certificates(pair[0])[0]


def test_ca_certificate_reaches_the_mail_services_and_renewal_reloads_them(box: Box, ca) -> None:
    pebble, _tokens = ca
    deployed = box.op("stack_deploy")
    assert all(s["health"] == "healthy" for s in deployed["services"].values()), deployed
    bootstrap = x509.load_pem_x509_certificate((box.state / "tls" / "bootstrap.crt").read_bytes())
    assert served_leaf(PORTS["imaps"]) == bootstrap

    box.op("acme_configure", directory=pebble.directory_url, ca_bundle_pem=pebble.ca_bundle.read_text(),
           contact=f"postmaster@{DOMAIN}", challenge="http-01")
    issued = box.op("cert_issue")
    assert issued["redeployed"] is True, issued  # bootstrap -> live/ changes the services' paths
    first = live_leaf(box.state)
    for port, implicit in ((PORTS["imaps"], True), (PORTS["pop3s"], True), (PORTS["submissions"], True),
                           (PORTS["submission"], False)):
        assert served_leaf(port, implicit) == first, f"port {port} does not serve the CA certificate"
    verifies_for_mail_host(PORTS["imaps"], pebble.root_pem)
    verifies_for_mail_host(PORTS["submissions"], pebble.root_pem)

    renewed = box.op("cert_renew", force=True)
    assert renewed["renewed"] is True and renewed["redeployed"] is False, renewed
    second = live_leaf(box.state)
    assert second.serial_number != first.serial_number
    assert renewed["reloads"]["postfix"] == "reloaded" and renewed["reloads"]["dovecot"] == "reloaded", renewed

    def serves_renewed() -> None:
        for port in (PORTS["imaps"], PORTS["submissions"]):
            got = served_leaf(port)
            assert got.serial_number == second.serial_number, f"port {port} still serves serial {got.serial_number:x}"
    retry(serves_renewed, 30, "the renewed certificate on IMAPS and SMTPS")
    # The key stays private: 0600 in the archive; the live link points inside tls/.
    key_file = (box.state / "tls" / "live" / "privkey.pem").resolve()
    assert key_file.is_relative_to((box.state / "tls").resolve()) and key_file.stat().st_mode & 0o077 == 0
