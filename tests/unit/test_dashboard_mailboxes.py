"""Dashboard mailboxes and aliases, through a real agent (no docker engine: changes
that need dovecot's keys say so; the accounts database ones work)."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings, strategies as st

from portal.stack.accounts import Accounts, NoKeys
from tests.unit.conftest import https_client
from tests.support.admin import sign_in
from tests.support.settings import write_settings

ADMIN = "postmaster@example.test"
PASSWORD = "correct horse battery staple"




def token(html: str, form_id: str) -> str:
    form = html[html.index(f'id="{form_id}"'):]
    return re.search(r'name="[a-z]*-?csrf_token" type="hidden" value="([^"]+)"', form).group(1)


@pytest.fixture
def dashboard(make_app: Callable[..., Flask], state_dir: Path, start_agent: Callable[..., Any]) -> FlaskClient:
    write_settings(state_dir, domain="example.test", setup_complete="1", stack_deployed="1")
    accounts = Accounts(state_dir / "accounts" / "accounts.db")
    accounts.add_domain("example.test")
    accounts.create_mailbox(ADMIN, PASSWORD, 0, keys=NoKeys())
    accounts.create_mailbox("bob@example.test", PASSWORD, 100, keys=NoKeys())
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state_dir)})
    client = https_client(make_app(AGENT_SOCKET=str(agent.socket)))
    sign_in(client, ADMIN)
    return client


def post(client: FlaskClient, path: str, form_id: str, prefix: str, **fields: Any) -> Any:
    page = client.get("/admin/mailboxes/")
    data = {f"{prefix}-csrf_token": token(page.text, form_id), **{f"{prefix}-{k}": v for k, v in fields.items()}}
    return client.post(path, data=data)


def test_list(dashboard: FlaskClient) -> None:
    html = dashboard.get("/admin/mailboxes/").text
    assert 'id="mailbox-bob@example.test"' in html and "100 MiB" in html and 'id="alias-none"' in html
    for field in ("create-address", "create-password", "create-quota_mb", "reset-address", "reset-new_password",
                  "quota-address", "quota-quota_mb", "alias-source", "alias-destination"):
        assert f'<label for="{field}">' in html and f'id="{field}"' in html, field


@pytest.mark.parametrize("fields, field", [
    ({"address": "", "password": PASSWORD}, "address"),
    ({"address": "no at sign", "password": PASSWORD}, "address"),
    ({"address": "a;rm -rf /@example.test", "password": PASSWORD}, "address"),
    ({"address": "x" * 400 + "@example.test", "password": PASSWORD}, "address"),
    ({"address": "carol@example.test", "password": "short"}, "password"),
    ({"address": "carol@example.test", "password": "tab\there and long enough"}, "password"),
    ({"address": "carol@example.test", "password": PASSWORD, "quota_mb": "lots"}, "quota_mb"),
    ({"address": "carol@example.test", "password": PASSWORD, "quota_mb": "-1"}, "quota_mb"),
    ({"address": "bob@example.test", "password": PASSWORD}, "address"),  # exists: refused by the agent
])
def test_create_bad_input_on_the_field(dashboard: FlaskClient, fields: dict, field: str) -> None:
    response = post(dashboard, "/admin/mailboxes/create", "create-form", "create", **fields)
    assert response.status_code == 422, response.text
    assert f'id="create-{field}-error"' in response.text
    assert PASSWORD not in response.text  # a password is never echoed back


def test_create_without_docker_says_so(dashboard: FlaskClient, state_dir: Path) -> None:
    response = post(dashboard, "/admin/mailboxes/create", "create-form", "create",
                    address="carol@example.test", password=PASSWORD, quota_mb="0")
    assert response.status_code in (409, 503) and 'id="page-error"' in response.text
    assert "docker engine" in response.text
    assert Accounts(state_dir / "accounts" / "accounts.db").get_mailbox("carol@example.test") is None


def test_alias_add_and_remove(dashboard: FlaskClient) -> None:
    response = post(dashboard, "/admin/mailboxes/alias", "alias-form", "alias",
                    source="Info@example.test", destination="bob@example.test")
    assert response.status_code == 303, response.text
    page = dashboard.get("/admin/mailboxes/")
    assert "info@example.test now forwards to bob@example.test" in page.text
    assert 'id="alias-info@example.test-bob@example.test"' in page.text
    again = post(dashboard, "/admin/mailboxes/alias", "alias-form", "alias",
                 source="info@example.test", destination="bob@example.test")
    assert again.status_code == 422 and 'id="alias-destination-error"' in again.text
    loop = post(dashboard, "/admin/mailboxes/alias", "alias-form", "alias",
                source="bob@example.test", destination="info@example.test")
    assert loop.status_code == 422 and 'id="alias-source-error"' in loop.text  # bob is a mailbox
    page = dashboard.get("/admin/mailboxes/")
    removed = dashboard.post("/admin/mailboxes/alias/remove", data={
        "unalias-csrf_token": token(page.text, "alias-list"),
        "unalias-source": "info@example.test", "unalias-destination": "bob@example.test"})
    assert removed.status_code == 303
    assert 'id="alias-none"' in dashboard.get("/admin/mailboxes/").text


def test_a_catch_all_is_added_on_the_alias_form_and_a_looping_one_refused(dashboard: FlaskClient) -> None:
    response = post(dashboard, "/admin/mailboxes/alias", "alias-form", "alias",
                    source="@Example.test", destination="sales@example.test")
    assert response.status_code == 422 and 'id="alias-destination-error"' in response.text
    assert "loop" in response.text
    response = post(dashboard, "/admin/mailboxes/alias", "alias-form", "alias",
                    source="@Example.test", destination="bob@example.test")
    assert response.status_code == 303, response.text
    html = dashboard.get("/admin/mailboxes/").text
    assert 'id="alias-@example.test-bob@example.test"' in html
    assert "@example.test now forwards to bob@example.test" in html
    response = dashboard.post("/admin/mailboxes/alias/remove", data={
        "unalias-csrf_token": token(html, "alias-list"),
        "unalias-source": "@example.test", "unalias-destination": "bob@example.test"})
    assert response.status_code == 303
    assert 'id="alias-@example.test-bob@example.test"' not in dashboard.get("/admin/mailboxes/").text


def test_quota_change(dashboard: FlaskClient, state_dir: Path) -> None:
    response = post(dashboard, "/admin/mailboxes/quota", "quota-form", "quota",
                    address="bob@example.test", quota_mb="2048")
    assert response.status_code == 303
    assert Accounts(state_dir / "accounts" / "accounts.db").get_mailbox("bob@example.test")["quota_mb"] == 2048
    for value in ("", "x", "99999999999"):
        bad = post(dashboard, "/admin/mailboxes/quota", "quota-form", "quota", address="bob@example.test",
                   quota_mb=value)
        assert bad.status_code == 422 and 'id="quota-quota_mb-error"' in bad.text, value
    unknown = post(dashboard, "/admin/mailboxes/quota", "quota-form", "quota", address="nobody@example.test",
                   quota_mb="1")
    assert unknown.status_code == 422 and 'id="quota-address-error"' in unknown.text


def test_reset_password_checks_the_new_password(dashboard: FlaskClient) -> None:
    bad = post(dashboard, "/admin/mailboxes/reset-password", "reset-form", "reset",
               address="bob@example.test", new_password="short")
    assert bad.status_code == 422 and 'id="reset-new_password-error"' in bad.text
    needs_docker = post(dashboard, "/admin/mailboxes/reset-password", "reset-form", "reset",
                        address="bob@example.test", new_password=PASSWORD + "!")
    assert needs_docker.status_code in (409, 503) and "docker engine" in needs_docker.text


def test_delete_asks_for_confirmation(dashboard: FlaskClient, state_dir: Path) -> None:
    confirm = dashboard.get("/admin/mailboxes/delete?address=bob@example.test")
    assert confirm.status_code == 200 and 'id="delete-confirmation"' in confirm.text
    data = {"delete-csrf_token": token(confirm.text, "delete-form"), "delete-address": "bob@example.test"}
    unticked = dashboard.post("/admin/mailboxes/delete", data=data)
    assert unticked.status_code == 422 and 'id="delete-confirm-error"' in unticked.text
    ticked = dashboard.post("/admin/mailboxes/delete", data={**data, "delete-confirm": "y"})
    assert ticked.status_code in (409, 503) and "docker engine" in ticked.text  # keys live in dovecot
    assert Accounts(state_dir / "accounts" / "accounts.db").get_mailbox("bob@example.test") is not None
    assert dashboard.get("/admin/mailboxes/delete?address=%00bad").status_code == 303


def test_missing_csrf_is_refused(dashboard: FlaskClient) -> None:
    response = dashboard.post("/admin/mailboxes/alias", data={"alias-source": "a@example.test",
                                                              "alias-destination": "b@example.test"})
    assert response.status_code == 400


text = st.one_of(st.text(max_size=80), st.text(alphabet="';\"$`\\<>&|%@.\x00\n\t ", max_size=30),
                 st.just("x" * 5000), st.just(""))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(address=text, password=text, quota=text)
def test_create_fuzz_never_5xx_and_errors_on_fields(dashboard: FlaskClient, address: str, password: str,
                                                    quota: str) -> None:
    response = post(dashboard, "/admin/mailboxes/create", "create-form", "create",
                    address=address, password=password, quota_mb=quota)
    assert response.status_code < 500 or "docker engine" in response.text
    if response.status_code == 422:
        assert re.search(r'id="create-(address|password|quota_mb)-error"', response.text)
