"""CSRF: missing, invalid, expired and replayed tokens are refused and change nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient

from tests.support import appdb as db
from tests.conftest import TEST_TOKEN, csrf_token
from tests.unit.conftest import BASE, https_client

MESSAGE = "The form expired or was submitted twice; reload the page and try again"


def settings(app: Flask) -> dict[str, str]:
    with app.app_context():
        return db.get_settings()


def done(app: Flask) -> set[str]:
    with app.app_context():
        return db.done_steps()


def assert_csrf_refused(response) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 400
    assert MESSAGE in response.text
    assert 'role="alert"' in response.text


def assert_locked(client: FlaskClient) -> None:
    assert client.get("/setup/domain").status_code == 302


def test_missing_csrf_token(client: FlaskClient) -> None:
    client.get("/setup/token")
    assert_csrf_refused(client.post("/setup/token", data={"token": TEST_TOKEN}))
    assert_locked(client)


def test_invalid_csrf_token(client: FlaskClient) -> None:
    client.get("/setup/token")
    assert_csrf_refused(client.post("/setup/token", data={"csrf_token": "forged", "token": TEST_TOKEN}))
    assert_locked(client)


def test_csrf_token_from_another_session(app: Flask) -> None:
    other, victim = https_client(app), https_client(app)
    stolen = csrf_token(other.get("/setup/token").text)
    victim.get("/setup/token")
    assert_csrf_refused(victim.post("/setup/token", data={"csrf_token": stolen, "token": TEST_TOKEN}))
    assert_locked(victim)


def test_expired_csrf_token(make_app: Callable[..., Flask], token_file: object) -> None:
    client = https_client(make_app(WTF_CSRF_TIME_LIMIT=1))
    form = csrf_token(client.get("/setup/token").text)
    time.sleep(2.1)
    assert_csrf_refused(client.post("/setup/token", data={"csrf_token": form, "token": TEST_TOKEN}))
    assert_locked(client)


def test_cross_site_referer_is_refused(client: FlaskClient) -> None:
    form = csrf_token(client.get("/setup/token").text)
    response = client.post("/setup/token", data={"csrf_token": form, "token": TEST_TOKEN},
                           headers={"Referer": "https://evil.example/"})
    assert_csrf_refused(response)
    assert "referrer does not match" in response.text
    assert_locked(client)


def test_replayed_token_gate_form_is_refused(client: FlaskClient) -> None:
    form = {"csrf_token": csrf_token(client.get("/setup/token").text), "token": TEST_TOKEN}
    assert client.post("/setup/token", data=form).status_code == 302
    # Replay straight away (no new form rendered yet) ...
    assert_csrf_refused(client.post("/setup/token", data=form))
    # ... and after the wizard has rendered a fresh form.
    assert client.get("/setup/domain").status_code == 200
    assert_csrf_refused(client.post("/setup/token", data=form))


def test_replayed_domain_form_is_refused(app: Flask, unlocked: FlaskClient) -> None:
    token = csrf_token(unlocked.get("/setup/domain").text)
    first = {"csrf_token": token, "domain": "example.com", "mail_host": "mail.example.com",
             "public_ipv4": "8.8.8.8", "dns_resolvers": "9.9.9.9"}
    assert unlocked.post("/setup/domain", data=first).status_code == 303
    replay = {**first, "domain": "attacker.example", "mail_host": "mx.attacker.example"}
    assert_csrf_refused(unlocked.post("/setup/domain", data=replay))
    unlocked.get("/setup/domain")  # a fresh form exists now; the old token still fails
    assert_csrf_refused(unlocked.post("/setup/domain", data=replay))
    assert settings(app) == {"domain": "example.com", "mail_host": "mail.example.com", "public_ipv4": "8.8.8.8",
                             "public_ipv6": "", "dns_resolvers": "9.9.9.9"}


def test_domain_post_without_csrf_stores_nothing(app: Flask, unlocked: FlaskClient) -> None:
    response = unlocked.post("/setup/domain", data={"domain": "example.com", "mail_host": "mail.example.com"})
    assert_csrf_refused(response)
    assert settings(app) == {}
    assert done(app) == set()


def test_error_page_links_back(client: FlaskClient) -> None:
    response = client.post("/setup/token", data={"token": "x"}, headers={"Referer": BASE + "/setup/token"})
    assert_csrf_refused(response)
    assert 'href="/"' in response.text
