"""Domain step."""

from __future__ import annotations

import html

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal import db
from portal.steps.domain import dns_name_problem
from tests.conftest import csrf_token


def submit(client: FlaskClient, domain: str, mail_host: str):  # type: ignore[no-untyped-def]
    token = csrf_token(client.get("/setup/domain").text)
    return client.post("/setup/domain", data={"csrf_token": token, "domain": domain, "mail_host": mail_host})


def stored(app: Flask) -> tuple[dict[str, str], set[str]]:
    with app.app_context():
        return db.get_settings(), db.done_steps()


BAD_DOMAINS = [
    ("", "Domain name is required"),
    ("   ", "Domain name is required"),
    ("localhost", "needs at least one dot"),
    ("exa mple.com", "contains characters that are not allowed"),
    ("exa_mple.com", "contains characters that are not allowed"),
    ("example..com", "has an empty part between dots"),
    (".example.com", "has an empty part between dots"),
    ("-example.com", "cannot start or end with a hyphen"),
    ("example-.com", "cannot start or end with a hyphen"),
    ("me@example.com", "is an email address"),
    ("https://example.com/", "looks like a web address"),
    ("192.0.2.1", "looks like an IP address"),
    ("a" * 64 + ".com", "longer than 63 characters"),
    (".".join(["a" * 60] * 5), "is too long"),
    ("<script>.com", "contains characters that are not allowed"),
]


@pytest.mark.parametrize(("value", "problem"), BAD_DOMAINS)
def test_bad_domain_gets_a_clear_field_error(app: Flask, unlocked: FlaskClient, value: str, problem: str) -> None:
    response = submit(unlocked, value, "mail.example.com")
    assert response.status_code == 200
    page = html.unescape(response.text)
    assert problem in page
    assert 'class="error" role="alert" id="domain-error"' in response.text
    assert 'aria-invalid="true"' in response.text
    assert "<script>.com" not in response.text  # escaped
    assert stored(app) == ({}, set())


@pytest.mark.parametrize(("value", "problem"), [
    ("", "Mail server host name is required"),
    ("mail", "needs at least one dot"),
    ("mail .example.com", "not allowed"),
])
def test_bad_mail_host_gets_a_clear_field_error(unlocked: FlaskClient, value: str, problem: str) -> None:
    response = submit(unlocked, "example.com", value)
    assert response.status_code == 200
    assert problem in html.unescape(response.text)
    assert 'id="mail_host-error"' in response.text
    assert 'id="domain-error"' not in response.text


def test_valid_domain_is_stored_and_step_marked_done(app: Flask, unlocked: FlaskClient) -> None:
    response = submit(unlocked, " Example.COM. ", "MAIL.example.com")
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
    assert stored(app) == ({"domain": "example.com", "mail_host": "mail.example.com"}, {"domain"})
    page = unlocked.get("/", follow_redirects=True)
    assert "Next steps are coming" in page.text
    assert "example.com" in page.text


def test_form_shows_saved_values(unlocked: FlaskClient) -> None:
    submit(unlocked, "example.net", "mx.example.net")
    page = unlocked.get("/setup/domain").text
    assert 'value="example.net"' in page
    assert 'value="mx.example.net"' in page


def test_bad_input_does_not_lose_stored_data(app: Flask, unlocked: FlaskClient) -> None:
    assert submit(unlocked, "example.com", "mail.example.com").status_code == 303
    response = submit(unlocked, "not a domain", "")
    assert response.status_code == 200
    assert stored(app) == ({"domain": "example.com", "mail_host": "mail.example.com"}, {"domain"})


@pytest.mark.parametrize("name", [
    "example.com", "mail.example.com", "a.b.c.d.example.co.uk", "xn--bcher-kva.de", "bücher.de",
    "1example.com", "example.museum", "a-b.example", "x" * 63 + ".com",
])
def test_valid_names(name: str) -> None:
    assert dns_name_problem(name, "Domain name", "example.com") is None


def test_problem_names_the_field_and_the_fix() -> None:
    message = dns_name_problem("bad name", "Mail server host name", "mail.example.com")
    assert message is not None
    assert message.startswith("Mail server host name")
    assert "mail.example.com" in message
