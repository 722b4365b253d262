"""Host checks: free disk and memory, backups, security updates, reboot required."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
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


_apt_cache: dict[tuple[Any, ...], CheckResult] = {}


def _mtime(path: Any) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


@check("updates", "Security updates")
def updates(env: CheckEnv) -> CheckResult:
    """Pending updates from a -security suite. apt takes seconds, so its answer is kept
    until the package lists (apt update) or the installed packages (dpkg) change."""
    if shutil.which(env.apt) is None:
        return CheckResult("updates", "warn", "unknown: apt is not available on this system", "")
    key = (env.apt, _mtime(env.apt_lists), _mtime(env.dpkg_status))
    if None not in key[1:] and key in _apt_cache:
        return _apt_cache[key]
    result = _apt_updates(env)
    if not result.message.startswith("unknown"):
        _apt_cache.clear()
        _apt_cache[key] = result
    return result


def _apt_updates(env: CheckEnv) -> CheckResult:
    try:
        out = subprocess.run([env.apt, "list", "--upgradable"], capture_output=True, text=True,
                             timeout=30, check=False, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as err:
        return CheckResult("updates", "warn", f"unknown: apt list failed ({type(err).__name__})", "")
    if out.returncode != 0:
        return CheckResult("updates", "warn", f"unknown: apt list exited {out.returncode}", "")
    security = []
    for line in out.stdout.splitlines():
        name, slash, rest = line.partition("/")
        if slash and "-security" in rest.split(" ", 1)[0]:
            security.append(name)
    if security:
        shown = ", ".join(security[:8]) + (" …" if len(security) > 8 else "")
        return CheckResult("updates", "warn", f"{len(security)} security update(s) pending: {shown}",
                           "unattended-upgrades installs them daily; to install now: apt-get upgrade")
    return CheckResult("updates", "ok", "no security updates pending")


@check("reboot", "Reboot required")
def reboot(env: CheckEnv) -> CheckResult:
    if not env.reboot_file.exists():
        return CheckResult("reboot", "ok", "no reboot needed")
    pkgs_file = env.reboot_file.with_name(env.reboot_file.name + ".pkgs")
    try:
        pkgs = sorted(set(pkgs_file.read_text().split()))
    except OSError:
        pkgs = []
    why = f" (for {', '.join(pkgs[:6])})" if pkgs else ""
    return CheckResult("reboot", "warn", f"a reboot is needed to finish installing updates{why}",
                       "reboot at a quiet time: mail waits in the senders' queues meanwhile")
