"""The whole stack, end to end: DKIM verified against a real DNS server, spam
refused at SMTP time, a TLS audit of every port, and a failed deploy that
leaves the previous stack running."""

from __future__ import annotations

import email
import imaplib
import smtplib
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import dkim
import dns.resolver
import pytest

from portal.stack.accounts import Accounts
from portal.stack.deploy import DeployError, service_states
from portal.stack.dovecot_keys import DovecotKeys
from tests.conftest import retry

from .tlsaudit import tls_problems
from .stackharness import DOMAIN, HOSTNAME, Stack, shared_dns, start_stack

PASSWORD = "e2e-correct-horse-battery"
ALICE = f"alice@{DOMAIN}"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    s = start_stack(tmp_path_factory.mktemp("e2e"), "mstest-e2e", 24000)
    try:
        s.deploy()
        Accounts(s.settings.accounts_db).create_mailbox(ALICE, PASSWORD, keys=DovecotKeys(s.client, s.settings.project))
        yield s
    finally:
        s.down()


def tls_context(stack: Stack) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(stack.settings.cert_path))
    ctx.check_hostname = False  # the certificate names the mail host; we connect to 127.0.0.1
    return ctx


def fetch(stack: Stack, subject: str, timeout: float = 60) -> bytes:
    """The raw message with `subject` from alice's mailbox, once it has arrived: in the
    INBOX, or in Junk for mail from outside that rspamd flags (without real DNS for the
    sender's domain, the tests' outside mail scores about 7.6, over the threshold of 6)."""
    def look() -> bytes:
        with imaplib.IMAP4_SSL("127.0.0.1", stack.port("imaps"), ssl_context=tls_context(stack)) as imap:
            imap.login(ALICE, PASSWORD)
            for folder in ("INBOX", "Junk"):
                typ, _count = imap.select(folder, readonly=True)
                if typ != "OK":
                    continue  # Junk is made by the first spam
                _typ, data = imap.search(None, "SUBJECT", f'"{subject}"')
                if data[0]:
                    _typ, msg = imap.fetch(data[0].split()[-1], "(BODY.PEEK[])")
                    return msg[0][1]
            raise AssertionError(f"no message with subject {subject!r} yet")
    return retry(look, timeout, f"message {subject!r} in {ALICE}'s INBOX or Junk")


def test_submission_is_dual_dkim_signed_and_verifies_against_dns(stack: Stack) -> None:
    """Signed by rspamd, verified by dkimpy with the keys the test DNS server (knot) publishes."""
    knot = shared_dns()
    with smtplib.SMTP("127.0.0.1", stack.port("submission"), local_hostname="client.test", timeout=30) as s:
        s.starttls(context=tls_context(stack))
        s.login(ALICE, PASSWORD)
        s.sendmail(ALICE, [ALICE], f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: signed e2e\r\n"
                                   "Message-ID: <e2e-dkim@example.test>\r\n\r\nsigned body\r\n")
    raw = fetch(stack, "signed e2e")
    msg = email.message_from_bytes(raw)
    sigs = msg.get_all("DKIM-Signature") or []
    algorithms = sorted(part.strip().split("=", 1)[1] for sig in sigs for part in sig.split(";")
                        if part.strip().startswith("a="))
    assert algorithms == ["ed25519-sha256", "rsa-sha256"], sigs

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        values = knot.txt(name.decode().rstrip("."))
        return values[0] if values else b""

    verifier = dkim.DKIM(raw)
    for idx in range(len(sigs)):
        assert verifier.verify(idx=idx, dnsfunc=dnsfunc), f"signature {idx} does not verify: {sigs[idx]}"


def unbound_stats(stack: Stack) -> dict[str, float]:
    out = stack.exec("unbound", "unbound-control", "-c", "/etc/mailstead/unbound/unbound.conf", "stats_noreset",
                     user="unbound")
    return {k: float(v) for k, v in (line.split("=", 1) for line in out.splitlines() if "=" in line)}


def test_lookups_go_to_the_stacks_own_caching_resolver(stack: Stack) -> None:
    """rspamd asks unbound (at its fixed address), which forwards to dns_servers (the
    test's knot) and answers repeats from its cache."""
    before = unbound_stats(stack)
    with smtplib.SMTP("127.0.0.1", stack.port("smtp"), local_hostname="sender.test", timeout=60) as s:
        s.starttls(context=tls_context(stack))
        s.sendmail("someone@sender.test", [ALICE], f"From: someone@sender.test\r\nTo: {ALICE}\r\n"
                                                  "Subject: via unbound\r\n\r\nbody\r\n")
    fetch(stack, "via unbound")
    after = unbound_stats(stack)
    # SPF, DMARC and the HELO name at least, for the sender's domain
    assert after["total.num.queries"] - before["total.num.queries"] >= 3, (before, after)
    # The zone's records through the resolver (asked from the host, on the stack network):
    # forwarded to knot once, then from the cache.
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.lifetime = [stack.settings.resolver_address], 10
    first = unbound_stats(stack)
    for _ in range(2):
        assert [r.exchange.to_text() for r in resolver.resolve(DOMAIN, "MX")] == [f"{HOSTNAME}."]
    last = unbound_stats(stack)
    assert last["total.num.cachehits"] - first["total.num.cachehits"] >= 1, (first, last)
    # rspamd is pointed at it by address (the others reach it through docker's DNS).
    options = stack.exec("rspamd", "cat", "/etc/rspamd/override.d/options.inc")
    assert f'nameserver = ["{stack.settings.resolver_address}:53"];' in options
    network = stack.container("unbound").attrs["NetworkSettings"]["Networks"][stack.settings.project]
    assert network["IPAMConfig"]["IPv4Address"] == stack.settings.resolver_address


def test_gtube_is_rejected_at_smtp_time(stack: Stack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.port("smtp"), local_hostname="sender.test", timeout=60) as s:
        s.starttls(context=tls_context(stack))
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail("spammer@sender.test", [ALICE],
                       f"From: spammer@sender.test\r\nTo: {ALICE}\r\nSubject: gtube\r\n\r\n{GTUBE}\r\n")
    assert 500 <= err.value.smtp_code < 600, err.value


def test_tls_audit_finds_nothing_below_tls12_and_no_weak_cipher(stack: Stack, tmp_path: Path) -> None:
    targets = {"smtp": "smtp", "submission": "smtp", "submissions": None, "imaps": None, "pop3s": None}
    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = {name: pool.submit(tls_problems, f"127.0.0.1:{stack.port(name)}", starttls,
                                     tmp_path / f"{name}.json")
                   for name, starttls in targets.items()}
        problems = [f"{name}: {p}" for name, f in futures.items() for p in f.result()]
    assert not problems, "\n".join(problems)


def all_healthy(stack: Stack) -> None:
    bad = {s: f"{st.status}/{st.health}" for s, st in service_states(stack.client, stack.settings.project).items()
           if not st.ok}
    assert not bad, f"not healthy: {bad}"


def test_a_deploy_that_keeps_containers_recreates_only_what_differs(stack: Stack) -> None:
    """recreate=False (the old version's recovery after a failed update): with the same
    rendered folder the running containers stay, a stopped one is started again, and a
    changed folder recreates them all."""
    from portal.stack import deploy as deploy_mod

    def ids() -> dict[str, str]:
        return {s: stack.container(s).id for s in service_states(stack.client, stack.settings.project)}

    before = ids()
    stack.container("radicale").stop(timeout=10)
    deploy_mod.deploy(stack.client, stack.settings, timeout=180, recreate=False)
    assert ids() == before
    all_healthy(stack)
    stack.settings = replace(stack.settings, message_size_limit_mb=stack.settings.message_size_limit_mb + 1)
    deploy_mod.deploy(stack.client, stack.settings, timeout=180, recreate=False)  # a changed folder
    after = ids()
    assert not set(after.values()) & set(before.values()), (before, after)
    all_healthy(stack)


def test_failed_deploy_names_the_service_and_keeps_the_previous_stack(stack: Stack) -> None:
    with smtplib.SMTP("127.0.0.1", stack.port("smtp"), local_hostname="sender.test", timeout=60) as s:
        s.sendmail("friend@sender.test", [ALICE], "From: friend@sender.test\r\nSubject: before the failed deploy\r\n\r\nhi\r\n")
    fetch(stack, "before the failed deploy")
    good = stack.settings
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = busy.getsockname()[1]
    try:
        with pytest.raises(DeployError) as err:
            stack.deploy(ports={**good.ports, "imaps": taken})
    finally:
        busy.close()
        stack.settings = good
    assert err.value.rolled_back, err.value
    assert "dovecot" in err.value.failures, err.value.failures
    assert str(taken) in str(err.value), err.value
    # The previous stack is back: every service healthy, the mail readable on the old port.
    retry(lambda: all_healthy(stack), 120, "the previous stack to be healthy again")
    assert b"hi" in fetch(stack, "before the failed deploy")
