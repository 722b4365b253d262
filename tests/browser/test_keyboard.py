"""The wizard's form steps with the keyboard only: every field and button is
reached with Tab, filled by typing, and submitted with Enter or Space."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import Portal, running_portal


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[Portal]:
    with running_portal(tmp_path) as p:  # its own state: this walk goes past the Domain step
        yield p


def tab_to(page: Page, element_id: str, limit: int = 40) -> None:
    """Press Tab until `element_id` has the focus (fails if it is never reached)."""
    for _ in range(limit):
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} is not reachable with Tab within {limit} presses")


def type_into(page: Page, element_id: str, text: str) -> None:
    tab_to(page, element_id)
    page.keyboard.press("Control+A")
    page.keyboard.type(text) if text else page.keyboard.press("Delete")


def test_token_domain_and_admin_with_the_keyboard_only(page: Page, portal: Portal, artifacts: Path) -> None:
    page.goto(portal.url + "/")
    type_into(page, "token", portal.token)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/setup/domain$"))

    type_into(page, "domain", "example.org")
    type_into(page, "mail_host", "")
    type_into(page, "public_ipv4", "127.0.0.1")
    type_into(page, "dns_resolvers", "127.0.0.1")
    tab_to(page, "domain-submit")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/setup/admin$"))

    secret = page.locator("#totp-secret").inner_text().replace(" ", "").strip()
    type_into(page, "password", "keyboard-correct-horse-battery")
    type_into(page, "password_confirm", "keyboard-correct-horse-battery")
    type_into(page, "totp_code", pyotp.TOTP(secret).now())
    tab_to(page, "admin-submit")
    page.keyboard.press("Space")
    expect(page.locator("#recovery-codes li")).to_have_count(10)
    tab_to(page, "recovery-saved")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/setup/dns"))
    tab_to(page, "dns-check-now")  # the next step's controls are reachable too
    page.screenshot(path=str(artifacts / "keyboard-dns.png"), full_page=True)
