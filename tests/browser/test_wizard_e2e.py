"""The whole first-boot wizard and the dashboard in chromium, against real servers.

A real portal (gunicorn over TLS) and a real agent (root, the host's docker
engine) share one state folder. The outside world stands in on loopback:
knot is the domain's authoritative DNS (TSIG updates, RFC 2136), pebble is
the ACME CA (its validation authority resolves through knot and fetches
HTTP-01 tokens from a token server standing in for the host nginx on port
80). The domain is an IDN. The stack publishes on 127.0.0.1 at 29000 + the
standard port % 1000.

One walk, in order (each step's screenshot lands in artifacts/browser/):
wrong then right token; domain (IDN shown both ways); admin with TOTP;
DNS check (records missing), RFC 2136 push, check all green; a certificate
from pebble; deploy, with the agent killed mid-deploy and restarted (the page
resumes); client settings, .mobileconfig, test message, which IMAP finds in
the admin mailbox; finish (the token is dead); then the dashboard: log out
and in with TOTP and with a recovery code, a new mailbox receives mail over
SMTP from outside, and is deleted.
"""

from __future__ import annotations

import base64
import email
import imaplib
import json
import os
import plistlib
import re
import shutil
import smtplib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pyotp
import pytest
import requests
from playwright.sync_api import Page, expect

from tests.support import appdb as db
from portal.stack import deploy as deploy_mod
from portal.stack.settings import DEFAULT_PORTS
from portal.stack.store import load_settings
from tests.browser.conftest import ARTIFACTS, CHROMIUM
from tests.conftest import REPO, TEST_TOKEN, AgentProcess, free_port, launch_agent, launch_gunicorn, retry, stop_process
from tests.integration.knot import Knot, KnotKey, Record
from tests.integration.pebble import Pebble, TokenServer
from tests.integration.stackharness import IMAGES_DIR, ensure_images, make_tls, shared_dns

DOMAIN_UNICODE = "bücher.example"
DOMAIN = "xn--bcher-kva.example"
HOST = f"mail.{DOMAIN}"
ADMIN = f"postmaster@{DOMAIN}"
PASSWORD = "wizard-correct-horse-battery"
PROJECT, PORT_BASE = "mstest-wizard", 29000
PORTS = {name: PORT_BASE + port % 1000 for name, port in DEFAULT_PORTS.items()}
KEY = KnotKey("mailstead-wizard", base64.b64encode(os.urandom(32)).decode())
FIGURES = ARTIFACTS / "wizard-figures.json"


@dataclass
class World:
    url: str
    state: Path
    run: Path
    knot: Knot
    pebble: Pebble
    agent: AgentProcess
    agent_env: dict[str, str]
    figures: dict

    def restart_agent(self, kill: bool = True) -> None:
        """Kill the agent (as a crash or power loss would: SIGKILL) and start it again."""
        if kill:
            self.agent.proc.kill()
            self.agent.proc.wait(10)
        self.agent = launch_agent(self.run, "--docker-host", "unix:///var/run/docker.sock", env=self.agent_env)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import docker

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    ensure_images(docker.from_env(timeout=120))
    root = tmp_path_factory.mktemp("wizard")
    state, run, acme = root / "state", root / "run", root / "acme"
    for d in (state / "tls", run, acme, root / "nginx", root / "www"):
        d.mkdir(parents=True)
    (state / "setup-token").write_text(TEST_TOKEN + "\n")
    cert, key = make_tls(root / "bootstrap", [HOST, "localhost"])
    shutil.copy(cert, state / "tls" / "bootstrap.crt")
    shutil.copy(key, state / "tls" / "bootstrap.key")
    # What the appliance image fixes and a test must choose: where the stack
    # publishes, its DNS for the containers, and that loopback is "public" here.
    db.write_settings(state / "state.db", {
        "stack_project": PROJECT, "stack_ports": json.dumps(PORTS), "publish_addresses": "127.0.0.1",
        "dns_servers": shared_dns().address, "dns_allow_private": "1",
    })
    # The domain's authoritative DNS: only its SOA/NS at first; the wizard pushes the rest.
    zone = Knot(root / "knot", DOMAIN, [], key=KEY).start()
    db.write_settings(state / "state.db", {"dns_auth_port": str(zone.port)})
    pebble = Pebble(root / "pebble", zone.port).start()
    tokens = TokenServer(acme, pebble.http_port).start()  # the host nginx's port 80, for HTTP-01
    resolv = root / "resolv.conf"
    resolv.write_text(f"nameserver 127.0.0.1\n")
    agent_env = {"MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_IMAGES_DIR": str(IMAGES_DIR),
                 "MAILSTEAD_NGINX_DIR": str(root / "nginx"), "MAILSTEAD_WWW_DIR": str(root / "www"),
                 "MAILSTEAD_ACME_DIR": str(acme), "MAILSTEAD_RELOAD_NGINX": "0",
                 "MAILSTEAD_RESOLV_CONF": str(resolv)}
    agent = launch_agent(run, "--docker-host", "unix:///var/run/docker.sock", env=agent_env)
    port = free_port()
    web_log = root / "gunicorn.log"
    env = {**os.environ, "MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_RUN_DIR": str(run),
           "MAILSTEAD_AGENT_SOCKET": str(agent.socket)}
    web = launch_gunicorn("--bind", f"127.0.0.1:{port}", "--certfile", str(cert), "--keyfile", str(key),
                          env=env, log=web_log)
    url = f"https://127.0.0.1:{port}"
    w = World(url, state, run, zone, pebble, agent, agent_env, {})

    def healthy() -> None:
        assert web.poll() is None, f"gunicorn exited: {web_log.read_text()}"
        with requests.Session() as s:
            s.trust_env = False
            s.get(f"{url}/healthz", verify=False, timeout=2).raise_for_status()

    try:
        import urllib3

        urllib3.disable_warnings()
        retry(healthy, 30, f"gunicorn at {url}")
        yield w
    finally:
        stop_process(web)
        w.agent.stop()
        tokens.stop()
        pebble.stop()
        zone.stop()
        try:
            deploy_mod.down(load_settings(state), volumes=True)
        except Exception as err:  # the walk may have failed before a domain was saved
            print(f"stack teardown: {err}")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(json.dumps(w.figures, indent=2, sort_keys=True))
        print(f"agent log:\n{w.agent.log_text()[-4000:]}\ngunicorn log:\n{web_log.read_text()[-3000:]}")


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"wizard-{name}.png"), full_page=True)


def imap_find(address: str, password: str, subject: str, timeout: float = 90,
              folders: tuple[str, ...] = ("INBOX",)) -> email.message.Message:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the certificate is checked in the certs step
    where = " or ".join(folders)

    def look() -> email.message.Message:
        with imaplib.IMAP4_SSL("127.0.0.1", PORTS["imaps"], ssl_context=ctx) as imap:
            imap.login(address, password)
            for folder in folders:
                imap.select(folder, readonly=True)
                _typ, data = imap.search(None, "SUBJECT", f'"{subject}"')
                if data[0]:
                    _typ, msg = imap.fetch(data[0].split()[-1], "(BODY.PEEK[])")
                    return email.message_from_bytes(msg[0][1])
            raise AssertionError(f"no message {subject!r} in {address}'s {where} yet")
    return retry(look, timeout, f"{subject!r} in {address}'s {where}")


def next_totp_code(secret: str) -> str:
    """A code for the next 30-second step: never one used before (codes work once)."""
    totp = pyotp.TOTP(secret)
    return totp.at(time.time() + totp.interval)


def test_wizard_then_dashboard(page: Page, world: World) -> None:
    page.set_default_timeout(30_000)
    url = world.url

    # 1. Token: wrong, then right.
    page.goto(url + "/")
    expect(page).to_have_url(re.compile(r"/setup/token$"))
    page.fill("#token", "not-the-token")
    page.keyboard.press("Enter")  # the keyboard is enough
    expect(page.locator(".error[role=alert]")).to_contain_text("not right")
    shot(page, "01-token-wrong")
    page.fill("#token", TEST_TOKEN)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/setup/domain$"))
    shot(page, "02-domain")

    # 2. Domain: an IDN, shown in Unicode and as DNS sees it.
    page.fill("#domain", DOMAIN_UNICODE)
    page.fill("#mail_host", "")
    page.fill("#public_ipv4", "127.0.0.1")
    page.fill("#public_ipv6", "")
    page.fill("#dns_resolvers", f"127.0.0.1:{world.knot.port}")
    page.click("#domain-submit")
    expect(page).to_have_url(re.compile(r"/setup/admin$"))
    page.goto(url + "/setup/domain")
    expect(page.locator("#saved-domain-unicode")).to_have_text(DOMAIN_UNICODE)
    expect(page.locator("#saved-domain-ascii")).to_have_text(DOMAIN)
    shot(page, "03-domain-saved")
    page.goto(url + "/setup/admin")

    # 3. Admin with TOTP (the code computed here, as a phone would).
    expect(page.locator("#address")).to_have_value(f"postmaster@{DOMAIN_UNICODE}")  # stored as punycode
    secret = page.locator("#totp-secret").inner_text().replace(" ", "").strip()
    expect(page.locator("#totp-qr")).to_be_visible()
    page.fill("#password", PASSWORD)
    page.fill("#password_confirm", PASSWORD)
    page.fill("#totp_code", pyotp.TOTP(secret).now())
    shot(page, "04-admin")
    page.click("#admin-submit")
    codes = [c.strip() for c in page.locator("#recovery-codes li code").all_inner_texts()]
    assert len(codes) == 10, codes
    shot(page, "05-recovery-codes")
    page.click("#recovery-saved")
    expect(page).to_have_url(re.compile(r"/setup/dns"))

    # 4. DNS: check (records missing), push by RFC 2136, check again: all green.
    expect(page.locator("#dns-records")).to_be_visible()
    page.click("#dns-check-now")
    # When the check job finishes the page shows its verdicts (no full reload while it runs).
    expect(page.locator("#dns-check-summary")).to_have_attribute("data-problems", re.compile(r"^[1-9]"),
                                                                  timeout=60_000)
    assert page.locator('#dns-records [data-verdict="missing"]').count() > 5
    shot(page, "06-dns-missing")
    page.fill("#rfc2136_server", "127.0.0.1")
    page.fill("#rfc2136_port", str(world.knot.port))
    page.fill("#rfc2136_key_name", KEY.name)
    page.fill("#rfc2136_secret", KEY.secret)
    page.select_option("#rfc2136_algorithm", "hmac-sha256")
    page.click("#save_push_config")
    expect(page.locator("#rfc2136_secret")).to_have_value("")  # never shown again
    page.click("#push_records")
    expect(page.locator("#dns-push-result")).to_be_visible()
    assert world.knot.query(HOST, "A").answer, "the push did not reach knot"
    page.click("#dns-check-now")
    expect(page.locator("#dns-all-ok")).to_be_visible(timeout=60_000)
    assert page.locator('#dns-records [data-verdict="missing"]').count() == 0
    shot(page, "07-dns-green")
    page.click("#dns_continue")
    expect(page).to_have_url(re.compile(r"/setup/certs"))

    # 5. Certificates from pebble (HTTP-01), its CA bundle pasted.
    page.check("#acme_ca-2")
    page.fill("#acme_directory", world.pebble.directory_url)
    page.fill("#acme_ca_bundle_pem", world.pebble.ca_bundle.read_text())
    page.fill("#acme_contact", ADMIN)
    page.check("#acme_challenge-0")
    page.click("#save_acme")
    started = time.monotonic()
    page.click("#cert-issue-start")
    expect(page.locator("#cert-status")).to_have_attribute("data-source", "ca", timeout=120_000)
    world.figures["certificate_seconds"] = round(time.monotonic() - started, 1)
    expect(page.locator("#cert-names")).to_contain_text(HOST)
    shot(page, "08-certificate")
    page.click("#certs_continue")
    expect(page).to_have_url(re.compile(r"/setup/deploy"))

    # 6. Deploy, with the agent killed mid-way (power loss for the agent) and restarted.
    page.click("#deploy-start")
    expect(page.locator('#deploy-events li[data-step="deploy"]')).to_be_visible(timeout=120_000)
    shot(page, "09-deploy-running")
    world.restart_agent()
    page.reload()
    expect(page.locator("#deploy-start")).to_have_text(re.compile("Deploy again"))
    expect(page.locator("#deploy-state")).to_contain_text("Interrupted")
    shot(page, "10-deploy-interrupted")
    started = time.monotonic()
    page.click("#deploy-start")
    expect(page).to_have_url(re.compile(r"/setup/deploy/clients"), timeout=600_000)
    world.figures["deploy_to_healthy_seconds"] = round(time.monotonic() - started, 1)

    # 7. Client settings, the Apple profile, and a test message that IMAP finds.
    expect(page.locator("#server-imap-host")).to_have_text(HOST)
    expect(page.locator("#server-imap-port")).to_have_text(str(PORTS["imaps"]))
    shot(page, "11-clients")
    with page.expect_download() as download:
        page.click("#profile-download")
    profile = plistlib.loads(Path(download.value.path()).read_bytes())
    kinds = {p["PayloadType"] for p in profile["PayloadContent"]}
    assert {"com.apple.mail.managed", "com.apple.caldav.account", "com.apple.carddav.account"} <= kinds
    page.fill("#to", ADMIN)
    page.click("#send-test")
    expect(page.locator("#test-result")).to_be_visible(timeout=60_000)
    message = imap_find(ADMIN, PASSWORD, "Mailstead")
    assert message["To"] and ADMIN in message["To"]
    # Handed to postfix inside the stack: DKIM-signed, and not scored as spam.
    assert f"d={DOMAIN};" in "".join(message["DKIM-Signature"].split()), message.items()
    assert message["X-Spam"] is None, message.items()
    page.click("#finish")
    expect(page).to_have_url(re.compile(r"/login"))
    shot(page, "12-finished")

    # The token is dead for good.
    with requests.Session() as s:
        s.trust_env, s.verify = False, False
        assert "finished" in s.get(f"{url}/setup/token", timeout=10).text.lower()
    assert not (world.state / "setup-token").exists()

    # 8. Dashboard: log in with TOTP, out, and in again with a recovery code.
    def login(code: str) -> None:
        page.goto(url + "/login")
        page.fill("#address", ADMIN)
        page.fill("#password", PASSWORD)
        page.fill("#code", code)
        page.click("#login-submit")
        expect(page).to_have_url(re.compile(r"/admin/?$"))

    login(next_totp_code(secret))
    expect(page.locator("#health-overall")).to_be_visible()
    shot(page, "13-dashboard-home")
    page.click("#logout")
    expect(page).to_have_url(re.compile(r"/login"))
    page.goto(url + "/admin/")
    expect(page).to_have_url(re.compile(r"/login"))  # no page without a session
    login(codes[0])

    # 9. A new mailbox receives mail from outside (SMTP on 25, as a remote MTA), then is deleted.
    bob, bob_password = f"bob@{DOMAIN}", "bob-correct-horse-battery"
    page.goto(url + "/admin/mailboxes/")
    page.fill("#create-address", bob)
    page.fill("#create-password", bob_password)
    page.click("#create-submit")
    expect(page.locator(f'[id="mailbox-{bob}"]')).to_be_visible(timeout=60_000)
    shot(page, "14-mailbox-created")
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@remote.test", bob, "Hello Bob from outside"
    msg.set_content("Delivered by a remote MTA on port 25.")
    with smtplib.SMTP("127.0.0.1", PORTS["smtp"], local_hostname="mx.remote.test", timeout=30) as smtp:
        smtp.send_message(msg)
    # In the INBOX, or in Junk: without DNS for remote.test rspamd may flag it.
    imap_find(bob, bob_password, "Hello Bob from outside", folders=("INBOX", "Junk"))

    # 10. Bob changes his own password on /password, in a browser with no session: a
    # wrong current password changes nothing; the right one re-encrypts his mail key,
    # so the mail stored until now opens with the new password (and not the old one).
    mine = page.context.browser.new_context(ignore_https_errors=True)
    own = mine.new_page()
    bob_new = "bob-a-new-passphrase-of-his"
    for current in ("not-bobs-password-at-all", bob_password):
        own.goto(url + "/password")
        own.fill("#address", bob)
        own.fill("#old_password", current)
        own.fill("#new_password", bob_new)
        own.fill("#new_password_confirm", bob_new)
        own.click("#password-submit")
        if current != bob_password:
            expect(own.locator("#old_password-error")).to_contain_text("not right")
    expect(own.locator("#password-changed")).to_contain_text(f"The password of {bob} is changed", timeout=60_000)
    shot(own, "15-own-password-changed")
    mine.close()
    message = imap_find(bob, bob_new, "Hello Bob from outside", folders=("INBOX", "Junk"), timeout=10)
    assert "Delivered by a remote MTA" in message.get_payload(decode=True).decode()
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    with imaplib.IMAP4_SSL("127.0.0.1", PORTS["imaps"], ssl_context=tls) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(bob, bob_password)

    page.click(f'[id="delete-{bob}"]')
    page.check("#delete-confirm")
    page.click("#delete-submit")
    expect(page.locator(f'[id="mailbox-{bob}"]')).to_have_count(0, timeout=60_000)
    shot(page, "16-mailbox-deleted")
