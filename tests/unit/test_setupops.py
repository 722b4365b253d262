"""The setup and dashboard agent operations (portal/setup/privileged.py): setup_deploy
resumes after an interrupted job and never loses a pending password,
setup_finish, send_test_message (against a tiny SMTP server on loopback),
system_status and stack_logs."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from portal.setup import privileged as setupops
from portal.agent import jobs
from portal.stack.accounts import Accounts, PreparedPassword
from portal.agent.client import AgentClient, AgentError
from portal.agent.registry import REGISTRY, Context, OpError
from tests.conftest import retry
from tests.support.settings import receives, write_settings
from tests.support.smtp import SmtpSink, send_to_smtp_port
from tests.unit.checks_support import serving

SERVICES = ("postfix", "dovecot", "rspamd", "redis", "radicale", "unbound")




def setting(state: Path, key: str) -> str | None:
    with sqlite3.connect(state / "state.db") as c:
        row = c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def op(ctx: Context, name: str, **args: Any) -> dict[str, Any]:
    return REGISTRY[name].run_checked(ctx, args)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    state = tmp_path / "state"
    write_settings(state, domain="example.test", mail_host="mail.example.test")
    from portal.agent.registry import docker_factory

    return Context(state_dir=state, docker=docker_factory(f"unix://{tmp_path}/no-docker.sock"))


def finished(ctx: Context, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any]:
        job = op(ctx, "job_status", job_id=job_id)
        assert job["state"] != "running", job
        return job
    return retry(done, 10, f"job {job_id}")  # type: ignore[return-value]


class FakeWorld:
    """The stack's deploy, the Admin step's pending file and mailbox creation, recorded."""

    def __init__(self) -> None:
        self.prepared = PreparedPassword.of("correct horse battery staple")
        self.pending = [("Postmaster@example.test", self.prepared)]
        self.created: list[tuple[str, PreparedPassword]] = []
        self.deploy_fails = False
        self.mailbox_fails = False
        self.taken = 0

    def deploy(self, ctx: Context, progress: Any) -> dict[str, Any]:
        progress("images", "loading")
        if self.deploy_fails:
            raise OpError("deploy_failed", "services did not become healthy: dovecot")
        for s in SERVICES:
            progress(s, "running/starting")
            progress(s, "healthy")
        return {"services": {s: {"status": "running", "health": "healthy"} for s in SERVICES}}

    def take(self, state_dir: Path) -> list[tuple[str, PreparedPassword]]:
        self.taken += 1
        out, self.pending = self.pending, []
        return out

    def make(self, ctx: Context, address: str, password: PreparedPassword) -> bool:
        if self.mailbox_fails:
            raise OpError("stack", "the mail stack refused the change: dovecot is down")
        self.created.append((address, password))
        return True


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> FakeWorld:
    w = FakeWorld()
    monkeypatch.setattr(setupops, "deploy_stack", w.deploy)
    monkeypatch.setattr(setupops, "take_pending", w.take)
    monkeypatch.setattr(setupops, "make_mailbox", w.make)
    return w


def test_setup_deploy_is_a_job_the_web_may_start() -> None:
    import importlib

    from portal.web import jobs as agentweb

    importlib.import_module("portal.agent.server")
    from portal.agent.registry import load_all

    load_all()
    assert "setup_deploy" in jobs.kinds() and agentweb.web_job("setup_deploy") is REGISTRY["setup_deploy"]
    assert {"send_test_message", "setup_finish", "system_status", "stack_logs"} <= set(REGISTRY)


def test_deploy_resumes_after_an_interrupted_job(ctx: Context, world: FakeWorld) -> None:
    folder = ctx.state_dir / "jobs"
    folder.mkdir(exist_ok=True)
    (folder / "20260101000000000000-setup_deploy-deadbeef.json").write_text(json.dumps(
        {"id": "20260101000000000000-setup_deploy-deadbeef", "kind": "setup_deploy", "state": "running",
         "agent": "999-0", "started": 0, "finished": None,
         "events": [{"t": 1.0, "step": "postfix", "detail": "running/starting"}], "result": None, "error": None}))
    assert op(ctx, "job_latest", kind="setup_deploy")["job"]["state"] == "interrupted"

    job = finished(ctx, REGISTRY["setup_deploy"].start(ctx)["id"])
    assert job["state"] == "done", job
    assert world.created == [("postmaster@example.test", world.prepared)]
    assert setting(ctx.state_dir, "stack_deployed") == "1"
    assert job["result"]["mailboxes"] == ["postmaster@example.test"]
    steps = [e["step"] for e in job["events"]]
    assert all(s in steps for s in SERVICES) and steps[-1] == "done"
    text = json.dumps(job)
    assert "battery" not in text  # no password in events or result
    assert not (ctx.state_dir / "secrets" / setupops.DEPLOY_STASH).exists()
    assert op(ctx, "job_latest", kind="setup_deploy")["job"]["state"] == "done"


def test_a_failed_deploy_keeps_the_pending_password(ctx: Context, world: FakeWorld) -> None:
    world.deploy_fails = True
    job = finished(ctx, REGISTRY["setup_deploy"].start(ctx)["id"])
    assert job["state"] == "failed" and "dovecot" in job["error"]
    assert world.taken == 0 and world.pending  # not taken before the stack runs
    assert setting(ctx.state_dir, "stack_deployed") is None

    world.deploy_fails = False
    assert finished(ctx, REGISTRY["setup_deploy"].start(ctx)["id"])["state"] == "done"
    assert [a for a, _ in world.created] == ["postmaster@example.test"]


def test_a_failed_mailbox_keeps_the_password_until_it_is_made(ctx: Context, world: FakeWorld) -> None:
    world.mailbox_fails = True
    job = finished(ctx, REGISTRY["setup_deploy"].start(ctx)["id"])
    assert job["state"] == "failed" and "dovecot is down" in job["error"]
    stash = ctx.state_dir / "secrets" / setupops.DEPLOY_STASH
    assert stat.S_IMODE(stash.stat().st_mode) == 0o600
    # What waits is the prepared password (hash and derived key password), never the password.
    assert json.loads(stash.read_text()) == {"postmaster@example.test": world.prepared.as_dict()}
    assert "battery" not in stash.read_text()
    assert setting(ctx.state_dir, "stack_deployed") is None

    world.mailbox_fails = False  # "Deploy again": the taken password comes from the stash
    assert finished(ctx, REGISTRY["setup_deploy"].start(ctx)["id"])["state"] == "done"
    assert world.created == [("postmaster@example.test", world.prepared)]
    assert not stash.exists()


def test_setup_finish_deletes_the_token_and_sets_the_flag(ctx: Context) -> None:
    token = ctx.state_dir / "setup-token"
    token.write_text("secret-token\n")
    with pytest.raises(OpError) as err:
        op(ctx, "setup_finish")
    assert err.value.code == "not_ready" and token.exists()
    assert setting(ctx.state_dir, "setup_complete") is None

    write_settings(ctx.state_dir, stack_deployed="1")
    assert op(ctx, "setup_finish") == {"setup_complete": True, "token_deleted": True}
    assert not token.exists() and setting(ctx.state_dir, "setup_complete") == "1"
    assert op(ctx, "setup_finish")["token_deleted"] is False  # safe to repeat


def test_system_status(ctx: Context) -> None:
    status = op(ctx, "system_status")
    assert status["disk"]["total"] > 0 and 0 <= status["disk"]["free"] <= status["disk"]["total"]
    assert status["memory"]["total"] > 0


def test_meminfo_parses_and_tolerates_a_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:        2048 kB\nMemFree: 1 kB\nMemAvailable:    1024 kB\n")
    assert setupops.meminfo(f) == {"MemTotal": 2048 * 1024, "MemAvailable": 1024 * 1024}
    assert setupops.meminfo(tmp_path / "missing") == {}


@pytest.mark.parametrize("args, field", [
    ({"service": "nginx; rm -rf /"}, "service"), ({"service": ""}, "service"),
    ({"service": "postfix", "lines": 0}, "lines"), ({"service": "postfix", "lines": -5}, "lines"),
])
def test_stack_logs_refuses_bad_arguments_naming_the_field(ctx: Context, args: dict, field: str) -> None:
    with pytest.raises(OpError) as err:
        op(ctx, "stack_logs", **args)
    assert err.value.code == "invalid" and str(err.value).startswith(f"{field}:")


def test_stack_logs_without_docker_says_so(ctx: Context) -> None:
    with pytest.raises(OpError) as err:
        op(ctx, "stack_logs", service="postfix")
    assert err.value.code == "docker_unavailable" and "docker engine" in str(err.value)


class FakeContainer:
    name = "mailstead-postfix-1"

    def __init__(self) -> None:
        self.asked: dict[str, Any] = {}

    def logs(self, **kwargs: Any) -> bytes:
        self.asked = kwargs
        return b"".join(b"2026-01-01T00:00:%02dZ line %d\n" % (i % 60, i) for i in range(kwargs["tail"]))


class FakeDocker:
    def __init__(self, container: FakeContainer | None) -> None:
        self.container, self.filters = container, None
        self.containers = self

    def list(self, all: bool, filters: dict[str, Any]) -> list[FakeContainer]:
        self.filters = filters
        return [self.container] if self.container else []

    def close(self) -> None:
        pass


def test_stack_logs_caps_lines_and_finds_the_service(ctx: Context) -> None:
    container = FakeContainer()
    client = FakeDocker(container)
    ctx.docker = lambda: client  # type: ignore[assignment,return-value]
    result = op(ctx, "stack_logs", service="postfix", lines=100000)
    assert container.asked == {"tail": 500, "timestamps": True}
    assert len(result["lines"]) == 500 and result["lines"][-1].endswith("line 499")
    assert "com.docker.compose.service=postfix" in client.filters["label"]
    ctx.docker = lambda: FakeDocker(None)  # type: ignore[assignment,return-value]
    with pytest.raises(OpError) as err:
        op(ctx, "stack_logs", service="dovecot")
    assert err.value.code == "not_found" and "deploy" in str(err.value)


# -- test message ---------------------------------------------------------------------------

def hosted(ctx: Context, *aliases: str) -> Context:
    """`aliases` receive here (tests.support.settings.receives); mail goes to an SmtpSink
    at the stack's smtp port (send_to_smtp_port) instead of the postfix container."""
    receives(ctx.state_dir, *aliases)
    return dataclasses.replace(ctx, send_mail=send_to_smtp_port)


def test_send_test_message_hands_it_to_postfix(ctx: Context) -> None:
    ctx = hosted(ctx, "postmaster@example.test")
    with serving(SmtpSink()) as sink:
        write_settings(ctx.state_dir, stack_ports=json.dumps({"smtp": sink.port}))
        result = op(ctx, "send_test_message", to="PostMaster@Example.test")
    assert result["sent"] is True and result["to"] == "postmaster@example.test"
    ((sent),) = sink.messages
    assert sent["from"] == "postmaster@example.test" and sent["to"] == ["postmaster@example.test"]
    message = sent["message"]
    assert message["From"] == "Mailstead <postmaster@example.test>" and message["To"] == "postmaster@example.test"
    assert message["Subject"] == "Mailstead test message" and message["Message-ID"] == result["message_id"]


def test_send_test_message_refuses_an_address_that_receives_nothing_here(ctx: Context) -> None:
    ctx = hosted(ctx, "postmaster@example.test")
    with serving(SmtpSink()) as sink:
        write_settings(ctx.state_dir, stack_ports=json.dumps({"smtp": sink.port}))
        with pytest.raises(OpError) as err:
            op(ctx, "send_test_message", to="nobody@example.test")
    assert err.value.code == "invalid" and err.value.field == "to" and "neither a mailbox nor an alias" in str(err.value)
    assert sink.messages == []


@pytest.mark.parametrize("to", ["", "not an address", "a@b@c", "x@elsewhere.example", "\x00@example.test",
                                "a" * 400 + "@example.test", "'; DROP TABLE x; --@example.test"])
def test_send_test_message_refuses_bad_recipients_on_the_field(ctx: Context, to: str) -> None:
    with pytest.raises(OpError) as err:
        op(ctx, "send_test_message", to=to)
    assert err.value.code == "invalid" and str(err.value).startswith("to:")


def test_send_test_message_without_the_stack_says_so(ctx: Context) -> None:
    """No ctx.send_mail: the message goes to the postfix container, and docker is not there."""
    receives(ctx.state_dir, "postmaster@example.test")
    with pytest.raises(OpError) as err:
        op(ctx, "send_test_message", to="postmaster@example.test")
    assert err.value.code == "smtp" and "no docker socket" in str(err.value)
    assert "stack deployed" in str(err.value)


def test_operations_through_a_real_agent(start_agent: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_settings(state, domain="example.test", stack_deployed="1")
    (state / "setup-token").write_text("tok\n")
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state)})
    client = AgentClient(str(agent.socket))
    assert client.call("system_status")["disk"]["path"] == str(state)
    with pytest.raises(AgentError) as err:
        client.call("stack_logs", service="postfix", lines=10)
    assert err.value.code == "docker_unavailable"
    assert client.call("setup_finish")["token_deleted"] is True
    assert not (state / "setup-token").exists()
    assert "battery" not in agent.log_text()


def test_no_plaintext_password_is_ever_written(tmp_path: Path) -> None:
    """The Admin step's password waits for Deploy as its hash and derived key password only;
    the mailbox made from them opens with the password (the same hash, the same key password)."""
    import pyotp

    from portal.agent.registry import load_all
    from portal.stack.accounts import Accounts, verify_password
    from portal.stack.dovecot_keys import key_password

    load_all()
    state = tmp_path / "state"
    write_settings(state, domain="example.test")
    ctx = Context(state_dir=state)
    password = "correct horse battery staple"
    totp = pyotp.TOTP(REGISTRY["admin_totp_begin"].run(ctx, "postmaster@example.test")["secret"])
    REGISTRY["admin_setup"].run(ctx, "postmaster@example.test", password, totp.now())
    found = [p for p in state.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
    assert found == []

    made: list[str] = []

    class Keys:
        def generate_key(self, address: str, derived: str) -> None:
            made.append(derived)

    ((address, prepared),) = setupops.take_pending(state)
    accounts = Accounts(state / "accounts" / "accounts.db")
    accounts.create_mailbox(address, prepared, keys=Keys())
    import sqlite3

    with sqlite3.connect(state / "accounts" / "accounts.db") as conn:
        stored, kdf, salt = conn.execute("SELECT password, key_kdf, key_salt FROM mailboxes WHERE address = ?",
                                         (address,)).fetchone()
    assert verify_password(stored, password) and (kdf, salt) == (prepared.kdf.version, prepared.kdf.salt)
    assert made == [key_password(password, prepared.kdf)]
