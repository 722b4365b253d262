"""The first-boot wizard's "Restore from a backup" with the real backup service and
restic (/usr/bin/restic) against a local folder (and an sshd for SFTP).

An "old" appliance (settings, the administrator made by the agent's own admin
operations, accounts, DKIM keys, a certificate, mail in the volumes) is backed up
by portal.backup.service. A fresh state folder with only a setup token gets a real
agent (portal.agent.server.AgentServer on a unix socket, in a thread: its Context
takes the stack's volumes as folders and records the stack's start, so no docker
engine is needed) and the portal (Flask test client, over "HTTPS"), and the tests
walk the wizard's restore path as the owner would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient

from portal.web import create_app
from portal.admin.privileged import take_pending_mailboxes
from portal.agent import registry as ops
from portal.agent.client import AgentClient, AgentError
from portal.agent.server import AgentServer
from portal.backup import config as cfg
from portal.backup.contents import FolderVolumes
from portal.backup.service import Env, backup, configure
from portal.stack.accounts import Accounts, NoKeys
from tests.conftest import OS_PRETTY_NAME, TEST_TOKEN, free_port
from tests.unit.conftest import https_client, unlock
from tests.unit.test_a11y import problems
from tests.unit.test_fuzz_forms import csrf_of, write_settings

from .backup_targets import Sshd

RESTIC = "/usr/bin/restic"
VERSION = "0.1.0"
DOMAIN = "example.org"
ADMIN = f"postmaster@{DOMAIN}"
PASSWORD = "old appliance's admin password"
SETTINGS = {"domain": DOMAIN, "mail_host": f"mail.{DOMAIN}", "public_ipv4": "198.51.100.77",
            "public_ipv6": "2001:db8::77", "dns_resolvers": "192.0.2.53", "stack_project": "mstest-i6r-none",
            "dmarc_policy": "reject"}


# -- the old appliance and its backups -----------------------------------------------------------

class RecordingStack:
    """Stands for the mail stack: a restore stops and starts it (there is no docker here)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop(self, project: str) -> None:
        self.calls.append(f"stop {project}")

    def start(self, progress: Any) -> dict[str, Any]:
        progress("deploy", "(test) the stack would start here")
        self.calls.append("start")
        return {"services": {"postfix": "healthy"}}


def call_in(state: Path) -> Any:
    """The agent's operations called directly on `state` (for making the old appliance)."""
    ctx = ops.Context(state_dir=state)
    return lambda op, **args: ops.REGISTRY[op].run_checked(ctx, args)


def tree(root: Path) -> dict[str, str]:
    """Every file (SHA-256, mode) and symlink (target) under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(stat.S_IMODE(p.lstat().st_mode))}"
    return out


def table(path: Path, name: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as c:
        return sorted(map(tuple, c.execute(f"SELECT * FROM {name}")))  # noqa: S608 - fixed names


@dataclass
class Old:
    state: Path
    vols: Path
    repo: Path
    password: str
    totp: pyotp.TOTP
    snapshots: dict[str, str] = field(default_factory=dict)  # version -> snapshot id


def make_old_appliance(root: Path) -> Old:
    state, vols, repo = root / "old-state", root / "old-vols", root / "repo"
    state.mkdir(parents=True)
    write_settings(state, SETTINGS, done_before=40)  # domain .. certs done; the admin by its own operation:
    call = call_in(state)
    totp = pyotp.TOTP(call("admin_totp_begin", address=ADMIN)["secret"])
    call("admin_setup", address=ADMIN, password=PASSWORD, totp_code=totp.now())
    take_pending_mailboxes(state)  # made into a mailbox at Deploy
    write_settings(state, {"admin_address": ADMIN, "stack_deployed": "1", "setup_complete": "1"}, done_before=99)
    accounts = Accounts(state / "accounts" / "accounts.db")
    accounts.add_domain(DOMAIN)
    accounts.create_mailbox(ADMIN, PASSWORD, 0, keys=NoKeys())
    accounts.create_mailbox(f"alice@{DOMAIN}", "alice's password 1", 100, keys=NoKeys())
    accounts.add_alias(f"info@{DOMAIN}", ADMIN)
    dkim = state / "secrets" / "dkim"
    dkim.mkdir(parents=True)
    (dkim / "mailstead-rsa.key").write_text("-----BEGIN PRIVATE KEY-----\nold rsa\n")
    (dkim / "mailstead-ed.key").write_text("-----BEGIN PRIVATE KEY-----\nold ed25519\n")
    (state / "tls" / "archive" / "1").mkdir(parents=True)
    (state / "tls" / "archive" / "1" / "fullchain.pem").write_text("old certificate")
    os.symlink("archive/1", state / "tls" / "live")
    (state / "stack").mkdir()
    (state / "stack" / "compose.yaml").write_text("services: {}\n")
    for i, box in enumerate(["postmaster", "alice", "alice"]):
        d = vols / "mail" / DOMAIN / box / "mail" / "mailboxes" / "INBOX" / "dbox-Mails"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"u.{i + 1}").write_bytes(os.urandom(300 + i))
    (vols / "dav" / "collection-root" / "alice").mkdir(parents=True)
    (vols / "dav" / "collection-root" / "alice" / "cal.ics").write_text("BEGIN:VCALENDAR\n")

    env = Env(state, VERSION, restic_bin=RESTIC, volumes=FolderVolumes(vols), timeout=120)
    made = configure(env, cfg.validate("local", path=str(repo)))
    password = next(x.split(":", 1)[1].strip() for x in made["recovery_sheet"].splitlines()
                    if x.startswith("Password:"))
    old = Old(state, vols, repo, password, totp)
    old.snapshots[VERSION] = backup(env)["snapshot"]
    # A later snapshot by a newer Mailstead (say the old appliance was upgraded): this one refuses it.
    newer = Env(state, "9.0.0", restic_bin=RESTIC, volumes=FolderVolumes(vols), timeout=120)
    time.sleep(1.1)  # a later time stamp: listed first
    old.snapshots["9.0.0"] = backup(newer)["snapshot"]
    return old


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory) -> Old:
    return make_old_appliance(tmp_path_factory.mktemp("old"))


# -- the fresh appliance: agent + portal ---------------------------------------------------------

@dataclass
class Fresh:
    state: Path
    vols: Path
    stack: RecordingStack
    socket: Path
    app: Flask
    client: FlaskClient

    def agent(self, op: str, **args: Any) -> dict[str, Any]:
        return AgentClient(str(self.socket), timeout=30).call(op, **args)

    def stored(self) -> dict[str, Any]:
        """What a refused attempt must leave alone."""
        out: dict[str, Any] = {"token": (self.state / "setup-token").exists(), "vols": tree(self.vols)}
        if (self.state / "state.db").exists():
            out["settings"] = table(self.state / "state.db", "settings")
            out["progress"] = table(self.state / "state.db", "wizard_progress")
        secrets = self.state / "secrets"
        out["secrets"] = sorted(p.name for p in secrets.iterdir()) if secrets.exists() else []
        for name in ("accounts", "tls", "stack"):
            out[name] = tree(self.state / name) if (self.state / name).exists() else {}
        return out


@contextlib.contextmanager
def fresh_appliance_agent(root: Path) -> Iterator[tuple[Path, Path, RecordingStack, Path]]:
    """A freshly flashed appliance's state folder (only the setup token) and its agent:
    the real server and operations on a unix socket, in a thread, with the stack's
    volumes as folders and a recorded stack. Yields (state, vols, stack, socket)."""
    state, vols = root / "state", root / "vols"
    state.mkdir()
    vols.mkdir()
    token = state / "setup-token"
    token.write_text(TEST_TOKEN + "\n")
    token.chmod(0o440)
    os_release = root / "os-release"
    os_release.write_text(f'NAME="Mailstead Test"\nPRETTY_NAME="{OS_PRETTY_NAME}"\n')
    ctx = ops.Context(docker=ops.docker_factory(f"unix://{root}/no-docker.sock"), os_release=os_release,
                      state_dir=state, images_dir=root / "no-images", nginx_dir=root / "nginx",
                      www_dir=root / "www", acme_dir=root / "acme", reload_nginx=False)
    stack = RecordingStack()
    ctx.backup_volumes = FolderVolumes(vols)  # type: ignore[attr-defined]
    ctx.backup_stack = stack  # type: ignore[attr-defined]
    ctx.restic_bin = RESTIC  # type: ignore[attr-defined]
    sock = root / "agent.sock"
    server = AgentServer(str(sock), ctx, {os.getuid()}, conn_timeout=30)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, vols, stack, sock
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Fresh]:
    with fresh_appliance_agent(tmp_path) as (state, vols, stack, sock):
        app = create_app({"TESTING": True, "WEB_DIR": str(tmp_path / "web"), "TEST_STATE_DIR": str(state), "RUN_DIR": str(tmp_path / "run"),
                          "AGENT_SOCKET": str(sock), "TOKEN_RATE_LIMIT": "1000 per minute",
                          "LOGIN_RATE_LIMIT": "1000 per minute"})
        yield Fresh(state, vols, stack, sock, app, https_client(app))


def target_form(page: str, **fields: str) -> dict[str, str]:
    return {"csrf_token": csrf_of(page) or "", "target": "local", **fields}


def open_backups(f: Fresh, **fields: str) -> Any:
    page = f.client.get("/setup/restore")
    assert page.status_code == 200, page.text[:2000]
    return f.client.post("/setup/restore", data=target_form(page.text, **fields))


def error_text(page: str, field_id: str) -> str:
    match = re.search(rf'id="{field_id}-error">(.*?)</p>', page, re.S)
    assert match, f"no error on {field_id}:\n{page[:4000]}"
    return " ".join(match.group(1).split())


def run_restore(f: Fresh, snapshot: str) -> dict[str, Any]:
    """Choose `snapshot`, confirm, and follow the job as static/jobs.js does; returns the job."""
    page = f.client.get("/setup/restore/snapshots")
    assert page.status_code == 200, page.text[:3000]
    chosen = f.client.post("/setup/restore/snapshots", data={"csrf_token": csrf_of(page.text), "snapshot": snapshot})
    assert chosen.status_code == 303 and chosen.headers["Location"] == "/setup/restore/confirm"
    confirm = f.client.get("/setup/restore/confirm")
    assert confirm.status_code == 200 and snapshot in confirm.text
    assert problems(confirm.text) == []
    started = f.client.post("/setup/restore/start", data={"csrf_token": csrf_of(confirm.text)})
    assert started.status_code == 303 and started.headers["Location"] == "/setup/restore/progress", started.text
    progress = f.client.get("/setup/restore/progress")
    assert progress.status_code in (200, 303)
    if progress.status_code == 200:
        assert problems(progress.text) == []
        assert 'data-status-url="/setup/restore/status"' in progress.text
    deadline = time.monotonic() + 120
    while True:
        status = f.client.get("/setup/restore/status")
        assert status.status_code == 200, status.text  # also once the restored state says setup is complete
        job = status.get_json()["job"]
        if job["state"] != "running":
            return job
        assert time.monotonic() < deadline, job["events"][-3:]
        time.sleep(0.3)


# -- the tests ----------------------------------------------------------------------------------

def test_the_first_boot_wizard_restore_works_on_a_fresh_state_folder(old: Old, fresh: Fresh) -> None:
    f = fresh
    assert unlock(f.client).status_code == 302
    first = f.client.get("/setup/domain")  # the first page after the token offers the choice
    assert 'id="choose-restore"' in first.text and 'href="/setup/restore"' in first.text
    assert "Set up a new appliance" in first.text

    opened = open_backups(f, path=str(old.repo), password=old.password)
    assert opened.status_code == 303 and opened.headers["Location"] == "/setup/restore/snapshots", opened.text[:3000]

    listing = f.client.get("/setup/restore/snapshots")
    assert listing.status_code == 200 and problems(listing.text) == []
    newest, older = old.snapshots["9.0.0"], old.snapshots[VERSION]
    assert listing.text.index(newest) < listing.text.index(older)  # newest first
    assert re.search(rf'value="{newest}"[^>]*checked|checked[^>]*value="{newest}"', listing.text)  # the default
    assert f"mail.{DOMAIN}" in listing.text and "Mailstead 9.0.0" in listing.text and f"Mailstead {VERSION}" in listing.text
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", listing.text)
    assert "Made by a newer Mailstead (9.0.0)" in listing.text

    # The newest is from a newer Mailstead: refused by the backend, said on the page, nothing changed.
    before = f.stored()
    job = run_restore(f, newest)
    assert job["state"] == "failed", job
    assert "made by Mailstead 9.0.0, newer than this appliance" in job["error"]
    outcome = f.client.get("/setup/restore/done")
    assert outcome.status_code == 200 and problems(outcome.text) == []
    assert "made by Mailstead 9.0.0, newer than this appliance" in outcome.text
    assert "upgrade this appliance" in outcome.text and 'id="restore-retry"' in outcome.text
    assert f.stored() == before and f.stack.calls == []

    # The older one comes back whole.
    job = run_restore(f, older)
    assert job["state"] == "done", job
    assert job["result"]["token_deleted"] is True and job["result"]["setup_complete"] is True
    assert f.stack.calls == ["start"]  # a fresh appliance: nothing to stop; the restored stack is started

    assert not (f.state / "setup-token").exists()
    # every setting but the machine's own (stack_project: this one has none set)
    assert table(f.state / "state.db", "settings") == [row for row in table(old.state / "state.db", "settings")
                                                       if row[0] != "stack_project"]
    assert table(f.state / "state.db", "wizard_progress") == table(old.state / "state.db", "wizard_progress")
    for name in ("admin.json", "dkim/mailstead-rsa.key", "dkim/mailstead-ed.key"):
        assert (f.state / "secrets" / name).read_bytes() == (old.state / "secrets" / name).read_bytes(), name
    for t in ("domains", "mailboxes", "aliases"):
        assert table(f.state / "accounts" / "accounts.db", t) == table(old.state / "accounts" / "accounts.db", t)
    assert tree(f.state / "tls") == tree(old.state / "tls")
    assert not (f.state / "stack").exists()  # rendered anew from the restored settings when the stack deploys
    assert tree(f.vols) == tree(old.vols)
    assert (f.state / "secrets" / "backup-password").read_text().strip() == old.password  # its own target kept

    done = f.client.get("/setup/restore/done")  # where static/jobs.js goes
    assert done.status_code == 200, done.text[:3000]
    assert problems(done.text) == []
    text = " ".join(done.text.split())
    assert "Your appliance is restored" in text and older in text
    assert f'id="restored-domain">{DOMAIN}<' in text and f'id="restored-admin">{ADMIN}<' in text
    assert 'id="restored-accounts">2 mailboxes, 1 alias<' in text
    assert 'id="restored-mail">3 messages in 2 mailboxes<' in text and 'id="restored-dkim">2<' in text
    found = f.agent("net_addresses")
    # The restored public addresses are documentation ones: never this machine's, so DNS must be updated.
    assert "198.51.100.77" in text and "2001:db8::77" in text
    if found["ipv4"]:
        assert "differs from the restored setting public_ipv4 (198.51.100.77)" in text and "Update DNS" in text
    else:
        assert "If its public address is not 198.51.100.77, update the DNS records" in text
    assert "the setup token is deleted" in text and 'id="restore-sign-in"' in text

    # The wizard is gone: the restore path is refused, the portal is the dashboard.
    with pytest.raises(AgentError) as err:
        f.agent("setup_restore", snapshot=older)
    assert err.value.code == "forbidden" and "dashboard" in str(err.value)
    for path in ("/setup/restore", "/setup/restore/snapshots", "/setup/domain", "/"):
        response = f.client.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/login"), path
    assert f.client.get("/setup/restore/done").status_code == 302  # that session is gone now
    other = https_client(f.app)
    assert "Setup is finished" in other.get("/setup/token").text
    assert other.get("/setup/restore").headers["Location"].startswith("/login")

    # Sign-in with the OLD administrator's password and authenticator.
    login = other.get("/login")
    wrong = other.post("/login", data={"csrf_token": csrf_of(login.text), "address": ADMIN,
                                       "password": "a new password?", "code": old.totp.at(time.time() + 30)})
    assert wrong.status_code == 403
    signed = other.post("/login", data={"csrf_token": csrf_of(wrong.text), "address": ADMIN, "password": PASSWORD,
                                        "code": old.totp.at(time.time() + 30)})  # (the old one spent the current)
    assert signed.status_code == 303, signed.text[:2000]
    assert other.get(signed.headers["Location"]).status_code == 200
    for path in ("/setup/restore", "/setup/domain"):
        response = other.get(path)
        assert response.status_code == 302 and response.headers["Location"].startswith("/admin"), path


def test_a_wrong_password_is_named_on_its_field_and_changes_nothing(old: Old, fresh: Fresh) -> None:
    f = fresh
    unlock(f.client)
    before = f.stored()
    response = open_backups(f, path=str(old.repo), password="abcd-efgh-jkmn-pqrs-tuvw-xyz2-3456-789a")
    assert response.status_code == 422
    assert "password from the recovery sheet" in error_text(response.text, "password")
    assert 'aria-invalid="true"' in response.text and problems(response.text) == []
    assert f.stored() == before
    assert not (f.state / "secrets" / "backup.json").exists()
    assert f.client.get("/setup/restore/snapshots").headers["Location"] == "/setup/restore"  # not opened
    with pytest.raises(AgentError):
        f.agent("backup_list")
    # an empty one is said before the agent is asked
    empty = open_backups(f, path=str(old.repo), password="  ")
    assert empty.status_code == 422 and "Enter the password" in error_text(empty.text, "password")


def test_a_missing_or_unreachable_target_is_said_clearly(old: Old, fresh: Fresh, tmp_path: Path) -> None:
    f = fresh
    unlock(f.client)
    before = f.stored()
    missing = tmp_path / "unplugged-disk" / "mailstead"
    response = open_backups(f, path=str(missing), password=old.password)
    assert response.status_code == 422
    assert "There is no backup (restic repository) there" in error_text(response.text, "path")
    assert "is the backup disk mounted?" in error_text(response.text, "path")
    assert not missing.exists()  # an existing repository's folder is never made

    relative = open_backups(f, path="backups", password=old.password)
    assert relative.status_code == 422 and "absolute" in error_text(relative.text, "path")

    closed = free_port()  # nothing listens there
    response = open_backups(f, target="sftp", host="127.0.0.1", port=str(closed), user="backup",
                            path="/srv/backup", password=old.password)
    assert response.status_code == 422
    message = error_text(response.text, "host")
    assert f"Cannot reach the SFTP server 127.0.0.1 port {closed}" in message and "reachable" in message
    assert 'id="restore-ssh-key">ssh-ed25519 ' in response.text  # to add to authorized_keys meanwhile
    assert problems(response.text) == []
    after = f.stored()
    assert after.pop("secrets") == ["backup-ssh"] and before.pop("secrets") == []  # only the appliance's SSH key
    assert after == before


def test_an_sftp_target_shows_the_key_to_authorize_and_then_opens(old: Old, fresh: Fresh, tmp_path: Path) -> None:
    f = fresh
    sshd = Sshd(tmp_path / "sshd").start()
    try:
        unlock(f.client)
        fields = {"target": "sftp", "host": "127.0.0.1", "port": str(sshd.port), "user": sshd.user,
                  "path": str(old.repo), "password": old.password}
        refused = open_backups(f, **fields)
        assert refused.status_code == 422
        assert "authorized_keys" in error_text(refused.text, "key")
        shown = re.search(r'id="restore-ssh-key">([^<]+)</pre>', refused.text)
        assert shown and shown.group(1).startswith("ssh-ed25519 ")
        with open(sshd.authorized, "a") as keys:  # the owner adds it on the server
            keys.write(shown.group(1).strip() + "\n")
        opened = open_backups(f, **fields)
        assert opened.status_code == 303, opened.text[:3000]
        listing = f.client.get("/setup/restore/snapshots")
        assert old.snapshots[VERSION] in listing.text and old.snapshots["9.0.0"] in listing.text
        assert json.loads((f.state / "secrets" / "backup.json").read_text())["target"]["kind"] == "sftp"
    finally:
        sshd.stop()
