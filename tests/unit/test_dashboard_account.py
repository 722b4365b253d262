"""Dashboard Account area: the administrator changes the password and moves to a new
authenticator app, each confirmed with a fresh code (or a recovery code); the other
signed-in browsers are signed out, this one stays."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support.admin import sign_in
from tests.unit.conftest import https_client
from tests.unit.test_a11y import problems
from tests.unit.test_backup_confirm import ADMIN, PASSWORD, Owner, set_up

NEW_PASSWORD = "another long passphrase"
CSRF_RE = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


@pytest.fixture
def site(make_app: Callable[..., Flask], state_dir: Path) -> tuple[Flask, FlaskClient, Owner]:
    owner = set_up(state_dir)
    app = make_app()
    client = https_client(app)
    sign_in(client, ADMIN)
    return app, client, owner


def csrf(text: str, form_id: str) -> str:
    return html.unescape(CSRF_RE.search(text[text.index(f'id="{form_id}"'):]).group(1))


def signed_in(client: FlaskClient) -> bool:
    return client.get("/admin/account/").status_code == 200


def test_the_account_page(site: tuple[Flask, FlaskClient, Owner]) -> None:
    _, client, _ = site
    page = client.get("/admin/account/")
    assert page.status_code == 200
    assert 'id="account-address">postmaster@example.test<' in page.text
    assert 'id="account-recovery-left">10<' in page.text
    assert problems(page.text) == []


def test_changing_the_password(site: tuple[Flask, FlaskClient, Owner], state_dir: Path) -> None:
    app, client, owner = site
    other = https_client(app)
    sign_in(other, ADMIN)
    form = {"old_password": PASSWORD, "new_password": NEW_PASSWORD, "new_password_confirm": NEW_PASSWORD}
    page = client.get("/admin/account/").text
    for code in ("", owner.used, owner.wrong()):
        answer = client.post("/admin/account/password", data={**form, "totp_code": code,
                                                               "csrf_token": csrf(page, "password-form")})
        assert answer.status_code == 422 and 'id="password_totp_code-error"' in answer.text, code
        assert problems(answer.text) == []
        page = answer.text
    answer = client.post("/admin/account/password", data={**form, "old_password": "not it",
                                                           "totp_code": owner.fresh(),
                                                           "csrf_token": csrf(page, "password-form")})
    assert answer.status_code == 422 and 'id="old_password-error"' in answer.text
    done = client.post("/admin/account/password", data={**form, "totp_code": owner.fresh(),
                                                         "csrf_token": csrf(answer.text, "password-form")})
    assert done.status_code == 303
    page = client.get("/admin/account/").text
    assert "The password is changed. 1 other signed-in browser(s) were signed out." in page
    assert signed_in(client) and not signed_in(other)


def test_moving_to_a_new_authenticator(site: tuple[Flask, FlaskClient, Owner], state_dir: Path) -> None:
    app, client, owner = site
    other = https_client(app)
    sign_in(other, ADMIN)
    page = client.get("/admin/account/").text
    started = client.post("/admin/account/totp/begin", data={"csrf_token": csrf(page, "totp-start-form")})
    assert started.status_code == 200 and 'id="totp-qr"' in started.text
    assert problems(started.text) == []
    secret = re.search(r'id="totp-secret">([A-Z2-7]+)<', started.text).group(1)
    new = pyotp.TOTP(secret)
    wrong_new = "000000" if new.now() != "000000" else "111111"
    answer = client.post("/admin/account/totp/confirm", data={"totp_code": owner.fresh(), "new_code": wrong_new,
                                                               "csrf_token": csrf(started.text, "totp-form")})
    assert answer.status_code == 422 and 'id="new_code-error"' in answer.text
    assert re.search(r'id="totp-secret">([A-Z2-7]+)<', answer.text).group(1) == secret  # the same key
    answer = client.post("/admin/account/totp/confirm", data={"totp_code": owner.used, "new_code": new.now(),
                                                               "csrf_token": csrf(answer.text, "totp-form")})
    assert answer.status_code == 422 and 'id="totp_totp_code-error"' in answer.text
    done = client.post("/admin/account/totp/confirm", data={"totp_code": owner.codes[0], "new_code": new.now(),
                                                             "csrf_token": csrf(answer.text, "totp-form")})
    assert done.status_code == 303
    page = client.get("/admin/account/").text
    assert "You now sign in with the new authenticator app" in page and 'id="account-recovery-left">9<' in page
    assert not signed_in(other)


def test_five_wrong_codes_sign_out(site: tuple[Flask, FlaskClient, Owner]) -> None:
    _, client, owner = site
    form = {"old_password": PASSWORD, "new_password": NEW_PASSWORD, "new_password_confirm": NEW_PASSWORD,
            "totp_code": owner.wrong()}
    for _ in range(4):
        page = client.get("/admin/account/").text
        assert client.post("/admin/account/password",
                           data={**form, "csrf_token": csrf(page, "password-form")}).status_code == 422
    page = client.get("/admin/account/").text
    out = client.post("/admin/account/password", data={**form, "csrf_token": csrf(page, "password-form")})
    assert out.status_code == 303 and out.location.endswith("/login")
    assert not signed_in(client)

