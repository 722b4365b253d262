"""The mail stack's agent operations and CLI, through a real agent process.

No docker engine here: operations that need one must say so clearly; those
that only touch the accounts database work without it.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from portal import cli
from portal.agent.client import AgentClient, AgentError
from portal.stack.store import load_settings
from tests.conftest import REPO
from tests.support.settings import write_settings




@pytest.fixture
def agent(start_agent, tmp_path):
    state = tmp_path / "state"
    write_settings(state, domain="example.test")
    return start_agent(env={"MAILSTEAD_STATE_DIR": str(state)}), state


def test_deploy_without_a_domain_names_the_setting(start_agent, tmp_path):
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(tmp_path / "empty")})
    with pytest.raises(AgentError) as err:
        AgentClient(str(agent.socket)).call("stack_deploy")
    assert err.value.code == "invalid"
    assert str(err.value).startswith("domain: is not set yet")


def test_deploy_without_docker_says_so(agent):
    """The deploy is a job: what it meets (no docker engine) is the job's failure, said plainly."""
    from tests.conftest import retry

    proc, _state = agent
    client = AgentClient(str(proc.socket), timeout=30)
    job = client.call("stack_deploy")
    assert job["kind"] == "stack_deploy" and job["state"] in ("running", "failed")  # it may end at once

    def ended():
        got = client.call("job_status", job_id=job["id"])
        assert got["state"] != "running"
        return got

    failed = retry(ended, 30, "the deploy job to end")
    assert failed["state"] == "failed" and "docker" in failed["error"]


def test_aliases_through_the_agent_and_refusals_name_the_field(agent):
    proc, state = agent
    client = AgentClient(str(proc.socket))
    client.call("alias_add", source="info@example.test", destination="someone@elsewhere.test")
    listed = client.call("mailbox_list")
    assert listed["aliases"] == [{"source": "info@example.test", "destination": "someone@elsewhere.test"}]
    with pytest.raises(AgentError) as err:
        client.call("alias_add", source="x';DROP TABLE aliases;--@example.test", destination="a@b.test")
    assert err.value.code == "invalid" and str(err.value).startswith("source:")
    with pytest.raises(AgentError) as err:
        client.call("alias_add", source="someone@elsewhere.test", destination="info@example.test")
    assert str(err.value).startswith("source:")
    assert client.call("mailbox_list")["aliases"] == listed["aliases"]


def test_mailbox_create_refuses_bad_input_before_touching_docker(agent):
    proc, _state = agent
    client = AgentClient(str(proc.socket))
    for args, field in ((dict(address="not-an-address", password="long enough password"), "address"),
                        (dict(address="a@example.test", password="short"), "password")):
        with pytest.raises(AgentError) as err:
            client.call("mailbox_create", **args)
        assert str(err.value).startswith(f"{field}:"), str(err.value)
    assert client.call("mailbox_list")["mailboxes"] == []


def test_passwords_never_reach_the_agent_log(agent):
    proc, _state = agent
    with pytest.raises(AgentError):
        AgentClient(str(proc.socket)).call("mailbox_create", address="a@example.test",
                                           password="Sup3r-secret-passphrase")
    assert "Sup3r-secret-passphrase" not in proc.log_text()


def test_cli_reads_the_password_from_stdin(agent):
    proc, _state = agent
    run = subprocess.run(
        [sys.executable, "-m", "portal.cli", "--socket", str(proc.socket), "mailbox-create",
         "bad address", "--password-stdin"],
        input="Sup3r-secret-passphrase\n", capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 1
    assert "address:" in run.stderr and "Sup3r-secret" not in run.stderr + run.stdout


@pytest.mark.parametrize("argv, op", [
    (["deploy"], "stack_deploy"),
    (["load-images"], "stack_load_images"),
    (["stack-status"], "stack_status"),
    (["mailbox-delete", "a@example.test"], "mailbox_delete"),
    (["mailbox-rename", "a@example.test", "b@example.test"], "mailbox_rename"),
    (["alias-add", "x@example.test", "a@example.test"], "alias_add"),
])
def test_cli_maps_commands_to_operations(argv, op):
    assert cli.request(cli.build_parser().parse_args(argv))[0].name == op


def test_settings_store(tmp_path):
    write_settings(tmp_path, domain="xn--bcher-kva.example", publish_addresses="127.0.0.1, ::1",
                   stack_ports=json.dumps({"smtp": 2525}))
    s = load_settings(tmp_path)
    assert (s.domain, s.hostname) == ("xn--bcher-kva.example", "mail.xn--bcher-kva.example")
    assert s.publish_addresses == ("127.0.0.1", "::1") and s.ports == {"smtp": 2525}
    write_settings(tmp_path, stack_ports="not json")
    with pytest.raises(ValueError) as err:
        load_settings(tmp_path)
    assert err.value.field == "stack_ports"
