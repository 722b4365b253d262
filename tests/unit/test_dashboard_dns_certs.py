"""Dashboard DNS and Certificates areas: the same table, check, push and settings as the
wizard, under /admin (real agent process)."""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.web import wizard
from tests.support import appdb as db
from portal.web.dashboard import nav
from tests.conftest import AgentProcess, csrf_token
from tests.unit.conftest import https_client, unlock
from tests.unit.test_steps_dns import BASE_SETTINGS, SECRET


@pytest.fixture
def dash(make_app: Callable[..., Flask], token_file: Path, agent: AgentProcess) -> tuple[Flask, FlaskClient]:
    app = make_app(AGENT_SOCKET=str(agent.socket))
    with app.app_context():
        db.set_settings(BASE_SETTINGS)
        for step in wizard.all_steps():
            if step.id in ("domain", "dns", "certs"):
                db.mark_step_done(step.id)
    client = https_client(app)
    assert unlock(client).status_code == 302
    # After setup an admin session is needed (portal/web/auth.py); sign the session in directly.
    with client.session_transaction() as s:
        import time
        s.update(admin="postmaster@example.org", auth_at=time.time(), seen=time.time())
    return app, client


def test_nav_has_both_areas(app: Flask) -> None:
    with app.app_context():
        endpoints = [n.endpoint for n in nav()]
    assert "dashboard_dns.index" in endpoints and "dashboard_certs.index" in endpoints


def test_dns_area_table_check_and_zone(dash: tuple[Flask, FlaskClient]) -> None:
    _, client = dash
    response = client.get("/admin/dns")
    assert response.status_code == 200, response.text[-2000:]
    text = response.text
    assert 'id="dns-records"' in text and 'id="dns-value-0"' in text and 'data-copy="dns-value-0"' in text
    assert 'data-status-url="/admin/dns/check-status?after="' in text
    assert 'id="dns-check-now"' in text and 'href="/admin/dns/zone"' in text
    assert 'id="dns-continue-form"' not in text  # wizard only
    assert 'aria-current="page">DNS<' in text
    zone = client.get("/admin/dns/zone")
    assert zone.status_code == 200 and "$ORIGIN example.org." in zone.text
    assert client.get("/admin/dns/check-status").get_json() == {"job": None}


def test_dns_area_push_settings_and_dry_run_error(dash: tuple[Flask, FlaskClient]) -> None:
    app, client = dash
    token = csrf_token(client.get("/admin/dns").text)
    saved = client.post("/admin/dns/push-config", data={
        "csrf_token": token, "rfc2136_server": "127.0.0.1", "rfc2136_port": "9",  # nothing listens there
        "rfc2136_key_name": "k", "rfc2136_secret": SECRET, "rfc2136_algorithm": "hmac-sha512"})
    assert saved.status_code == 303 and saved.headers["Location"].startswith("/admin/dns")
    text = client.get("/admin/dns").text
    assert 'id="push_records"' in text and "hmac-sha512" in text
    token = csrf_token(text)
    dry = client.post("/admin/dns/push", data={"csrf_token": token, "push_dry_run": "Dry run"})
    assert dry.status_code == 200
    assert 'id="dns-push-error"' in dry.text  # the server does not answer: said plainly, not a 5xx
    assert "127.0.0.1 port 9" in html.unescape(dry.text)


def test_certs_area_status_renew_and_settings(dash: tuple[Flask, FlaskClient], state_dir: Path) -> None:
    app, client = dash
    text = client.get("/admin/certs").text
    assert 'id="cert-status"' in text and 'data-source="none"' in text
    assert 'id="cert-settings-form"' in text and 'id="cert-issue-unconfigured"' in text
    assert 'id="cert-continue-form"' not in text
    token = csrf_token(text)
    saved = client.post("/admin/certs/settings", data={
        "csrf_token": token, "acme_ca": "letsencrypt", "acme_contact": "", "acme_challenge": "http-01"})
    assert saved.status_code == 303
    text = client.get("/admin/certs").text
    assert ">Renew now</button>" in text and 'data-status-url="/admin/certs/issue-status?after="' in text
    with app.app_context():
        assert db.get_setting("acme_directory") == "letsencrypt"
