"""Dashboard Health, Schedules and Backups areas through a real agent process (with its
scheduler running), a local restic repository and local alert receivers. The backup
round trip with a backup job lives in tests/integration/test_dashboard_backups.py (it
asks the host's docker engine about the stack's volumes)."""

from __future__ import annotations

import html
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.agent.client import AgentClient
from portal.checks import CheckResult, history
from portal.web.dashboard import health, nav
from tests.conftest import AgentProcess, free_port
from tests.support.admin import sign_in
from tests.support.smtp import SmtpSink
from tests.unit.conftest import https_client

from .checks_support import HookServer, serving, write_settings

ADMIN = "postmaster@example.test"
PAGES = ("/admin/health/", "/admin/schedules/", "/admin/backups/")
CSRF_RE = re.compile(r'name="(?:[a-z_]+-)?csrf_token" type="hidden" value="([^"]+)"')


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess], state_dir: Path) -> AgentProcess:
    # No public address, ports nobody listens on: a health round (scheduled or pressed) and its
    # alert mail reach nothing beyond this machine.
    write_settings(state_dir, domain="example.test", mail_host="mail.example.test", setup_complete="1",
                   admin_address=ADMIN, dns_resolvers=f"127.0.0.1:{free_port()}", publish_addresses="127.0.0.1",
                   stack_ports={name: free_port() for name in ("smtp", "submissions", "submission", "imaps",
                                                               "pop3s", "dav")})
    # The appliance's own mail goes to the smtp port above (a test's SmtpSink where it listens).
    return start_agent(env={"MAILSTEAD_STATE_DIR": str(state_dir), "MAILSTEAD_SCHEDULER": "1",
                            "MAILSTEAD_UPDATE_DIR": str(state_dir.parent / "update")}, mail_to_smtp_port=True)


@pytest.fixture
def client(make_app: Callable[..., Flask], agent: AgentProcess) -> FlaskClient:
    c = https_client(make_app(AGENT_SOCKET=str(agent.socket)))
    sign_in(c, ADMIN)
    return c


def call(agent: AgentProcess, op: str, **args: Any) -> dict[str, Any]:
    return AgentClient(str(agent.socket), timeout=60).call(op, **args)


def token(text: str, form_id: str | None = None) -> str:
    if form_id:
        text = text[text.index(f'id="{form_id}"'):]
    match = CSRF_RE.search(text)
    assert match, f"no CSRF token in {form_id}"
    return html.unescape(match.group(1))


def post(client: FlaskClient, page: str, action: str, form_id: str, **data: str) -> Any:
    text = client.get(page).text
    names = {"csrf_token"} | {k.split("-")[0] + "-csrf_token" for k in data if "-" in k}
    return client.post(action, data={**{n: token(text, form_id) for n in names}, **data})


def field_error(text: str, field_id: str) -> str:
    match = re.search(rf'<p class="error" role="alert" id="{re.escape(field_id)}-error">(.*?)</p>', text, re.S)
    assert match, f"no error on {field_id}"
    assert f'id="{field_id}"' in text and 'aria-invalid="true"' in text
    return html.unescape(match.group(1))


# -- all three areas ------------------------------------------------------------------------------------

def test_nav_has_the_three_areas(make_app: Callable[..., Flask]) -> None:
    with make_app().app_context():
        titles = {n.endpoint: n.title for n in nav()}
    assert titles["health.index"] == "Health" and titles["schedules.index"] == "Schedules"
    assert titles["backups.index"] == "Backups"


@pytest.mark.parametrize("path", PAGES)
def test_pages_render_for_a_signed_in_admin(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.text[-3000:]
    assert 'aria-current="page"' in response.text and "<h1>" in response.text
    assert "<script>" not in response.text and " style=" not in response.text  # CSP: self scripts, no inline


@pytest.mark.parametrize("path", [*PAGES, "/admin/backups/status/backup_run"])
def test_pages_refuse_without_a_session(make_app: Callable[..., Flask], agent: AgentProcess, path: str) -> None:
    response = https_client(make_app(AGENT_SOCKET=str(agent.socket))).get(path)
    assert response.status_code in (302, 303) and "/login" in response.location


POSTS = ["/admin/health/run", "/admin/health/alerts", "/admin/health/alerts/test", "/admin/schedules/backup",
         "/admin/schedules/backup/run", "/admin/backups/target", "/admin/backups/run", "/admin/backups/verify",
         "/admin/backups/restore", "/jobs/backup_run/start", "/jobs/backup_verify/start"]


@pytest.mark.parametrize("action", POSTS)
def test_every_new_form_needs_its_csrf_token(client: FlaskClient, agent: AgentProcess, state_dir: Path,
                                             action: str) -> None:
    data = {"backup-cron": "1 1 * * *", "target": "local", "path": str(state_dir / "nope"), "snapshot": "latest",
            "confirm": "y", "alert_webhook_url": "", "dnsbl_zones": "x.example"}
    for bad in ({}, {"csrf_token": "forged", "backup-csrf_token": "forged"}):
        response = client.post(action, data={**data, **bad})
        assert response.status_code == 400 and "The form expired" in response.text, (action, response.status_code)
    assert {j["job"]: j["cron"] for j in call(agent, "schedule_list")["jobs"]}["backup"] == "0 3 * * *"
    assert call(agent, "backup_target") == {"target": None} and not (state_dir / "nope").exists()
    assert call(agent, "schedule_runs")["runs"] == [] and call(agent, "job_latest", kind="backup_run")["job"] is None


# -- health ----------------------------------------------------------------------------------------------

def test_timeline_cells_summary_and_changes() -> None:
    rows = [{"at": 1_700_000_600, "status": "ok", "message": "fine again"},
            {"at": 1_700_000_300, "status": "fail", "message": "broken"},
            {"at": 1_700_000_000, "status": "ok", "message": "fine"}]  # newest first, as health_history
    t = health.timeline(rows)
    assert [c["status"] for c in t["cells"]] == ["ok", "fail", "ok"]  # oldest on the left
    assert [c["x"] for c in t["cells"]] == [0, 8, 16] and t["width"] == 22
    assert [c["height"] for c in t["cells"]] == [6, 18, 6]  # taller is worse, not only redder
    assert t["cells"][1]["title"] == "2023-11-14 22:18 UTC: problem — broken"
    assert t["summary"] == "The last 3 rounds, from 2023-11-14 22:13 UTC to 2023-11-14 22:23 UTC: 2 OK, 1 problem."
    assert t["changes"] == ["2023-11-14 22:18 UTC: OK → problem", "2023-11-14 22:23 UTC: problem → OK"]
    assert health.timeline([])["summary"] == "No rounds recorded yet."


def test_health_page_shows_the_latest_result_and_the_timeline(client: FlaskClient, state_dir: Path) -> None:
    t0 = time.time() - 3600
    for i, status in enumerate(["ok", "ok", "warn", "fail"]):
        history.record(state_dir, [CheckResult("disk", status, f"round {i}", "" if status == "ok" else "free space"),
                                   CheckResult("memory", "ok", "plenty")], at=t0 + 300 * i)
    text = client.get("/admin/health/").text
    disk = text[text.index('id="check-disk"'):text.index('id="check-memory"')]
    assert 'data-status="fail"' in disk and "round 3" in disk and "free space" in disk
    svg = disk[disk.index("<svg"):disk.index("</svg>")]
    assert 'role="img"' in svg and 'aria-labelledby="timeline-disk-title"' in svg
    assert '<title id="timeline-disk-title">History of Free disk space: The last 4 rounds' in svg
    assert re.findall(r'<rect class="tl-(\w+)"', svg) == ["ok", "ok", "warn", "fail"]
    assert svg.count("<title>") == 4 and "warning — round 2</title>" in svg
    assert "OK → warning" in disk and "warning → problem" in disk
    memory = text[text.index('id="check-memory"'):]
    assert 'data-status="ok"' in memory and 'id="check-memory-fix"' not in memory
    assert 'id="check-tls"' in text and "Not run yet" in text  # every check is listed, run or not
    assert 'id="health-overall"' in text and 'data-status="fail"' in text


def test_run_checks_now_records_a_round(client: FlaskClient, agent: AgentProcess) -> None:
    response = post(client, "/admin/health/", "/admin/health/run", "health-run-form")
    assert response.status_code == 303, response.text[-2000:]
    text = client.get("/admin/health/").text
    assert re.search(r'id="flash-1">Checks run in [\d.]+ s: \d+ OK, \d+ warning\(s\), \d+ problem\(s\)', text)
    assert "Not run yet" not in text
    assert len(call(agent, "health_history", check="disk")["history"]) == 1
    assert 'id="check-ports-fix"' in text  # a failing check says what to do


def test_alert_settings_errors_on_the_field_then_saved_and_tested(client: FlaskClient, state_dir: Path) -> None:
    bad = post(client, "/admin/health/", "/admin/health/alerts", "alerts-form",
               alert_webhook_url="http://hooks.example.com/x", dnsbl_zones="zen.spamhaus.org")
    assert bad.status_code == 422
    assert field_error(bad.text, "alert_webhook_url").startswith("must use https://")
    bad = post(client, "/admin/health/", "/admin/health/alerts", "alerts-form", alert_webhook_url="",
               dnsbl_zones="zen.spamhaus.org, not a zone")
    assert bad.status_code == 422 and "is not a DNS zone" in field_error(bad.text, "dnsbl_zones")
    with serving(HookServer()) as hook, serving(SmtpSink()) as sink:
        # The receiver is on loopback: the owner allows private targets (as root, on the console).
        write_settings(state_dir, stack_ports={"smtp": sink.port}, alert_webhook_private="1")
        url = f"http://127.0.0.1:{hook.port}/hooks/secret"
        saved = post(client, "/admin/health/", "/admin/health/alerts", "alerts-form", alert_webhook_url=url,
                     dnsbl_zones="bl.example.net")
        assert saved.status_code == 303 and saved.location.endswith("/admin/health/#alerts")
        page = client.get("/admin/health/").text
        assert "Alert settings saved: mail and webhook; blocklists bl.example.net." in page
        assert f'value="{url}"' in page and 'value="bl.example.net"' in page
        sent = post(client, "/admin/health/", "/admin/health/alerts/test", "alerts-test-form")
        assert sent.status_code == 303
        page = html.unescape(client.get("/admin/health/").text)
        assert f'class="ok" role="status" id="flash-1">Test alert: mail sent to {ADMIN}; webhook sent (HTTP 204).' in page
        assert len(hook.posts) == 1 and hook.posts[0]["json"]["changes"][0]["id"] == "test"
        assert sink.messages[0]["to"] == [ADMIN] and "test alert" in str(sink.messages[0]["message"]).lower()
    failed = post(client, "/admin/health/", "/admin/health/alerts/test", "alerts-test-form")  # both gone now
    assert failed.status_code == 303
    page = html.unescape(client.get("/admin/health/").text)
    assert 'class="error" role="alert" id="flash-1">Test alert: mail failed: 127.0.0.1:' in page
    assert f"webhook failed: cannot connect to 127.0.0.1 port {hook.port}" in page
    assert "/hooks/secret" not in page.split('id="alerts-form"')[0]


# -- schedules -------------------------------------------------------------------------------------------

def test_schedule_change_persists_and_goes_back_to_the_default(client: FlaskClient, agent: AgentProcess) -> None:
    text = client.get("/admin/schedules/").text
    for job in ("backup", "verify", "cert_renew", "health", "dns_check", "update"):
        assert f'id="schedule-{job}"' in text and f'<label for="{job}-cron">' in text and f'id="{job}-run"' in text
    response = post(client, "/admin/schedules/", "/admin/schedules/backup", "backup-form",
                    **{"backup-cron": " 15 2 * * * ", "backup-save": "Save"})
    assert response.status_code == 303 and response.location.endswith("#job-backup")
    assert {j["job"]: j["cron"] for j in call(agent, "schedule_list")["jobs"]}["backup"] == "15 2 * * *"
    text = html.unescape(client.get("/admin/schedules/").text)
    assert '<code id="schedule-backup-cron">15 2 * * *</code>' in text and "New schedule for backup: 15 2 * * *" in text
    assert re.search(r'id="schedule-backup-next">\d{4}-\d\d-\d\d 02:15', text)
    response = post(client, "/admin/schedules/", "/admin/schedules/backup", "backup-form",
                    **{"backup-cron": "", "backup-reset": "Back to the default"})
    assert response.status_code == 303
    assert {j["job"]: j["cron"] for j in call(agent, "schedule_list")["jobs"]}["backup"] == "0 3 * * *"


@pytest.mark.parametrize("cron, words", [
    ("61 3 * * *", "'61 3 * * *' is not a valid schedule"),  # from the agent
    ("every night", "a schedule has 5 fields"),
    ("", "Enter a schedule"),  # from the form
    ("0\t3 * * *", "control characters"),
])
def test_bad_cron_is_a_field_error_and_changes_nothing(client: FlaskClient, agent: AgentProcess, cron: str,
                                                       words: str) -> None:
    response = post(client, "/admin/schedules/", "/admin/schedules/verify", "verify-form",
                    **{"verify-cron": cron, "verify-save": "Save"})
    assert response.status_code == 422
    assert words in field_error(response.text, "verify-cron")
    assert 'id="backup-cron-error"' not in response.text
    assert {j["job"]: j["cron"] for j in call(agent, "schedule_list")["jobs"]}["verify"] == "30 4 * * sun"


def test_unknown_job_is_not_found(client: FlaskClient) -> None:
    for action in ("/admin/schedules/nightly", "/admin/schedules/nightly/run", "/admin/schedules/No!/run"):
        response = post(client, "/admin/schedules/", action, "backup-form", **{"nightly-cron": "0 3 * * *"})
        assert response.status_code == 404, action


def test_run_now_and_recent_runs(client: FlaskClient, agent: AgentProcess) -> None:
    response = post(client, "/admin/schedules/", "/admin/schedules/update/run", "update-run-form")
    assert response.status_code == 303 and response.location.endswith("#recent-runs")
    text = html.unescape(client.get("/admin/schedules/").text)
    # The rig has no stack deployed and no newer images: the check runs and finds nothing to do.
    assert re.search(r'id="flash-1">update: OK after [\d.]+ s \([^)]*no update feed is set', text), text[-3000:]
    runs = text[text.index('id="run-list"'):]
    assert 'data-job="update" data-outcome="ok"' in runs and "Update window: install a newer version" in runs
    assert 'id="schedule-update-last" data-outcome="ok"' in text
    assert call(agent, "schedule_runs", job="update")["runs"][0]["outcome"] == "ok"


# -- backups ---------------------------------------------------------------------------------------------

def test_local_target_shows_the_recovery_sheet_once(client: FlaskClient, agent: AgentProcess, state_dir: Path,
                                                    tmp_path: Path) -> None:
    text = client.get("/admin/backups/").text
    assert "not configured yet" in text and 'id="backup-run-start"' not in text
    repo = tmp_path / "backups"
    form = {"target": "local", "path": str(repo), "save_target": "Save"}
    page = client.get("/admin/backups/").text
    response = client.post("/admin/backups/target", data={**form, "csrf_token": token(page, "backup-target-form")})
    assert response.status_code == 200, response.text[-3000:]
    sheet = html.unescape(response.text)
    assert "This sheet is shown only now." in sheet and 'data-print id="recovery-sheet-print"' in sheet
    password = re.search(r"Password: +(\S+)", sheet).group(1)
    assert f"Repository:  {repo}" in sheet
    assert (state_dir / "secrets" / "backup-password").read_text().strip() == password
    assert stat.S_IMODE((state_dir / "secrets" / "backup-password").stat().st_mode) == 0o600
    assert (repo / "config").exists()
    again = client.get("/admin/backups/")
    assert password not in again.text and "recovery-sheet" not in again.text
    assert f"<code>{repo}</code>" in again.text and 'id="backup-run-start"' in again.text
    assert 'id="snapshots-none"' in again.text and 'id="restore-form"' not in again.text
    resent = client.post("/admin/backups/target", data={**form, "csrf_token": token(page, "backup-target-form")})
    assert resent.status_code == 400 and password not in resent.text  # the reload re-sends a spent token


@pytest.mark.parametrize("fields, field, words", [
    ({"target": "local", "path": "backups"}, "path", "must be an absolute folder"),  # from the agent
    ({"target": "local", "path": ""}, "path", "give the folder"),
    ({"target": "sftp", "host": "", "user": "u", "path": "/b"}, "host", "give the SFTP server"),
    ({"target": "sftp", "host": "h.example", "port": "99999", "user": "u", "path": "/b"}, "port", "1 to 65535"),
    ({"target": "s3", "endpoint": "ftp://x", "bucket": "b-1", "access_key_id": "a", "secret_access_key": "s3cret-key"},
     "endpoint", "must be an http:// or https:// URL"),
    ({"target": "nfs"}, "target", "Choose a folder or disk"),
])
def test_bad_target_is_a_field_error(client: FlaskClient, agent: AgentProcess, fields: dict[str, str], field: str,
                                     words: str) -> None:
    response = post(client, "/admin/backups/", "/admin/backups/target", "backup-target-form", **fields)
    assert response.status_code == 422, response.text[-2000:]
    if field == "target":
        assert words in response.text and 'id="target-error"' in response.text
    else:
        assert words in field_error(response.text, field)
    assert "s3cret-key" not in response.text  # a secret is never echoed back
    assert call(agent, "backup_target") == {"target": None}


def test_restore_needs_the_confirmation(client: FlaskClient, agent: AgentProcess, tmp_path: Path) -> None:
    response = post(client, "/admin/backups/", "/admin/backups/target", "backup-target-form", target="local",
                    path=str(tmp_path / "repo"))
    assert response.status_code == 200
    for data, field in (({"snapshot": "latest"}, "confirm"), ({"snapshot": "../etc", "confirm": "y"}, "snapshot")):
        refused = post(client, "/admin/backups/", "/admin/backups/restore", "backup-target-form", **data)
        assert refused.status_code == 422
        if field == "confirm":
            assert "Tick the box to confirm the restore" in refused.text and 'id="confirm-error"' in refused.text
        else:
            assert "Choose a snapshot" in field_error(refused.text, "snapshot")
    assert call(agent, "job_latest", kind="backup_restore")["job"] is None


def test_job_status_for_the_page(client: FlaskClient) -> None:
    assert client.get("/admin/backups/status/backup_verify").get_json() == {"job": None}
    assert client.get("/admin/backups/status/stack_deploy").status_code == 404


def test_pages_with_their_data_have_the_accessibility_basics(client: FlaskClient, state_dir: Path,
                                                             tmp_path: Path) -> None:
    """What the a11y test's empty rig does not show: timelines, the recovery sheet, runs."""
    from tests.unit.test_a11y import problems

    for i, status in enumerate(["ok", "warn", "fail"]):
        history.record(state_dir, [CheckResult("disk", status, f"round {i}", "free space")], at=time.time() + i)
    assert problems(client.get("/admin/health/").text) == []
    post(client, "/admin/schedules/", "/admin/schedules/update/run", "update-run-form")
    assert problems(client.get("/admin/schedules/").text) == []
    sheet = post(client, "/admin/backups/", "/admin/backups/target", "backup-target-form", target="local",
                 path=str(tmp_path / "repo"))
    assert sheet.status_code == 200 and problems(sheet.text) == []
    refused = post(client, "/admin/backups/", "/admin/backups/restore", "backup-target-form", snapshot="latest")
    assert refused.status_code == 422 and problems(refused.text) == []


# -- updates --------------------------------------------------------------------------------------------

def test_updates_page_settings_move_the_window_into_the_owners_time_zone(client: FlaskClient,
                                                                          agent: AgentProcess) -> None:
    text = html.unescape(client.get("/admin/updates/").text)
    assert 'id="update-running">Mailstead ' in text and 'id="update-auto">on' in text
    assert 'id="update-history-none"' in text and 'id="update-rollback"' not in text
    response = post(client, "/admin/updates/", "/admin/updates/settings", "update-settings-form",
                    window_hour="5", time_zone="Asia/Kolkata", feed_url="", save="Save")
    assert response.status_code == 303, response.text[-2000:]
    window = {j["job"]: j for j in call(agent, "schedule_list")["jobs"]}["update"]
    assert window["cron"] == "0 5 * * *" and window["next_run"].endswith("T05:00:00+05:30"), window
    # The other jobs follow the owner's time zone too.
    backup = {j["job"]: j for j in call(agent, "schedule_list")["jobs"]}["backup"]
    assert backup["next_run"].endswith("T03:00:00+05:30"), backup
    text = html.unescape(client.get("/admin/updates/").text)
    assert 'id="update-auto">off' in text and "Update settings saved: automatic updates off" in text
    # Refused values name their field and keep what is stored.
    response = post(client, "/admin/updates/", "/admin/updates/settings", "update-settings-form",
                    auto="y", window_hour="5", time_zone="Mars/Olympus", feed_url="", save="Save")
    assert response.status_code == 422
    assert "not a time zone this system knows" in field_error(html.unescape(response.text), "time_zone")
    assert call(agent, "update_status")["time_zone"] == "Asia/Kolkata"


def test_updates_check_now_without_a_feed_says_what_to_do(client: FlaskClient) -> None:
    response = post(client, "/admin/updates/", "/admin/updates/check", "update-check-form")
    assert response.status_code == 303
    text = html.unescape(client.get("/admin/updates/").text)
    assert "The update feed could not be read: no update feed is set" in text
    response = post(client, "/admin/updates/", "/admin/updates/install", "update-check-form")
    assert response.status_code == 409 and "Not installed:" in html.unescape(response.text)


def test_updates_page_says_when_the_version_on_offer_failed_here(client: FlaskClient, state_dir: Path) -> None:
    import json

    from portal.update import state

    running = call_status(client)
    # What an earlier check of the feed found (written by the agent), and that version's rollback here.
    (state_dir / "update-check.json").write_text(json.dumps({
        "ok": True, "available": True, "newest": "9.0.0", "message": "Version 9.0.0 is available.",
        "notes": {"version": "9.0.0", "built": "2026-12-01T00:00:00+00:00", "notes": ["Newer"], "slot_bytes": 5}}))
    text = html.unescape(client.get("/admin/updates/").text)
    assert 'id="update-install"' in text and 'id="update-window-skips"' not in text
    (state_dir.parent / "update").mkdir(exist_ok=True)  # systemd's StateDirectory= on the appliance
    state.add_history(state_dir.parent / "update", "rolled_back", **{"from": running, "to": "9.0.0", "by": "health"})
    text = html.unescape(client.get("/admin/updates/").text)
    skips = text[text.index('id="update-window-skips"'):]
    assert "9.0.0 rolled back here on " in skips[:300] and "Install now tries it again" in skips[:300]
    assert 'id="update-install"' in text


def call_status(client: FlaskClient) -> str:
    text = html.unescape(client.get("/admin/updates/").text)
    return re.search(r'id="update-running">Mailstead (\S+?)[,<]', text).group(1)
