"""The dashboard's Backups area end to end with a real agent, real restic and a local
folder target: configure (recovery sheet once), Back up now as jobs.js starts it, the
snapshot in the list, Verify now without JavaScript, then a restore of that snapshot
behind its confirmation box and a fresh code of the administrator, watched until it ends.

The stack's volumes are asked for through the host's docker engine under a compose
project no test stack uses (as test_backup_agent.py does): they do not exist, so only
the databases and files are backed up. No stack is deployed, so the restore puts the
files back and then reports that the stack did not come back (nothing here can start it).
"""

from __future__ import annotations

import html
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

import pyotp

from portal.agent.registry import Context
from portal.web import create_app
from tests.support.statedb import write_settings
from tests.conftest import AgentProcess, launch_agent
from tests.unit.conftest import https_client
from tests.support.admin import sign_in

ADMIN = "postmaster@example.test"
CSRF_RE = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


def make_admin(state: Path) -> tuple[pyotp.TOTP, list[str]]:
    """The administrator, made by the agent's own operations (the Admin step)."""
    from portal.admin.privileged import admin_setup, admin_totp_begin

    ctx = Context(state_dir=state)
    totp = pyotp.TOTP(admin_totp_begin.run(ctx, address=ADMIN)["secret"])
    return totp, admin_setup.run(ctx, address=ADMIN, password="the admin's password", totp_code=totp.now())[
        "recovery_codes"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[FlaskClient, AgentProcess, Path, tuple[pyotp.TOTP, list[str]]]]:
    state = tmp_path / "state"
    write_settings(state / "state.db", {"domain": "example.test", "mail_host": "mail.example.test",
                                        "stack_project": "mstest-i6dash-none", "dnsbl_zones": "before.example"})
    admin = make_admin(state)
    write_settings(state / "state.db", {"setup_complete": "1", "admin_address": ADMIN})
    (state / "secrets" / "dkim").mkdir(parents=True)
    (state / "secrets" / "dkim" / "k.key").write_text("dkim")
    agent = launch_agent(tmp_path, "--no-scheduler", env={"MAILSTEAD_STATE_DIR": str(state)})
    app = create_app({"TESTING": True, "WEB_DIR": str(tmp_path / "web"), "RUN_DIR": str(tmp_path / "run"),
                      "AGENT_SOCKET": str(agent.socket), "TEST_STATE_DIR": str(state)})
    client = https_client(app)
    sign_in(client, ADMIN)
    try:
        yield client, agent, state, admin
    finally:
        agent.stop()


def token(client: FlaskClient) -> str:
    return html.unescape(CSRF_RE.search(client.get("/admin/backups/").text).group(1))


def watch(client: FlaskClient, kind: str, timeout: float = 120) -> dict[str, Any]:
    """Poll the page's status URL as jobs.js does until the job ends."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/admin/backups/status/{kind}").get_json()["job"]
        if job and job["state"] != "running":
            return job
        assert time.monotonic() < deadline, f"{kind} still running: {job}"
        time.sleep(0.3)


def test_backup_verify_and_restore_through_the_page(site: tuple[FlaskClient, AgentProcess, Path, Any],
                                                     tmp_path: Path) -> None:
    client, agent, state, (totp, codes) = site
    repo = tmp_path / "backups"
    unconfirmed = client.post("/admin/backups/target", data={"csrf_token": token(client), "target": "local",
                                                              "path": str(repo), "save_target": "y"})
    assert unconfirmed.status_code == 422 and 'id="target_totp_code-error"' in unconfirmed.text
    assert not repo.exists()
    sheet = client.post("/admin/backups/target", data={"csrf_token": token(client), "target": "local",
                                                        "path": str(repo), "save_target": "y",
                                                        "totp_code": totp.at(time.time() + 30)})
    assert sheet.status_code == 200 and "This sheet is shown only now." in sheet.text
    password = re.search(r"Password: +(\S+)", html.unescape(sheet.text)).group(1)
    assert stat.S_IMODE((state / "secrets" / "backup-password").stat().st_mode) == 0o600

    page = client.get("/admin/backups/").text
    assert 'data-start-url="/jobs/backup_run/start"' in page and 'id="snapshots-none"' in page
    started = client.post("/jobs/backup_run/start", data={"csrf_token": token(client)})  # as jobs.js does
    assert started.status_code == 202, started.text
    job = watch(client, "backup_run")
    assert job["state"] == "done", job
    assert {"databases", "upload", "retention"} <= {e["step"] for e in job["events"]}
    snapshot = job["result"]["snapshot"]
    page = client.get("/admin/backups/").text
    assert f'id="snapshot-{snapshot}"' in page and f'<option value="{snapshot}">' in page
    assert re.search(r'id="last-backup"><span class="outcome-ok">OK</span>', page)
    assert f'id="backup-run-done">The last backup succeeded: snapshot <code>{snapshot}</code>' in page
    # the finished job the page shows is not reported again (jobs.js would reload the page)
    after = re.search(r'data-status-url="(/admin/backups/status/backup_run\?after=[^"]+)"', page).group(1)
    assert client.get(html.unescape(after)).get_json() == {"job": None}

    verified = client.post("/admin/backups/verify", data={"csrf_token": token(client)})  # without JavaScript
    assert verified.status_code == 303 and verified.location.endswith("#backup-verify")
    job = watch(client, "backup_verify")
    assert job["state"] == "done" and job["result"]["snapshot"] == snapshot, job
    assert re.search(r'id="last-verify"><span class="outcome-ok">OK</span>', client.get("/admin/backups/").text)

    # A change after the backup, then the restore: refused without the box, done with it.
    write_settings(state / "state.db", {"dnsbl_zones": "after.example"})
    refused = client.post("/admin/backups/restore", data={"csrf_token": token(client), "snapshot": snapshot})
    assert refused.status_code == 422 and 'id="confirm-error"' in refused.text
    assert client.get("/admin/backups/status/backup_restore").get_json() == {"job": None}
    refused = client.post("/admin/backups/restore", data={"csrf_token": token(client), "snapshot": snapshot,
                                                          "confirm": "y", "restore": "y"})
    assert refused.status_code == 422 and 'id="restore_totp_code-error"' in refused.text
    assert client.get("/admin/backups/status/backup_restore").get_json() == {"job": None}
    restored = client.post("/admin/backups/restore", data={"csrf_token": token(client), "snapshot": snapshot,
                                                           "confirm": "y", "restore": "y", "totp_code": codes[0]})
    assert restored.status_code == 303 and restored.location.endswith("#backup-restore")
    job = watch(client, "backup_restore")
    steps = [e["step"] for e in job["events"]]
    # The backed-up appliance had no stack deployed (no rendered compose file): none is started.
    assert steps[0] == "check" and "files" in steps and "deploy" not in steps
    assert job["state"] == "done" and job["result"]["stack"] is None, job
    from tests.support.statedb import read_settings as read_settings_table

    assert read_settings_table(state / "state.db")["dnsbl_zones"] == "before.example"  # the files are back
    page = html.unescape(client.get("/admin/backups/").text)
    assert re.search(r'id="last-restore"><span class="outcome-ok">OK</span>', page), page[:3000]
    assert password not in page and password not in agent.log_text() and codes[0] not in agent.log_text()
