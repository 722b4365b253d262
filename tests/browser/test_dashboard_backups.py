"""The Backups page in chromium: sign in, choose a local folder, the recovery sheet
once, then "Back up now" with live progress (static/jobs.js, no inline script) and
the new snapshot listed when the job ends; the Health and Schedules pages load with
no console error (CSP violations show there). Real agent and restic; the stack's
volumes are asked for through the host's docker engine under an unused project."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import Page, expect

from tests.support import appdb as db
from portal.agent.client import AgentClient
from tests.browser.conftest import Portal, running_portal

ADMIN = "postmaster@example.test"
PASSWORD = "backup-correct-horse-battery"


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    with running_portal(tmp_path) as p:
        yield p


def test_back_up_now_with_live_progress(page: Page, portal: Portal, tmp_path: Path, artifacts: Path) -> None:
    db.write_settings(portal.state_dir / "state.db", {"domain": "example.test", "mail_host": "mail.example.test"})
    agent = AgentClient(str(tmp_path / "run" / "agent.sock"), timeout=30)
    secret = agent.call("admin_totp_begin", address=ADMIN)["secret"]
    totp = pyotp.TOTP(secret)
    codes = agent.call("admin_setup", address=ADMIN, password=PASSWORD, totp_code=totp.now())["recovery_codes"]
    db.write_settings(portal.state_dir / "state.db", {"admin_address": ADMIN, "setup_complete": "1",
                                                      "stack_project": "mstest-i6dash-browser"})
    errors: list[str] = []
    # (chromium asks for /favicon.ico by itself; the portal has none)
    page.on("console", lambda m: errors.append(f"{m.text} {m.location.get('url')}")
            if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico") else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    page.goto(portal.url + "/login")
    page.fill("#address", ADMIN)
    page.fill("#password", PASSWORD)
    page.fill("#code", totp.at(page.evaluate("Date.now() / 1000") + 30))  # admin_setup spent the current one
    page.click("#login-submit")
    expect(page).to_have_url(re.compile(r"/admin/?$"))

    page.goto(portal.url + "/admin/backups/")
    page.fill("#path", str(tmp_path / "backups"))
    page.fill("#target_totp_code", codes[0])  # a change of target is confirmed (sign-in spent the TOTP step)
    page.click("#save_target")
    expect(page.locator("#recovery-sheet")).to_contain_text("Password:", timeout=60_000)
    page.screenshot(path=str(artifacts / "backups-1-sheet.png"), full_page=True)
    page.click("#backup-continue")
    expect(page.locator("#snapshots-none")).to_be_visible()
    assert page.locator("#recovery-sheet").count() == 0  # shown once

    page.click("#backup-run-start")
    # jobs.js: the progress shows without a reload, then the page reloads with the result
    expect(page.locator("#backup-run-events li").first).to_be_visible(timeout=30_000)
    expect(page.locator("#backup-run-done")).to_contain_text("The last backup succeeded", timeout=120_000)
    expect(page.locator("#snapshot-list tbody tr")).to_have_count(1)
    expect(page.locator("#last-backup")).to_contain_text("OK")
    expect(page.locator("#backup-run-state")).to_have_text("Nothing running.")
    page.screenshot(path=str(artifacts / "backups-2-done.png"), full_page=True)

    for path in ("/admin/health/", "/admin/schedules/"):
        page.goto(portal.url + path)
        expect(page.locator("h1")).to_be_visible()
    assert errors == [], errors
