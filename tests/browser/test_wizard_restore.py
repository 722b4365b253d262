"""The wizard's "Restore from a backup" in chromium: from the token to the sign-in,
with the live progress of static/jobs.js (which goes on to the outcome by itself,
although the restored state completes setup while the page watches). The backups
are made by the real backup service with restic (tests/integration/test_wizard_restore.py
has the old appliance and the fresh appliance's agent); gunicorn serves the portal."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

import requests
from playwright.sync_api import Page, expect

from portal.agent.firstboot import make_certificate
from tests.conftest import TEST_TOKEN, free_port, launch_gunicorn, retry, stop_process
from tests.integration.test_wizard_restore import ADMIN, VERSION, fresh_appliance_agent, make_old_appliance


def test_restore_from_a_backup_in_the_browser(page: Page, tmp_path: Path, artifacts: Path) -> None:
    old = make_old_appliance(tmp_path / "old")
    (tmp_path / "fresh").mkdir()
    with fresh_appliance_agent(tmp_path / "fresh") as (state, _vols, stack, sock):
        cert_pem, key_pem = make_certificate("localhost", [ipaddress.ip_address("127.0.0.1")],
                                             now=dt.datetime.now(dt.timezone.utc))
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        cert.write_bytes(cert_pem)
        key.write_bytes(key_pem)
        key.chmod(0o600)
        port = free_port()
        env = {**os.environ, "MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_RUN_DIR": str(tmp_path / "run"),
               "MAILSTEAD_AGENT_SOCKET": str(sock)}
        log = tmp_path / "gunicorn.log"
        web = launch_gunicorn("--bind", f"127.0.0.1:{port}", "--certfile", str(cert), "--keyfile", str(key),
                              env=env, log=log)
        url = f"https://127.0.0.1:{port}"
        try:
            def healthy() -> None:
                assert web.poll() is None, log.read_text()
                requests.get(f"{url}/healthz", verify=str(cert), timeout=2).raise_for_status()

            retry(healthy, 30, f"gunicorn at {url}")
            page.goto(url + "/")
            page.fill("#token", TEST_TOKEN)
            page.keyboard.press("Enter")
            expect(page).to_have_url(re.compile(r"/setup/domain$"))
            page.click("#choose-restore")
            expect(page).to_have_url(re.compile(r"/setup/restore$"))
            page.check("#target-0")  # a folder or disk
            page.fill("#path", str(old.repo))
            page.fill("#password", old.password)
            page.click("#restore-open")
            expect(page).to_have_url(re.compile(r"/setup/restore/snapshots$"))
            expect(page.locator("#snapshot-0")).to_be_checked()  # the newest by default
            expect(page.locator("#snapshot-0-newer")).to_contain_text("newer Mailstead (9.0.0)")
            page.screenshot(path=str(artifacts / "restore-snapshots.png"), full_page=True)
            page.check(f"input[value='{old.snapshots[VERSION]}']")
            page.click("#restore-choose")
            expect(page).to_have_url(re.compile(r"/setup/restore/confirm$"))
            page.click("#restore-start")
            # jobs.js shows the progress, then goes on to the outcome by itself.
            expect(page).to_have_url(re.compile(r"/setup/restore/done$"), timeout=90_000)
            expect(page.get_by_role("heading", name="Your appliance is restored")).to_be_visible()
            expect(page.locator("#restored-admin")).to_have_text(ADMIN)
            expect(page.locator("#restore-dns")).to_contain_text("198.51.100.77")
            page.screenshot(path=str(artifacts / "restore-done.png"), full_page=True)
            assert stack.calls == ["start"] and not (state / "setup-token").exists()
            page.click("#restore-sign-in")
            expect(page).to_have_url(re.compile(r"/login"))
            expect(page.locator("#address")).to_be_visible()
            page.goto(url + "/setup/restore")  # the wizard is gone
            expect(page).to_have_url(re.compile(r"/login"))
        finally:
            stop_process(web)
            print(f"gunicorn log ({log}):\n{log.read_text()[-3000:]}")
