"""Dashboard logs and client setup, through a real agent (no docker engine)."""

from __future__ import annotations

import plistlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.conftest import csrf_token
from tests.unit.conftest import https_client
from tests.support.admin import sign_in
from tests.support.settings import receives, write_settings

ADMIN = "postmaster@example.test"




@pytest.fixture
def dashboard(make_app: Callable[..., Flask], state_dir: Path, start_agent: Callable[..., Any]) -> FlaskClient:
    write_settings(state_dir, domain="example.test", mail_host="mail.example.test", setup_complete="1",
                   stack_deployed="1")
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state_dir)})
    client = https_client(make_app(AGENT_SOCKET=str(agent.socket)))
    sign_in(client, ADMIN)
    return client


def test_logs_without_docker_say_so_once(dashboard: FlaskClient) -> None:
    page = dashboard.get("/admin/logs/")
    assert page.status_code == 200
    assert "The docker engine is unavailable" in page.text and page.text.count('class="error"') == 1
    assert '<label for="service">' in page.text and '<label for="lines">' in page.text
    one = dashboard.get("/admin/logs/?service=dovecot&lines=500")
    assert one.status_code == 200 and 'id="log-dovecot"' in one.text and 'id="log-postfix"' not in one.text


@pytest.mark.parametrize("query, field", [("lines=0", "lines"), ("lines=501", "lines"), ("lines=abc", "lines"),
                                          ("lines=", "lines"), ("service=nginx&lines=5", "service"),
                                          ("service=%00;ls&lines=5", "service")])
def test_logs_bad_input_on_the_field(dashboard: FlaskClient, query: str, field: str) -> None:
    response = dashboard.get(f"/admin/logs/?{query}")
    assert response.status_code == 422 and f'id="{field}-error"' in response.text


def test_client_setup_is_the_wizard_page(dashboard: FlaskClient, state_dir: Path) -> None:
    receives(state_dir, ADMIN)
    page = dashboard.get("/admin/clients/")
    assert page.status_code == 200
    assert 'id="server-imap-host">mail.example.test<' in page.text and 'id="dav-url"' in page.text
    assert 'aria-current="page">Client setup<' in page.text and 'id="finish"' not in page.text
    assert f'value="{ADMIN}"' in page.text  # the test goes to the signed-in admin by default
    profile = dashboard.get("/admin/clients/profile.mobileconfig")
    assert profile.mimetype == "application/x-apple-aspen-config"
    assert plistlib.loads(profile.data)["PayloadContent"][0]["IncomingMailServerHostName"] == "mail.example.test"
    bad = dashboard.get("/admin/clients/profile.mobileconfig?address=nope")
    assert bad.status_code == 422 and 'id="address-error"' in bad.text
    sent = dashboard.post("/admin/clients/test", data={"csrf_token": csrf_token(page.text), "to": ADMIN})
    assert sent.status_code == 502 and 'id="test-error"' in sent.text  # no postfix listening here
    assert "nobody@example.test is neither a mailbox nor an alias" in dashboard.post(
        "/admin/clients/test", data={"csrf_token": csrf_token(page.text), "to": "nobody@example.test"}).text
    wrong = dashboard.post("/admin/clients/test", data={"csrf_token": csrf_token(page.text), "to": "a@b.example"})
    assert wrong.status_code == 422 and 'id="to-error"' in wrong.text


def test_client_setup_before_a_domain(make_app: Callable[..., Flask], state_dir: Path) -> None:
    write_settings(state_dir, setup_complete="1")
    client = https_client(make_app())
    sign_in(client, ADMIN)
    page = client.get("/admin/clients/")
    assert page.status_code == 409 and 'id="clients-problem"' in page.text
    assert client.get("/admin/clients/profile.mobileconfig").status_code == 409
