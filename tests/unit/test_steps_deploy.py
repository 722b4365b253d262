"""The Deploy step through the test client and a real agent (no docker engine):
the job page, "Deploy again" after an interrupted deploy, the client settings,
the test message, and Finish (the token stops working for good)."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.web import wizard
from portal.web.steps.deploy import service_progress
from tests.conftest import TEST_TOKEN, csrf_token, retry
from tests.unit.conftest import https_client, unlock
from tests.support.settings import receives, write_settings




def setting(state: Path, key: str) -> str | None:
    with sqlite3.connect(state / "state.db") as c:
        row = c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def earlier_steps_done(state: Path) -> None:
    with sqlite3.connect(state / "state.db") as c:
        c.execute("CREATE TABLE IF NOT EXISTS wizard_progress (step_id TEXT PRIMARY KEY, done_at TEXT NOT NULL)")
        c.executemany("INSERT OR REPLACE INTO wizard_progress VALUES (?, '2026-01-01')",
                      [(s.id,) for s in wizard.all_steps() if s.order < 50])


@pytest.fixture
def ready(make_app: Callable[..., Flask], token_file: Path, state_dir: Path, agent: Any) -> FlaskClient:
    """An unlocked wizard at the Deploy step, talking to a real agent."""
    write_settings(state_dir, domain="example.test", mail_host="mail.example.test",
                   stack_ports=json.dumps({"smtp": 2525, "imaps": 1993, "submissions": 1465}))
    earlier_steps_done(state_dir)
    client = https_client(make_app(AGENT_SOCKET=str(agent.socket)))
    assert unlock(client).status_code == 302
    return client


def test_service_progress_keeps_each_services_latest_state() -> None:
    events = [{"step": "images", "detail": "loading"}, {"step": "postfix", "detail": "running/starting"},
              {"step": "dovecot", "detail": "exited/none"}, {"step": "postfix", "detail": "healthy"}]
    states = {s["service"]: (s["state"], s["detail"]) for s in service_progress(events)}
    assert states["postfix"] == ("ok", "running and healthy")
    assert states["dovecot"][0] == "bad" and states["redis"] == ("waiting", "waiting to start")
    assert [s["service"] for s in service_progress([])] == ["postfix", "dovecot", "rspamd", "redis", "radicale", "unbound"]


def test_the_wizard_arrives_at_deploy(ready: FlaskClient) -> None:
    page = ready.get("/", follow_redirects=True)
    assert page.request.path == "/setup/deploy"
    html = page.text
    for marker in ('data-job="setup_deploy"', 'id="deploy-start"', 'id="deploy-services"', 'id="service-postfix"',
                   'data-start-url="/jobs/setup_deploy/start"', 'data-done-url="/setup/deploy/clients"',
                   "data-job-events", "data-job-state"):
        assert marker in html, marker
    assert ">Deploy</button>" in html and "Not started yet." in html


def test_interrupted_deploy_offers_deploy_again_which_runs_and_fails_clearly(
        ready: FlaskClient, state_dir: Path) -> None:
    folder = state_dir / "jobs"
    folder.mkdir(exist_ok=True)
    (folder / "20260101000000-setup_deploy-dead.json").write_text(json.dumps(
        {"id": "20260101000000-setup_deploy-dead", "kind": "setup_deploy", "state": "running", "agent": "1-1",
         "started": 0, "finished": None, "events": [{"t": 3.0, "step": "postfix", "detail": "healthy"}],
         "result": None, "error": None}))
    pending = state_dir / "secrets" / "pending-mailboxes.json"
    pending.parent.mkdir(mode=0o700, exist_ok=True)
    pending.write_text('[["postmaster@example.test", "correct horse battery staple"]]')

    page = ready.get("/setup/deploy")
    assert "Deploy again</button>" in page.text and "Interrupted:" in page.text
    assert 'id="service-postfix" data-service="postfix" class="svc-ok"' in page.text

    started = ready.post("/jobs/setup_deploy/start", data={"csrf_token": csrf_token(page.text)})
    assert started.status_code == 202, started.text

    def failed() -> dict[str, Any]:
        job = ready.get("/jobs/setup_deploy").get_json()["job"]
        assert job["state"] == "failed", job
        return job
    job = retry(failed, 20, "the deploy to fail without docker")
    assert "docker engine" in job["error"]  # type: ignore[index]
    assert pending.exists()  # the admin password waits for a deploy that works
    assert setting(state_dir, "stack_deployed") is None
    again = ready.get("/setup/deploy")
    assert "Deploy again</button>" in again.text and "docker engine" in again.text


def test_deploy_without_javascript_posts_and_comes_back(ready: FlaskClient) -> None:
    page = ready.get("/setup/deploy")
    response = ready.post("/setup/deploy/start", data={"csrf_token": csrf_token(page.text)})
    assert response.status_code == 303 and response.location.endswith("/setup/deploy")


def test_a_missing_csrf_token_starts_nothing(ready: FlaskClient, state_dir: Path) -> None:
    assert ready.post("/jobs/setup_deploy/start").status_code == 400
    assert ready.post("/setup/deploy/finish").status_code == 400
    assert not (state_dir / "jobs").exists() or not list((state_dir / "jobs").glob("*setup_deploy*"))


def test_client_settings_need_a_deployed_stack(ready: FlaskClient) -> None:
    response = ready.get("/setup/deploy/clients")
    assert response.status_code == 303 and response.location.endswith("/setup/deploy")


def test_later_pages_need_the_earlier_steps(make_app: Callable[..., Flask], token_file: Path,
                                            state_dir: Path) -> None:
    client = https_client(make_app())
    unlock(client)
    write_settings(state_dir, stack_deployed="1")
    for path in ("/setup/deploy", "/setup/deploy/clients", "/setup/deploy/profile.mobileconfig"):
        response = client.get(path)
        assert response.status_code in (302, 303) and "/setup/domain" in response.location, path


def deployed_client(ready: FlaskClient, state_dir: Path) -> FlaskClient:
    write_settings(state_dir, stack_deployed="1")
    return ready


def test_client_settings_page_shows_hosts_and_ports(ready: FlaskClient, state_dir: Path) -> None:
    client = deployed_client(ready, state_dir)
    html = client.get("/setup/deploy/clients").text
    cell = lambda id_: re.search(rf'id="{id_}">([^<]*)<', html).group(1)  # noqa: E731
    assert cell("server-imap-host") == "mail.example.test" and cell("server-imap-port") == "1993"
    assert cell("server-pop3-port") == "995" and cell("server-smtp-port") == "1465"
    assert cell("server-smtp-starttls-port") == "587" and cell("server-caldav-port") == "443"
    assert cell("dav-url") == "https://mail.example.test/dav/"
    assert cell("autoconfig-url") == "https://autoconfig.example.test/mail/config-v1.1.xml"
    assert 'data-copy="dav-url"' in html and 'id="finish"' in html and 'id="send-test"' in html
    assert 'value="postmaster@example.test"' in html  # the test message's default recipient
    for field in ("address", "to"):
        assert f'<label for="{field}">' in html


def test_profile_download(ready: FlaskClient, state_dir: Path) -> None:
    import plistlib

    client = deployed_client(ready, state_dir)
    response = client.get("/setup/deploy/profile.mobileconfig?address=Alice@Example.test")
    assert response.status_code == 200
    assert response.mimetype == "application/x-apple-aspen-config"
    assert "attachment" in response.headers["Content-Disposition"]
    profile = plistlib.loads(response.data)
    mail = profile["PayloadContent"][0]
    assert mail["IncomingMailServerPortNumber"] == 1993 and mail["EmailAddress"] == "alice@example.test"
    keys = {k for payload in profile["PayloadContent"] for k in payload}
    assert not keys & {"IncomingPassword", "OutgoingPassword", "Password", "CalDAVPassword", "CardDAVPassword"}
    again = plistlib.loads(client.get("/setup/deploy/profile.mobileconfig").data)
    assert [p["PayloadUUID"] for p in again["PayloadContent"]] == [p["PayloadUUID"] for p in profile["PayloadContent"]]


@pytest.mark.parametrize("address", ["not an address", "a@b@c", "x" * 400, "\u0000@example.test", "<script>@x"])
def test_profile_with_a_bad_address_says_so_on_the_field(ready: FlaskClient, state_dir: Path,
                                                         address: str) -> None:
    client = deployed_client(ready, state_dir)
    response = client.get("/setup/deploy/profile.mobileconfig", query_string={"address": address})
    assert response.status_code == 422
    assert 'id="address-error"' in response.text and 'aria-invalid="true"' in response.text


@pytest.mark.parametrize("to, status", [("", 422), ("no address", 422), ("x@elsewhere.example", 422),
                                        ("a" * 500, 422), ("postmaster@example.test", 502)])
def test_test_message_errors(ready: FlaskClient, state_dir: Path, to: str, status: int) -> None:
    receives(state_dir, "postmaster@example.test")
    client = deployed_client(ready, state_dir)
    page = client.get("/setup/deploy/clients")
    response = client.post("/setup/deploy/clients/test", data={"csrf_token": csrf_token(page.text), "to": to})
    assert response.status_code == status, response.text
    if status == 422:
        assert 'id="to-error"' in response.text
    else:  # nothing listens on the SMTP port: said plainly, not on the field
        assert 'id="test-error"' in response.text and "stack deployed" in response.text


def test_finish_ends_setup_and_the_token_for_good(ready: FlaskClient, state_dir: Path, token_file: Path) -> None:
    client = deployed_client(ready, state_dir)
    page = client.get("/setup/deploy/clients")
    response = client.post("/setup/deploy/finish", data={"csrf_token": csrf_token(page.text)})
    assert response.status_code == 303 and response.location.endswith("/login")
    assert not token_file.exists()
    assert setting(state_dir, "setup_complete") == "1"
    with client.session_transaction() as session:
        assert not session.get("setup")
    token_page = client.get("/setup/token")
    assert "Setup is finished" in token_page.text
    # The finished page has no form; a replayed token post unlocks nothing.
    assert "csrf_token" not in token_page.text
    again = client.post("/setup/token", data={"token": TEST_TOKEN, "csrf_token": csrf_token(page.text)})
    assert ("Setup is finished" in again.text) or (again.status_code == 400 and "Form expired" in again.text)
    with client.session_transaction() as session:
        assert not session.get("setup")
    assert client.get("/setup/deploy").status_code in (302, 303)


def test_finish_before_deploy_is_refused(ready: FlaskClient, state_dir: Path, token_file: Path) -> None:
    write_settings(state_dir, stack_deployed="0")
    page = ready.get("/setup/deploy")
    # the clients page is not reachable yet; a forged Finish is refused by the agent
    response = ready.post("/setup/deploy/finish", data={"csrf_token": csrf_token(page.text)})
    assert response.status_code == 409 and "press Deploy first" in response.text
    assert token_file.exists() and setting(state_dir, "setup_complete") is None


def test_agent_down_is_a_message_not_a_crash(make_app: Callable[..., Flask], token_file: Path,
                                             state_dir: Path, thread_agent: Any) -> None:
    write_settings(state_dir, domain="example.test")
    earlier_steps_done(state_dir)
    client = https_client(make_app())
    unlock(client)
    page = client.get("/setup/deploy")
    assert page.status_code == 200
    thread_agent.stop()
    response = client.post("/setup/deploy/start", data={"csrf_token": csrf_token(page.text)})
    assert response.status_code == 503 and "mailstead-agent" in response.text
    assert client.get("/setup/deploy").status_code == 503
