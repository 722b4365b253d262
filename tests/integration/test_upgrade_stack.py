"""Stack upgrades against the real mail stack on the host's docker engine
(compose project mstest-i6u, ports 34000+), through the agent's upgrade_run
operation and its background job:

- a backup that fails before the upgrade stops it with nothing changed;
- a "newer version" whose dovecot image is broken (the appliance's image tars
  under a VERSION file saying 0.1.1, with doveconf in the dovecot tar replaced
  by a script that fails) is loaded, backed up before, deployed, found
  crash-looping, and rolled back: the old image IDs run again and IMAP reads
  the mail stored before;
- a good newer version (the appliance's own image tars under a VERSION file
  saying 0.1.2, the base tar with one file more, so every image ID is new)
  becomes the pinned version, and the mail is still there;
- what did not change is not loaded again: the broken version's images other
  than dovecot are the running ones, tagged for it (their tars hold the same);
- a new stack that deploys but fails the health check (one fault injected
  through the checks' CheckEnv: its IMAPS port reads as closed) is rolled back
  by the upgrade itself, from the kept config and image IDs.

The images come from the harness's ensure_images (the image build's output).
Each newer version is an images folder like the one a newer appliance version
ships in /usr/lib/mailstead/images (the context's images_dir, for that upgrade).
Every image this module tags (mailstead-*:0.1.1 and :0.1.2) is removed at the end."""

from __future__ import annotations

import contextlib
import imaplib
import io
import json
import os
import shutil
import ssl
import subprocess
import tarfile
import time
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import docker
import pytest

from portal.agent import jobs
from portal.agent.registry import REGISTRY, Context, OpError, docker_factory, load_all
from portal.backup import config as backup_cfg
from portal.backup.privileged import env_for
from portal.backup.service import configure, snapshots
from portal.checks.env import CheckEnv
from tests.support.statedb import write_settings
from portal.stack import pins, upgrade
from portal.stack.privileged import deploy_stack, mailbox_create
from portal.stack.deploy import DeployError, service_states, wait_healthy
from portal.stack.settings import SERVICES
from tests.conftest import free_port, retry

from .stackharness import DOMAIN, HOSTNAME, IMAGES_DIR, SHARED_DKIM, VERSION, ensure_images, make_settings

load_all()
PROJECT, PORT_BASE = "mstest-i6u", 34000
USER, PASSWORD = f"alice@{DOMAIN}", "upgrade-test-password-1"
BROKEN, GOOD = "0.1.1", "0.1.2"
NAMES = ("base", *SERVICES)


def compose_down(volumes: bool = True) -> None:
    subprocess.run(["docker", "compose", "-p", PROJECT, "down", "--remove-orphans", *(["--volumes"] if volumes else [])],
                   capture_output=True, timeout=300, check=False)


def remove_test_images() -> None:
    """Our tags only (never mailstead-*:0.1.0): re-tagged images just lose the tag."""
    refs = [f"mailstead-{n}:{v}" for v in (BROKEN, GOOD) for n in NAMES]
    subprocess.run(["docker", "rmi", *refs], capture_output=True, timeout=300, check=False)


def sh(*cmd: str, input: str | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=900, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def images_folder(folder: Path, version: str) -> Path:
    """The appliance's own image tars (hard links: an upgrade follows no symlink; copies
    across file systems) with a VERSION file: a newer appliance version's images."""
    folder.mkdir(mode=0o700)
    for name in NAMES:
        try:
            os.link(IMAGES_DIR / f"mailstead-{name}.tar", folder / f"mailstead-{name}.tar")
        except OSError:
            shutil.copyfile(IMAGES_DIR / f"mailstead-{name}.tar", folder / f"mailstead-{name}.tar")
    (folder / "VERSION").write_text(f"{version}\n")
    return folder


def rewrite_tar(tar: Path, source: Path, change: Any) -> None:
    """`tar` (a hard link to the shipped one) replaced by a copy of `source` whose
    members pass through `change(member, data)` -> [(member, data), ...]."""
    tar.unlink()
    with tarfile.open(source) as src, tarfile.open(tar, "w") as out:
        for member in src:
            for m, data in change(member, src.extractfile(member) if member.isfile() else None):
                out.addfile(m, data)


def good_images(folder: Path) -> Path:
    """0.1.2: the shipped tars, the base's with one file more (new contents, so every
    image is loaded anew, as for an update whose packages changed)."""
    images_folder(folder, GOOD)
    note = f"mailstead {GOOD}, made by the upgrade test\n".encode()

    def add_note(member: tarfile.TarInfo, data: Any) -> list[tuple[tarfile.TarInfo, Any]]:
        if member.name.lstrip("./") != "etc/passwd":
            return [(member, data)]
        extra = tarfile.TarInfo("./etc/mailstead-upgrade-test")
        extra.size, extra.mode = len(note), 0o644
        return [(member, data), (extra, io.BytesIO(note))]

    rewrite_tar(folder / "mailstead-base.tar", IMAGES_DIR / "mailstead-base.tar", add_note)
    with tarfile.open(folder / "mailstead-base.tar") as tar:
        assert "./etc/mailstead-upgrade-test" in tar.getnames(), "etc/passwd is not in the base tar"
    return folder


def broken_images(folder: Path) -> Path:
    """0.1.1: the dovecot tar's doveconf replaced by a script that fails, so the
    entry point stops at once and the container crash-loops; the others as shipped."""
    images_folder(folder, BROKEN)
    failing = b"#!/bin/sh\necho 'doveconf: broken on purpose by the test' >&2\nexit 1\n"
    replaced = []

    def break_doveconf(member: tarfile.TarInfo, data: Any) -> list[tuple[tarfile.TarInfo, Any]]:
        if member.isfile() and member.name.lstrip("./") == "usr/bin/doveconf":
            member.size = len(failing)
            replaced.append(member.name)
            return [(member, io.BytesIO(failing))]
        return [(member, data)]

    rewrite_tar(folder / "mailstead-dovecot.tar", IMAGES_DIR / "mailstead-dovecot.tar", break_doveconf)
    assert len(replaced) == 1, "usr/bin/doveconf is not in the dovecot tar"
    return folder


def imap_messages(state: Path) -> list[bytes]:
    tls = ssl.create_default_context(cafile=str(state / "tls" / "cert.pem"))
    tls.check_hostname = False
    with imaplib.IMAP4_SSL("127.0.0.1", PORT_BASE + 993, ssl_context=tls, timeout=30) as conn:
        conn.login(USER, PASSWORD)
        conn.select("INBOX", readonly=True)
        _typ, data = conn.search(None, "ALL")
        out = []
        for num in data[0].split():
            _typ, msg = conn.fetch(num, "(BODY.PEEK[])")
            out.append(msg[0][1])
        return out


class Box:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        s = make_settings(self.state, PROJECT, PORT_BASE)  # makes the certificate under state/tls
        write_settings(self.state / "state.db", {
            "domain": DOMAIN, "mail_host": HOSTNAME, "publish_addresses": "127.0.0.1",
            "stack_ports": json.dumps(s.ports), "stack_project": PROJECT, "dns_servers": ",".join(s.dns_servers),
            "stack_subnet": s.subnet,
            "tls_cert": str(s.tls_cert), "tls_key": str(s.tls_key)})
        shutil.copytree(SHARED_DKIM, s.dkim_dir, dirs_exist_ok=True)
        for d in ("nginx", "www"):
            (tmp / d).mkdir(exist_ok=True)
        self.ctx = Context(docker=docker_factory("unix:///var/run/docker.sock", timeout=120), state_dir=self.state,
                           images_dir=IMAGES_DIR, nginx_dir=tmp / "nginx", www_dir=tmp / "www", reload_nginx=False)
        self.ctx.upgrade_health_wait = 60  # type: ignore[attr-defined]
        self.client = docker.from_env(timeout=120)
        self.sent: list[bytes] = []

    @contextlib.contextmanager
    def shipping(self, images: Path | None) -> Any:
        """The appliance ships `images` (a newer version's /usr/lib/mailstead/images) meanwhile."""
        self.ctx.images_dir = images or IMAGES_DIR
        try:
            yield
        finally:
            self.ctx.images_dir = IMAGES_DIR

    def upgrade(self, images: Path | None = None, **args: Any) -> dict[str, Any]:
        """upgrade_run as root calls it, the appliance shipping `images`; the finished job."""
        with self.shipping(images):
            job = REGISTRY["upgrade_run"].invoke(self.ctx, {"timeout": 300, **args})
            assert job["kind"] == "upgrade_run"
            deadline = time.monotonic() + 1200
            while job["state"] == "running" and time.monotonic() < deadline:
                time.sleep(1)
                job = jobs.status(self.ctx, job["id"])
        assert job["state"] != "running", "the upgrade job did not end within 20 minutes"
        return job

    def running(self) -> dict[str, str]:
        return pins.running_images(self.client, PROJECT)

    def container_ids(self) -> dict[str, str]:
        return {c.labels["com.docker.compose.service"]: c.id
                for c in self.client.containers.list(all=True, filters={"label": f"com.docker.compose.project={PROJECT}"})}

    def all_healthy(self) -> None:
        bad = {s: f"{st.status}/{st.health}" for s, st in service_states(self.client, PROJECT).items() if not st.ok}
        assert not bad, f"not healthy: {bad}"

    def configure_backup(self, repo: Path) -> None:
        configure(env_for(self.ctx), backup_cfg.validate("local", path=str(repo)))


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory):
    compose_down()  # an interrupted earlier run
    remove_test_images()
    tmp = tmp_path_factory.mktemp("upgrade")
    b = Box(tmp)
    try:
        ensure_images(b.client)
        deploy_stack(b.ctx, lambda *_: None, timeout=600)
        mailbox_create.run(b.ctx, address=USER, password=PASSWORD)
        tls = ssl.create_default_context(cafile=str(b.state / "tls" / "cert.pem"))
        tls.check_hostname = False
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "someone@example.net", USER, "kept across upgrades"
        msg.set_content("stored before the upgrade\n" * 10)
        with imaplib.IMAP4_SSL("127.0.0.1", PORT_BASE + 993, ssl_context=tls, timeout=30) as conn:
            conn.login(USER, PASSWORD)
            conn.append("INBOX", "", imaplib.Time2Internaldate(time.time()), msg.as_bytes())
        b.sent = imap_messages(b.state)
        assert len(b.sent) == 1
        b.broken = broken_images(tmp / "broken-images")  # type: ignore[attr-defined]
        yield b
    finally:
        compose_down()
        remove_test_images()
        b.client.close()


def test_a_failed_backup_stops_the_upgrade_with_nothing_changed(box: Box) -> None:
    before = pins.read_pin(box.state)
    assert before is not None and before.version == VERSION and box.running() == before.images
    containers = box.container_ids()
    compose = (box.state / "stack" / "compose.yaml").read_bytes()
    repo = box.tmp / "repo-gone"
    box.configure_backup(repo)
    shutil.rmtree(repo)  # the target is gone: restic cannot open the repository

    job = box.upgrade(box.broken)
    assert job["state"] == "failed" and job["code"] == "backup_failed", job
    assert job["error"].startswith("the backup before the upgrade failed: ") and \
        f"Nothing was changed: the stack still runs {VERSION}" in job["error"]
    steps = [e["step"] for e in job["events"]]
    assert "images" in steps and "backup" in steps and "deploy" not in steps and "rollback" not in steps
    assert pins.read_pin(box.state) == before
    assert box.container_ids() == containers  # not even recreated
    assert (box.state / "stack" / "compose.yaml").read_bytes() == compose
    last = upgrade.read_state(box.state)["last_upgrade"]
    assert (last["ok"], last["changed"], last["rolled_back"], last["to"]) == (False, False, False, BROKEN)
    assert imap_messages(box.state) == box.sent


def test_a_broken_new_version_is_rolled_back_and_the_old_stack_serves_mail(box: Box) -> None:
    before = pins.read_pin(box.state)
    assert before is not None and box.running() == before.images
    box.configure_backup(box.tmp / "repo")
    remove_test_images()  # as an earlier test may have loaded them: this one loads them afresh

    job = box.upgrade(box.broken)
    assert job["state"] == "failed" and job["code"] == "upgrade_failed", job
    error = job["error"]
    assert error.startswith(f"the upgrade from {VERSION} to {BROKEN} failed: ") and "dovecot" in error
    assert error.endswith(f"Rolled back: {VERSION} (its images and config) runs again and passed the health check")
    steps = [e["step"] for e in job["events"]]
    for step in ("images", "backup", "record", "deploy", "rollback"):
        assert step in steps, (step, steps)
    assert steps.index("backup") < steps.index("deploy") < steps.index("rollback")

    # The new dovecot really ran (and failed); the old images run again, healthy.
    assert box.client.images.get(f"mailstead-dovecot:{BROKEN}").id != before.images["dovecot"]
    # Only dovecot's tar is new: the others hold what runs already, so those images were
    # tagged for BROKEN, not loaded again.
    for service in SERVICES:
        if service != "dovecot":
            assert box.client.images.get(f"mailstead-{service}:{BROKEN}").id == before.images[service], service
    said: dict[str, list[str]] = {}
    for event in job["events"]:
        said.setdefault(event["step"], []).append(event["detail"])
    assert "already loaded (the same contents)" in said["postfix"], said["postfix"]
    assert any(d.startswith("loaded in") for d in said["dovecot"]), said["dovecot"]
    assert box.running() == before.images
    box.all_healthy()
    assert pins.read_pin(box.state) == before
    assert (box.state / "stack" / "compose.yaml").read_text().startswith(f"# Mailstead mail stack {VERSION}:")
    kept = json.loads((upgrade.previous_dir(box.state) / "pin.json").read_text())
    assert kept["version"] == VERSION and kept["images"] == before.images
    last = upgrade.read_state(box.state)["last_upgrade"]
    assert (last["ok"], last["changed"], last["rolled_back"], last["rollback_ok"]) == (False, True, True, True)
    assert last["backup"].startswith("snapshot ") and len(snapshots(env_for(box.ctx))) == 1
    # The old stack serves the mail stored before.
    got = retry(lambda: imap_messages(box.state), 60, f"IMAP login as {USER}")
    assert got == box.sent


def test_nothing_newer_is_refused(box: Box) -> None:
    with pytest.raises(OpError) as err:
        REGISTRY["upgrade_run"].invoke(box.ctx, {})  # the appliance's own images: the version that runs
    assert err.value.code == "not_newer" and f"the stack runs {VERSION}" in str(err.value)


def test_a_good_new_version_becomes_the_pinned_one(box: Box) -> None:
    before = pins.read_pin(box.state)
    assert before is not None and before.version == VERSION
    (box.state / "secrets" / "backup.json").unlink()  # no backup target: only with without_backup
    good = good_images(box.tmp / "good-images")
    with pytest.raises(OpError) as err, box.shipping(good):
        REGISTRY["upgrade_run"].invoke(box.ctx, {})
    assert err.value.code == "no_backup" and "without_backup=True" in str(err.value)

    job = box.upgrade(good, without_backup=True)
    assert job["state"] == "done", job
    result = job["result"]
    assert (result["from"], result["to"]) == (VERSION, GOOD)
    assert result["backup"].startswith("skipped")
    after = pins.read_pin(box.state)
    assert after is not None and after.version == GOOD and after.images == result["images"]
    assert all(after.images[s] != before.images[s] for s in SERVICES)  # every image loaded anew
    assert box.running() == after.images
    box.all_healthy()
    assert upgrade.read_state(box.state)["last_upgrade"]["ok"] is True
    assert got_mail(box) == box.sent

    # A later deploy (a settings change, say) keeps the pinned 0.1.2 images, not the shipped 0.1.0 ones.
    deploy_stack(box.ctx, lambda *_: None, timeout=600)
    assert box.running() == after.images
    check = upgrade.versions(box.ctx)
    assert (check["current"], check["available"], check["upgrade_available"]) == (GOOD, VERSION, False)


def got_mail(box: Box) -> list[bytes]:
    return retry(lambda: imap_messages(box.state), 60, f"IMAP login as {USER}")  # type: ignore[return-value]


class NewStackClosesImaps(CheckEnv):
    """The health checks' view with one fault: while the rendered stack is version
    `bad`, its IMAPS port is a closed one (as if the new dovecot did not listen)."""

    bad = VERSION

    def stack_settings(self) -> Any:
        s = super().stack_settings()
        header = (self.state_dir / "stack" / "compose.yaml").read_text().split("\n", 1)[0]
        if header.startswith(f"# Mailstead mail stack {self.bad}:"):
            return replace(s, ports={**s.ports, "imaps": free_port()})
        return s


def test_a_stack_that_fails_the_health_check_is_rolled_back_to_the_kept_config(box: Box) -> None:
    """The deploy itself succeeds here, so the rollback is the upgrade's own: the kept
    folder put back and brought up with the previous image IDs."""
    before = pins.read_pin(box.state)
    assert before is not None and before.version == GOOD and box.running() == before.images
    box.ctx.check_env = NewStackClosesImaps  # type: ignore[attr-defined]
    box.ctx.upgrade_health_wait = 10  # type: ignore[attr-defined]
    try:
        # The appliance's own 0.1.0 images, reinstalled over 0.1.2 (force).
        job = box.upgrade(force=True, without_backup=True)
    finally:
        del box.ctx.check_env  # type: ignore[attr-defined]
        box.ctx.upgrade_health_wait = 60  # type: ignore[attr-defined]
    assert job["state"] == "failed" and job["code"] == "upgrade_failed", job
    assert f"the upgrade from {GOOD} to {VERSION} failed: the health check failed: ports: not listening: imaps" \
        in job["error"] and "Rolled back" in job["error"]
    details = [e["detail"] for e in job["events"] if e["step"] == "rollback"]
    assert not any("deploy's own rollback" in d for d in details)
    assert box.running() == before.images
    box.all_healthy()
    assert pins.read_pin(box.state) == before
    assert (box.state / "stack" / "compose.yaml").read_text().startswith(f"# Mailstead mail stack {GOOD}:")
    last = upgrade.read_state(box.state)["last_upgrade"]
    assert (last["ok"], last["rolled_back"], last["rollback_ok"]) == (False, True, True)
    assert got_mail(box) == box.sent


def test_a_crash_looping_container_fails_the_deploy_wait_at_once() -> None:
    """A broken new image makes its container exit and restart over and over; docker
    marks it unhealthy as soon as its process exits (long before the health check's
    start period ends), so the deploy's wait, and with it the upgrade, fails at once."""
    client = docker.from_env(timeout=120)
    name = f"{PROJECT}-loop"
    try:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
        client.containers.run(f"mailstead-base:{VERSION}", ["/bin/sh", "-c", "echo giving up >&2; exit 3"],
                              name=name, detach=True, restart_policy={"Name": "always"},
                              labels={"com.docker.compose.project": PROJECT, "com.docker.compose.service": "loop"},
                              healthcheck={"test": ["CMD", "/bin/true"], "interval": 10**9 * 60,
                                           "start_period": 10**9 * 600})
        t0 = time.monotonic()
        with pytest.raises(DeployError) as err:
            wait_healthy(client, PROJECT, 120, lambda *_: None, services=("loop",))
        assert time.monotonic() - t0 < 60
        assert "loop" in err.value.failures and "giving up" in err.value.failures["loop"]
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True)
        client.close()
