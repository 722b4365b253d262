"""Host checks: free disk and memory, backups, image updates."""

from __future__ import annotations

import datetime as dt
import shutil
from typing import Any

from portal.checks import CheckResult, check
from portal.checks.env import CheckEnv


def _gib(n: float) -> str:
    return f"{n / 1024 ** 3:.1f} GiB"


@check("disk", "Free disk space")
def disk(env: CheckEnv) -> CheckResult:
    try:
        usage = shutil.disk_usage(env.state_dir if env.state_dir.exists() else "/")
    except OSError as err:
        return CheckResult("disk", "fail", f"cannot read the free space of {env.state_dir} ({err.strerror})",
                           "check that the data disk is mounted")
    pct = 100 * usage.free / usage.total if usage.total else 0.0
    text = f"{_gib(usage.free)} free of {_gib(usage.total)} ({pct:.0f} %) on the data disk"
    fix = ("delete old mail or grow the disk (on a VPS: resize it in the provider's panel, then reboot; "
           "the root file system grows at boot)")
    low_pct, low_bytes = pct < env.disk_min_free_percent, usage.free < env.disk_min_free_bytes
    if pct < env.disk_min_free_percent / 2 and usage.free < env.disk_min_free_bytes / 2:
        return CheckResult("disk", "fail", f"almost full: {text}; mail delivery stops when it is full", fix)
    if low_pct and low_bytes:
        return CheckResult("disk", "warn", f"getting full: {text}", fix)
    return CheckResult("disk", "ok", text)


@check("memory", "Free memory")
def memory(env: CheckEnv) -> CheckResult:
    from portal.setup.privileged import meminfo

    mem = meminfo(env.meminfo)
    total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
    if not total:
        return CheckResult("memory", "warn", f"unknown: {env.meminfo} is not readable", "")
    pct = 100 * avail / total
    text = f"{_gib(avail)} available of {_gib(total)} ({pct:.0f} %)"
    fix = "restart the stack (mailstead deploy) or give the machine more memory; see `docker stats`"
    if pct < env.mem_min_available_percent / 2:
        return CheckResult("memory", "fail", f"almost no memory left: {text}", fix)
    if pct < env.mem_min_available_percent:
        return CheckResult("memory", "warn", f"memory is low: {text}", fix)
    return CheckResult("memory", "ok", text)


def read_backup_state(env: CheckEnv) -> dict[str, Any] | None:
    """<state>/backup-state.json, written by the backup operations:
    {"last_backup": {"at": ISO-8601 or epoch, "ok": bool, "error": str|null, ...}, "last_verify": {...}}."""
    from portal.core import safefs
    from portal.core.errors import UnsafePathError

    try:
        data = safefs.read_json(env.backup_state)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnsafePathError) as err:
        return {"_error": f"{env.backup_state} is unreadable ({type(err).__name__})"}
    return data if isinstance(data, dict) else {"_error": f"{env.backup_state} is not a JSON object"}


def _when(value: Any) -> dt.datetime | None:
    try:
        if isinstance(value, (int, float)):
            return dt.datetime.fromtimestamp(value, dt.timezone.utc)
        when = dt.datetime.fromisoformat(str(value))
        return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
    except (ValueError, OSError, OverflowError):
        return None


def _age(hours: float) -> str:
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"


def _run_check(env: CheckEnv, cid: str, key: str, what: str, max_hours: float, fix_none: str,
               fix_fail: str) -> CheckResult:
    state = read_backup_state(env)
    if state and "_error" in state:
        return CheckResult(cid, "fail", state["_error"], "run the backup again; it rewrites the file")
    last = (state or {}).get(key)
    if not isinstance(last, dict):
        return CheckResult(cid, "warn", f"no {what} has run yet", fix_none)
    when = _when(last.get("at"))
    if when is None:
        return CheckResult(cid, "fail", f"the last {what} has no valid time ('at')", fix_fail)
    hours = (dt.datetime.now(dt.timezone.utc) - when).total_seconds() / 3600
    if not last.get("ok"):
        error = " ".join(str(last.get("error") or "no reason recorded").split())[:300]
        return CheckResult(cid, "fail", f"the last {what} ({_age(hours)} ago) failed: {error}", fix_fail)
    if hours > max_hours:
        return CheckResult(cid, "warn", f"the last successful {what} was {_age(hours)} ago", fix_fail)
    return CheckResult(cid, "ok", f"the last {what} succeeded {_age(hours)} ago")


@check("backup", "Last backup")
def backup(env: CheckEnv) -> CheckResult:
    return _run_check(env, "backup", "last_backup", "backup", env.backup_max_age_hours,
                      "configure a backup target: mailstead backup configure",
                      "see the backup's log in the dashboard, fix the target, then: mailstead backup run")


@check("verify", "Last restore verification")
def verify(env: CheckEnv) -> CheckResult:
    return _run_check(env, "verify", "last_verify", "restore verification", env.verify_max_age_days * 24,
                      "configure backups; the weekly verification then restores the latest one to prove it",
                      "run mailstead backup verify and read its report; a mismatch means the backup "
                      "cannot be trusted: run a new backup")


@check("updates", "Updates")
def updates(env: CheckEnv) -> CheckResult:
    """The image updates (portal/update): a feed is set and readable, the running version
    is not far behind the newest, and the last update did not have to be rolled back."""
    from portal.update import privileged as upd
    from portal.update import state

    now = dt.datetime.now(dt.timezone.utc)
    if not upd.feed_url(env.ctx):
        return CheckResult("updates", "warn", "no update feed is set, so this appliance gets no security updates",
                           "enter the feed's address on the Updates page (the folder scripts/publish writes)")
    last = state.history(env.ctx.update_dir)[:1]
    if last and last[0].get("outcome") == "rolled_back":
        # Said, not warned: the rollback sent its own alert (one mail for one event).
        return CheckResult("updates", "ok", f"the update to {last[0].get('to')} was rolled back: "
                                            f"{last[0].get('message', '')}"[:400])
    check = upd.last_check(env.ctx)
    if not check:
        return CheckResult("updates", "ok", "the feed was not read yet: the update window reads it daily")
    if not check.get("ok"):
        since = _when(check.get("failing_since")) or now
        days = (now - since).total_seconds() / 86400
        message = f"the update feed could not be read since {since:%Y-%m-%d}: {check.get('error')}"[:400]
        if days >= upd.STALE_FEED_DAYS:
            return CheckResult("updates", "warn", message, "check the feed's address on the Updates page and "
                                                            "that its host serves it")
        return CheckResult("updates", "ok", f"{message} (retried daily; a warning after "
                                            f"{upd.STALE_FEED_DAYS} days)"[:400])
    newest_built = _when((check.get("notes") or {}).get("built"))
    running_built = _when(upd.built(env.ctx))
    if check.get("available") and newest_built and running_built:
        behind = (newest_built - running_built).total_seconds() / 86400
        if behind > upd.OLD_IMAGE_DAYS:
            return CheckResult("updates", "warn", f"{check.get('running')} is {behind:.0f} days older than "
                                                  f"{check.get('newest')} on the feed",
                               "install it: Updates page, Install now (or turn automatic updates on)")
    return CheckResult("updates", "ok", str(check.get("message") or "up to date")[:400])
