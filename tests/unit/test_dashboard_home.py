"""Dashboard home: the status -> colour mapping (pure) and the page with a real agent (no docker)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.agent.client import AgentError
from portal.web.dashboard.home import (AMBER, GREEN, RED, cert_health, disk_health, dns_health, overall,
                                   services_health)
from tests.unit.conftest import https_client
from tests.support.admin import sign_in
from tests.support.settings import write_settings

ADMIN = "postmaster@example.test"




def signed_in(client: FlaskClient) -> FlaskClient:
    sign_in(client, ADMIN)
    return client


@pytest.fixture
def dashboard(make_app: Callable[..., Flask], state_dir: Path, start_agent: Callable[..., Any]) -> FlaskClient:
    write_settings(state_dir, domain="example.test", mail_host="mail.example.test", setup_complete="1",
                   stack_deployed="1")
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state_dir)})
    return signed_in(https_client(make_app(AGENT_SOCKET=str(agent.socket))))


def svc(status: str = "running", health: str = "healthy") -> dict[str, str]:
    return {"status": status, "health": health}


NAMES = ("postfix", "dovecot", "rspamd", "redis", "radicale", "unbound")


@pytest.mark.parametrize("states, colour, words", [
    ({n: svc() for n in NAMES}, GREEN, "All 6 services"),
    ({**{n: svc() for n in NAMES}, "redis": svc(health="none")}, GREEN, "running and healthy"),
    ({**{n: svc() for n in NAMES}, "rspamd": svc(health="starting")}, AMBER, "Starting: rspamd"),
    ({**{n: svc() for n in NAMES}, "dovecot": svc(health="unhealthy")}, RED, "Not working: dovecot"),
    ({**{n: svc() for n in NAMES}, "postfix": svc("exited", "none")}, RED, "Not working: postfix"),
    ({n: svc("missing", "none") for n in NAMES}, RED, "deploy the stack"),
    ({}, RED, "deploy the stack"),
])
def test_services_colour(states: dict, colour: str, words: str) -> None:
    health = services_health({"services": states})
    assert health.colour == colour and words in health.sentence


def test_services_unknown_is_red_and_says_why() -> None:
    health = services_health(AgentError("docker_unavailable", "no docker socket at /x; is the docker engine running?"))
    assert health.colour == RED and "docker engine unavailable" in health.sentence


@pytest.mark.parametrize("days, colour", [(-3, RED), (0, RED), (6, RED), (7, AMBER), (20, AMBER), (21, GREEN), (89, GREEN)])
def test_certificate_colour_by_days_left(days: int, colour: str) -> None:
    assert cert_health({"source": "ca", "days_left": days, "self_signed": False}).colour == colour


def test_certificate_special_cases() -> None:
    assert cert_health({"source": "bootstrap", "days_left": 300, "self_signed": True}).colour == AMBER
    assert cert_health({"source": "bootstrap", "days_left": 3, "self_signed": True}).colour == RED
    assert cert_health({"source": "none"}).colour == RED
    assert cert_health({"source": "ca", "days_left": 60, "last_error": "CA down"}).colour == AMBER
    assert "expired" in cert_health({"source": "ca", "days_left": -1}).sentence
    assert cert_health(AgentError("internal", "boom")).colour == RED


def job(summary: dict[str, int], required_ok: bool) -> dict[str, Any]:
    return {"state": "done", "result": {"summary": summary, "required_ok": required_ok}}


@pytest.mark.parametrize("given, setting, colour", [
    (job({"ok": 12}, True), None, GREEN),
    (job({"ok": 10, "missing": 2}, True), None, AMBER),
    (job({"ok": 8, "missing": 3, "different": 1}, False), None, RED),
    ({"state": "failed", "error": "no resolver"}, None, AMBER),
    ({"state": "running"}, None, AMBER),
    (None, "ok", GREEN),
    (None, "problems", AMBER),
    (None, None, AMBER),
    (AgentError("unavailable", "down"), "ok", GREEN),
])
def test_dns_colour(given: Any, setting: str | None, colour: str) -> None:
    assert dns_health(given, setting).colour == colour


GiB = 1024 ** 3


@pytest.mark.parametrize("free, mem_avail, colour", [(50, 1.0, GREEN), (10, 1.0, AMBER), (4, 1.0, RED), (50, 0.05, AMBER)])
def test_disk_colour(free: int, mem_avail: float, colour: str) -> None:
    status = {"disk": {"total": 100 * GiB, "free": free * GiB}, "memory": {"total": 2 * GiB, "available": int(mem_avail * GiB)}}
    health = disk_health(status)
    assert health.colour == colour and f"{free}.0 GiB free of 100.0 GiB" in health.sentence


def test_disk_unknown() -> None:
    assert disk_health({"disk": {"path": "/x", "error": "No such file"}}).colour == AMBER
    assert disk_health(AgentError("unavailable", "down")).colour == RED


def test_overall_is_the_worst() -> None:
    g, a, r = (services_health({"services": {"x": svc()}}), dns_health(None), services_health({}))
    assert (overall([g]), overall([g, a]), overall([g, a, r])) == (GREEN, AMBER, RED)


def test_home_page_without_docker_is_clear(dashboard: FlaskClient, state_dir: Path) -> None:
    jobs = state_dir / "jobs"
    jobs.mkdir(exist_ok=True)
    (jobs / "20260101000000-dns_check-aaaa.json").write_text(json.dumps(
        {"id": "20260101000000-dns_check-aaaa", "kind": "dns_check", "state": "done", "agent": "1-1", "started": 0,
         "finished": 1, "events": [], "error": None, "result": {"summary": {"ok": 9}, "required_ok": True}}))
    page = dashboard.get("/admin/")
    assert page.status_code == 200, page.text
    html = page.text
    assert 'id="health-services" class="card health health-red"' in html
    assert "docker engine unavailable" in html
    assert 'id="health-dns" class="card health health-green"' in html
    assert 'id="health-certificate" class="card health health-red"' in html  # no certificate in this state dir
    assert 'id="health-disk"' in html and "free of" in html
    assert 'id="health-overall" class="health health-red"' in html
    assert 'aria-current="page">Home<' in html


def test_home_page_with_the_agent_down(make_app: Callable[..., Flask], state_dir: Path, thread_agent: Any) -> None:
    write_settings(state_dir, domain="example.test", setup_complete="1")
    client = signed_in(https_client(make_app()))
    thread_agent.stop()
    page = client.get("/admin/")
    assert page.status_code == 503 and "mailstead-agent" in page.text


def test_home_needs_a_session(make_app: Callable[..., Flask], state_dir: Path) -> None:
    write_settings(state_dir, domain="example.test", setup_complete="1")
    response = https_client(make_app()).get("/admin/")
    assert response.status_code in (302, 303) and "/login" in response.location
