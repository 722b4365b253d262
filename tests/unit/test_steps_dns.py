"""DNS step: the record table, zone download, RFC 2136 settings tied to their fields,
and continuing with problems only after a plain confirmation (real agent process)."""

from __future__ import annotations

import base64
import json
import html
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.web import wizard
from tests.support import appdb as db
from portal.web.steps import dns as dns_step
from tests.conftest import AgentProcess, csrf_token, retry
from tests.unit.conftest import unlock

SECRET = base64.b64encode(bytes(range(32))).decode()
BASE_SETTINGS = {"domain": "example.org", "mail_host": "mail.example.org", "public_ipv4": "9.9.9.10"}


def set_up(app: Flask, settings: dict[str, str], before: int) -> None:
    """Store `settings` and mark every step ordered before `before` done."""
    with app.app_context():
        db.set_settings(settings)
        for step in wizard.all_steps():
            if step.order < before:
                db.mark_step_done(step.id)


@pytest.fixture
def dns_app(make_app: Callable[..., Flask], token_file: Path, agent: AgentProcess) -> Flask:
    app = make_app(AGENT_SOCKET=str(agent.socket))
    set_up(app, BASE_SETTINGS, dns_step.STEP.order)
    return app


@pytest.fixture
def page(dns_app: Flask) -> Iterator[FlaskClient]:
    from tests.unit.conftest import https_client

    client = https_client(dns_app)
    assert unlock(client).status_code == 302
    yield client


def settings(app: Flask) -> tuple[dict[str, str], set[str]]:
    with app.app_context():
        return db.get_settings(), db.done_steps()


def test_table_shows_every_record_with_a_copy_button(page: FlaskClient, agent: AgentProcess) -> None:
    from tests.unit.test_steps_dns import expected_records

    response = page.get("/setup/dns")
    assert response.status_code == 200, response.text
    text = response.text
    rows = expected_records(agent)
    assert len(rows) > 15
    for i, row in enumerate(rows):
        cell = re.search(rf'<code id="dns-value-{i}">([^<]*)</code>', text)
        assert cell, f"row {i} {row['name']} {row['type']} missing"
        assert html.unescape(cell.group(1)) == row["value"]
        assert f'data-copy="dns-value-{i}"' in text
        assert f'id="dns-row-{i}" data-name="{row["name"]}" data-type="{row["type"]}"' in text
        assert html.escape(row["purpose"]) in text or row["purpose"] in html.unescape(text)
    assert "v=DKIM1" in text and "10 mail.example.org." in text
    assert 'id="dns-notes"' in text  # notes from dns_records
    assert 'data-verdict="unchecked"' in text
    assert 'data-job="dns_check"' in text and 'id="dns-check-now"' in text


def expected_records(agent: AgentProcess) -> list[dict[str, Any]]:
    from portal.agent.client import AgentClient

    return AgentClient(str(agent.socket), timeout=10).call("dns_records")["table"]


def test_zone_download(page: FlaskClient) -> None:
    response = page.get("/setup/dns/zone")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.headers["Content-Disposition"] == 'attachment; filename="example.org.zone"'
    assert "$ORIGIN example.org." in response.text
    assert re.search(r"^@\s+IN MX\s+10 mail\.example\.org\.$", response.text, re.M)


def post_config(client: FlaskClient, **fields: str) -> Any:
    token = csrf_token(client.get("/setup/dns").text)
    data = {"csrf_token": token, "rfc2136_server": "192.0.2.53", "rfc2136_port": "53",
            "rfc2136_key_name": "mailstead-key", "rfc2136_secret": SECRET, "rfc2136_algorithm": "hmac-sha256",
            "save_push_config": "Save", **fields}
    return client.post("/setup/dns/push-config", data=data)


@pytest.mark.parametrize(("fields", "field", "words"), [
    ({"rfc2136_secret": "not base64!!"}, "rfc2136_secret", "not base64"),
    ({"rfc2136_secret": ""}, "rfc2136_secret", "Secret is required"),
    ({"rfc2136_server": ""}, "rfc2136_server", "DNS server is required"),
    ({"rfc2136_server": "ns1 example net"}, "rfc2136_server", "host name or an IP address"),
    ({"rfc2136_server": "-bad-.example.net"}, "rfc2136_server", ""),  # refused by the agent
    ({"rfc2136_server": "ns1..example.net"}, "rfc2136_server", ""),  # refused by the agent
    ({"rfc2136_port": "0"}, "rfc2136_port", "1 to 65535"),
    ({"rfc2136_port": "65536"}, "rfc2136_port", "1 to 65535"),
    ({"rfc2136_port": "fifty"}, "rfc2136_port", "1 to 65535"),
    ({"rfc2136_key_name": ""}, "rfc2136_key_name", "Key name is required"),
    ({"rfc2136_key_name": "bad key;"}, "rfc2136_key_name", "only letters"),
    ({"rfc2136_algorithm": "hmac-md5"}, "rfc2136_algorithm", "HMAC-SHA256"),
])
def test_bad_push_settings_are_tied_to_the_field(dns_app: Flask, page: FlaskClient, fields: dict[str, str],
                                                 field: str, words: str) -> None:
    response = post_config(page, **fields)
    assert response.status_code == 200
    assert f'id="{field}-error"' in response.text, response.text[-3000:]
    assert words in html.unescape(response.text)
    assert SECRET not in response.text  # the secret is never displayed again
    assert "rfc2136_server" not in settings(dns_app)[0]
    assert not (Path(dns_app.config["TEST_STATE_DIR"]) / "secrets" / "rfc2136.key").exists()


def test_push_settings_saved_secret_never_shown(dns_app: Flask, page: FlaskClient) -> None:
    response = post_config(page)
    assert response.status_code == 303, response.text[-2000:]
    stored = settings(dns_app)[0]
    assert stored["rfc2136_server"] == "192.0.2.53" and stored["rfc2136_key_name"] == "mailstead-key"
    assert SECRET not in str(stored)
    again = page.get(response.headers["Location"])
    assert "DNS update settings saved" in html.unescape(again.text)
    assert 'id="dns-push-form"' in again.text and 'id="push_dry_run"' in again.text
    assert 'value="192.0.2.53"' in again.text
    assert SECRET not in again.text
    assert re.search(r'<input[^>]*id="rfc2136_secret"[^>]*type="password"[^>]*>', again.text) or \
        re.search(r'<input[^>]*type="password"[^>]*id="rfc2136_secret"', again.text)
    assert 'value="' + SECRET not in again.text


def test_csrf_missing_is_refused(dns_app: Flask, page: FlaskClient) -> None:
    response = page.post("/setup/dns/push-config", data={"rfc2136_server": "192.0.2.53"})
    assert response.status_code == 400
    assert "rfc2136_server" not in settings(dns_app)[0]


def continue_(client: FlaskClient, **fields: str) -> Any:
    token = csrf_token(client.get("/setup/dns").text)
    return client.post("/setup/dns", data={"csrf_token": token, "dns_continue": "Continue", **fields})


def test_continue_unchecked_needs_the_confirmation(dns_app: Flask, page: FlaskClient) -> None:
    response = continue_(page)
    assert response.status_code == 200
    assert 'id="accept_problems-error"' in response.text
    assert "not been checked" in response.text
    assert "dns" not in settings(dns_app)[1]
    done = continue_(page, accept_problems="y")
    assert done.status_code == 303
    stored, steps = settings(dns_app)
    assert "dns" in steps and stored["dns_status"] == "problems"


def test_check_failure_is_shown_and_continue_says_what_breaks(dns_app: Flask, page: FlaskClient) -> None:
    # no dns_resolvers: the agent's check fails and says what to set
    token = csrf_token(page.get("/setup/dns").text)
    started = page.post("/jobs/dns_check/start", data={"csrf_token": token})
    assert started.status_code == 202, started.text

    def finished() -> dict[str, Any]:
        job = page.get("/setup/dns/check-status").get_json()["job"]
        assert job and job["state"] != "running"
        return job
    job = retry(finished, 20, "the dns_check job")
    assert job["state"] == "failed" and "dns_resolvers" in job["error"]
    text = html.unescape(page.get("/setup/dns").text)
    assert 'id="dns-check-error"' in text and "dns_resolvers" in text


def test_consequences_and_status_from_a_finished_check(dns_app: Flask, page: FlaskClient,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering of a finished job's result (a real check against knot is in the integration tests)."""
    rows = [
        {"name": "example.org", "type": "MX", "purpose": "where other servers deliver mail for the domain",
         "required": True, "verdict": "missing", "expected": "10 mail.example.org.", "actual": [],
         "message": "example.org MX is missing", "fix": "add example.org MX 10 mail.example.org.",
         "visible_by": {"seconds": 300, "text": "within 5 min 0 s (by 12:00 UTC)."}},
        {"name": "example.org", "type": "TXT", "purpose": "SPF: only this domain's MX may send its mail",
         "required": True, "verdict": "different", "expected": "v=spf1 mx -all", "actual": ["v=spf1 -all"],
         "message": "example.org TXT is v=spf1 -all instead of v=spf1 mx -all", "fix": "change it",
         "visible_by": {"seconds": 3600, "text": "within 1 h 0 min (by 13:00 UTC)."}},
        {"name": "mail.example.org", "type": "A", "purpose": "the mail server's address", "required": True,
         "verdict": "ok", "expected": "9.9.9.10", "actual": ["9.9.9.10"], "message": "", "fix": "",
         "visible_by": {"seconds": 0, "text": "Resolvers see it now."}},
    ]
    job = {"id": "j1", "kind": "dns_check", "state": "done", "events": [], "error": None, "finished": 1.0,
           "result": {"servers": [["ns1.example.org", "192.0.2.1", 53]], "dnssec": False,
                      "summary": {"missing": 1, "different": 1, "ok": 1}, "required_ok": False, "results": rows}}
    monkeypatch.setattr(dns_step, "latest_job", lambda kind: (job, None))
    text = html.unescape(page.get("/setup/dns").text)
    assert "example.org MX missing</strong>: no mail will reach you" in " ".join(text.split())
    assert "Expected: v=spf1 mx -all" in " ".join(re.sub(r"<[^>]+>", "", text).split())
    assert "within 1 h 0 min" in text  # the slowest propagation estimate
    assert 'data-verdict="missing"' in text and 'data-verdict="ok"' in text
    assert 'data-status-url="/setup/dns/check-status?after=j1"' in text
    assert page.get("/setup/dns/check-status?after=j1").get_json() == {"job": None}
    refused = continue_(page)
    assert 'id="accept_problems-error"' in refused.text and "dns" not in settings(dns_app)[1]
    assert continue_(page, accept_problems="y").status_code == 303
    assert settings(dns_app)[0]["dns_status"] == "problems"


def test_all_ok_continues_without_confirmation(dns_app: Flask, page: FlaskClient,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ok = {"name": "example.org", "type": "MX", "purpose": "where other servers deliver mail for the domain",
          "required": True, "verdict": "ok", "expected": "10 mail.example.org.", "actual": ["10 mail.example.org."],
          "message": "", "fix": "", "visible_by": {"seconds": 0, "text": "Resolvers see it now."}}
    job = {"id": "20260101000000000000-dns_check-0000000a", "kind": "dns_check", "state": "done", "events": [],
           "error": None, "agent": "1-1", "started": 0, "finished": 1,
           "result": {"servers": [], "summary": {"ok": 1}, "required_ok": True, "results": [ok]}}
    jobs = Path(dns_app.config["TEST_STATE_DIR"]) / "jobs"  # the agent's own record of the check
    jobs.mkdir(exist_ok=True)
    (jobs / f"{job['id']}.json").write_text(json.dumps(job))
    page_text = page.get("/setup/dns").text
    assert 'id="dns-all-ok"' in page_text and 'id="accept_problems"' not in page_text
    assert continue_(page).status_code == 303
    assert settings(dns_app)[0]["dns_status"] == "ok"


def test_helper_routes_wait_for_earlier_steps(make_app: Callable[..., Flask], token_file: Path,
                                              agent: AgentProcess) -> None:
    from tests.unit.conftest import https_client

    app = make_app(AGENT_SOCKET=str(agent.socket))
    client = https_client(app)
    unlock(client)
    assert client.get("/setup/dns/zone").status_code == 302
    assert client.get("/setup/dns").status_code == 302


def test_agent_down_is_a_message_not_a_5xx(make_app: Callable[..., Flask], token_file: Path,
                                           thread_agent: Any) -> None:
    """The wizard's state is the agent's: with it gone, the page says so (503), not a 500."""
    from tests.unit.conftest import https_client

    app = make_app()
    set_up(app, BASE_SETTINGS, dns_step.STEP.order)
    client = https_client(app)
    unlock(client)
    thread_agent.stop()
    response = client.get("/setup/dns")
    assert response.status_code == 503 and "mailstead-agent" in response.text
    assert client.get("/setup/dns/zone").status_code == 503


def test_a_page_rendered_while_the_check_runs_watches_it(page: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs.js reloads for a job the page watches: one that ends between the render and
    the first poll must be watched too, or its result never shows (seen in the journey)."""
    job = {"id": "jrun", "kind": "dns_check", "state": "running", "events": [], "error": None, "result": None}
    monkeypatch.setattr(dns_step, "latest_job", lambda kind: (job, None))
    assert 'data-watched="jrun"' in page.get("/setup/dns").text
    job.update(state="done", result={"servers": [], "summary": {}, "required_ok": True, "results": []})
    assert "data-watched" not in page.get("/setup/dns").text  # finished before the render: no reload
