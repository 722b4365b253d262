"""Stack upgrades: load the images this appliance ships, back up, redeploy,
health-check, and roll back to the previous images and config when the check fails.

The first boot of an image update (portal/update) runs this to bring the stack to
the new version's images; `upgrade_run` runs it by hand. The images are those in
ctx.images_dir (/usr/lib/mailstead/images, in the read-only system): the
mkosi subimage tars `mailstead-base.tar` and `mailstead-<service>.tar` (a base
file system and one overlay per service, loaded by portal/stack/images.py).
Their version is the first line of a `VERSION` file there, or else the
appliance's own. What they hold runs with the mail, so the folder and its files
must belong to root and be writable by no one else, and each tar is opened once
(without following a symlink): it is checked, hashed and given to docker through
that same open file, so swapping a file on the path after the check changes
nothing that is loaded.

Nothing is changed before the new images are loaded and, when a backup
target is configured, a backup has succeeded (without a target, the upgrade
runs only with `without_backup`, as an update's first boot asks). The previous pin (version and image IDs) and a copy of the rendered
stack folder are kept in `<state>/upgrade/previous/`; the outcome of the last
upgrade goes to `<state>/upgrade-state.json`:

    {"last_upgrade": {"at", "ok", "from", "to", "source", "backup", "changed",
                      "rolled_back", "rollback_ok", "error", "seconds"}}
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from portal.core import safefs
from portal.core.errors import UnsafePathError
from portal.core.layout import StateLayout
from portal.stack.images import ImageError, ImageTar, open_tar_at, trusted_stat
from portal.stack.pins import Pin, present, read_pin, running_images, write_pin
from portal.stack.settings import SERVICES, StackSettings

Progress = Callable[[str, str], None]
NAMES = ("base", *SERVICES)
STATE_FILE = "upgrade-state.json"
HEALTH_CHECKS = ["containers", "ports"]
VERSION_RE = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,12}){1,4}(-[0-9A-Za-z][0-9A-Za-z.]{0,39})?$")


from portal.core.errors import MailsteadError  # noqa: E402


class UpgradeError(MailsteadError):
    """An upgrade was refused or failed: `code` for callers, a message that says what to do."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, field=field, code=code)


def _quiet(_step: str, _detail: str) -> None:
    pass


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- versions -------------------------------------------------------------------------

def check_version(text: str, where: str, field: str | None = None) -> str:
    v = text.strip()
    if not VERSION_RE.match(v):
        raise UpgradeError("invalid", f"{where}: '{v[:40]}' is not a version (e.g. 0.2.0 or 0.2.0-rc1)", field)
    return v


def version_key(v: str) -> tuple[Any, ...]:
    """Orders versions: 0.1.10 > 0.1.9 > 0.1.9-rc1."""
    main, _, pre = v.partition("-")
    nums = [int(p) for p in main.split(".")]
    return (*nums, *[0] * (5 - len(nums)), 0 if pre else 1, pre)


# -- the shipped images -----------------------------------------------------------------

@dataclass
class Images:
    """The images folder's tars, open (read only through these: close() them), and their version."""

    folder: Path
    version: str
    tars: dict[str, ImageTar] = field(default_factory=dict, repr=False)

    def hash(self) -> dict[str, str]:
        """{name: SHA-256} of every tar, read from its open file (docker's reads are checked against it)."""
        return {n: t.sha256 or t.hash() for n, t in self.tars.items()}

    def close(self) -> None:
        for t in self.tars.values():
            t.file.close()


def _images_error(message: str) -> UpgradeError:
    return UpgradeError("images", message)


def _read_version_at(dfd: int, folder: Path) -> str | None:
    """The first line of `VERSION` in the opened folder (root's, no one else may write it), or None."""
    path = folder / "VERSION"
    try:
        with safefs.open_file("VERSION", dir_fd=dfd) as f:
            trusted_stat(os.fstat(f.fileno()), path, "file")
            text = f.read(4096).decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    return check_version(text.split("\n", 1)[0], str(path))


def open_images(folder: Path, appliance_version: str) -> Images:
    """The images folder `folder` (walked from / without following a symlink), checked,
    its tars open (close() them), and their version (VERSION, else `appliance_version`)."""
    tars: dict[str, ImageTar] = {}
    try:
        with safefs.open_dir(folder) as dfd:
            trusted_stat(os.fstat(dfd), folder, "folder")
            missing = []
            for n in NAMES:
                try:
                    tars[n] = open_tar_at(dfd, folder, n)
                except FileNotFoundError:
                    missing.append(f"mailstead-{n}.tar")
            if missing:
                raise _images_error(f"the images folder {folder} lacks {', '.join(missing)}; the appliance "
                                    "image is damaged: install an update or flash it again")
            version = _read_version_at(dfd, folder) or check_version(appliance_version, "the appliance's version")
    except BaseException as exc:
        for t in tars.values():
            t.file.close()
        if isinstance(exc, FileNotFoundError):
            raise _images_error(f"the images folder {folder} is missing; the appliance image is damaged: "
                                "install an update or flash it again") from None
        if isinstance(exc, UnsafePathError):
            raise _images_error(exc.message) from None
        raise
    return Images(folder, version, tars)


def shipped_version(ctx: Any) -> str | None:
    """The version of the images the appliance ships (its VERSION file, else the
    appliance's own version), or None when its images folder holds none. Quick:
    the tars are not read."""
    folder = Path(ctx.images_dir)
    if not (folder / "mailstead-base.tar").is_file():
        return None
    try:
        with safefs.open_dir(folder) as dfd:
            version = _read_version_at(dfd, folder)
    except UnsafePathError as exc:
        raise _images_error(exc.message) from None
    return version or check_version(ctx.portal_version, "the appliance's version")


def load(client: Any, images: Images, state_dir: Path, progress: Progress = _quiet) -> dict[str, str]:
    """Load the images into docker, from their open tars (their hashes taken first,
    and what docker read checked against them); {service: image ID}."""
    import docker.errors

    from portal.stack.images import load_tars

    hashes = images.hash()
    progress("images", "sha256 " + ", ".join(f"{n} {h[:16]}" for n, h in hashes.items()))
    try:
        return load_tars(client, images.tars, images.version, lock_path=StateLayout(Path(state_dir)).images_lock,
                         progress=progress)
    except ImageError as exc:
        raise UpgradeError("images", f"loading the {images.version} images failed: {exc}") from None
    except (docker.errors.DockerException, OSError) as exc:
        raise UpgradeError("images", f"loading the {images.version} images failed: "
                                     f"{' '.join(str(exc).split())[-300:]}") from None


# -- the state file -------------------------------------------------------------------

def state_path(state_dir: Path) -> Path:
    return StateLayout(Path(state_dir)).upgrade_state


def read_state(state_dir: Path) -> dict[str, Any]:
    """upgrade-state.json; a symlink or another user's file is refused, not followed."""
    try:
        data = safefs.read_json(state_path(state_dir), {}, owner_uid=os.geteuid())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, UnsafePathError):
        return {}  # (a symlink or another user's file is replaced by the next record, never followed)


def record(state_dir: Path, key: str, entry: dict[str, Any]) -> None:
    safefs.ensure_dir(state_dir, 0o755)
    data = read_state(state_dir)
    data[key] = entry
    safefs.write_json(state_path(state_dir), data, 0o644)


def previous_dir(state_dir: Path) -> Path:
    return StateLayout(Path(state_dir)).upgrade_previous


# -- check ----------------------------------------------------------------------------

def versions(ctx: Any) -> dict[str, Any]:
    """{current, available, upgrade_available, images_dir, message}: the stack's
    pinned version against the images the appliance ships."""
    pin = read_pin(ctx.state_dir)
    out: dict[str, Any] = {"current": pin.version if pin else None, "available": None,
                           "upgrade_available": False, "images_dir": str(ctx.images_dir)}
    try:
        available = shipped_version(ctx)
    except UpgradeError as err:
        out["message"] = err.message
        return out
    if available is None:
        out["message"] = f"{ctx.images_dir} holds no images"
        return out
    out["available"] = available
    if pin is None:
        out["message"] = f"the stack is not deployed yet; deploying it installs {available}"
    elif version_key(available) > version_key(pin.version):
        out["upgrade_available"] = True
        out["message"] = (f"{available} is available (the stack runs {pin.version}): the agent's "
                          "upgrade_run brings the stack to it")
    else:
        out["message"] = f"the stack runs {pin.version}, the newest this appliance has"
    return out


# -- plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What an upgrade will do; its images' tars are open: use it in a `with`."""

    settings: StackSettings
    current: Pin
    images: Images
    backup: bool         # a backup target is configured: back up first

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.images.close()


def backup_configured(state_dir: Path) -> bool:
    from portal.backup import BackupError
    from portal.backup import config as cfg

    try:
        cfg.load_target(cfg.Paths(state_dir / "secrets"))
    except BackupError:
        return False
    return True


def plan(ctx: Any, force: bool = False, without_backup: bool = False) -> Plan:
    """Everything that can be refused before anything is touched. The images' tars
    are opened here, once: close the plan (`with plan(...) as p:`)."""
    from portal.stack.settings import SettingsError
    from portal.stack.store import load_settings

    try:
        settings = load_settings(ctx.state_dir)
    except SettingsError as exc:
        raise UpgradeError("invalid", f"{exc.field}: {exc.message}") from None
    current = read_pin(ctx.state_dir)
    if current is None:
        raise UpgradeError("not_deployed", "the stack is not deployed yet, so there is nothing to upgrade: "
                                           "deploy it (mailstead deploy), which installs the images "
                                           "this appliance has")
    folder = Path(ctx.images_dir)
    images = open_images(folder, ctx.portal_version)
    try:
        if not force and version_key(images.version) <= version_key(current.version):
            older = "an older version, " if version_key(images.version) < version_key(current.version) else ""
            raise UpgradeError("not_newer", f"nothing to upgrade: the stack runs {current.version} and {folder} "
                                            f"holds {images.version} ({older}nothing newer); to reinstall these "
                                            "images anyway, give force=True")
        has_backup = backup_configured(ctx.state_dir)
        if not has_backup and not without_backup:
            raise UpgradeError("no_backup", "no backup target is configured, so an upgrade cannot back up the "
                                            "mail first: configure one (dashboard Backups, or mailstead backup "
                                            "configure), or give without_backup=True to upgrade without a backup")
    except BaseException:
        images.close()
        raise
    return Plan(settings, current, images, has_backup)


# -- health ---------------------------------------------------------------------------

Health = Callable[[float, Progress], list[str]]


def _no_health_checks(wait: float, progress: Progress) -> list[str]:
    return ["no health check was given to the upgrade"]


# -- run ------------------------------------------------------------------------------

@contextlib.contextmanager
def upgrade_lock(state_dir: Path) -> Iterator[None]:
    safefs.ensure_dir(state_dir, 0o755)
    try:
        with safefs.lock(StateLayout(Path(state_dir)).upgrade_lock, blocking=False):
            yield
    except BlockingIOError:
        raise UpgradeError("busy", "another upgrade is running; watch it (job_latest upgrade)") from None


def keep_previous(state_dir: Path, pin: Pin, stack_dir: Path) -> Path:
    """Copy the running stack's folder and pin to <state>/upgrade/previous (0700):
    built in a new folder with a random name, then renamed into place."""
    layout = StateLayout(Path(state_dir))
    safefs.ensure_dir(layout.upgrade, 0o700)
    prev = layout.upgrade_previous
    tmp = safefs.temp_dir(layout.upgrade, "previous")
    try:
        safefs.copy_tree(stack_dir, tmp / "stack")
        safefs.write_json(tmp / "pin.json", {**pin.public(), "kept": now_iso()}, 0o600)
        safefs.remove_tree(prev)
        safefs.rename(tmp, prev)
    except BaseException:
        safefs.remove_tree(tmp)
        raise
    return prev


def put_back_config(stack_dir: Path, kept: Path) -> None:
    """Replace the stack folder with the kept copy of the previous one."""
    nxt = stack_dir.with_name(f".{stack_dir.name}.rollback.{secrets.token_hex(6)}.tmp")
    failed = stack_dir.with_name(stack_dir.name + ".failed")
    try:
        safefs.copy_tree(kept, nxt)  # made here (mkdir fails on anything already there)
        safefs.remove_tree(failed)
        if safefs.lstat(stack_dir) is not None:
            safefs.rename(stack_dir, failed)
        safefs.rename(nxt, stack_dir)
    except BaseException:
        safefs.remove_tree(nxt)
        raise


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def run(ctx: Any, progress: Progress = _quiet, *, force: bool = False,
        without_backup: bool = False, timeout: float = 900, health_wait: float = 120,
        health: Health = _no_health_checks) -> dict[str, Any]:
    """The upgrade (see the module's text). Raises UpgradeError when refused or failed;
    the message says whether anything changed and whether the previous stack runs again.
    `health(wait, progress)` runs the stack's health checks for up to `wait` seconds and
    returns what it found wrong ([] when healthy): the caller gives it (the health checks
    read this module's state, so it does not import them)."""
    t0 = time.monotonic()
    entry: dict[str, Any] = {"at": now_iso(), "ok": False, "from": None, "to": None, "source": None,
                             "backup": None, "changed": False, "rolled_back": False, "rollback_ok": None,
                             "error": None, "seconds": 0}
    with upgrade_lock(ctx.state_dir), plan(ctx, force, without_backup) as p:
        # (refusals: nothing recorded, nothing touched; the images' tars are open from here on)
        entry.update({"from": p.current.version, "to": p.images.version, "source": str(p.images.folder)})
        try:
            result = _run(ctx, p, progress, entry, timeout, lambda pr: health(health_wait, pr))
            entry["ok"] = True
            return result
        except UpgradeError as err:
            entry["error"] = err.message
            raise
        except Exception as err:  # e.g. the agent's OpError when docker is down: recorded, then raised
            entry["error"] = getattr(err, "message", None) or f"{type(err).__name__}: {_short(err, 300)}"
            raise
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 1)
            record(ctx.state_dir, "last_upgrade", entry)


def _run(ctx: Any, p: Plan, progress: Progress, entry: dict[str, Any], timeout: float,
         check: Callable[[Progress], list[str]]) -> dict[str, Any]:
    from portal.stack import deploy as deploy_mod

    old, new = p.current.version, p.images.version
    progress("check", f"upgrading the stack from {old} to {new} (images from {p.images.folder})")
    client = ctx.docker()
    try:
        # 1. The new images: loading them changes nothing that runs.
        progress("images", f"loading the {new} images")
        new_ids = load(client, p.images, ctx.state_dir, progress)
        entry["sha256"] = p.images.hash()
        previous = present(client, p.current.images)
        if previous is None:
            raise UpgradeError("images", f"the running {old} images are no longer all in docker, so there "
                                         "would be nothing to roll back to; nothing was changed. Run "
                                         "mailstead deploy first")

        # 2. Back up first.
        if p.backup:
            entry["backup"] = _backup(ctx, progress, old)
        else:
            entry["backup"] = "skipped (without_backup: no backup target is configured)"
            progress("backup", "skipped: no backup target is configured and without_backup was given")

        # 3. What runs now, kept for the rollback.
        stack_dir = p.settings.stack_dir
        if not (stack_dir / "compose.yaml").is_file():
            raise UpgradeError("not_deployed", f"{stack_dir}/compose.yaml is missing, so the running stack's "
                                               "config cannot be kept for a rollback; nothing was changed. "
                                               "Run mailstead deploy first")
        kept = keep_previous(ctx.state_dir, replace(p.current, images=previous), stack_dir)
        progress("record", f"kept the {old} image IDs and config in {kept}")

        # 4. Redeploy with the new images; 5. health-check.
        entry["changed"] = True
        settings = replace(p.settings, version=new).with_images(new_ids)
        progress("deploy", f"starting the {new} services")
        failure, deploy_rolled_back = None, False
        try:
            deploy_mod.deploy(client, settings, timeout=timeout, progress=progress)
        except deploy_mod.DeployError as err:
            details = "; ".join(f"{s}: {why}" for s, why in sorted(err.failures.items()))
            said = str(err).removesuffix(" (the previous stack is running again)")  # checked below, said at the end
            failure = _short(said + (f" ({details})" if details else ""), 900)
            deploy_rolled_back = err.rolled_back
        except Exception as err:  # noqa: BLE001 - e.g. compose hung past its timeout: roll back all the same
            failure = _short(f"the deploy stopped: {type(err).__name__}: {err}", 900)
        if failure is None:
            progress("health", f"checking the {new} stack (containers healthy, ports listening)")
            problems = check(progress)
            if problems:
                failure = _short("the health check failed: " + "; ".join(problems), 900)
        if failure is None:
            write_pin(ctx.state_dir, new, new_ids)
            progress("done", f"the stack runs {new}")
            return {"from": old, "to": new, "images": new_ids, "backup": entry["backup"],
                    "previous": str(kept)}

        # 6. Roll back to the previous images and config.
        entry["rolled_back"] = True
        progress("rollback", f"the {new} stack failed ({failure[:200]}); bringing back {old}")
        ok, why = _rollback(ctx, client, p, previous, kept / "stack", deploy_rolled_back, timeout,
                            check, progress)
        entry["rollback_ok"] = ok
        if ok:
            progress("rollback", f"{old} runs again and passed the health check")
            raise UpgradeError("upgrade_failed", f"the upgrade from {old} to {new} failed: {failure}. Rolled "
                                                 f"back: {old} (its images and config) runs again and passed "
                                                 "the health check")
        backup_hint = (f" Restore the backup taken before the upgrade ({entry['backup']}) with mailstead "
                       "backup restore if the data is damaged." if p.backup else "")
        raise UpgradeError("rollback_failed", f"the upgrade from {old} to {new} failed: {failure}; rolling back "
                                              f"to {old} failed too: {why}. Mail may be down: run mailstead "
                                              f"deploy and see docker compose -p {p.settings.project} logs."
                                              + backup_hint)
    finally:
        client.close()


def _backup(ctx: Any, progress: Progress, old: str) -> str:
    from portal.backup import BackupError
    from portal.backup.privileged import env_for
    from portal.backup.service import backup

    progress("backup", "backing up before the upgrade")
    try:
        done = backup(env_for(ctx), progress)
    except BackupError as err:
        raise UpgradeError("backup_failed", f"the backup before the upgrade failed: {err.message}. Nothing was "
                                            f"changed: the stack still runs {old}. Fix the backup (mailstead "
                                            "backup run shows the same error) and upgrade again") from None
    progress("backup", f"snapshot {done.get('snapshot')} ({done.get('messages')} messages)")
    return f"snapshot {done.get('snapshot')}"


def _rollback(ctx: Any, client: Any, p: Plan, previous: dict[str, str], kept_stack: Path,
              deploy_rolled_back: bool, timeout: float, check: Callable[[Progress], list[str]],
              progress: Progress) -> tuple[bool, str]:
    """Bring the previous images and config back; (ok, why not)."""
    from portal.stack import deploy as deploy_mod

    if deploy_rolled_back:
        # The deploy put its previous folder (the same config, same image IDs) back and
        # brought it up: make sure that is what runs and that it is healthy.
        running = running_images(client, p.settings.project)
        if all(running.get(s) == previous[s] for s in SERVICES) and not check(progress):
            return True, ""
        progress("rollback", "the deploy's own rollback did not bring the previous stack back; "
                             "restoring the kept config")
    try:
        put_back_config(p.settings.stack_dir, kept_stack)
        deploy_mod.up(client, replace(p.settings, version=p.current.version).with_images(previous),
                      timeout, progress)
    except deploy_mod.DeployError as err:
        details = "; ".join(f"{s}: {why}" for s, why in sorted(err.failures.items()))
        return False, _short(f"{err}" + (f" ({details})" if details else ""), 600)
    except OSError as err:
        return False, f"the kept config could not be put back ({err})"
    except Exception as err:  # noqa: BLE001 - said in the outcome, never lost
        return False, _short(f"{type(err).__name__}: {err}", 600)
    running = running_images(client, p.settings.project)
    wrong = [s for s in SERVICES if running.get(s) != previous[s]]
    if wrong:
        return False, f"{', '.join(wrong)} do not run the previous images"
    problems = check(progress)
    if problems:
        return False, "the health check failed: " + "; ".join(problems)
    return True, ""
