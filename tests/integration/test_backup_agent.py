"""The backup operations through a real agent process and its socket: configure
(recovery sheet once, secrets never logged), backup_run as a job with restic's
progress, backup_list, backup_state, backup_verify, and refusals naming the field."""

from __future__ import annotations

import time

import pytest

from portal.agent.client import AgentClient, AgentError
from tests.support.statedb import write_settings
from tests.conftest import launch_agent



def wait_job(client: AgentClient, job: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while job["state"] == "running":
        assert time.monotonic() < deadline, f"job {job['id']} still running: {job['events'][-3:]}"
        time.sleep(0.3)
        job = client.call("job_status", job_id=job["id"])
    return job


def test_backup_operations_through_the_agent(tmp_path):
    state = tmp_path / "state"
    # A compose project no test stack uses: its docker volumes do not exist, so only files are backed up.
    write_settings(state / "state.db", {"domain": "example.test", "stack_project": "mstest-i6b-agent-none"})
    (state / "secrets" / "dkim").mkdir(parents=True)
    (state / "secrets" / "dkim" / "k.key").write_text("dkim")
    agent = launch_agent(tmp_path, "--no-scheduler", env={"MAILSTEAD_STATE_DIR": str(state)})
    try:
        client = AgentClient(str(agent.socket), timeout=60)
        with pytest.raises(AgentError) as err:
            client.call("backup_configure", target="s3", endpoint="ftp://x", bucket="b-1", access_key_id="a",
                        secret_access_key="hunter2-secret")
        assert err.value.code == "invalid" and str(err.value).startswith("endpoint:")
        assert client.call("backup_target") == {"target": None}
        failed = wait_job(client, client.call("backup_run"))  # not configured: fails, says what to do, recorded
        assert failed["state"] == "failed" and "backup configure" in failed["error"]
        assert client.call("backup_state")["last_backup"]["ok"] is False

        made = client.call("backup_configure", target="local", path=str(tmp_path / "repo"))
        sheet = made["recovery_sheet"]
        password = next(x.split(":", 1)[1].strip() for x in sheet.splitlines() if x.startswith("Password:"))
        assert client.call("backup_target")["target"]["repository"] == str(tmp_path / "repo")

        job = wait_job(client, client.call("backup_run"))
        assert job["state"] == "done", job
        steps = [e["step"] for e in job["events"]]
        assert "databases" in steps and "upload" in steps and "retention" in steps
        assert job["result"]["volumes"] == []
        listed = client.call("backup_list")["snapshots"]
        assert [s["id"] for s in listed] == [job["result"]["snapshot"]] and listed[0]["version"]
        status = client.call("backup_state")
        assert status["last_backup"]["ok"] is True

        verified = wait_job(client, client.call("backup_verify"))
        assert verified["state"] == "done" and verified["result"]["ok"] is True
        assert client.call("backup_state")["last_verify"]["ok"] is True

        with pytest.raises(AgentError) as err:
            client.call("backup_restore", snapshot="../../etc")
        assert err.value.code == "invalid" and str(err.value).startswith("snapshot:")
    finally:
        agent.stop()
    log = agent.log_text()
    assert password not in log and "hunter2-secret" not in log
    assert "op=backup_configure" in log
