"""The DNS and Certificates wizard steps end to end through the web pages, with a real
agent process, knot (the zone, RFC 2136 updates) and pebble (the CA) on loopback:
check -> records missing -> push by RFC 2136 -> check all ok -> continue; then CA
settings with a pasted CA bundle -> cert_issue job polled via GET /jobs/cert_issue ->
the certificate shown -> continue."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.web import create_app, wizard
from tests.support import appdb as db
from tests.conftest import TEST_TOKEN, AgentProcess, csrf_token, launch_agent, retry
from tests.unit.conftest import https_client, unlock

from .knot import Knot, KnotKey, Record
from .pebble import Pebble, TokenServer

ZONE = "example.test"
KEY = KnotKey("mailstead-web", base64.b64encode(os.urandom(32)).decode())


@pytest.fixture(scope="module")
def knot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Knot]:
    # Only what pebble needs to find this host; the appliance's records come from the push.
    server = Knot(tmp_path_factory.mktemp("knot"), ZONE,
                  [Record(n, "A", "127.0.0.1") for n in ("mail", "mta-sts", "autoconfig")], key=KEY).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory, knot: Knot) -> Iterator[Pebble]:
    ca = Pebble(tmp_path_factory.mktemp("pebble"), knot.port).start()
    yield ca
    ca.stop()


@pytest.fixture
def site(tmp_path: Path, knot: Knot) -> Iterator[tuple[Flask, FlaskClient, AgentProcess, Path]]:
    state, acme = tmp_path / "state", tmp_path / "acme"
    for d in (state / "tls", acme, tmp_path / "nginx", tmp_path / "www"):
        d.mkdir(parents=True)
    (state / "setup-token").write_text(TEST_TOKEN + "\n")
    agent = launch_agent(tmp_path, env={
        "MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_ACME_DIR": str(acme), "MAILSTEAD_RELOAD_NGINX": "0",
        "MAILSTEAD_NGINX_DIR": str(tmp_path / "nginx"), "MAILSTEAD_WWW_DIR": str(tmp_path / "www")})
    app = create_app({"TESTING": True, "WEB_DIR": str(tmp_path / "web"), "TEST_STATE_DIR": str(state), "RUN_DIR": str(tmp_path / "run"),
                      "AGENT_SOCKET": str(agent.socket)})
    with app.app_context():
        db.set_settings({"domain": ZONE, "mail_host": f"mail.{ZONE}", "public_ipv4": "127.0.0.1",
                         "dns_allow_private": "1", "dns_resolvers": f"127.0.0.1:{knot.port}",
                         "dns_auth_port": str(knot.port)})
        for step in wizard.all_steps():
            if step.order < 30:
                db.mark_step_done(step.id)
    client = https_client(app)
    assert unlock(client).status_code == 302
    try:
        yield app, client, agent, acme
    finally:
        agent.stop()


def run_job(client: FlaskClient, page: str, kind: str, timeout: float = 90) -> dict[str, Any]:
    token = csrf_token(client.get(page).text)
    started = client.post(f"/jobs/{kind}/start", data={"csrf_token": token})
    assert started.status_code == 202, started.text

    def finished() -> dict[str, Any]:
        job = client.get(f"/jobs/{kind}").get_json()["job"]
        assert job and job["id"] == started.get_json()["id"] and job["state"] != "running", job
        return job
    return retry(finished, timeout, f"the {kind} job")  # type: ignore[return-value]


def flat(text: str) -> str:
    return " ".join(html.unescape(text).split())


def test_dns_step_check_push_check_continue(site: tuple[Flask, FlaskClient, AgentProcess, Path]) -> None:
    app, client, agent, _ = site
    job = run_job(client, "/setup/dns", "dns_check")
    assert job["state"] == "done", job
    text = flat(client.get("/setup/dns").text)
    assert f"{ZONE} MX missing</strong>: no mail will reach you" in text
    assert 'data-verdict="missing"' in text and 'id="dns-visible-by"' in text

    token = csrf_token(client.get("/setup/dns").text)
    saved = client.post("/setup/dns/push-config", data={
        "csrf_token": token, "rfc2136_server": "127.0.0.1", "rfc2136_port": str(site_knot_port(app)),
        "rfc2136_key_name": KEY.name, "rfc2136_secret": KEY.secret, "rfc2136_algorithm": KEY.algorithm})
    assert saved.status_code == 303, flat(saved.text)[-2000:]

    token = csrf_token(client.get("/setup/dns").text)
    dry = client.post("/setup/dns/push", data={"csrf_token": token, "push_dry_run": "Dry run"})
    assert 'data-dry-run="true"' in dry.text and "would add" in dry.text
    token = csrf_token(client.get("/setup/dns").text)
    pushed = client.post("/setup/dns/push", data={"csrf_token": token, "push_records": "Push records"})
    assert 'data-dry-run="false"' in pushed.text and 'data-action="add"' in pushed.text, flat(pushed.text)[-3000:]

    job = run_job(client, "/setup/dns", "dns_check")
    assert job["state"] == "done" and job["result"]["required_ok"], job
    page = client.get("/setup/dns").text
    bad = [r for r in job["result"]["results"] if r["verdict"] != "ok"]
    assert not bad, bad
    assert 'id="dns-all-ok"' in page and 'data-verdict="missing"' not in page
    token = csrf_token(page)
    done = client.post("/setup/dns", data={"csrf_token": token, "dns_continue": "Continue"})
    assert done.status_code == 303
    with app.app_context():
        assert db.get_setting("dns_status") == "ok" and "dns" in db.done_steps()


def site_knot_port(app: Flask) -> int:
    with app.app_context():
        return int(db.get_setting("dns_auth_port") or 53)


def test_certs_step_issues_from_pebble(site: tuple[Flask, FlaskClient, AgentProcess, Path],
                                       pebble: Pebble) -> None:
    app, client, agent, acme = site
    with app.app_context():
        db.mark_step_done("dns")
    token = csrf_token(client.get("/setup/certs").text)
    saved = client.post("/setup/certs/settings", data={
        "csrf_token": token, "acme_ca": "custom", "acme_directory": pebble.directory_url,
        "acme_ca_bundle_pem": pebble.ca_bundle.read_text(), "acme_contact": f"postmaster@{ZONE}",
        "acme_challenge": "http-01"})
    assert saved.status_code == 303, flat(saved.text)[-3000:]

    tokens = TokenServer(acme, pebble.http_port).start()
    try:
        job = run_job(client, "/setup/certs", "cert_issue", timeout=120)
    finally:
        tokens.stop()
    assert job["state"] == "done", job
    assert any(e["step"] for e in job["events"])
    page = client.get("/setup/certs").text
    assert 'data-source="ca"' in page and "Pebble" in page
    assert f"mail.{ZONE}" in page and 'id="cert-days-left"' in page
    assert 'id="certs_continue"' in page and 'id="self-signed-warning"' not in page
    assert f'issue-status?after={job["id"]}' in page
    token = csrf_token(page)
    done = client.post("/setup/certs", data={"csrf_token": token, "certs_continue": "Continue"})
    assert done.status_code == 303
    with app.app_context():
        assert db.get_setting("cert_choice") == "ca" and "certs" in db.done_steps()
