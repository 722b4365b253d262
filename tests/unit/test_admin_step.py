"""Admin step through the test client with a real agent (TOTP computed with pyotp)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings, strategies as st

from portal.admin import privileged as adminauth

from tests.support import appdb as db
from portal.web.steps.admin import qr_svg
from tests.conftest import csrf_token
from tests.unit.conftest import https_client, unlock

PASSWORD = "correct horse battery staple"


@pytest.fixture
def wizard_app(make_app: Callable[..., Flask], token_file: Path, agent: Any) -> Flask:
    app = make_app(AGENT_SOCKET=str(agent.socket))
    with app.app_context():
        db.save_step("domain", {"domain": "xn--bcher-kva.example", "mail_host": "mail.xn--bcher-kva.example"})
    return app


@pytest.fixture
def client(wizard_app: Flask) -> FlaskClient:
    client = https_client(wizard_app)
    unlock(client)
    return client


def secret_of(page: str) -> str:
    match = re.search(r'<code id="totp-secret">([A-Z2-7]+)</code>', page)
    assert match, page[:3000]
    return match.group(1)


def post(client: FlaskClient, **values: str) -> Any:
    page = client.get("/setup/admin").text
    totp = pyotp.TOTP(secret_of(page))
    data = {"csrf_token": csrf_token(page), "address": "postmaster@bücher.example", "password": PASSWORD,
            "password_confirm": PASSWORD, "totp_code": totp.now(), **values}
    return client.post("/setup/admin", data=data)


def test_admin_comes_after_domain(client: FlaskClient) -> None:
    assert client.get("/").headers["Location"].endswith("/setup/admin")


def test_page_shows_qr_secret_and_default_address(client: FlaskClient) -> None:
    page = client.get("/setup/admin")
    assert page.status_code == 200
    text = page.text
    assert '<svg id="totp-qr" class="qr" role="img"' in text and "<?xml" not in text
    assert 'value="postmaster@bücher.example"' in text
    secret = secret_of(text)
    assert f"otpauth://totp/Mailstead:postmaster%40xn--bcher-kva.example?secret={secret}" in html.unescape(text)
    for name in ("address", "password", "password_confirm", "totp_code"):
        assert f'<label for="{name}">' in text
    assert 'data-strength-meter="password-strength"' in text and "password.js" in text
    assert 'autocomplete="one-time-code"' in text
    # A reload shows the same secret (no new QR code).
    assert secret_of(client.get("/setup/admin").text) == secret


@pytest.mark.parametrize(("values", "field", "problem"), [
    ({"password": "short", "password_confirm": "short"}, "password", "at least 12 characters"),
    ({"password_confirm": "something else entirely"}, "password_confirm", "not the same"),
    ({"password": "postmaster@bücher.example", "password_confirm": "postmaster@bücher.example"},
     "password", "must not be the address"),
    ({"totp_code": "12 34"}, "totp_code", "6-digit code"),
    ({"totp_code": "<script>"}, "totp_code", "6-digit code"),
    ({"address": ""}, "address", "Enter the administrator's address"),
    ({"address": "a@b@c"}, "address", "name@domain"),
    # checked by the agent, shown on the field:
    ({"address": "root@example.org"}, "address", "must be in your domain"),
    ({"address": "r\u00f6ot@bücher.example"}, "address", "before the @, which is not allowed"),
])
def test_bad_input_gets_a_message_on_its_field(wizard_app: Flask, client: FlaskClient, values: dict[str, str],
                                               field: str, problem: str) -> None:
    secret = secret_of(client.get("/setup/admin").text)
    response = post(client, **values)
    assert response.status_code == 200
    assert f'id="{field}-error"' in response.text
    assert problem in html.unescape(response.text)
    assert PASSWORD not in response.text  # passwords are never sent back
    assert "<script>" not in response.text.split("<main", 1)[1].replace("<script src", "")
    assert secret_of(response.text) == secret
    with wizard_app.app_context():
        assert "admin" not in db.done_steps()


def test_wrong_code_is_refused_by_the_agent(client: FlaskClient) -> None:
    page = client.get("/setup/admin").text
    code = "000000" if pyotp.TOTP(secret_of(page)).now() != "000000" else "111111"
    response = post(client, totp_code=code)
    assert 'id="totp_code-error"' in response.text
    assert "that code is not right" in response.text
    assert 'value="postmaster@bücher.example"' in response.text  # what was typed stays


def test_setup_shows_codes_once_then_marks_done(wizard_app: Flask, client: FlaskClient, state_dir: Path) -> None:
    response = post(client)
    assert response.status_code == 200
    codes = re.findall(r"<li><code>([A-Z0-9-]{19})</code></li>", response.text)
    assert len(codes) == 10
    assert 'id="recovery-saved"' in response.text
    with wizard_app.app_context():
        assert db.get_setting("admin_address") == "postmaster@xn--bcher-kva.example"
        assert "admin" not in db.done_steps()
    # Reloading the step before confirming: no codes again, but a way on.
    again = client.get("/setup/admin").text
    assert not any(c in again for c in codes)
    assert 'id="admin-continue"' in again and 'id="admin-configured-address"' in again
    done = client.post("/setup/admin/saved", data={"csrf_token": csrf_token(response.text)})
    assert done.status_code == 303 and done.headers["Location"] == "/"
    with wizard_app.app_context():
        assert "admin" in db.done_steps()
    ((address, prepared),) = adminauth.take_pending_mailboxes(state_dir)
    from portal.stack.accounts import verify_password

    assert address == "postmaster@xn--bcher-kva.example" and verify_password(prepared.password_hash, PASSWORD)


def test_saved_without_an_admin_goes_back(wizard_app: Flask, client: FlaskClient) -> None:
    page = client.get("/setup/admin").text
    response = client.post("/setup/admin/saved", data={"csrf_token": csrf_token(page)})
    assert response.status_code == 303 and response.headers["Location"].endswith("/setup/admin")
    with wizard_app.app_context():
        assert "admin" not in db.done_steps()


def test_saved_needs_csrf(client: FlaskClient) -> None:
    assert client.post("/setup/admin/saved").status_code == 400


def test_agent_down_is_a_message(make_app: Callable[..., Flask], token_file: Path, thread_agent: Any) -> None:
    """The wizard's state is the agent's: with the agent gone, a page says so (503), never a 500."""
    app = make_app()
    with app.app_context():
        db.save_step("domain", {"domain": "example.com", "mail_host": "mail.example.com"})
    client = https_client(app)
    unlock(client)
    page = client.get("/setup/admin")
    assert page.status_code == 200
    thread_agent.stop()
    response = client.post("/setup/admin", data={
        "csrf_token": csrf_token(page.text), "address": "postmaster@example.com", "password": PASSWORD,
        "password_confirm": PASSWORD, "totp_code": "123456"})
    assert response.status_code == 503 and "mailstead-agent" in response.text
    assert client.get("/setup/admin").status_code == 503


def test_qr_svg_is_only_a_path() -> None:
    svg = str(qr_svg('otpauth://totp/x?secret=ABC&issuer="><script>alert(1)</script>'))
    assert svg.startswith("<svg ") and "<script" not in svg and "alert" not in svg
    assert re.fullmatch(r'<svg [^<>]*><path [^<>]*/></svg>\s*', svg), svg[:300]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.fixed_dictionaries({k: st.text(max_size=300) for k in ("address", "password", "password_confirm",
                                                                   "totp_code")}))
def test_fuzzed_admin_form_never_fails(client: FlaskClient, values: dict[str, str]) -> None:
    page = client.get("/setup/admin").text
    response = client.post("/setup/admin", data={"csrf_token": csrf_token(page), **values})
    assert response.status_code == 200
    assert 'class="error" role="alert"' in response.text


def test_qr_svg_is_rendered_once_per_uri() -> None:
    """The admin page re-renders on every form error: the QR code is kept per URI."""
    first = qr_svg("otpauth://totp/Mailstead:admin@example.org?secret=JBSWY3DPEHPK3PXP")
    again = qr_svg("otpauth://totp/Mailstead:admin@example.org?secret=JBSWY3DPEHPK3PXP")
    other = qr_svg("otpauth://totp/Mailstead:admin@example.org?secret=KRSXG5CTMVRXEZLU")
    assert again is first
    assert other != first
