"""The mail users' own password page (/password, portal/web/password.py) through a real
agent. There is no docker engine in this tier, so the agent cannot re-encrypt a key:
everything up to that point is checked here (fields, a wrong current password, the rate
limit, no session needed); the change itself, with the mail still readable afterwards,
is in the browser tier (tests/browser/test_wizard_e2e.py) against a real stack."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.stack.accounts import Accounts, NoKeys, verify_password
from portal.web.password import NOT_NOW, NOT_RIGHT
from tests.support.settings import write_settings
from tests.unit.conftest import https_client

BOB = "bob@example.test"
PASSWORD = "correct horse battery staple"
NEW = "a brand new passphrase for bob"


@pytest.fixture
def accounts(state_dir: Path) -> Accounts:
    write_settings(state_dir, domain="example.test", mail_host="mail.example.test", setup_complete="1",
                   stack_deployed="1")
    accounts = Accounts(state_dir / "accounts" / "accounts.db")
    accounts.add_domain("example.test")
    accounts.create_mailbox(BOB, PASSWORD, 0, keys=NoKeys())
    return accounts


@pytest.fixture
def user(make_app: Callable[..., Flask], accounts: Accounts) -> FlaskClient:
    """A browser with no session at all: the page needs none."""
    return https_client(make_app(PASSWORD_RATE_LIMIT="100 per minute"))


def change(client: FlaskClient, **fields: str) -> Any:
    page = client.get("/password")
    assert page.status_code == 200, page.text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
    data = {"address": BOB, "old_password": PASSWORD, "new_password": NEW, "new_password_confirm": NEW, **fields}
    return client.post("/password", data={"csrf_token": token, **data})


def stored_hash(accounts: Accounts) -> str:
    with accounts.connect() as conn:
        return conn.execute("SELECT password FROM mailboxes WHERE address = ?", (BOB,)).fetchone()["password"]


def test_the_page_is_open_without_a_session_and_labels_every_field(user: FlaskClient) -> None:
    page = user.get("/password")
    assert page.status_code == 200
    for field, autocomplete in (("address", "off"), ("old_password", "current-password"),
                                ("new_password", "new-password"), ("new_password_confirm", "new-password")):
        assert f'<label for="{field}">' in page.text, field
        tag = re.search(rf'<input[^>]* id="{field}"[^>]*>', page.text).group(0)
        assert f'autocomplete="{autocomplete}"' in tag, tag
    assert "can no longer be read" in page.text  # what a reset would cost instead


@pytest.mark.parametrize("fields, field", [
    ({"address": ""}, "address"),
    ({"address": "no at sign"}, "address"),
    ({"address": "x" * 400 + "@example.test"}, "address"),
    ({"old_password": ""}, "old_password"),
    ({"new_password": "short", "new_password_confirm": "short"}, "new_password"),
    ({"new_password": "tab\there and long enough", "new_password_confirm": "tab\there and long enough"},
     "new_password"),
    ({"new_password_confirm": NEW + "!"}, "new_password_confirm"),
])
def test_bad_input_is_shown_on_its_field_and_changes_nothing(user: FlaskClient, accounts: Accounts,
                                                              fields: dict[str, str], field: str) -> None:
    before = stored_hash(accounts)
    response = change(user, **fields)
    assert response.status_code == 422, response.text
    assert re.search(rf'id="{field}-error">[^<]+\S', response.text), response.text
    assert PASSWORD not in response.text and NEW not in response.text  # never echoed back
    assert stored_hash(accounts) == before


@pytest.mark.parametrize("fields", [{"old_password": "not the password at all"},
                                    {"address": "nobody@example.test"},
                                    {"address": "bob@elsewhere.test"}])
def test_a_wrong_password_and_an_unknown_address_get_the_same_answer(user: FlaskClient, accounts: Accounts,
                                                                     fields: dict[str, str]) -> None:
    before = stored_hash(accounts)
    response = change(user, **fields)
    assert response.status_code == 422, response.text
    assert f'<p class="error" role="alert" id="old_password-error">{NOT_RIGHT}</p>' in response.text
    assert "nobody" not in response.text.split('id="password-form"')[0]
    assert stored_hash(accounts) == before and verify_password(before, PASSWORD)


def test_the_right_password_without_the_stack_says_so_and_keeps_the_old_one(user: FlaskClient,
                                                                           accounts: Accounts) -> None:
    """The mailbox key cannot be re-encrypted (no dovecot here): nothing changes."""
    response = change(user)
    assert response.status_code == 409, response.text
    assert f'<p class="error" role="alert" id="password-error">{NOT_NOW}</p>' in response.text
    assert "docker" not in response.text and "/tmp/" not in response.text  # the agent's words are the admin's
    assert verify_password(stored_hash(accounts), PASSWORD) and not verify_password(stored_hash(accounts), NEW)


def test_posts_are_rate_limited_per_client(make_app: Callable[..., Flask], accounts: Accounts) -> None:
    client = https_client(make_app(PASSWORD_RATE_LIMIT="3 per minute"))
    for _ in range(3):
        assert change(client, old_password="guess number one").status_code == 422
    assert change(client).status_code == 429  # even with the right password


def test_a_post_without_its_csrf_token_is_refused(user: FlaskClient, accounts: Accounts) -> None:
    before = stored_hash(accounts)
    response = user.post("/password", data={"address": BOB, "old_password": PASSWORD, "new_password": NEW,
                                            "new_password_confirm": NEW})
    assert response.status_code == 400
    assert stored_hash(accounts) == before


def test_before_setup_the_page_is_behind_the_token_gate(make_app: Callable[..., Flask], state_dir: Path) -> None:
    write_settings(state_dir, domain="example.test")
    client = https_client(make_app())
    response = client.get("/password")
    assert response.status_code in (302, 303) and "/setup/" in response.location
