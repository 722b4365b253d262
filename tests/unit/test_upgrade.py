"""Stack upgrades without a docker engine: versions, bundle folders, the pinned
images, every refusal before anything is touched, the opt-in automatic upgrade
at the weekly check, and the health check that reports the last outcome.
(The real upgrade and rollback run against docker in
tests/integration/test_upgrade_stack.py.)"""

from __future__ import annotations

import hashlib
import io
import json
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


def docker_folder(folder: Path, version: str, tags: dict[str, str] | None = None) -> Path:
    """A folder of `docker save`-shaped archives (a manifest.json naming the tags)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in upgrade.NAMES:
        tag = (tags or {}).get(name, f"mailstead-{name}:{version}")
        make_tar(folder / f"mailstead-{name}.tar",
                 {"manifest.json": json.dumps([{"Config": "x.json", "RepoTags": [tag], "Layers": []}]).encode()})
    return folder


@pytest.fixture
def ctx(tmp_path):
    state = tmp_path / "state"
    write_settings(state, domain=DOMAIN, mail_host=f"mail.{DOMAIN}")
    # tmp_path (root's, 0700) stands in for /var/lib/mailstead/upgrade/bundles: bundles go under it.
    return ops.Context(docker=ops.docker_factory(f"unix://{tmp_path}/no-docker.sock"), state_dir=state,
                       images_dir=mkosi_folder(tmp_path / "shipped"), portal_version="0.1.0",
                       upgrade_roots=(tmp_path,))


def deployed(ctx, version="0.1.0"):
    pins.write_pin(ctx.state_dir, version, OLD_IDS)


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


# -- bundle folders -------------------------------------------------------------------

def read_bundle(folder, shipped_version=None, roots=None):
    """The bundle's version and form (its tars opened, then closed again)."""
    bundle = upgrade.open_bundle(folder, roots or (folder.parent,), shipped_version)
    bundle.close()
    return bundle


def test_bundle_folders_of_both_kinds_and_their_versions(tmp_path):
    b = read_bundle(mkosi_folder(tmp_path / "m", "0.2.0"))
    assert (b.version, b.form) == ("0.2.0", "mkosi")
    assert read_bundle(mkosi_folder(tmp_path / "shipped"), "0.1.0").version == "0.1.0"
    b = read_bundle(docker_folder(tmp_path / "d", "0.1.1"))
    assert (b.version, b.form) == ("0.1.1", "docker")


@pytest.mark.parametrize("case, words", [
    ("relative", "give an absolute path"),
    ("missing_tar", "lacks mailstead-dovecot.tar"),
    ("no_version", "has no VERSION file"),
    ("bad_version", "is not a version"),
    ("other_writable", "must belong to root and be writable by no one else"),
    ("mixed", "mixes `docker save` archives (redis)"),
    ("wrong_tag", "holds mailstead-redis:0.1.0, not mailstead-redis:0.1.1"),
    ("not_a_tar", "is not a readable tar archive"),
])
def test_a_bad_bundle_folder_is_refused_naming_what_to_fix(tmp_path, case, words):
    folder = tmp_path / "bundle"
    if case == "relative":
        folder = Path("bundle")
    elif case == "missing_tar":
        mkosi_folder(folder, "0.1.1")
        (folder / "mailstead-dovecot.tar").unlink()
    elif case == "no_version":
        mkosi_folder(folder)
    elif case == "bad_version":
        mkosi_folder(folder, "0.1.1 && reboot")
    elif case == "other_writable":
        mkosi_folder(folder, "0.1.1")
        os.chmod(folder / "mailstead-postfix.tar", 0o666)
    elif case == "mixed":
        mkosi_folder(folder, "0.1.1")
        docker_folder(tmp_path / "d", "0.1.1")
        os.replace(tmp_path / "d" / "mailstead-redis.tar", folder / "mailstead-redis.tar")
    elif case == "wrong_tag":
        docker_folder(folder, "0.1.1", tags={"redis": "mailstead-redis:0.1.0"})
        (folder / "VERSION").write_text("0.1.1\n")
    elif case == "not_a_tar":
        mkosi_folder(folder, "0.1.1")
        (folder / "mailstead-radicale.tar").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(upgrade.UpgradeError) as err:
        read_bundle(folder, roots=(tmp_path,))
    assert err.value.code == "invalid" and err.value.field == "source" and words in str(err.value)
    assert str(err.value).startswith("source: ")


# -- refusals before anything is touched ----------------------------------------------

def test_nothing_deployed_yet_is_refused(ctx):
    err = refused(ctx, without_backup=True)
    assert err.code == "not_deployed" and "mailstead deploy" in str(err)


def test_nothing_newer_is_refused_with_a_clear_message(ctx, tmp_path):
    deployed(ctx, "0.1.0")
    err = refused(ctx, without_backup=True)  # the shipped images are the appliance's 0.1.0
    assert err.code == "not_newer"
    assert str(err) == (f"nothing to upgrade: the stack runs 0.1.0 and {ctx.images_dir} holds 0.1.0 (nothing "
                           "newer); to reinstall these images anyway, give force=True")
    older = mkosi_folder(tmp_path / "older", "0.0.9")
    err = refused(ctx, source=str(older), without_backup=True)
    assert err.code == "not_newer" and "holds 0.0.9 (an older version, nothing newer)" in str(err)


def test_without_a_backup_target_the_upgrade_is_refused_naming_the_option(ctx, tmp_path):
    deployed(ctx, "0.1.0")
    newer = mkosi_folder(tmp_path / "newer", "0.1.1")
    err = refused(ctx, source=str(newer))
    assert err.code == "no_backup"
    assert "no backup target is configured" in str(err) and "without_backup=True" in str(err)
    assert upgrade.read_state(ctx.state_dir) == {}  # a refusal is not an attempt


@pytest.mark.parametrize("args, words", [
    ({"timeout": 5}, "timeout: give a number of seconds from 60 to 3600"),
    ({"source": "relative/folder", "without_backup": True}, "source: give an absolute path"),
    ({"source": "/nonexistent/bundle", "without_backup": True},
     "/nonexistent/bundle is not in a folder upgrades are taken from; copy the bundle, as root, into a folder "
     "of its own under "),
])
def test_bad_arguments_are_refused(ctx, args, words):
    deployed(ctx)
    err = refused(ctx, **args)
    assert err.code == "invalid" and words in str(err)


def test_an_upgrade_that_cannot_reach_docker_changes_nothing_and_says_so(ctx, tmp_path):
    """Past the refusals the job starts; its first step needs docker. The outcome is
    recorded (not run, nothing changed) and the pin stays."""
    deployed(ctx, "0.1.0")
    newer = mkosi_folder(tmp_path / "newer", "0.1.1")
    job = ops.REGISTRY["upgrade_run"].invoke(ctx, {"source": str(newer), "without_backup": True})
    assert job["kind"] == "upgrade_run" and job["state"] == "running"
    done = retry(lambda: _finished(ctx, job["id"]), 30, "the upgrade job to end")
    assert done["state"] == "failed" and "no docker socket" in done["error"]
    last = upgrade.read_state(ctx.state_dir)["last_upgrade"]
    assert last["ok"] is False and last["changed"] is False and last["rolled_back"] is False
    assert (last["from"], last["to"]) == ("0.1.0", "0.1.1") and "no docker socket" in last["error"]
    assert pins.read_pin(ctx.state_dir).version == "0.1.0"
    assert not list(ctx.state_dir.glob("*request*"))  # the job's arguments travel with it, in no file


def _finished(ctx, job_id):
    job = jobs.status(ctx, job_id)
    assert job["state"] != "running"
    return job


# -- the weekly check -----------------------------------------------------------------

def test_check_compares_the_pinned_version_with_the_shipped_images(ctx):
    out = ops.REGISTRY["upgrade_check"].run_checked(ctx, {})
    assert (out["current"], out["available"], out["upgrade_available"]) == (None, "0.1.0", False)
    deployed(ctx, "0.1.0")
    out = ops.REGISTRY["upgrade_check"].run_checked(ctx, {})
    assert (out["current"], out["available"], out["upgrade_available"], out["auto"]) == ("0.1.0", "0.1.0", False, False)
    (ctx.images_dir / "VERSION").write_text("0.2.0\n")  # an appliance update shipped newer images
    out = ops.REGISTRY["upgrade_check"].run_checked(ctx, {})
    assert (out["current"], out["available"], out["upgrade_available"]) == ("0.1.0", "0.2.0", True)
    assert "job" not in out and jobs.latest(ctx, "upgrade_run") is None  # auto-apply is opt-in
    assert upgrade.read_state(ctx.state_dir)["last_check"]["upgrade_available"] is True


def test_automatic_upgrade_is_opt_in_and_never_without_a_backup(ctx, tmp_path):
    deployed(ctx, "0.1.0")
    (ctx.images_dir / "VERSION").write_text("0.2.0\n")
    assert ops.REGISTRY["upgrade_configure"].run_checked(ctx, {"auto": True}) == {"auto": True}
    out = ops.REGISTRY["upgrade_check"].run_checked(ctx, {})
    assert out["auto"] is True and "job" not in out and "without_backup" in out["auto_refused"]
    configure_backup_target(ctx, tmp_path)
    out = ops.REGISTRY["upgrade_check"].run_checked(ctx, {})
    assert out["job"]["kind"] == "upgrade_run"
    retry(lambda: _finished(ctx, out["job"]["id"]), 30, "the upgrade job to end")  # no docker here: it fails
    ops.REGISTRY["upgrade_configure"].run_checked(ctx, {"auto": False})
    assert "job" not in ops.REGISTRY["upgrade_check"].run_checked(ctx, {})


def test_the_operations_are_served_by_the_agent(start_agent, tmp_path):
    state = tmp_path / "state"
    write_settings(state, domain=DOMAIN)
    agent = start_agent(env={"MAILSTEAD_STATE_DIR": str(state), "MAILSTEAD_IMAGES_DIR": str(mkosi_folder(tmp_path / "img"))})
    client = AgentClient(str(agent.socket))
    out = client.call("upgrade_check")
    assert out["current"] is None and out["upgrade_available"] is False
    with pytest.raises(AgentError) as err:
        client.call("upgrade_run", without_backup=True)
    assert err.value.code == "not_deployed"
    assert client.call("upgrade_state")["pinned"] is None
    assert client.call("job_latest", kind="upgrade_run") == {"job": None}


# -- the health check -----------------------------------------------------------------

def run_check(ctx):
    result = checks.run_one("upgrade", CheckEnv(ctx, reboot_file=ctx.state_dir / "reboot-required"))
    assert result.status == "ok" or result.fix, result
    return result


def test_health_check_reports_the_last_upgrade_and_an_available_one(ctx):
    r = run_check(ctx)
    assert r.status == "warn" and "not deployed yet" in r.message
    deployed(ctx, "0.1.0")
    r = run_check(ctx)
    assert r.status == "ok" and r.message == "the stack runs 0.1.0, the newest this appliance has"
    (ctx.images_dir / "VERSION").write_text("0.2.0\n")
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
    (ctx.images_dir / "VERSION").write_text("0.2.0\n")
    assert run_check(ctx).status == "ok"


# -- the source: resolved once, only under a root-only folder, read through the open file ----

def bundles_dir(ctx):
    """<state>/upgrade/bundles: where the owner puts bundles (an allowed root by default)."""
    folder = ctx.state_dir / "upgrade" / "bundles"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ctx.state_dir / "upgrade", 0o700)
    return folder


@pytest.mark.parametrize("case, words", [
    ("outside", "is not in a folder upgrades are taken from"),
    ("symlinked_folder", "is a symlink or not a folder"),
    ("symlinked_tar", "mailstead-dovecot.tar is a symlink"),
    ("group_writable_parent", "must belong to root and be writable by no one else"),
    ("other_users_folder", "must belong to root and be writable by no one else (it is uid 65534"),
])
def test_a_source_outside_a_root_only_folder_or_through_a_symlink_is_refused(ctx, tmp_path, case, words):
    deployed(ctx, "0.1.0")
    bundles = bundles_dir(ctx)
    source = bundles / "0.2.0"
    if case == "outside":
        source = mkosi_folder(tmp_path / "elsewhere" / "0.2.0", "0.2.0")
        ctx = ops.Context(**{**ctx.__dict__, "upgrade_roots": ()}) if hasattr(ctx, "upgrade_roots") else ctx
    elif case == "symlinked_folder":
        mkosi_folder(bundles / "real", "0.2.0")
        source.symlink_to(bundles / "real")
    elif case == "symlinked_tar":
        mkosi_folder(source, "0.2.0")
        elsewhere = mkosi_folder(tmp_path / "other", "0.2.0")
        (source / "mailstead-dovecot.tar").unlink()
        (source / "mailstead-dovecot.tar").symlink_to(elsewhere / "mailstead-dovecot.tar")
    elif case == "group_writable_parent":
        mkosi_folder(bundles / "team" / "0.2.0", "0.2.0")
        os.chmod(bundles / "team", 0o775)  # anyone in the group could swap what is below it
        source = bundles / "team" / "0.2.0"
    elif case == "other_users_folder":
        mkosi_folder(source, "0.2.0")
        os.chown(source, 65534, 65534)
    err = refused(ctx, source=str(source), without_backup=True)
    assert err.code == "invalid" and err.field == "source" and words in err.message, err.message


def test_a_bundle_under_the_state_folder_bundles_is_taken(ctx):
    deployed(ctx, "0.1.0")
    source = mkosi_folder(bundles_dir(ctx) / "0.2.0", "0.2.0")
    ctx = ops.Context(**{**ctx.__dict__, "upgrade_roots": ()})  # only the default roots
    with upgrade.plan(ctx, str(source), without_backup=True) as p:
        assert (p.bundle.version, p.bundle.form) == ("0.2.0", "mkosi")


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

            def load(self, data):
                blob = read_all(data)
                with tarfile.open(fileobj=io.BytesIO(blob)) as archive:
                    tags = json.loads(archive.extractfile("manifest.json").read())[0]["RepoTags"]
                for tag in tags:
                    name = tag.split(":")[0].removeprefix("mailstead-")
                    outer.loaded[name] = blob
                    outer.refs[tag] = FakeImage(tag, {"org.mailstead.service": name})
                return []

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
    make_tar(path, {"usr/bin/evil": b"#!/bin/sh\nsteal the passwords\n",
                    "manifest.json": json.dumps([{"RepoTags": []}]).encode()})


@pytest.mark.parametrize("form", ["mkosi", "docker"])
@pytest.mark.parametrize("swap", ["rename_over", "symlink", "whole_folder"])
def test_a_tar_swapped_after_the_check_is_never_what_docker_loads(ctx, tmp_path, form, swap):
    """The check passes; then, before docker reads anything, the tars are swapped (a file
    renamed over each, a symlink put in each one's place, or the whole bundle folder moved
    away and another put at its path). Docker gets the bytes that were checked, or nothing."""
    deployed(ctx, "0.1.0")
    source = bundles_dir(ctx) / "0.2.0"
    (docker_folder if form == "docker" else mkosi_folder)(source, "0.2.0")
    if form == "docker":
        (source / "VERSION").write_text("0.2.0\n")
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
        upgrade.run(ctx, progress, source=str(source), without_backup=True)
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
    source = mkosi_folder(bundles_dir(ctx) / "0.2.0", "0.2.0")
    client = RecordingDocker()
    with upgrade.plan(ctx, str(source), without_backup=True) as p:
        p.bundle.hash()
        with open(source / "mailstead-base.tar", "r+b") as f:  # the same inode, rewritten
            f.seek(600)
            f.write(b"X")
        with pytest.raises(upgrade.UpgradeError, match="changed while it was being loaded"):
            upgrade.load_bundle(client, p.bundle, ctx.state_dir)
