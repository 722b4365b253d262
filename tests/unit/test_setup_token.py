"""The token gate."""

from __future__ import annotations

from collections.abc import Callable
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support import appdb as db
from tests.conftest import TEST_TOKEN, csrf_token
from tests.unit.conftest import https_client, unlock


def post_token(client: FlaskClient, token: str, **kwargs: object):  # type: ignore[no-untyped-def]
    page = client.get("/setup/token", **kwargs)
    return client.post("/setup/token", data={"csrf_token": csrf_token(page.text), "token": token}, **kwargs)


def assert_locked(client: FlaskClient) -> None:
    response = client.get("/setup/domain")
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/setup/token")


def test_token_page(client: FlaskClient) -> None:
    response = client.get("/setup/token")
    assert response.status_code == 200
    assert 'id="token"' in response.text
    assert '<label for="token">' in response.text
    assert ">Continue</button>" in response.text
    assert 'name="csrf_token"' in response.text


@pytest.mark.parametrize("path", ["/", "/setup/domain", "/setup/next"])
def test_pages_need_the_token(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 302
    assert response.headers["Location"].endswith("/setup/token")


@pytest.mark.parametrize("wrong", ["", "nope", TEST_TOKEN[:-1], TEST_TOKEN + "x", TEST_TOKEN.upper(), "tökén"])
def test_wrong_token_is_refused(client: FlaskClient, wrong: str) -> None:
    response = post_token(client, wrong)
    assert response.status_code == 403
    assert "That setup token is not right. Copy it exactly from the appliance console" in response.text
    assert 'class="error" role="alert"' in response.text
    assert 'id="token"' in response.text  # the form is there to try again
    assert_locked(client)


def test_right_token_unlocks_the_wizard(client: FlaskClient) -> None:
    response = post_token(client, TEST_TOKEN)
    assert response.status_code == 302
    assert response.headers["Location"] == "/"
    follow = client.get("/")
    assert follow.status_code == 302
    assert follow.headers["Location"].endswith("/setup/domain")
    page = client.get("/setup/domain")
    assert page.status_code == 200
    assert "Your mail domain" in page.text


def test_pasted_whitespace_is_ignored(client: FlaskClient) -> None:
    assert post_token(client, f"  {TEST_TOKEN}\n").status_code == 302


def test_session_cookie_flags(client: FlaskClient) -> None:
    response = post_token(client, TEST_TOKEN)
    [header] = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("__Host-mailstead=")]
    morsel = SimpleCookie(header)["__Host-mailstead"]
    assert morsel["secure"] is True
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/"
    assert morsel["expires"]  # permanent session: 30 minutes


def test_token_page_redirects_when_already_unlocked(unlocked: FlaskClient) -> None:
    response = unlocked.get("/setup/token")
    assert response.status_code == 302
    assert response.headers["Location"] == "/"


def test_sixth_attempt_in_a_minute_is_rate_limited(client: FlaskClient) -> None:
    for _ in range(5):
        assert post_token(client, "wrong").status_code == 403
    response = post_token(client, TEST_TOKEN)  # even the right token waits
    assert response.status_code == 429
    assert "Too many attempts" in response.text
    assert 'role="alert"' in response.text
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert_locked(client)
    # Reading the page is not limited.
    assert client.get("/setup/token").status_code == 200


def test_rate_limit_is_per_client_address(app: Flask) -> None:
    attacker, owner = https_client(app), https_client(app)
    for _ in range(6):
        post_token(attacker, "wrong", headers={"X-Forwarded-For": "203.0.113.9"})
    assert post_token(attacker, "wrong", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    response = post_token(owner, TEST_TOKEN, headers={"X-Forwarded-For": "198.51.100.20"})
    assert response.status_code == 302


def test_missing_token_file_is_503(client: FlaskClient, token_file: Path) -> None:
    form = csrf_token(client.get("/setup/token").text)
    token_file.unlink()
    response = client.get("/setup/token")
    assert response.status_code == 503
    assert "setup token has not been generated yet" in response.text
    assert "mailstead-firstboot" in response.text
    response = client.post("/setup/token", data={"csrf_token": form, "token": TEST_TOKEN})
    assert response.status_code == 503
    assert_locked(client)


def test_unreadable_token_file_is_503(client: FlaskClient, token_file: Path) -> None:
    token_file.unlink()
    token_file.mkdir()
    response = client.get("/setup/token")
    assert response.status_code == 503
    assert "cannot read the setup token file" in response.text


def test_empty_token_file_never_matches(client: FlaskClient, token_file: Path) -> None:
    token_file.write_text("\n")
    response = client.get("/setup/token")
    assert response.status_code == 503


def test_after_setup_the_token_page_says_finished(app: Flask) -> None:
    with app.app_context():
        db.set_settings({"setup_complete": "1"})
    client = https_client(app)
    response = client.get("/setup/token")
    assert response.status_code == 200
    assert "Setup is finished" in response.text
    assert 'id="token"' not in response.text


def test_wrong_token_changes_nothing(make_app: Callable[..., Flask], token_file: Path, state_dir: Path) -> None:
    client = https_client(make_app())
    before = token_file.read_bytes()
    post_token(client, "wrong")
    assert token_file.read_bytes() == before
    assert_locked(client)


def test_unlock_helper_works(client: FlaskClient) -> None:
    assert unlock(client).status_code == 302
