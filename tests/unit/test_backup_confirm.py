"""A change of the backup target and a restore ask for a fresh code of the administrator
(issue 14): through the agent's socket (the web's and the console's way in), the
dashboard's Backups forms and the CLI. Without a code, with a wrong one or with one
used before (at sign-in) they are refused naming `totp_code`, before anything changes;
on a fresh appliance (no administrator yet) nobody is asked."""

from __future__ import annotations

import html
import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal import cli
from portal.agent.client import AgentClient, AgentError
from portal.agent.registry import Context
from tests.support.admin import sign_in
from tests.support.agent import ThreadAgent
from tests.support.statedb import write_settings
from tests.unit.conftest import https_client

ADMIN = "postmaster@example.test"
PASSWORD = "the administrator's password"
CSRF_RE = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


class Owner:
    def __init__(self, totp: pyotp.TOTP, codes: list[str], used: str) -> None:
        self.totp, self.codes, self.used = totp, codes, used

    def fresh(self) -> str:
        return self.totp.at(time.time() + 30)

    def wrong(self) -> str:
        return next(c for c in ("000000", "111111", "222222") if c not in (self.totp.now(), self.fresh(), self.used))


def set_up(state_dir: Path) -> Owner:
    """A set-up appliance with its administrator; the code used at the Admin step is spent."""
    from portal.admin.privileged import admin_setup, admin_totp_begin

    write_settings(state_dir / "state.db", {"domain": "example.test", "mail_host": "mail.example.test",
                                            "admin_address": ADMIN})
    ctx = Context(state_dir=state_dir)
    totp = pyotp.TOTP(admin_totp_begin.run(ctx, address=ADMIN)["secret"])
    used = totp.now()
    codes = admin_setup.run(ctx, address=ADMIN, password=PASSWORD, totp_code=used)["recovery_codes"]
    write_settings(state_dir / "state.db", {"setup_complete": "1"})
    return Owner(totp, codes, used)


@pytest.fixture
def agent(state_dir: Path, tmp_path: Path) -> ThreadAgent:
    run = tmp_path / "run-agent"
    run.mkdir()
    a = ThreadAgent(state_dir, run / "agent.sock")
    yield a
    a.stop()


def refused(client: AgentClient, op: str, **args: object) -> AgentError:
    with pytest.raises(AgentError) as err:
        client.call(op, **args)
    return err.value


def test_a_target_change_needs_a_fresh_code(agent: ThreadAgent, state_dir: Path, tmp_path: Path) -> None:
    owner = set_up(state_dir)
    client = agent.client(timeout=60)
    target = {"target": "local", "path": str(tmp_path / "repo")}
    for code in ("", owner.used, owner.wrong(), "AAAA-BBBB-CCCC-DDDD"):
        err = refused(client, "backup_configure", **target, totp_code=code)
        assert (err.code, err.field) == ("invalid", "totp_code"), code
    assert not (state_dir / "secrets" / "backup.json").exists() and not (tmp_path / "repo").exists()
    # the target's own fields are checked first: a typo does not spend the code
    fresh = owner.fresh()
    assert refused(client, "backup_configure", target="local", path="relative", totp_code=fresh).field == "path"
    made = client.call("backup_configure", **target, totp_code=fresh)
    assert made["created"] and (state_dir / "secrets" / "backup.json").exists()
    # spent: the same code does not change the target again
    assert refused(client, "backup_configure", target="local", path=str(tmp_path / "other"),
                   totp_code=fresh).field == "totp_code"


def test_a_restore_needs_a_fresh_code_before_its_job_starts(agent: ThreadAgent, state_dir: Path) -> None:
    owner = set_up(state_dir)
    client = agent.client()
    for code in ("", owner.used, owner.wrong()):
        err = refused(client, "backup_restore", snapshot="latest", totp_code=code)
        assert (err.code, err.field) == ("invalid", "totp_code"), code
    assert client.call("job_latest", kind="backup_restore")["job"] is None  # no job was started
    # the generic job endpoint of the web (no arguments) is refused the same way
    assert refused(client, "backup_restore").field == "totp_code"
    # a right code starts the job (which then fails: no target configured)
    job = client.call("backup_restore", snapshot="latest", totp_code=owner.codes[0])
    assert job["kind"] == "backup_restore" and "totp_code" not in str(job)


def test_a_fresh_appliance_has_nobody_to_ask(agent: ThreadAgent, state_dir: Path, tmp_path: Path) -> None:
    write_settings(state_dir / "state.db", {"domain": "example.test"})
    made = agent.client(timeout=60).call("backup_configure", target="local", path=str(tmp_path / "repo"))
    assert made["created"]


def test_during_setup_the_token_holder_is_not_asked(agent: ThreadAgent, state_dir: Path, tmp_path: Path) -> None:
    """The Admin step is done, setup is not finished: the wizard (which has no code field)
    is in charge, as it may make the administrator again anyway."""
    set_up(state_dir)
    write_settings(state_dir / "state.db", {"setup_complete": "0"})
    made = agent.client(timeout=60).call("backup_configure", target="local", path=str(tmp_path / "repo"))
    assert made["created"]


# -- the dashboard ------------------------------------------------------------------------------

@pytest.fixture
def dashboard(make_app: Callable[..., Flask], agent: ThreadAgent, state_dir: Path) -> tuple[FlaskClient, Owner]:
    owner = set_up(state_dir)
    client = https_client(make_app(AGENT_SOCKET=str(agent.socket)))
    sign_in(client, ADMIN)
    return client, owner


def token(client: FlaskClient) -> str:
    return html.unescape(CSRF_RE.search(client.get("/admin/backups/").text).group(1))


def test_the_backups_page_asks_for_a_code_to_change_the_target(dashboard: tuple[FlaskClient, Owner],
                                                               state_dir: Path, tmp_path: Path) -> None:
    client, owner = dashboard
    page = client.get("/admin/backups/").text
    assert 'id="target_totp_code"' in page and 'autocomplete="one-time-code"' in page
    form = {"target": "local", "path": str(tmp_path / "repo"), "save_target": "y"}
    for code in ("", owner.used, owner.wrong()):
        answer = client.post("/admin/backups/target", data={**form, "csrf_token": token(client), "totp_code": code})
        assert answer.status_code == 422 and 'id="target_totp_code-error"' in answer.text, code
        assert code == "" or f'value="{code}"' not in answer.text  # a code is never put back in the form
    assert not (state_dir / "secrets" / "backup.json").exists()
    sheet = client.post("/admin/backups/target", data={**form, "csrf_token": token(client),
                                                       "totp_code": owner.fresh()})
    assert sheet.status_code == 200 and "This sheet is shown only now." in sheet.text


def test_the_backups_page_asks_for_a_code_to_restore(dashboard: tuple[FlaskClient, Owner], agent: ThreadAgent,
                                                     tmp_path: Path) -> None:
    client, owner = dashboard
    client.post("/admin/backups/target", data={"target": "local", "path": str(tmp_path / "repo"), "save_target": "y",
                                               "csrf_token": token(client), "totp_code": owner.codes[0]})
    form = {"snapshot": "deadbeef", "confirm": "y", "restore": "y"}
    for code in ("", owner.wrong(), owner.codes[0]):  # the recovery code was spent on the target
        answer = client.post("/admin/backups/restore", data={**form, "csrf_token": token(client), "totp_code": code})
        assert answer.status_code == 422 and 'id="restore_totp_code-error"' in answer.text, code
    assert agent.call("job_latest", kind="backup_restore")["job"] is None


# -- the console ----------------------------------------------------------------------------------

def test_the_cli_asks_for_a_code_when_the_agent_wants_one(agent: ThreadAgent, state_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    owner = set_up(state_dir)
    sock = ["--socket", str(agent.socket)]
    args = [*sock, "backup", "configure", "--target", "local", "--path", str(tmp_path / "repo"), "--secret-stdin"]
    monkeypatch.setattr("sys.stdin", io.StringIO(owner.wrong() + "\n"))
    assert cli.main(args) == 1
    assert "totp_code: that code is not right" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as out:
        cli.main(args)
    assert "totp_code: no code given" in str(out.value)
    # No terminal to ask on and no --secret-stdin (a script): the same words, no traceback.
    monkeypatch.setattr("getpass.getpass", lambda prompt: (_ for _ in ()).throw(EOFError()))
    with pytest.raises(SystemExit) as out:
        cli.main(args[:-1])
    assert "totp_code: no code given" in str(out.value)
    monkeypatch.setattr("sys.stdin", io.StringIO(owner.fresh() + "\n"))
    assert cli.main(args) == 0
    assert "RECOVERY SHEET" in capsys.readouterr().out
