"""The agent's upgrade operations: upgrade_check, upgrade_run, upgrade_state, upgrade_configure.

upgrade_run refuses at once what can be refused (nothing newer, no backup
target without `without_backup`, a bad source folder), then starts the
background job "upgrade" (jobs.py) and returns it; watch it with job_status.
The scheduler's weekly `upgrade_check` starts the same job when the owner
opted in (setting `upgrade_auto` = "1"), never without a backup target.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from portal.agent.jobs import job_kind, latest
from portal.agent.jobs import start as start_job
from portal.agent.ops import Context, OpError, operation

Progress = Callable[[str, str], None]
KIND = "upgrade"
REQUEST_FILE = "upgrade-request.json"


@contextlib.contextmanager
def refusals() -> Iterator[None]:
    from portal.stack.upgrade import UpgradeError

    try:
        yield
    except UpgradeError as exc:
        raise OpError(exc.code, exc.message) from None


def _request_path(ctx: Context) -> Any:
    return ctx.state_dir / REQUEST_FILE


def start_upgrade(ctx: Context, source: str = "", force: bool = False, without_backup: bool = False,
                  timeout: int = 900) -> dict[str, Any]:
    """Check the request (refusals raise), then start the "upgrade" job with it (or
    return the upgrade job already running: one at a time, requests are not queued)."""
    from portal.stack.upgrade import plan

    running = latest(ctx, KIND)
    if running is not None and running["state"] == "running":
        return running
    with refusals():
        plan(ctx, source, force, without_backup)
    path = _request_path(ctx)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"source": source, "force": force, "without_backup": without_backup,
                               "timeout": timeout}))
    os.replace(tmp, path)
    return start_job(ctx, KIND)


@job_kind(KIND)
def upgrade_job(ctx: Context, progress: Progress) -> dict[str, Any]:
    """The upgrade with the request upgrade_run left (started bare: the shipped images,
    no force, and a backup target required)."""
    from portal.stack.upgrade import run

    try:
        request = json.loads(_request_path(ctx).read_text())
    except (OSError, ValueError):
        request = {}
    _request_path(ctx).unlink(missing_ok=True)
    with refusals():
        return run(ctx, progress, source=str(request.get("source", "")), force=bool(request.get("force", False)),
                   without_backup=bool(request.get("without_backup", False)),
                   timeout=float(request.get("timeout", 900)),
                   health_wait=float(getattr(ctx, "upgrade_health_wait", 120)))


@operation("upgrade_check")
def upgrade_check(ctx: Context) -> dict[str, Any]:
    """The stack's version against the images this appliance ships: {current, available,
    upgrade_available, auto, message}. With upgrade_auto on and an upgrade available,
    starts it (the result's `job`, or `auto_refused` saying why not)."""
    from portal.stack.store import read_settings_table
    from portal.stack.upgrade import check

    out = check(ctx)
    out["auto"] = read_settings_table(ctx.state_dir / "state.db").get("upgrade_auto", "").strip() == "1"
    if out["auto"] and out["upgrade_available"]:
        try:
            out["job"] = start_upgrade(ctx)
        except OpError as err:
            out["auto_refused"] = err.message
    return out


@operation("upgrade_run")
def upgrade_run(ctx: Context, source: str = "", force: bool = False, without_backup: bool = False,
                timeout: int = 900) -> dict[str, Any]:
    """Upgrade the stack to the images in `source` (an absolute folder; default: those
    this appliance ships): load, back up, redeploy, health-check, roll back on failure.
    A background job (kind "upgrade"). `force` reinstalls a version that is not newer;
    `without_backup` upgrades when no backup target is configured; `timeout`: seconds
    the new stack may take to become healthy."""
    if len(source) > 4096 or "\x00" in source:
        raise OpError("invalid", "source: give an absolute path to a folder of image tars")
    if not 60 <= timeout <= 3600:
        raise OpError("invalid", "timeout: give a number of seconds from 60 to 3600")
    return start_upgrade(ctx, source, force, without_backup, timeout)


@operation("upgrade_state")
def upgrade_state(ctx: Context) -> dict[str, Any]:
    """The last check's and the last upgrade's outcome (upgrade-state.json), the pinned
    version and image IDs, and the kept previous version (for the dashboard)."""
    from portal.stack.pins import read_pin
    from portal.stack.upgrade import previous_dir, read_state

    pin = read_pin(ctx.state_dir)
    out = read_state(ctx.state_dir)
    out["pinned"] = pin.public() if pin else None
    try:
        out["previous"] = json.loads((previous_dir(ctx.state_dir) / "pin.json").read_text())
    except (OSError, ValueError):
        out["previous"] = None
    return out


@operation("upgrade_configure")
def upgrade_configure(ctx: Context, auto: bool) -> dict[str, Any]:
    """Opt in (auto=True) or out of applying an available upgrade at the weekly check
    (it always backs up first, so it needs a backup target)."""
    from portal.web import db

    db.write_settings(ctx.state_dir / "state.db", {"upgrade_auto": "1" if auto else "0"})
    return {"auto": auto}
