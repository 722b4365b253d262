"""Stack upgrades without a docker engine: versions, the shipped images folder,
the pinned images, every refusal before anything is touched, the retired
stack-only upgrade's leftovers, and the health check that reports the last
outcome. (The real upgrade and rollback run against docker in
tests/integration/test_upgrade_stack.py.)"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from portal import checks
from portal.agent import jobs, registry as ops
from portal.agent.client import AgentClient, AgentError
from portal.backup import config as backup_cfg
from portal.checks.env import CheckEnv
from portal.stack import pins, upgrade
from portal.stack import privileged as upgradeops
from portal.stack.render import render, write_tree
from portal.stack.settings import SERVICES, StackSettings
from tests.conftest import retry

from .checks_support import write_settings

checks.load_all()
DOMAIN = "example.test"
OLD_IDS = {s: "sha256:" + f"{i:x}" * 64 for i, s in enumerate(SERVICES, start=1)}


def make_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def mkosi_folder(folder: Path, version: str | None = None) -> Path:
    """A folder shaped like the image build's output (tiny file-system tars)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in upgrade.NAMES:
        make_tar(folder / f"mailstead-{name}.tar", {f"usr/share/{name}/hello": b"hello\n"})
    if version:
        (folder / "VERSION").write_text(version + "\n")
    return folder


@pytest.fixture
def ctx(tmp_path):
    state = tmp_path / "state"
    write_settings(state, domain=DOMAIN, mail_host=f"mail.{DOMAIN}")
    # The shipped images: the appliance's 0.1.0 (no VERSION file); a test writes one to
    # stand for a newer version's /usr/lib/mailstead/images.
    return ops.Context(docker=ops.docker_factory(f"unix://{tmp_path}/no-docker.sock"), state_dir=state,
                       images_dir=mkosi_folder(tmp_path / "shipped"), portal_version="0.1.0")


def deployed(ctx, version="0.1.0"):
    pins.write_pin(ctx.state_dir, version, OLD_IDS)


def ships(ctx, version):
    (ctx.images_dir / "VERSION").write_text(version + "\n")


def configure_backup_target(ctx, tmp_path):
    paths = backup_cfg.Paths(ctx.state_dir / "secrets")
    paths.secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
    backup_cfg.save_target(paths, backup_cfg.validate("local", path=str(tmp_path / "repo")), "2026-01-01T00:00:00+00:00")
    backup_cfg.write_secret(paths.password, "not-a-real-repository-password\n")


def refused(ctx, **args) -> ops.OpError:
    with pytest.raises(ops.OpError) as err:
        ops.REGISTRY["upgrade_run"].invoke(ctx, args)
    assert jobs.latest(ctx, "upgrade_run") is None  # refused before any job started
    return err.value


# -- versions -------------------------------------------------------------------------

def test_versions_order_numerically_and_a_prerelease_comes_first():
    ordered = ["0.1.0", "0.1.1-rc1", "0.1.1", "0.1.9", "0.1.10", "0.2", "1.0.0"]
    assert sorted(reversed(ordered), key=upgrade.version_key) == ordered
    assert upgrade.version_key("0.2") == upgrade.version_key("0.2.0")


@pytest.mark.parametrize("text", ["", "v0.1.1", "0.1.1; rm -rf /", "latest", "1", "0.1.1-", "0..1"])
def test_a_bad_version_is_refused(text):
    with pytest.raises(upgrade.UpgradeError, match="is not a version"):
        upgrade.check_version(text, "VERSION")


# -- pins -----------------------------------------------------------------------------

def test_pin_file_round_trip_and_a_stack_from_before_it_read_from_compose_yaml(tmp_path):
    state = tmp_path / "state"
    assert pins.read_pin(state) is None
    settings = StackSettings(domain=DOMAIN, hostname=f"mail.{DOMAIN}", state_dir=state, version="0.0.9").with_images(OLD_IDS)
    state.mkdir()
    write_tree(render(settings, {"redis_password": "x"}), state / "stack")
    pin = pins.read_pin(state)
    assert (pin.version, pin.images, pin.source) == ("0.0.9", OLD_IDS, "compose.yaml")
    pins.write_pin(state, "0.1.0", OLD_IDS)
    assert pins.read_pin(state) == pins.Pin("0.1.0", OLD_IDS, "pin file")


# -- the images folder ----------------------------------------------------------------

def read_images(folder, appliance_version="0.1.0"):
    """The folder's version (its tars opened, then closed again)."""
    images = upgrade.open_images(folder, appliance_version)
    images.close()
    return images


def test_the_images_version_is_its_version_file_or_else_the_appliances(tmp_path):
    assert read_images(mkosi_folder(tmp_path / "m", "0.2.0")).version == "0.2.0"
    images = read_images(mkosi_folder(tmp_path / "shipped"), "0.1.0")
    assert images.version == "0.1.0" and set(images.tars) == set(upgrade.NAMES)
    assert all(t.file.closed for t in images.tars.values())


@pytest.mark.parametrize("case, words", [
    ("missing_folder", "is missing; the appliance image is damaged"),
    ("missing_tar", "lacks mailstead-dovecot.tar; the appliance image is damaged"),
    ("bad_version", "is not a version"),
    ("other_writable_tar", "mailstead-postfix.tar must belong to root and be writable by no one else"),
    ("group_writable_folder", "must belong to root and be writable by no one else (it is uid 0, mode 0775)"),
    ("other_users_folder", "must belong to root and be writable by no one else (it is uid 65534"),
    ("symlinked_folder", "is a symlink or not a folder"),
    ("symlinked_tar", "mailstead-dovecot.tar"),
])
def test_a_bad_images_folder_is_refused_naming_what_is_wrong(tmp_path, case, words):
    folder = tmp_path / "images"
    if case == "missing_tar":
        mkosi_folder(folder, "0.1.1")
        (folder / "mailstead-dovecot.tar").unlink()
    elif case == "bad_version":
        mkosi_folder(folder, "0.1.1 && reboot")
    elif case == "other_writable_tar":
        mkosi_folder(folder, "0.1.1")
        os.chmod(folder / "mailstead-postfix.tar", 0o666)
    elif case == "group_writable_folder":
        mkosi_folder(folder, "0.1.1")
        os.chmod(folder, 0o775)  # anyone in the group could swap a tar
    elif case == "other_users_folder":
        mkosi_folder(folder, "0.1.1")
        os.chown(folder, 65534, 65534)
    elif case == "symlinked_folder":
        folder.symlink_to(mkosi_folder(tmp_path / "real", "0.1.1"))
    elif case == "symlinked_tar":
        mkosi_folder(folder, "0.1.1")
        elsewhere = mkosi_folder(tmp_path / "other", "0.1.1")
        (folder / "mailstead-dovecot.tar").unlink()
        (folder / "mailstead-dovecot.tar").symlink_to(elsewhere / "mailstead-dovecot.tar")
    with pytest.raises(upgrade.UpgradeError) as err:
        read_images(folder)
    assert err.value.code in ("images", "invalid") and words in str(err.value), str(err.value)


# -- refusals before anything is touched ----------------------------------------------

def test_nothing_deployed_yet_is_refused(ctx):
    err = refused(ctx, without_backup=True)
    assert err.code == "not_deployed" and "mailstead deploy" in str(err)


def test_nothing_newer_is_refused_with_a_clear_message(ctx):
    deployed(ctx, "0.1.0")
    err = refused(ctx, without_backup=True)  # the shipped images are the appliance's 0.1.0
    assert err.code == "not_newer"
    assert str(err) == (f"nothing to upgrade: the stack runs 0.1.0 and {ctx.images_dir} holds 0.1.0 (nothing "
                           "newer); to reinstall these images anyway, give force=True")
    ships(ctx, "0.0.9")
    err = refused(ctx, without_backup=True)
    assert err.code == "not_newer" and "holds 0.0.9 (an older version, nothing newer)" in str(err)


def test_without_a_backup_target_the_upgrade_is_refused_naming_the_option(ctx):
    deployed(ctx, "0.1.0")
    ships(ctx, "0.1.1")
    err = refused(ctx)
    assert err.code == "no_backup"
    assert "no backup target is configured" in str(err) and "without_backup=True" in str(err)
    assert upgrade.read_state(ctx.state_dir) == {}  # a refusal is not an attempt


@pytest.mark.parametrize("args, code, words", [
    ({"timeout": 5}, "invalid", "timeout: give a number of seconds from 60 to 3600"),
    ({"source": "/var/lib/mailstead/upgrade/bundles/0.2.0", "without_backup": True}, "bad_args", "source"),
])
def test_bad_arguments_are_refused(ctx, args, code, words):
    """`source` (a folder of bundled images) was the retired stack-only upgrade's: refused now."""
    deployed(ctx)
    ships(ctx, "0.1.1")
    err = refused(ctx, **args)
    assert err.code == code and words in str(err)


def test_damaged_shipped_images_are_refused_before_the_job(ctx):
    deployed(ctx)
    ships(ctx, "0.1.1")
    (ctx.images_dir / "mailstead-redis.tar").unlink()
    err = refused(ctx, without_backup=True)
    assert err.code == "images" and "lacks mailstead-redis.tar" in str(err)


def test_an_upgrade_that_cannot_reach_docker_changes_nothing_and_says_so(ctx):
    """Past the refusals the job starts; its first step needs docker. The outcome is
    recorded (not run, nothing changed) and the pin stays."""
    deployed(ctx, "0.1.0")
    ships(ctx, "0.1.1")
    job = ops.REGISTRY["upgrade_run"].invoke(ctx, {"without_backup": True})
    assert job["kind"] == "upgrade_run" and job["state"] == "running"
    done = retry(lambda: _finished(ctx, job["id"]), 30, "the upgrade job to end")
    assert done["state"] == "failed" and "no docker socket" in done["error"]
    last = upgrade.read_state(ctx.state_dir)["last_upgrade"]
    assert last["ok"] is False and last["changed"] is False and last["rolled_back"] is False
    assert (last["from"], last["to"]) == ("0.1.0", "0.1.1") and "no docker socket" in last["error"]
    assert last["source"] == str(ctx.images_dir)
    assert pins.read_pin(ctx.state_dir).version == "0.1.0"
    assert not list(ctx.state_dir.glob("*request*"))  # the job's arguments travel with it, in no file


def _finished(ctx, job_id):
    job = jobs.status(ctx, job_id)
    assert job["state"] != "running"
    return job


# -- what is retired ------------------------------------------------------------------

def test_the_stack_only_upgrade_check_and_its_auto_apply_are_gone(ctx):
    """Image updates replaced the weekly stack-only check and its opt-in auto-apply.
    A state.db from before may hold `upgrade_auto`: it is read past, even strictly
    (the stack and DNS read settings strictly), and a backup holding it restores."""
    from portal.backup.snapshot import read_state_db
    from portal.core import store
    from portal.core.layout import StateLayout
    from portal.core.settings import SettingsError, check_setting

    assert "upgrade_check" not in ops.REGISTRY and "upgrade_configure" not in ops.REGISTRY
    with pytest.raises(SettingsError, match="is not a Mailstead setting"):
        check_setting("upgrade_auto", "1")
    db = StateLayout(ctx.state_dir).state_db
    conn = store.connect(ctx.state_dir)
    with conn:
        conn.execute("INSERT INTO settings (key, value) VALUES ('upgrade_auto', '1')")
    conn.close()
    settings = store.read_settings(ctx.state_dir, strict=True)
    assert "upgrade_auto" not in settings and settings["domain"] == DOMAIN
    work = ctx.state_dir.parent / "work"
    work.mkdir(mode=0o700)
    restored, skipped, _steps = read_state_db(db, work)
    assert restored["domain"] == DOMAIN and "upgrade_auto" not in restored and "upgrade_auto" not in skipped


def test_the_operations_are_served_by_the_agent(start_agent, tmp_path):
    state = tmp_path / "state"
    write_settings(state, domain=DOMAIN)
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_IMAGES_DIR": str(mkosi_folder(tmp_path / "img"))})
    client = AgentClient(str(agent.socket))
    with pytest.raises(AgentError) as err:
        client.call("upgrade_run", without_backup=True)
    assert err.value.code == "not_deployed"
    assert client.call("upgrade_state")["pinned"] is None
    assert client.call("job_latest", kind="upgrade_run") == {"job": None}
    with pytest.raises(AgentError) as err:
        client.call("upgrade_check")
    assert "upgrade_check" in str(err.value)


# -- the health check -----------------------------------------------------------------

def run_check(ctx):
    result = checks.run_one("upgrade", CheckEnv(ctx))
    assert result.status == "ok" or result.fix, result
    return result


def test_health_check_reports_the_last_upgrade_and_an_available_one(ctx):
    r = run_check(ctx)
    assert r.status == "warn" and "not deployed yet" in r.message
    deployed(ctx, "0.1.0")
    r = run_check(ctx)
    assert r.status == "ok" and r.message == "the stack runs 0.1.0, the newest this appliance has"
    ships(ctx, "0.2.0")
    r = run_check(ctx)
    assert r.status == "warn" and "ships the 0.2.0 stack images; the stack runs 0.1.0" in r.message

    attempt = {"at": "2026-03-02T04:50:00+00:00", "ok": False, "from": "0.1.0", "to": "0.2.0", "changed": True,
               "rolled_back": True, "rollback_ok": True, "error": "the upgrade from 0.1.0 to 0.2.0 failed: dovecot"}
    upgrade.record(ctx.state_dir, "last_upgrade", attempt)
    r = run_check(ctx)
    assert r.status == "warn" and "failed and was rolled back; 0.1.0 runs" in r.message and "2026-03-02" in r.message
    upgrade.record(ctx.state_dir, "last_upgrade", {**attempt, "rollback_ok": False})
    r = run_check(ctx)
    assert r.status == "fail" and "so did its rollback" in r.message and "mailstead deploy" in r.fix
    upgrade.record(ctx.state_dir, "last_upgrade", {**attempt, "changed": False, "rolled_back": False,
                                                   "rollback_ok": None, "error": "the backup failed"})
    r = run_check(ctx)
    assert r.status == "warn" and "did not run; nothing was changed: the backup failed" in r.message
    deployed(ctx, "0.2.0")  # upgraded since (by hand, or a later run)
    assert run_check(ctx).status == "ok"


# -- the images are read through the files that were checked ---------------------------

class FakeImage:
    def __init__(self, ref, labels):
        self.id = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        self.attrs = {"Config": {"Labels": labels}}


class RecordingDocker:
    """Stands in for docker-py's client where the test needs to see what docker would
    read. Like docker-py, given a path it opens the path; given a file, it reads the file."""

    def __init__(self):
        self.loaded: dict[str, bytes] = {}
        self.refs: dict[str, FakeImage] = {}
        outer = self

        class Api:
            timeout = 5

            def import_image(self, src=None, repository=None, tag=None, changes=None, **_kw):
                outer.loaded["base"] = read_all(src)
                outer.refs[f"{repository}:{tag}"] = FakeImage(f"{repository}:{tag}", {})

            def import_image_from_file(self, filename, repository=None, tag=None, changes=None):
                with open(filename, "rb") as f:  # what docker-py does with a path
                    return self.import_image(f, repository, tag, changes)

            def build(self, fileobj=None, tag=None, **_kw):
                with tarfile.open(fileobj=fileobj) as context:
                    service = tag.split(":")[0].removeprefix("mailstead-")
                    outer.loaded[service] = context.extractfile("layer.tar").read()
                outer.refs[tag] = FakeImage(tag, {"org.mailstead.service": service})
                yield {"stream": "built"}

        class Images:
            def get(self, ref):
                import docker.errors

                if ref not in outer.refs:
                    raise docker.errors.ImageNotFound(ref)
                return outer.refs[ref]

            def list(self, filters=None):
                key, _, value = (filters or {}).get("label", "").partition("=")
                return [i for i in outer.refs.values() if i.attrs["Config"]["Labels"].get(key) == value]

        self.api, self.images = Api(), Images()

    def close(self):
        pass


def read_all(src):
    if hasattr(src, "read"):
        out = b""
        while chunk := src.read(65536):
            out += chunk
        return out
    return b"".join(src)


def evil_tar(path: Path) -> None:
    make_tar(path, {"usr/bin/evil": b"#!/bin/sh\nsteal the passwords\n"})


@pytest.mark.parametrize("swap", ["rename_over", "symlink", "whole_folder"])
def test_a_tar_swapped_after_the_check_is_never_what_docker_loads(ctx, tmp_path, swap):
    """The check passes; then, before docker reads anything, the tars are swapped (a file
    renamed over each, a symlink put in each one's place, or the whole images folder moved
    away and another put at its path). Docker gets the bytes that were checked, or nothing."""
    deployed(ctx, "0.1.0")
    source = ctx.images_dir
    ships(ctx, "0.2.0")
    original = {n: (source / f"mailstead-{n}.tar").read_bytes() for n in upgrade.NAMES}
    evil = tmp_path / "evil"
    evil.mkdir()
    for n in upgrade.NAMES:
        evil_tar(evil / f"mailstead-{n}.tar")
    (evil / "VERSION").write_text("0.2.0\n")

    def swap_now():
        if swap == "whole_folder":
            os.rename(source, source.with_name("moved-away"))
            os.rename(evil, source)
            return
        for n in upgrade.NAMES:
            tar = source / f"mailstead-{n}.tar"
            if swap == "rename_over":
                os.replace(evil / tar.name, tar)
            else:
                tar.unlink()
                tar.symlink_to(evil / tar.name)

    steps = []

    def progress(step, detail):
        steps.append((step, detail))
        if step == "images" and detail.startswith("loading the"):  # checked; nothing loaded yet
            swap_now()

    client = RecordingDocker()
    ctx = ops.Context(**{**ctx.__dict__, "docker": lambda: client})
    with pytest.raises(Exception):  # the running 0.1.0 images are not in this fake docker: it stops after loading
        upgrade.run(ctx, progress, without_backup=True)
    assert any(detail.startswith("loading the 0.2.0") for _s, detail in steps), steps
    assert client.loaded, "nothing was loaded"
    for name, data in client.loaded.items():
        assert data == original[name], f"docker got other bytes than the checked {name} tar"
    assert set(client.loaded) == set(upgrade.NAMES)
    last = upgrade.read_state(ctx.state_dir)["last_upgrade"]
    assert last["changed"] is False and pins.read_pin(ctx.state_dir).version == "0.1.0"
    assert last["sha256"] == {n: hashlib.sha256(original[n]).hexdigest() for n in upgrade.NAMES}


def test_a_tar_changed_in_place_while_docker_reads_it_is_refused(ctx):
    """The hash taken from the open file is checked against what docker read: if the
    bytes change under it (only root could), the images are not used."""
    deployed(ctx, "0.1.0")
    ships(ctx, "0.2.0")
    client = RecordingDocker()
    with upgrade.plan(ctx, without_backup=True) as p:
        p.images.hash()
        with open(ctx.images_dir / "mailstead-base.tar", "r+b") as f:  # the same inode, rewritten
            f.seek(600)
            f.write(b"X")
        with pytest.raises(upgrade.UpgradeError, match="changed while it was being loaded"):
            upgrade.load(client, p.images, ctx.state_dir)
