"""Domain step: names (IDN), public addresses, DNS resolver; defaults from the agent."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support import appdb as db
from portal.web.steps.domain import dns_name_problem
from tests.conftest import csrf_token
from tests.unit.conftest import https_client, unlock

GOOD = {"domain": "example.com", "mail_host": "mail.example.com", "public_ipv4": "192.0.2.10",
        "public_ipv6": "2001:db8::10", "dns_resolvers": "127.0.0.1:5353"}


def submit(client: FlaskClient, **values: str):  # type: ignore[no-untyped-def]
    token = csrf_token(client.get("/setup/domain").text)
    return client.post("/setup/domain", data={"csrf_token": token, **{**GOOD, **values}})


def stored(app: Flask) -> tuple[dict[str, str], set[str]]:
    with app.app_context():
        settings = db.get_settings()
        settings.pop("dns_allow_private", None)
        return settings, db.done_steps()


@pytest.fixture
def lab(app: Flask) -> Flask:
    """Test addresses (TEST-NET, loopback) are accepted, as in a lab."""
    with app.app_context():
        db.set_settings({"dns_allow_private": "1"})
    return app


BAD_DOMAINS = [
    ("", "Domain name is required"),
    ("   ", "Domain name is required"),
    ("localhost", "is this machine itself"),
    ("example", "is a single name without a dot"),
    ("exa mple.com", "contains a space"),
    ("exa_mple.com", "contains '_'"),
    ("example..com", "has an empty part between dots"),
    (".example.com", "has an empty part between dots"),
    ("-example.com", "starts or ends with a hyphen"),
    ("example-.com", "starts or ends with a hyphen"),
    ("me@example.com", "is an email address"),
    ("https://example.com/", "looks like a web address"),
    ("192.0.2.1", "is an IP address"),
    ("a" * 64 + ".com", "at most 63"),
    (".".join(["a" * 60] * 5), "at most 253"),
    ("<script>.com", "contains characters that are not allowed"),
    ("xn--zz.com", "not a valid international domain name"),
    ("x" * 5000, "far too long"),
]


@pytest.mark.parametrize(("value", "problem"), BAD_DOMAINS)
def test_bad_domain_gets_a_clear_field_error(lab: Flask, unlocked: FlaskClient, value: str, problem: str) -> None:
    response = submit(unlocked, domain=value)
    assert response.status_code == 200
    page = html.unescape(response.text)
    assert problem in page
    assert 'class="error" role="alert" id="domain-error"' in response.text
    assert 'aria-invalid="true"' in response.text
    assert "<script>.com" not in response.text  # escaped
    assert stored(lab) == ({}, set())


@pytest.mark.parametrize(("value", "problem"), [
    ("mail", "is a single name without a dot"),
    ("mail .example.com", "contains a space"),
    ("http://mail.example.com", "looks like a web address"),
])
def test_bad_mail_host_gets_a_clear_field_error(lab: Flask, unlocked: FlaskClient, value: str, problem: str) -> None:
    response = submit(unlocked, mail_host=value)
    assert response.status_code == 200
    assert problem in html.unescape(response.text)
    assert 'id="mail_host-error"' in response.text
    assert 'id="domain-error"' not in response.text


def test_valid_domain_is_stored_and_step_marked_done(lab: Flask, unlocked: FlaskClient) -> None:
    response = submit(unlocked, domain=" Example.COM. ", mail_host="MAIL.example.com",
                      public_ipv6=" 2001:DB8:0::10 ", dns_resolvers="127.0.0.1:5353, [::1]:53, 9.9.9.9")
    assert response.status_code == 303
    assert response.headers["Location"] == "/"
    assert stored(lab) == ({"domain": "example.com", "mail_host": "mail.example.com", "public_ipv4": "192.0.2.10",
                            "public_ipv6": "2001:db8::10", "dns_resolvers": "127.0.0.1:5353, ::1, 9.9.9.9"},
                           {"domain"})
    assert unlocked.get("/").headers["Location"].endswith("/setup/admin")


def test_empty_mail_host_defaults_to_mail_dot_domain(lab: Flask, unlocked: FlaskClient) -> None:
    assert submit(unlocked, mail_host="", public_ipv6="").status_code == 303
    settings, _ = stored(lab)
    assert settings["mail_host"] == "mail.example.com"
    assert settings["public_ipv6"] == ""


def test_idn_is_stored_as_punycode_and_shown_in_both_forms(lab: Flask, unlocked: FlaskClient) -> None:
    assert submit(unlocked, domain="Bücher.example", mail_host="").status_code == 303
    settings, _ = stored(lab)
    assert settings["domain"] == "xn--bcher-kva.example"
    assert settings["mail_host"] == "mail.xn--bcher-kva.example"
    page = unlocked.get("/setup/domain").text
    assert 'id="saved-domain-unicode">bücher.example<' in page
    assert 'id="saved-domain-ascii">xn--bcher-kva.example<' in page
    assert 'id="saved-mail-host-ascii">mail.xn--bcher-kva.example<' in page
    assert 'value="bücher.example"' in page  # the form shows what the owner typed


def test_punycode_input_is_shown_in_unicode_too(lab: Flask, unlocked: FlaskClient) -> None:
    assert submit(unlocked, domain="xn--bcher-kva.example", mail_host="mx.example.com").status_code == 303
    page = unlocked.get("/setup/domain").text
    assert 'id="saved-domain-unicode">bücher.example<' in page
    assert 'id="saved-mail-host-ascii"' not in page  # an ASCII name is shown once


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("public_ipv4", "", "Enter this server's public IPv4 address"),
    ("public_ipv4", "not-an-ip", "is not an IP address"),
    ("public_ipv4", "2001:db8::1", "is an IPv6 address; enter an IPv4 address here"),
    ("public_ipv4", "192.0.2.300", "is not an IP address"),
    ("public_ipv4", "1.2.3.4; rm -rf /", "is not an IP address"),
    ("public_ipv6", "192.0.2.1", "is an IPv4 address; enter an IPv6 address here"),
    ("public_ipv6", "fe80::1::2", "is not an IP address"),
    ("dns_resolvers", "", "give at least one recursive resolver"),
    ("dns_resolvers", "dns.google", "is not an IP address (or ip:port)"),
    ("dns_resolvers", "127.0.0.1:99999", "has no valid port"),
])
def test_bad_address_gets_a_message_on_its_field(lab: Flask, unlocked: FlaskClient, field: str, value: str,
                                                 problem: str) -> None:
    response = submit(unlocked, **{field: value})
    assert response.status_code == 200
    assert problem in html.unescape(response.text)
    assert f'id="{field}-error"' in response.text
    assert response.text.count('class="error" role="alert"') == 1
    assert stored(lab) == ({}, set())


@pytest.mark.parametrize(("field", "value"), [
    ("public_ipv4", "192.168.1.10"), ("public_ipv4", "127.0.0.1"), ("public_ipv4", "203.0.113.5"),
    ("public_ipv6", "fd00::1"), ("public_ipv6", "::1"),
])
def test_production_rule_refuses_private_addresses(app: Flask, unlocked: FlaskClient, field: str,
                                                   value: str) -> None:
    response = submit(unlocked, **{"public_ipv4": "8.8.8.8", "public_ipv6": "", field: value})
    assert response.status_code == 200
    assert "private or reserved address" in html.unescape(response.text)
    assert f'id="{field}-error"' in response.text


def test_production_rule_accepts_global_addresses(app: Flask, unlocked: FlaskClient) -> None:
    response = submit(unlocked, public_ipv4="8.8.8.8", public_ipv6="2a00:1450:4001::1")
    assert response.status_code == 303


def test_form_shows_saved_values(lab: Flask, unlocked: FlaskClient) -> None:
    submit(unlocked, domain="example.net", mail_host="mx.example.net")
    page = unlocked.get("/setup/domain").text
    for value in ("example.net", "mx.example.net", "192.0.2.10", "2001:db8::10", "127.0.0.1:5353"):
        assert f'value="{value}"' in page


def test_bad_input_does_not_lose_stored_data(lab: Flask, unlocked: FlaskClient) -> None:
    assert submit(unlocked).status_code == 303
    response = submit(unlocked, domain="not a domain", public_ipv4="nope")
    assert response.status_code == 200
    assert 'value="not a domain"' in response.text  # what was typed stays in the form
    assert stored(lab)[0]["domain"] == "example.com"


def test_every_input_has_a_label(unlocked: FlaskClient) -> None:
    page = unlocked.get("/setup/domain").text
    for name in ("domain", "mail_host", "public_ipv4", "public_ipv6", "dns_resolvers"):
        assert f'<label for="{name}">' in page
        assert f'id="{name}"' in page


def test_defaults_come_from_the_agent(make_app: Callable[..., Flask], token_file: Path, state_dir: Path,
                                      tmp_path: Path, start_agent: Callable[..., Any]) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# test\nsearch example.com\nnameserver 127.0.0.53\nnameserver ::1\nnameserver junk\n")
    app = make_app()
    with app.app_context():
        db.set_settings({"dns_allow_private": "1"})
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state_dir), "MAILSTEAD_RESOLV_CONF": str(resolv)})
    app.config["AGENT_SOCKET"] = str(agent.socket)
    client = https_client(app)
    unlock(client)
    page = client.get("/setup/domain").text
    assert 'id="dns_resolvers"' in page and 'value="127.0.0.53, ::1"' in page
    from portal.agent.client import AgentClient
    found = AgentClient(str(agent.socket), timeout=5).call("net_addresses")
    assert set(found) == {"ipv4", "ipv6", "resolvers"}
    assert "127.0.0.1" not in found["ipv4"] and "::1" not in found["ipv6"]
    if found["ipv4"]:
        assert f'value="{found["ipv4"][0]}"' in page
        assert 'id="detected-ipv4"' in page


@pytest.mark.parametrize("name", [
    "example.com", "mail.example.com", "a.b.c.d.example.co.uk", "xn--bcher-kva.de", "bücher.de",
    "1example.com", "example.museum", "a-b.example", "x" * 63 + ".com", "Example.COM.",
])
def test_valid_names(name: str) -> None:
    assert dns_name_problem(name, "Domain name") is None


def test_problem_names_the_field_and_the_fix() -> None:
    message = dns_name_problem("bad name", "Mail server host name")
    assert message is not None
    assert message.startswith("Mail server host name")
    assert "contains a space" in message
