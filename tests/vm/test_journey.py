"""The owner's whole journey in the booted image (UEFI), as the owner meets it.

The outside world stands in on the host's loopback, reached by the guest through
qemu user networking at 10.0.2.2 (the host's 127.0.0.1):

- knot on 127.0.0.1:53: the domain's authoritative DNS (example.test, RFC 2136
  updates with a TSIG key; its name server ns1 is 10.0.2.2) and the recipient
  domain remote.test (MX mx.remote.test = 10.0.2.2). The guest's resolver, the
  containers' resolver and the wizard's resolver are all pinned to it;
- pebble: the ACME CA. Its validation authority resolves through the same knot,
  where the appliance published 127.0.0.1 (its public address from the host's
  side), and fetches HTTP-01 tokens from the guest's port 80 forwarded there;
- an SMTP sink on 127.0.0.1:25: the remote.test MX for outbound mail;
- sshd: the SFTP backup target.

One machine walks the wizard in chromium, loses power in the middle of the
deploy, boots again and resumes; then mail, CalDAV, the security checks, a
backup, update feeds that must be refused, an update that passes its checks (v2
takes over), and one whose stack cannot start (v3): the machine boots it, finds
it unhealthy and goes back to v2 by itself.

A second, fresh machine (flashed with v2) boots with BIOS firmware: the machine checks of
tests/vm/checks.py at first boot (the token gate, the A/B layout, listeners,
the units' sandboxes), then it restores from that backup in the wizard, then
the restored stack's checks and the web user's reach into the agent's state.
Figures go to artifacts/vm/report.json (bench/appliance.py reads them).
"""

from __future__ import annotations

import base64
import email
import hashlib
import imaplib
import json
import os
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import caldav
import dkim
import pyotp
import pytest
import requests
from playwright.sync_api import Page, expect

from tests.integration.backup_targets import Sshd
from tests.integration.knot import Knot, KnotKey
from tests.integration.pebble import Pebble
from tests.integration.tlsaudit import tls_problems
from tests.support.smtp import SmtpSink

from . import checks
from .checks import GUEST_PY
from .machine import ARTIFACTS, Machine, boot, free_port, retry, subtest
from .updates import FeedServer, refused_feeds, update_timeline, verified_on, version_of

DOMAIN = "example.test"
HOST = f"mail.{DOMAIN}"
ADMIN = f"postmaster@{DOMAIN}"
PASSWORD = "journey-correct-horse-battery"
HOST_ALIAS = "10.0.2.2"  # the host's loopback, as qemu user networking shows it to the guest
KEY = KnotKey("mailstead-journey", base64.b64encode(os.urandom(32)).decode())
STATE = "/var/lib/mailstead"
MESSAGES = 40  # host MTA -> guest mailbox, for the rate figure

REMOTE_ZONE = f"""$ORIGIN remote.test.
$TTL 300
@ SOA ns1.remote.test. hostmaster.remote.test. 1 3600 600 86400 300
@ NS ns1.remote.test.
ns1 A {HOST_ALIAS}
@ MX 10 mx.remote.test.
mx A {HOST_ALIAS}
"""


@dataclass
class Outside:
    knot: Knot
    pebble: Pebble
    sink: SmtpSink
    sshd: Sshd
    workdir: Path

    def authorize(self, public_key: str) -> None:
        """Add an appliance's SSH key to the SFTP user's authorized_keys."""
        with open(self.sshd.authorized, "a") as f:
            f.write(public_key.strip() + "\n")


@dataclass
class Ports:
    """Host ports forwarded to the guest's standard ones."""
    guest: dict[str, int]
    host: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.host = {name: free_port() for name in self.guest}

    def forwards(self) -> dict[int, int]:
        return {self.host[name]: port for name, port in self.guest.items()}

    def __getitem__(self, name: str) -> int:
        return self.host[name]


MAIL_PORTS = {"https": 443, "smtp": 25, "submissions": 465, "submission": 587, "imaps": 993, "pop3s": 995}


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outside]:
    root = tmp_path_factory.mktemp("outside")
    # Port 53: the guest's resolv.conf and docker's `dns:` cannot name a port.
    knot = Knot(root / "knot", DOMAIN, [], port=53, ns=[("ns1", HOST_ALIAS)], key=KEY,
                extra_zones={"remote.test": REMOTE_ZONE}).start()
    pebble = Pebble(root / "pebble", knot.port, tls_ips=("127.0.0.1", HOST_ALIAS)).start()
    sink = SmtpSink(port=25)  # the remote MX: the guest's postfix delivers to 10.0.2.2:25
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    sshd = Sshd(root / "sshd").start()
    try:
        yield Outside(knot, pebble, sink, sshd, root)
    finally:
        sshd.stop()
        sink.shutdown()
        sink.server_close()
        pebble.stop()
        knot.stop()


# -- helpers ------------------------------------------------------------------------------

def guest_python(m: Machine, code: str, timeout: float = 120) -> str:
    payload = base64.b64encode(code.encode()).decode()
    return m.succeed(f"echo {payload} | base64 -d | {GUEST_PY} -", timeout=timeout)


def pin_guest_to_the_outside(m: Machine) -> None:
    """What the test must choose for its lab: every resolver in the guest asks the host's
    knot (never qemu's forwarder to the host's own DNS), loopback counts as public, and
    the containers resolve through knot too."""
    m.succeed(f"rm -f /etc/resolv.conf && echo 'nameserver {HOST_ALIAS}' > /etc/resolv.conf")
    # Through the agent's own checks (root on the console may set any setting).
    m.succeed(f"mailstead settings-set dns_allow_private=1 dns_servers={HOST_ALIAS}")


def fingerprint_seen_by_chromium(page: Page, url: str) -> str:
    """The SHA-256 fingerprint of the certificate chromium got for `url` (DevTools protocol)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    page.goto(url)
    origin = re.match(r"https://[^/]+", url).group(0)
    chain = cdp.send("Network.getCertificate", {"origin": origin})["tableNames"]
    der = base64.b64decode(chain[0])
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def tls_to(port: int) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the chain is checked once, in verify_chain
    return ctx


def imap_subjects(port: int, address: str, password: str, folders: tuple[str, ...] = ("INBOX",)) -> list[str]:
    out = []
    with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=tls_to(port), timeout=60) as imap:
        imap.login(address, password)
        for folder in folders:
            typ, count = imap.select(folder, readonly=True)
            if typ != "OK" or count[0] == b"0":
                continue
            _typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            out += [email.message_from_bytes(p[1])["Subject"] or "" for p in data if isinstance(p, tuple)]
    return out


# Mail from the tests' "remote MTA" is in the mailbox, in the INBOX or, when rspamd
# scores it as spam (the stand-in DNS decides much of that), in Junk.
MAILBOX = ("INBOX", "Junk")


def wait_for_subjects(port: int, address: str, password: str, wanted: set[str], timeout: float) -> None:
    def arrived() -> bool:
        missing = wanted - set(imap_subjects(port, address, password, MAILBOX))
        assert not missing, f"{len(missing)} of {len(wanted)} messages not in {address}'s mailbox yet"
        return True

    retry(arrived, timeout, f"{len(wanted)} messages in {address}'s mailbox", interval=2)


def stack_healthy(m: Machine) -> dict:
    status = json.loads(m.succeed("mailstead stack-status", timeout=120))
    bad = {n: s.get("health") for n, s in status["services"].items() if s.get("health") != "healthy"}
    assert not bad, f"not healthy: {bad}"
    return status


def fresh_totp_code(secret: str) -> str:
    """A code of a step newer than any the journey used: the agent takes each step once
    (sign-in and confirmations alike), so this waits for the next step when it must.
    It gives the next step's code, which the agent accepts a step early."""
    totp = pyotp.TOTP(secret)
    step = int(time.time() // totp.interval) + 1
    if step <= JOURNEY.last_totp_step:
        time.sleep(JOURNEY.last_totp_step * totp.interval - time.time() + 0.5)
        step = int(time.time() // totp.interval) + 1
    JOURNEY.last_totp_step = step
    return totp.at(step * totp.interval)


def keep_guest_logs(m: Machine, name: str) -> None:
    """On a failure: the serial console and the portal's and agent's journal, in artifacts/vm/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}-serial.log").write_text(m.console())
    try:
        (ARTIFACTS / f"{name}-guest.log").write_text(m.execute(
            "journalctl -b --no-pager -n 400 -u mailstead-agent -u mailstead-web -u mailstead-update-boot "
            "-u mailstead-update-verify; journalctl -b -1 --no-pager -n 200 -u 'mailstead-update*'; "
            "cat /var/lib/mailstead-update/update.json; docker ps -a", timeout=60)[1])
    except Exception as err:  # the guest may be gone
        print(f"no guest log: {err}")


def sign_in(page: Page, url: str) -> None:
    """The owner signs in with the password and a fresh TOTP code."""
    page.goto(url + "/login")
    page.fill("#address", ADMIN)
    page.fill("#password", PASSWORD)
    page.fill("#code", fresh_totp_code(JOURNEY.totp_secret))
    page.click("#login-submit")
    expect(page).to_have_url(re.compile(r"/admin/?$"))


def deliver(ports: Ports, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", ports["smtp"], local_hostname="mx.remote.test", timeout=120) as smtp:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "alice@remote.test", ADMIN, subject
        msg.set_content("Delivered by a remote MTA on port 25.\n")
        smtp.send_message(msg)


def certificate_fingerprint(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with tls_to(port).wrap_socket(raw) as conn:
            return hashlib.sha256(conn.getpeercert(binary_form=True)).hexdigest()


def image_version(m: Machine) -> str:
    return m.succeed(". /etc/os-release && echo $IMAGE_VERSION").strip()


def machine_identity(m: Machine) -> str:
    """What makes this machine itself and must survive an update: machine-id and ssh host keys."""
    return m.succeed("cat /etc/machine-id && sha256sum /var/lib/mailstead-ssh/etc/ssh/ssh_host_*_key.pub")


def install_from_dashboard(page: Page, url: str, feed_url: str, version: str) -> None:
    """The owner points the appliance at `feed_url`, checks it, sees `version` and installs it."""
    page.goto(url + "/admin/updates/")
    page.fill("#feed_url", feed_url)
    page.click("#update-settings-save")
    page.click("#update-check-now")
    expect(page.locator("#update-available-title")).to_contain_text(version)
    shot(page, f"update-available-{version}")
    page.click("#update-install")
    expect(page.locator("#flash-1")).to_contain_text(f"Installing {version}")


def update_history(m: Machine) -> list[dict]:
    return json.loads(m.succeed("cat /var/lib/mailstead-update/update.json"))["history"]


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"journey-{name}.png"), full_page=True)


# -- the journey ---------------------------------------------------------------------------

@dataclass
class Journey:
    """What the first machine leaves for the move to new hardware."""
    backup_password: str = ""
    subjects: set[str] = field(default_factory=set)
    dkim_keys: str = ""
    totp_secret: str = ""
    last_totp_step: int = 0  # the newest TOTP step given to the agent (see fresh_totp_code)


JOURNEY = Journey()


# The bootstrap certificate is self-signed, and the security check asks without verifying.
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_first_boot_to_mail_delivered_surviving_power_loss_and_updates(
        page: Page, image: Path, feeds: Path, outside: Outside, report: dict, tmp_path: Path) -> None:
    page.set_default_timeout(60_000)
    ports = Ports(dict(MAIL_PORTS))
    http_port = outside.pebble.http_port  # pebble fetches HTTP-01 tokens here: the guest's port 80
    m, banner = boot(image, "journey", report, tmp_path, {**ports.forwards(), http_port: 80}, cache="writeback")
    url = f"https://127.0.0.1:{ports['https']}"
    try:
        with subtest('first boot to the portal', report):
            m.wait_for_portal(ports["https"], 300, interval=2)
            report["journey_seconds_to_portal"] = round(m.boot_seconds(), 1)
            pin_guest_to_the_outside(m)

        with subtest("the browser sees the console's certificate", report):
            # 2. The browser sees exactly the certificate the console named.
            seen = fingerprint_seen_by_chromium(page, url + "/")
            assert seen == banner["fingerprint"], f"chromium sees {seen}, the console says {banner['fingerprint']}"
            expect(page).to_have_url(re.compile(r"/setup/token$"))

        with subtest('the wizard: domain, admin, DNS pushed and checked, certificate from the CA', report):
            # 3. The wizard.
            page.fill("#token", banner["token"])
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(r"/setup/domain$"))
            page.fill("#domain", DOMAIN)
            page.fill("#mail_host", "")
            page.fill("#public_ipv4", "127.0.0.1")  # where the host (and pebble) reach the appliance
            page.fill("#public_ipv6", "")
            page.fill("#dns_resolvers", HOST_ALIAS)
            page.click("#domain-submit")
            expect(page).to_have_url(re.compile(r"/setup/admin$"))

            expect(page.locator("#address")).to_have_value(ADMIN)
            secret = page.locator("#totp-secret").inner_text().replace(" ", "").strip()
            JOURNEY.totp_secret = secret
            page.fill("#password", PASSWORD)
            page.fill("#password_confirm", PASSWORD)
            page.fill("#totp_code", fresh_totp_code(secret))
            page.click("#admin-submit")
            assert page.locator("#recovery-codes li code").count() == 10
            page.click("#recovery-saved")
            expect(page).to_have_url(re.compile(r"/setup/dns"))

            page.fill("#rfc2136_server", HOST_ALIAS)
            page.fill("#rfc2136_port", "53")
            page.fill("#rfc2136_key_name", KEY.name)
            page.fill("#rfc2136_secret", KEY.secret)
            page.select_option("#rfc2136_algorithm", "hmac-sha256")
            page.click("#save_push_config")
            expect(page.locator("#rfc2136_secret")).to_have_value("")
            page.click("#push_records")
            expect(page.locator("#dns-push-result")).to_be_visible(timeout=120_000)
            assert outside.knot.query(HOST, "A").answer, "the push did not reach knot"
            page.click("#dns-check-now")
            expect(page.locator("#dns-all-ok")).to_be_visible(timeout=180_000)
            shot(page, "dns-green")
            page.click("#dns_continue")
            expect(page).to_have_url(re.compile(r"/setup/certs"))

            page.check("#acme_ca-2")
            page.fill("#acme_directory", f"https://{HOST_ALIAS}:{outside.pebble.port}/dir")
            page.fill("#acme_ca_bundle_pem", outside.pebble.ca_bundle.read_text())
            page.fill("#acme_contact", ADMIN)
            page.check("#acme_challenge-0")
            page.click("#save_acme")
            started = time.monotonic()
            page.click("#cert-issue-start")
            expect(page.locator("#cert-status")).to_have_attribute("data-source", "ca", timeout=300_000)
            report["journey_seconds_certificate"] = round(time.monotonic() - started, 1)
            page.click("#certs_continue")
            expect(page).to_have_url(re.compile(r"/setup/deploy"))

        with subtest('power loss mid-deploy, then the wizard resumes to the end', report):
            # 6. Power loss in the middle of the deploy; the wizard resumes to completion.
            m.wait_for_unit("mailstead-images.service", timeout=1200)  # the preloaded images are in
            page.click("#deploy-start")
            expect(page.locator('#deploy-events li[data-step="deploy"]')).to_be_visible(timeout=300_000)
            m.power_loss()
            # The one power loss is behind us: from here on the guest only reboots cleanly, so
            # qemu's fastest cache will do (with "writeback" every flush of the guest reaches the
            # host's disk, which made the update's 2.5 GB slot write take minutes).
            m.cfg.cache = "unsafe"
            m.start(fresh_disk=False)
            m.wait_for_shell(timeout=900)
            m.wait_for_portal(ports["https"], 600, interval=2)
            report["journey_seconds_power_loss_to_portal"] = round(m.boot_seconds(), 1)
            m.succeed(f"rm -f /etc/resolv.conf && echo 'nameserver {HOST_ALIAS}' > /etc/resolv.conf")
            page.goto(url + "/setup/deploy")
            expect(page.locator("#deploy-start")).to_have_text(re.compile("Deploy again"))
            shot(page, "deploy-interrupted")
            m.wait_for_unit("mailstead-images.service", timeout=1200)
            started = time.monotonic()
            page.click("#deploy-start")
            expect(page).to_have_url(re.compile(r"/setup/deploy/clients"), timeout=1_200_000)
            report["journey_seconds_deploy_to_healthy"] = round(time.monotonic() - started, 1)
            stack_healthy(m)
            # Where the deploy's time went (each container's start and its first log lines).
            (ARTIFACTS / "journey-deploy-timeline.log").write_text(m.execute(
                "for c in $(docker ps --format '{{.Names}}'); do echo \"== $c started $(docker inspect -f "
                "'{{.State.StartedAt}}' $c)\"; docker logs -t $c 2>&1 | head -n 15; done", timeout=120)[1])
            shot(page, "clients")
            page.click("#finish")
            expect(page).to_have_url(re.compile(r"/login"))

        with subtest('certificates, mail in and out, CalDAV, security, backup', report):
            # The certificate on the mail ports is pebble's, for the mail host.
            verify_chain(outside, ports["imaps"])
            verify_chain(outside, ports["https"])

            # 8. TLS audits run while the rest goes on (independent; testssl is slow against TCG).
            with ThreadPoolExecutor(max_workers=3) as pool:
                audits = {name: pool.submit(tls_problems, f"127.0.0.1:{ports[name]}", starttls,
                                            tmp_path / f"testssl-{name}.json")
                          for name, starttls in (("https", None), ("imaps", None), ("smtp", "smtp"),
                                                 ("submission", "smtp"))}
                check_mail(m, outside, ports, report)
                check_caldav(ports)
                check_security(m, ports, url)
                check_backup(m, outside, report)
                problems = [f"{name}: {p}" for name, f in audits.items() for p in f.result()]
                assert not problems, "testssl findings:\n" + "\n".join(problems)

        with subtest('the owner signs in to the dashboard', report):
            sign_in(page, url)
            expect(page.locator("#health-overall")).to_be_visible()
            shot(page, "dashboard")

        with subtest('refused feeds change nothing', report):
            v1 = image_version(m)
            www = tmp_path / "www"
            www.mkdir()
            (www / "v3").symlink_to(feeds / "v3")
            server = FeedServer(www)
            refused_feeds(feeds / "v3", www)
            layout = m.succeed("lsblk -rno PARTLABEL /dev/vda")
            assert f"mailstead_{v1}" in layout and "_empty" in layout, layout
            for name, words in (("unsigned", "it has no signature"),
                                ("flipped", "the signature does not match SHA256SUMS"),
                                ("older", "is older than the running")):
                m.succeed(f"mailstead settings-set update_feed_url={server.url(name)}")
                rc, out = m.execute("mailstead upgrade --now", timeout=180)
                assert rc != 0 and words in out, f"the {name} feed: [{rc}] {out}"
            assert m.succeed("lsblk -rno PARTLABEL /dev/vda") == layout
            m.fail("test -e /var/lib/mailstead-update/update.json")

        with subtest('an update that passes its checks: v2 takes over', report):
            # What must not change across updates: the DKIM keys, the certificate, the password
            # and TOTP, the machine's identity, the mail (also what arrives while the new version
            # is written).
            JOURNEY.dkim_keys = m.succeed(f"cd {STATE}/secrets && find dkim -type f | sort | xargs sha256sum")
            kept = {"certificate": certificate_fingerprint(ports["imaps"]), "identity": machine_identity(m)}
            v2 = version_of(feeds / "v2")
            (www / "v2").symlink_to(feeds / "v2")
            report["update_bytes_on_the_wire"] = sum(f.stat().st_size for f in (feeds / "v2").iterdir()
                                                     if not f.name.endswith(".json"))
            before = m.boot_id()
            started = time.monotonic()
            install_from_dashboard(page, url, server.url("v2"), v2)
            deliver(ports, "journey during the update to v2")
            report["update_v2_seconds_install_to_reboot"] = round(m.wait_for_new_boot(before, 1800), 1)
            retry(lambda: verified_on(m, v2), 2400, f"{v2} running and its trial passed", interval=5)
            report["update_v2_seconds_install_to_healthy"] = round(time.monotonic() - started, 1)
            report["update_v2_timeline"] = update_timeline(m)
            history = update_history(m)
            assert [(h["outcome"], h["from"], h["to"]) for h in history] == [("installed", v1, v2)], history
            # systemd-bless-boot marked v2's image good (its try counter is gone); v1's stays, to go back to.
            kernels = m.succeed("ls /efi/EFI/Linux").split()
            assert f"mailstead_{v2}.efi" in kernels and f"mailstead_{v1}.efi" in kernels, kernels
            # The stack runs the images v2 ships, pinned by ID.
            pins = json.loads(m.succeed(f"cat {STATE}/stack-images.json"))
            shipped = {svc: m.succeed(f"docker image inspect -f '{{{{.Id}}}}' mailstead-{svc}:{v2}").strip()
                       for svc in pins["images"]}
            assert pins["version"] == v2 and pins["images"] == shipped, (pins, shipped)
            stack_healthy(m)
            running = set(m.succeed("docker inspect -f '{{.Image}}' $(docker ps -q)").split())
            assert running == set(shipped.values()), (running, shipped)
            failed = m.succeed("systemctl --failed --no-legend --plain")
            assert failed.strip() == "", f"failed units on {v2}:\n{failed}"
            wait_for_subjects(ports["imaps"], ADMIN, PASSWORD,
                              JOURNEY.subjects | {"journey during the update to v2"}, 300)
            assert m.succeed(f"cd {STATE}/secrets && find dkim -type f | sort | xargs sha256sum") == JOURNEY.dkim_keys
            assert {"certificate": certificate_fingerprint(ports["imaps"]), "identity": machine_identity(m)} == kept
            page.context.clear_cookies()
            sign_in(page, url)  # the same password and TOTP
            page.goto(url + "/admin/updates/")
            expect(page.locator("#update-running")).to_contain_text(v2)
            expect(page.locator("#update-history-list")).to_contain_text(v2)
            shot(page, "updated")

        with subtest('a new version whose stack cannot start goes back by itself', report):
            v3 = version_of(feeds / "v3")
            before = m.boot_id()
            started = time.monotonic()
            install_from_dashboard(page, url, server.url("v3"), v3)
            deliver(ports, "journey during the update")  # after the backup: not in what the restore brings
            # It boots v3, which fails its checks and reboots; v2 comes back and recovers.
            report["update_seconds_install_to_reboot"] = round(m.wait_for_new_boot(before, 1800), 1)
            retry(lambda: verified_on(m, v2), 2400, f"the machine back on {v2}, recovered", interval=5)
            report["update_seconds_failed_to_healthy"] = round(time.monotonic() - started, 1)
            report["update_timeline"] = update_timeline(m)
            history = update_history(m)
            assert [h["outcome"] for h in history] == ["installed", "failed", "rolled_back"], history
            assert history[1]["to"] == v3 and "failed its health checks" in history[1]["message"], history[1]
            assert history[2]["alerted"] is True and "sent to" in history[2]["alerts"], history[2]
            # systemd-boot tried v3 once: its image is marked bad, v2's is the default again.
            kernels = m.succeed("ls /efi/EFI/Linux").split()
            assert f"mailstead_{v2}.efi" in kernels and any(k.startswith(f"mailstead_{v3}+0-") for k in kernels), \
                kernels
            stack_healthy(m)
            failed = m.succeed("systemctl --failed --no-legend --plain")
            assert failed.strip() == "", f"failed units after the rollback:\n{failed}"
            assert json.loads(m.succeed(f"cat {STATE}/stack-images.json"))["version"] == v2
            wait_for_subjects(ports["imaps"], ADMIN, PASSWORD, JOURNEY.subjects | {
                "journey during the update to v2", "journey during the update"}, 300)
            alert = f"[Mailstead {HOST}] PROBLEM: update fail"

            def one_alert() -> bool:
                subjects = imap_subjects(ports["imaps"], ADMIN, PASSWORD)
                assert subjects.count(alert) == 1, subjects[-5:]
                return True

            retry(one_alert, 300, "one alert mail about the rollback", interval=5)
            assert m.succeed(f"cd {STATE}/secrets && find dkim -type f | sort | xargs sha256sum") == JOURNEY.dkim_keys
            assert {"certificate": certificate_fingerprint(ports["imaps"]), "identity": machine_identity(m)} == kept
            page.context.clear_cookies()
            sign_in(page, url)  # the same password and TOTP
            page.goto(url + "/admin/updates/")
            expect(page.locator("#update-running")).to_contain_text(v2)
            expect(page.locator("#update-history-list")).to_contain_text("rolled back")
            shot(page, "rolled-back")
            server.stop()
            time.sleep(30)  # idle: let the boot-time work settle
            report["journey_idle_busy_percent"] = m.busy_percent()
            report["journey_memory_idle_mb"] = int(m.succeed("free -m | awk '/^Mem:/ {print $3}'").strip())
            report["journey_memory_budget"] = m.memory_budget()
            for key, command in (("journey_boot_critical_chain", "systemd-analyze critical-chain --no-pager "
                                                                 "mailstead-web.service"),
                                 ("journey_boot_blame", "systemd-analyze blame --no-pager | head -25")):
                report[key] = m.execute(command, timeout=120)[1].splitlines()[:40]
    except BaseException:
        keep_guest_logs(m, "journey")
        raise
    finally:
        m.stop()


def verify_chain(outside: Outside, port: int) -> None:
    """The served certificate chains to pebble's root and names the mail host."""
    ctx = ssl.create_default_context(cadata=outside.pebble.root_pem.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        with ctx.wrap_socket(sock, server_hostname=HOST) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3"), tls.version()


def check_mail(m: Machine, outside: Outside, ports: Ports, report: dict) -> None:
    # In: a remote MTA delivers on 25; the messages land in the admin mailbox (IMAPS).
    subjects = {f"journey inbound {i}" for i in range(MESSAGES)}
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", ports["smtp"], local_hostname="mx.remote.test", timeout=120) as smtp:
        for subject in sorted(subjects):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "alice@remote.test", ADMIN, subject
            msg.set_content("Delivered by a remote MTA on port 25.\n")
            smtp.send_message(msg)
    wait_for_subjects(ports["imaps"], ADMIN, PASSWORD, subjects, 600)
    report["journey_messages_per_second"] = round(MESSAGES / (time.monotonic() - started), 2)
    JOURNEY.subjects |= subjects

    # Out: submission on 587 to an external address; the remote MX (the sink) gets it
    # signed, and both DKIM signatures verify against the keys the wizard published.
    with smtplib.SMTP("127.0.0.1", ports["submission"], local_hostname="laptop.test", timeout=120) as smtp:
        smtp.starttls(context=tls_to(ports["submission"]))
        smtp.login(ADMIN, PASSWORD)
        smtp.sendmail(ADMIN, ["bob@remote.test"], f"From: {ADMIN}\r\nTo: bob@remote.test\r\n"
                      "Subject: journey outbound\r\nMessage-ID: <journey-out@example.test>\r\n\r\nhello bob\r\n")

    def received() -> bytes:
        for item in outside.sink.messages:
            if item["message"]["Subject"] == "journey outbound":
                return item["message"].as_bytes()
        raise AssertionError(f"the remote MX has {len(outside.sink.messages)} messages, not ours yet; "
                             f"guest queue: {m.execute('docker exec $(docker ps -qf name=postfix) postqueue -p')[1][-800:]}")

    raw = retry(received, 300, "the outbound message at the remote MX", interval=2)
    sigs = email.message_from_bytes(raw).get_all("DKIM-Signature") or []
    assert len(sigs) == 2, sigs

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        values = outside.knot.txt(name.decode().rstrip("."))
        return values[0] if values else b""

    verifier = dkim.DKIM(raw)
    for idx in range(len(sigs)):
        assert verifier.verify(idx=idx, dnsfunc=dnsfunc), f"signature {idx} does not verify: {sigs[idx]}"


def check_caldav(ports: Ports) -> None:
    def client() -> caldav.DAVClient:
        c = caldav.DAVClient(url=f"https://127.0.0.1:{ports['https']}/dav/", username=ADMIN, password=PASSWORD,
                             ssl_verify_cert=False, headers={"Host": HOST}, timeout=120)
        c.session.trust_env = False
        return c

    uid = "journey-event-1"
    calendar = client().principal().make_calendar(name="Journey", cal_id="journey")
    calendar.save_event(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Mailstead tests//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20300101T080000Z\r\n"
        "DTSTART:20300102T090000Z\r\nDTEND:20300102T100000Z\r\nSUMMARY:Moving day\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
    again = client().principal().calendar(cal_id="journey")
    assert str(again.event_by_uid(uid).icalendar_component["summary"]) == "Moving day"


RELAY_CASES = [
    ("smtp", False, "carol@remote.test", "dave@elsewhere.test", "unauthenticated relay on 25"),
    ("smtp", False, ADMIN, "dave@elsewhere.test", "unauthenticated relay on 25 with a local sender"),
    ("submission", False, "carol@remote.test", "dave@elsewhere.test", "unauthenticated relay on 587"),
    ("submission", False, "carol@remote.test", ADMIN, "unauthenticated submission on 587"),
    ("submission", True, "ceo@elsewhere.test", "dave@elsewhere.test", "the admin sending as a foreign address"),
]


def check_security(m: Machine, ports: Ports, url: str) -> None:
    # Nothing listens beyond ssh, http(s) and the mail ports (ManageSieve's too; loopback aside).
    allowed = {"22", "80", "443", "25", "465", "587", "993", "995", "4190"}
    unexpected = []
    for line in m.succeed("ss -Htuln").splitlines():
        proto, _state, _rq, _sq, local = line.split()[:5]
        addr, _, port = local.rpartition(":")
        if addr.startswith(("127.", "[::1]", "::1")) or addr.endswith("%lo"):
            continue
        if proto == "tcp" and port in allowed or proto == "udp" and port in {"68", "546"}:
            continue
        unexpected.append(line)
    assert not unexpected, "unexpected listeners:\n" + "\n".join(unexpected)

    # The open-relay matrix is refused.
    for port_name, login, sender, rcpt, why in RELAY_CASES:
        with smtplib.SMTP("127.0.0.1", ports[port_name], local_hostname="relay-probe.test", timeout=120) as s:
            if port_name == "submission":
                s.starttls(context=tls_to(ports[port_name]))
            if login:
                s.login(ADMIN, PASSWORD)
            s.ehlo_or_helo_if_needed()
            code, reply = s.mail(sender)
            if code == 250:
                code, reply = s.rcpt(rcpt)
            assert 500 <= code < 600, f"{why}: {code} {reply!r}"

    # The portal refuses every request without a session (all its routes, from the image's own app),
    # but for sign-in, health, static files and the mail users' own /password page, whose form
    # is refused without its CSRF token.
    routes = json.loads(m.succeed(
        f"cd /tmp && runuser -u mailstead -- {GUEST_PY} -c \"import json; from portal.web import create_app; "
        "app = create_app(); print(json.dumps([[r.rule, r.endpoint, sorted(r.methods - {'HEAD', 'OPTIONS'})] "
        "for r in app.url_map.iter_rules()]))\"", timeout=120).strip().splitlines()[-1])
    public = {"static", "healthz", "auth.login", "setup.token"}
    checked = 0
    with requests.Session() as s:
        s.trust_env, s.verify = False, False
        for rule, endpoint, methods in routes:
            if endpoint in public:
                continue
            path = re.sub(r"<[^>]+>", "x", rule)
            for method in methods:
                r = s.request(method, url + path, allow_redirects=False, timeout=60)
                if endpoint == "password.change" and method == "GET":
                    assert r.status_code == 200 and 'id="password-form"' in r.text, (path, r.status_code)
                    continue
                refused = r.status_code in (400, 401, 403, 404, 405) or (
                    r.status_code in (302, 303) and "/login" in r.headers.get("Location", ""))
                assert refused, f"{method} {path} ({endpoint}) without a session answered {r.status_code}"
                checked += 1
    assert checked > 30, f"only {checked} requests checked: {routes}"

    # No process runs as root where it need not.
    pid = m.succeed("systemctl show -P MainPID mailstead-web.service").strip()
    assert m.succeed(f"ps -o user= -p {pid}").strip() == "mailstead"
    must_not_be_root = ("redis-server", "rspamd", "unbound", "radicale", "smtpd", "qmgr", "cleanup", "imap",
                        "imap-login", "pop3-login", "gunicorn")
    table = m.succeed("ps -eo user:32,comm --no-headers")
    as_root = [line for line in table.splitlines()
               if line.split()[0] == "root" and line.split()[-1] in must_not_be_root]
    assert not as_root, "running as root:\n" + "\n".join(as_root)
    for name in must_not_be_root[:4]:
        assert re.search(rf"^\S+\s+{re.escape(name)}", table, re.M) or name == "radicale", f"{name} is not running"


def check_backup(m: Machine, outside: Outside, report: dict) -> None:
    """Backups to the host's SFTP stand-in: the appliance's key is added there, then one runs."""
    folder = outside.workdir / "backups"
    target = (f"--target sftp --host {HOST_ALIAS} --port {outside.sshd.port} --user {outside.sshd.user} "
              f"--path {folder}")
    # A change of the backup target on a set-up appliance is confirmed with a fresh
    # code, on the console as in the dashboard (it is spent even when the target fails).
    def configure() -> tuple[int, str]:
        code = fresh_totp_code(JOURNEY.totp_secret)
        return m.execute(f"echo {code} | mailstead backup configure {target} --secret-stdin", timeout=400)

    status, out = configure()
    if status != 0:  # the key is not authorized yet: the message names the key to add
        key = re.search(r"ssh-ed25519 [A-Za-z0-9+/=]+", out)
        assert key, f"backup configure failed without naming the key to add:\n{out}"
        outside.authorize(key.group(0))
        status, out = configure()
        assert status == 0, f"backup configure failed after the key was authorized:\n{out}"
    password = re.search(r"^Password:\s+(\S+)", out, re.M)
    assert password, f"no recovery sheet:\n{out}"
    JOURNEY.backup_password = password.group(1)
    started = time.monotonic()
    m.succeed("mailstead backup run", timeout=1200)
    report["journey_seconds_backup_sftp"] = round(time.monotonic() - started, 1)
    assert "Mailstead" in m.succeed("mailstead backup list")


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_move_to_new_hardware_restores_from_the_backup(
        page: Page, image: Path, feeds: Path, outside: Outside, report: dict, tmp_path: Path) -> None:
    """A fresh machine, booted with BIOS firmware (GRUB; the journey boots UEFI): the
    machine checks at first boot (tests/vm/checks.py) while it loads its images, then
    the wizard restores the journey's backup, then the restored stack's checks.

    It is flashed with v2, the version the journey's machine runs in the end: the newest
    backup is v2's (its stack upgrade backed up first; the retention keeps one a day),
    and a backup made by a newer version is refused by an older one."""
    assert JOURNEY.backup_password, "the journey made no backup (see the test before)"
    v2 = version_of(feeds / "v2")
    image = image.with_name(f"mailstead_{v2}.raw")  # scripts/publish built it next to the image under test
    assert image.is_file(), f"no {image}: the v2 feed's build leaves it there (scripts/test builds the feeds)"
    page.set_default_timeout(60_000)
    ports = Ports({"https": 443, "imaps": 993})
    m, banner = boot(image, "restore", report, tmp_path, ports.forwards(), firmware="bios")
    url = f"https://127.0.0.1:{ports['https']}"
    try:
        with subtest('a fresh machine (BIOS): first boot to the portal', report):
            m.wait_for_portal(ports["https"], 300, interval=2)
            report["restore_seconds_to_portal"] = round(m.boot_seconds(), 1)
            checks.check_console_certificate(ports["https"], banner)
            pin_guest_to_the_outside(m)
        with subtest("the token gate", report):
            checks.check_token_gate(url, banner)
        with subtest("the machine at first boot", report):
            checks.check_machine(m, banner, report, "restore")
        with subtest("the preloaded images", report):
            checks.check_images_preloaded(m, report, "restore")
        with subtest("the wizard's restore from the SFTP backup", report):
            page.goto(url + "/")
            page.fill("#token", banner["token"])
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(r"/setup/domain$"))
            page.click("#choose-restore")
            expect(page).to_have_url(re.compile(r"/setup/restore$"))

            def open_backups() -> None:
                page.check("#target-1")  # SFTP
                page.fill("#path", str(outside.workdir / "backups"))
                page.fill("#host", HOST_ALIAS)
                page.fill("#port", str(outside.sshd.port))
                page.fill("#user", outside.sshd.user)
                page.fill("#password", JOURNEY.backup_password)
                page.click("#restore-open")

            open_backups()
            key = page.locator("#restore-ssh-key")
            if key.count():  # a new appliance has a new key: the owner adds it on the server
                outside.authorize(key.inner_text())
                open_backups()
            expect(page).to_have_url(re.compile(r"/setup/restore/snapshots$"), timeout=300_000)
            expect(page.locator("#snapshot-0")).to_be_checked()
            page.click("#restore-choose")
            expect(page).to_have_url(re.compile(r"/setup/restore/confirm$"))
            started = time.monotonic()
            page.click("#restore-start")
            expect(page).to_have_url(re.compile(r"/setup/restore/done$"), timeout=1_500_000)
            report["restore_seconds_restore_to_done"] = round(time.monotonic() - started, 1)
            expect(page.locator("#restored-admin")).to_have_text(ADMIN)
            shot(page, "restore-done")
            retry(lambda: stack_healthy(m), 900, "every service healthy after the restore", interval=5)
            report["restore_seconds_restore_to_healthy"] = round(time.monotonic() - started, 1)

        with subtest('mail, keys and the admin are back', report):
            # Every message, account and key is back; the old passwords read the mail.
            wait_for_subjects(ports["imaps"], ADMIN, PASSWORD, JOURNEY.subjects, 300)
            keys = m.succeed(f"cd {STATE}/secrets && find dkim -type f | sort | xargs sha256sum")
            assert keys == JOURNEY.dkim_keys, f"DKIM keys differ:\n{keys}\nvs\n{JOURNEY.dkim_keys}"
            page.click("#restore-sign-in")
            page.fill("#address", ADMIN)
            page.fill("#password", PASSWORD)
            page.fill("#code", fresh_totp_code(JOURNEY.totp_secret))
            page.click("#login-submit")
            expect(page).to_have_url(re.compile(r"/admin/?$"))
            assert not m.succeed(f"ls {STATE}").count("setup-token")

        with subtest("the restored stack: loaded images, health checks, scheduler, memory", report):
            checks.check_deployed_stack(m, report, "restore")
        # Last: the restore, the mailboxes and the scheduler have filled the agent's state by now.
        with subtest("the web user can create or change nothing in the agent's state", report):
            checks.check_web_user_cannot_change_state(m)
    except BaseException:
        keep_guest_logs(m, "restore")
        raise
    finally:
        m.stop()
