"""The token gate and the first wizard step, as a person sees them in chromium."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.browser.conftest import Portal
from tests.conftest import OS_PRETTY_NAME


def unlock(page: Page, portal: Portal) -> None:
    page.goto(portal.url + "/setup/token")
    page.fill("#token", portal.token)
    page.get_by_role("button", name="Continue").click()
    expect(page).to_have_url(re.compile(r"/setup/domain$"))


def test_wrong_then_right_token(page: Page, portal_server: Portal, artifacts: Path) -> None:
    page.goto(portal_server.url + "/")
    expect(page).to_have_url(re.compile(r"/setup/token$"))
    expect(page.get_by_label("Setup token")).to_be_visible()

    page.fill("#token", "this-is-not-the-token")
    page.get_by_role("button", name="Continue").click()
    alert = page.locator(".error[role=alert]")
    expect(alert).to_contain_text("That setup token is not right. Copy it exactly from the appliance console")
    expect(page).to_have_url(re.compile(r"/setup/token$"))
    page.screenshot(path=str(artifacts / "token-gate-wrong.png"), full_page=True)

    page.fill("#token", portal_server.token)
    page.get_by_role("button", name="Continue").click()
    expect(page).to_have_url(re.compile(r"/setup/domain$"))
    expect(page.get_by_role("heading", name="Your mail domain")).to_be_visible()
    expect(page.locator("#agent-status")).to_contain_text(OS_PRETTY_NAME)
    page.screenshot(path=str(artifacts / "token-gate.png"), full_page=True)

    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["__Host-mailstead"]
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"


def test_domain_step(page: Page, portal_server: Portal, artifacts: Path) -> None:
    unlock(page, portal_server)
    page.get_by_label("Domain name").fill("not a domain")
    page.get_by_label("Mail server host name").fill("mail.example.com")
    page.get_by_role("button", name="Save and continue").click()
    expect(page.locator("#domain-error")).to_contain_text("Domain name")
    expect(page.locator("#domain-error")).to_contain_text("contains a space")
    expect(page.locator("#domain")).to_have_attribute("aria-invalid", "true")
    page.screenshot(path=str(artifacts / "domain-error.png"), full_page=True)

    page.get_by_label("Domain name").fill("Example.COM.")
    page.fill("#public_ipv4", "127.0.0.1")  # the fixture's state allows private addresses (a lab)
    page.fill("#dns_resolvers", "127.0.0.1")
    page.get_by_role("button", name="Save and continue").click()
    expect(page).to_have_url(re.compile(r"/setup/admin$"))
    page.goto(portal_server.url + "/setup/domain")
    expect(page.locator("#saved-domain-unicode")).to_have_text("example.com")  # lower-cased, dot dropped
    expect(page.locator("#saved-mail-host-unicode")).to_have_text("mail.example.com")
    page.screenshot(path=str(artifacts / "domain-saved.png"), full_page=True)
