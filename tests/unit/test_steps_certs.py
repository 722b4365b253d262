"""Certificates step: CA settings checked per field (web and agent), the CA bundle as PEM,
DNS-01 only with RFC 2136, the self-signed warning checkbox (real agent process)."""

from __future__ import annotations

import datetime as dt
import html
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from flask.testing import FlaskClient

from tests.support import appdb as db
from portal.web.steps import certs as certs_step
from tests.conftest import AgentProcess, csrf_token
from tests.unit.conftest import https_client, unlock
from tests.unit.test_steps_dns import BASE_SETTINGS, set_up


def ca_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ACME CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def certs_app(make_app: Callable[..., Flask], token_file: Path, agent: AgentProcess) -> Flask:
    app = make_app(AGENT_SOCKET=str(agent.socket))
    set_up(app, BASE_SETTINGS, certs_step.STEP.order)
    return app


@pytest.fixture
def page(certs_app: Flask) -> FlaskClient:
    client = https_client(certs_app)
    assert unlock(client).status_code == 302
    return client


def stored(app: Flask) -> tuple[dict[str, str], set[str]]:
    with app.app_context():
        return db.get_settings(), db.done_steps()


def save(client: FlaskClient, **fields: str) -> Any:
    token = csrf_token(client.get("/setup/certs").text)
    data = {"csrf_token": token, "acme_ca": "letsencrypt", "acme_directory": "", "acme_ca_bundle_pem": "",
            "acme_contact": "postmaster@example.org", "acme_challenge": "http-01", "save_acme": "Save", **fields}
    return client.post("/setup/certs/settings", data=data)


def test_page_offers_the_choices_and_disables_dns01(page: FlaskClient) -> None:
    text = page.get("/setup/certs").text
    for ident in ("acme_ca-0", "acme_ca-1", "acme_ca-2", "acme_directory", "acme_ca_bundle_pem", "acme_contact",
                  "acme_challenge-0", "save_acme", "self-signed-warning", "accept_self_signed",
                  "continue_self_signed"):
        assert f'id="{ident}"' in text, ident
    assert 'value="postmaster@example.org"' in text  # contact prefilled
    dns01 = text[text.index('id="acme_challenge-1"') - 200:text.index('id="acme_challenge-1"') + 200]
    assert "disabled" in dns01 and 'id="dns01-unavailable"' in text
    assert 'id="cert-issue-unconfigured"' in text  # no issue button before the settings are saved


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"acme_ca": "custom", "acme_directory": ""}, "acme_directory", "is required for another CA"),
    ({"acme_ca": "custom", "acme_directory": "http://ca.example.net/dir"}, "acme_directory", "https://"),
    ({"acme_ca": "custom", "acme_directory": "https://"}, "acme_directory", "https://"),
    ({"acme_ca": "custom", "acme_directory": "https://ca.example.net/dir",
      "acme_ca_bundle_pem": "hello"}, "acme_ca_bundle_pem", "PEM certificates"),
    ({"acme_ca": "custom", "acme_directory": "https://ca.example.net/dir",   # passes the web, refused by the agent
      "acme_ca_bundle_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"},
     "acme_ca_bundle_pem", "no PEM certificate found"),
    ({"acme_contact": "not an address"}, "acme_contact", "postmaster@example.org"),
    ({"acme_contact": "a@b"}, "acme_contact", "postmaster@example.org"),
    ({"acme_challenge": "dns-01"}, "acme_challenge", "DNS-01 needs DNS updates"),
    ({"acme_challenge": "tls-alpn-01"}, "acme_challenge", "Choose HTTP-01 or DNS-01"),
    ({"acme_ca": "someone"}, "acme_ca", "Choose Let's Encrypt"),
])
def test_bad_ca_settings_are_tied_to_the_field(certs_app: Flask, page: FlaskClient, fields: dict[str, str],
                                               field: str, words: str) -> None:
    response = save(page, **fields)
    assert response.status_code == 200
    assert f'id="{field}-error"' in response.text, html.unescape(response.text)[-4000:]
    assert words in html.unescape(response.text)
    assert "acme_challenge" not in stored(certs_app)[0]


def test_dns01_refused_by_the_agent_without_a_key(certs_app: Flask, page: FlaskClient) -> None:
    # The web sees RFC 2136 settings, but the agent finds no secret file: its refusal lands on the field.
    with certs_app.app_context():
        db.set_settings({"rfc2136_server": "192.0.2.53", "rfc2136_key_name": "k"})
    response = save(page, acme_challenge="dns-01")
    assert 'id="acme_challenge-error"' in response.text
    assert "dns-01 needs RFC 2136" in html.unescape(response.text)


def test_lets_encrypt_settings_saved(certs_app: Flask, page: FlaskClient) -> None:
    response = save(page, acme_ca="letsencrypt-staging")
    assert response.status_code == 303, html.unescape(response.text)[-3000:]
    s = stored(certs_app)[0]
    assert s["acme_directory"] == "letsencrypt-staging" and s["acme_challenge"] == "http-01"
    assert s["acme_contact"] == "postmaster@example.org" and s["acme_ca_bundle"] == ""
    text = page.get("/setup/certs").text
    assert 'id="cert-issue-start"' in text and 'data-job="cert_issue"' in text
    assert 'id="acme_ca-1" name="acme_ca" type="radio" value="letsencrypt-staging"' in text
    assert "checked" in text[text.index('id="acme_ca-1"') - 80:text.index('id="acme_ca-1"') + 120]


def test_custom_ca_with_a_pasted_bundle(certs_app: Flask, page: FlaskClient, state_dir: Path) -> None:
    pem = ca_pem()
    response = save(page, acme_ca="custom", acme_directory="https://127.0.0.1:14000/dir", acme_ca_bundle_pem=pem)
    assert response.status_code == 303, html.unescape(response.text)[-3000:]
    s = stored(certs_app)[0]
    bundle = state_dir / "acme-ca-bundle.pem"
    assert s["acme_directory"] == "https://127.0.0.1:14000/dir" and s["acme_ca_bundle"] == str(bundle)
    assert bundle.read_text().strip() == pem.strip()
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o644
    text = page.get("/setup/certs").text
    assert "A bundle is stored" in text and 'value="https://127.0.0.1:14000/dir"' in text
    # saving again without pasting keeps the stored bundle
    assert save(page, acme_ca="custom", acme_directory="https://127.0.0.1:14000/dir").status_code == 303
    assert stored(certs_app)[0]["acme_ca_bundle"] == str(bundle)


def test_a_private_key_is_never_taken_as_a_bundle(certs_app: Flask, page: FlaskClient, state_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    response = save(page, acme_ca="custom", acme_directory="https://ca.example.net/dir",
                    acme_ca_bundle_pem=ca_pem() + key)
    assert 'id="acme_ca_bundle_pem-error"' in response.text and "private key" in response.text
    assert not (state_dir / "acme-ca-bundle.pem").exists()


def continue_(client: FlaskClient, **fields: str) -> Any:
    token = csrf_token(client.get("/setup/certs").text)
    return client.post("/setup/certs", data={"csrf_token": token, **fields})


def test_self_signed_needs_the_checkbox(certs_app: Flask, page: FlaskClient) -> None:
    refused = continue_(page, continue_self_signed="Continue with the self-signed certificate")
    assert refused.status_code == 200
    assert 'id="accept_self_signed-error"' in refused.text
    assert "certs" not in stored(certs_app)[1]
    done = continue_(page, continue_self_signed="x", accept_self_signed="y")
    assert done.status_code == 303
    s, steps = stored(certs_app)
    assert "certs" in steps and s["cert_choice"] == "self-signed"


def test_continue_with_ca_needs_a_ca_certificate(certs_app: Flask, page: FlaskClient) -> None:
    refused = continue_(page, certs_continue="Continue")
    assert refused.status_code == 200 and 'id="cert-continue-error"' in refused.text
    assert "certs" not in stored(certs_app)[1]


def test_failed_issue_shows_the_reason_and_retry(certs_app: Flask, page: FlaskClient,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with certs_app.app_context():
        db.set_settings({"acme_challenge": "http-01", "acme_directory": "letsencrypt"})
    job = {"id": "c1", "kind": "cert_issue", "state": "failed", "events": [{"t": 0.1, "step": "order",
                                                                             "detail": "asking the CA"}],
           "error": "the CA could not reach http://mail.example.org/.well-known/acme-challenge/: timeout"}
    monkeypatch.setattr(certs_step, "latest_job", lambda kind: (job, None))
    text = html.unescape(page.get("/setup/certs").text)
    assert 'id="cert-issue-error"' in text and "could not reach" in text
    assert ">Retry</button>" in text
    # a failed job is reported to jobs.js as it is (no reload loop only for finished ones)
    assert page.get("/setup/certs/issue-status?after=c1").status_code in (200, 503)
