"""The agent's part of image updates.

- update_trial and update_recover: what the first boot of a new version is
  judged by, and what the old version does when it is back after a failed one.
  Root's only (the web process cannot call them): mailstead-update's `verify`
  (portal/update/service.py, in mailstead-update-verify.service) calls them
  over the agent's socket, because the stack, its settings and the alert mail
  are the agent's.
- The owner's controls (below): status, check, install, go back, settings, and
  the scheduler's daily window.
"""

from __future__ import annotations

import logging
import smtplib
import socket
import time
from typing import Any

from portal.agent.registry import Context, OpError, privileged

log = logging.getLogger("mailstead.update")
STACK_CHECKS = ["containers", "ports"]


def _progress(step: str, detail: str) -> None:
    log.info("update: %s: %s", step, detail)


def smtp_accepts(settings: Any, rcpt: str, wait: float) -> str | None:
    """None when the stack's port 25 takes a message for `rcpt` (EHLO, MAIL FROM:<>,
    RCPT TO: 250; then RSET, so nothing is sent), else why not after `wait` s."""
    from portal.setup.privileged import _smtp_target

    host, port = _smtp_target(settings)
    deadline = time.monotonic() + wait
    while True:
        try:
            with smtplib.SMTP(host, port, local_hostname=settings.hostname, timeout=30) as smtp:
                smtp.ehlo()
                code, text = smtp.mail("<>")
                if code == 250:
                    code, text = smtp.rcpt(rcpt)
                smtp.rset()
            if code == 250:
                return None
            why = f"{code} {text.decode(errors='replace')[:120]}"
        except (OSError, smtplib.SMTPException) as err:
            why = f"{type(err).__name__}: {err}"[:160] if not isinstance(err, socket.timeout) else "no answer"
        if time.monotonic() >= deadline:
            return f"port 25 ({host}:{port}) does not accept mail for {rcpt}: {why}"
        time.sleep(3)


def _admin_rcpt(ctx: Context, settings: Any) -> str:
    from portal.core.store import read_settings

    return read_settings(ctx.state_dir).get("admin_address", "").strip() or f"postmaster@{settings.domain}"


@privileged(timeout=2400.0)
def update_trial(ctx: Context, timeout: int = 900) -> dict[str, Any]:
    """The first boot of a new version: bring the stack to the images this version
    ships (the stack upgrade: a backup when a target is configured, redeploy, health
    check, its own rollback), then check that every service is healthy and port 25
    accepts mail. {ok, problems, stack}. Nothing deployed yet: only the agent counts."""
    from portal.checks import wait_healthy
    from portal.stack.pins import read_pin
    from portal.stack.privileged import settings_for
    from portal.stack.upgrade import UpgradeError, run

    if read_pin(ctx.state_dir) is None:
        return {"ok": True, "problems": [], "stack": "not deployed yet: nothing to bring to this version"}
    problems: list[str] = []
    try:
        done = run(ctx, _progress, without_backup=True, timeout=float(timeout), health_wait=float(timeout),
                   health=lambda wait, pr: wait_healthy(ctx, STACK_CHECKS, wait, pr))
        stack = f"upgraded from {done['from']} to {done['to']}"  # its own health check passed
    except UpgradeError as err:
        if err.code != "not_newer":
            return {"ok": False, "problems": [f"the stack upgrade: {err.message}"], "stack": "failed"}
        stack = "already on this version's images"
        problems += wait_healthy(ctx, STACK_CHECKS, float(timeout), _progress)
    except Exception as err:  # noqa: BLE001 - e.g. docker not answering: the verdict names it
        why = " ".join(f"{type(err).__name__}: {err}".split())[:400]
        return {"ok": False, "problems": [f"the stack upgrade could not run: {why}"], "stack": "failed"}
    if not problems:
        try:
            settings = settings_for(ctx)
        except OpError as err:
            return {"ok": False, "problems": [f"the stack's settings: {err.message}"], "stack": stack}
        why = smtp_accepts(settings, _admin_rcpt(ctx, settings), 120)
        if why:
            problems.append(why)
    return {"ok": not problems, "problems": problems, "stack": stack}


@privileged(timeout=2400.0)
def update_recover(ctx: Context, message: str, timeout: int = 900, alert: bool = True) -> dict[str, Any]:
    """Back on the old version after a failed update (its state already put back):
    bring its stack up again from the pinned images, and send the owner one alert
    (`message` says what happened; no alert when the owner chose to go back). {stack, alerts}."""
    from portal.checks import history
    from portal.checks.privileged import make_env
    from portal.stack.pins import read_pin
    from portal.stack.privileged import deploy_stack

    stack = "not deployed"
    if read_pin(ctx.state_dir) is not None:
        try:
            # The containers docker restarted at boot are kept where they are what the
            # restored settings render (the failed version left them alone).
            deploy_stack(ctx, _progress, timeout, recreate=False)
            stack = "back on the pinned images"
        except OpError as err:
            stack = f"the redeploy failed: {err.message}"
            message += f" Bringing the mail stack back failed too: {err.message}; run mailstead deploy."
    if not alert:
        return {"stack": stack, "alerts": "no alert: the owner chose to go back"}
    env = make_env(ctx)
    try:
        settings = env.stack_settings()
    except Exception:  # noqa: BLE001 - no stack: alert() says the mail was not sent
        settings = None
    change = {"id": "update", "old": "ok", "new": "fail", "message": message[:900],
              "fix": "nothing, normally: the appliance runs the version that worked. The Updates page shows "
                     "the history; the next version on the feed is tried at the next window"}
    return {"stack": stack, "alerts": history.alert(ctx, env.values, settings, [change])}


# -- the owner's controls -------------------------------------------------------------------
# The agent reads the feed (to show what it offers and refuse early) and starts
# mailstead-update@<action>.service, which does the privileged part outside the
# agent's sandbox (a partition, the ESP). It never hands that unit anything: the
# unit reads the feed address from the settings, checked again, and the feed
# itself must be signed by the key baked into the image. So the web process,
# even fully compromised, can only make root install the newest signed version,
# or go back to the previous one.

CHECK_FILE = "update-check.json"
ACTIONS = ("install", "rollback")
STALE_FEED_DAYS = 3       # the health check warns when the feed could not be read for this long
OLD_IMAGE_DAYS = 30       # ... or when the running version is this much older than the newest


def running_version(ctx: Context) -> str:
    from portal.update.feed import FeedError, check_version

    try:
        for line in ctx.os_release.read_text().splitlines():
            if line.startswith("IMAGE_VERSION="):
                return check_version(line.split("=", 1)[1].strip().strip("\"'"), "IMAGE_VERSION")
    except (OSError, FeedError):
        pass
    return ctx.portal_version


def built(ctx: Context) -> str | None:
    """When the running version was built (its os-release's time, as the image has it)."""
    import datetime as dt

    try:
        stamp = ctx.os_release.resolve().stat().st_mtime
    except OSError:
        return None
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="seconds")


def feed_url(ctx: Context) -> str:
    """The owner's setting, else the address the image was built with (may be "")."""
    from portal.core.store import read_settings
    from portal.update.state import default_feed_url

    return read_settings(ctx.state_dir).get("update_feed_url", "").strip() or default_feed_url()


def auto_on(ctx: Context) -> bool:
    from portal.core.store import read_settings

    return read_settings(ctx.state_dir).get("update_auto", "").strip() != "0"


def last_check(ctx: Context) -> dict[str, Any]:
    from portal.core import safefs

    doc = safefs.read_json(ctx.state_dir / CHECK_FILE, default={})
    return doc if isinstance(doc, dict) else {}


def check_feed(ctx: Context) -> dict[str, Any]:
    """Read the feed now; the outcome is kept (CHECK_FILE) for the page and the health check."""
    import datetime as dt

    from portal.core import safefs
    from portal.update import feed as feed_mod

    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    before = last_check(ctx)
    url = feed_url(ctx)
    try:
        out = feed_mod.check(url, running_version(ctx), keyring=ctx.update_keyring)
        record = {**out, "at": now, "ok": True, "last_ok": now, "error": None}
    except feed_mod.FeedError as err:
        record = {"at": now, "ok": False, "feed": url, "running": running_version(ctx),
                  "error": err.message, "code": err.code, "last_ok": before.get("last_ok"),
                  "failing_since": before.get("failing_since") if not before.get("ok", True) else now,
                  "newest": before.get("newest"), "notes": before.get("notes"), "available": False}
        record["message"] = f"The update feed could not be read: {err.message}"
    safefs.write_json(ctx.state_dir / CHECK_FILE, record, 0o600)
    return record


def start_unit(action: str) -> None:
    import subprocess

    if action not in ACTIONS:
        raise OpError("invalid", f"unknown update action {action[:20]!r}")
    proc = subprocess.run(["systemctl", "start", "--no-block", f"mailstead-update@{action}.service"],
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise OpError("failed", f"could not start mailstead-update@{action}.service: "
                                f"{' '.join(proc.stderr.split())[:300]}")


def unit_active(action: str) -> bool:
    import subprocess

    proc = subprocess.run(["systemctl", "is-active", "--quiet", f"mailstead-update@{action}.service"],
                          capture_output=True, timeout=15, check=False)
    return proc.returncode == 0


def skipped(ctx: Context, version: str) -> str | None:
    """Why the window does not install `version` by itself: it failed, or was taken
    back, here before ("Install now" still may)."""
    from portal.update import state

    for entry in state.history(ctx.update_dir):
        if entry.get("to") == version and entry.get("outcome") in ("failed", "rolled_back", "not_installed"):
            return f"{version} {entry['outcome'].replace('_', ' ')} here on {entry.get('at', '?')[:10]}"
    return None


@privileged(web=True, timeout=90.0)
def update_check(ctx: Context) -> dict[str, Any]:
    """Read the update feed now (signature, hashes, notes): what it offers against the running version."""
    return check_feed(ctx)


@privileged(web=True, timeout=15.0)
def update_status(ctx: Context) -> dict[str, Any]:
    """The running version and build date, the last feed check, the settings, whether an
    install or rollback runs, the update under way and the history (newest first)."""
    from portal.agent.scheduler import schedule_of
    from portal.core.store import read_settings
    from portal.update import state

    update_dir = ctx.update_dir
    record = state.read_record(update_dir)
    settings = read_settings(ctx.state_dir)
    check = last_check(ctx)
    newest = str(check.get("newest") or "") if check.get("available") else ""
    return {"running": running_version(ctx), "built": built(ctx), "feed_url": feed_url(ctx),
            "feed_url_default": state.default_feed_url(), "auto": auto_on(ctx),
            "time_zone": settings.get("time_zone", ""), "window": schedule_of("update"),
            "check": check, "window_skips": skipped(ctx, newest) if newest else None,
            "pending": record["pending"], "history": state.history(update_dir),
            "installing": unit_active("install"), "rolling_back": unit_active("rollback"),
            "rollback_to": state.rollback_target(update_dir, running_version(ctx))}


@privileged(web=True, timeout=90.0)
def update_install(ctx: Context) -> dict[str, Any]:
    """Install the newest version on the feed now, and reboot into it (in the background:
    mailstead-update@install.service). Refused when nothing newer is on offer."""
    if unit_active("install") or unit_active("rollback"):
        raise OpError("busy", "an update is already being installed or taken back; wait for it")
    out = check_feed(ctx)
    if not out["ok"]:
        raise OpError("feed", out["message"], "update_feed_url")
    if not out["available"]:
        raise OpError("not_newer", out["message"])
    start_unit("install")
    return {"started": out["newest"], "message": f"installing {out['newest']}; the appliance reboots into it "
                                                 "when it is written (the portal is away for a few minutes)"}


@privileged(web=True, timeout=30.0)
def update_rollback(ctx: Context) -> dict[str, Any]:
    """Go back to the version that ran before the last update, with the settings from
    before it (mail is kept): reboots (mailstead-update@rollback.service)."""
    from portal.update import state

    update_dir = ctx.update_dir
    target = state.rollback_target(update_dir, running_version(ctx))
    if not target:
        raise OpError("no_previous", "there is no previous version to go back to here (none was updated "
                                     "from, or its copy of the settings is gone)")
    if unit_active("install") or unit_active("rollback"):
        raise OpError("busy", "an update is already being installed or taken back; wait for it")
    start_unit("rollback")
    return {"started": target, "message": f"going back to {target}; the appliance reboots"}


@privileged(web=True, timeout=30.0)
def update_configure(ctx: Context, auto: bool, feed_url: str, time_zone: str, window_hour: int) -> dict[str, Any]:
    """Automatic updates on or off, the feed's address ("" = the one the image was built
    with), the owner's time zone ("" = the appliance's) and the window's hour (0-23)."""
    from portal.agent.scheduler import reschedule, set_schedule
    from portal.core import store
    from portal.core.settings import SettingsError

    if not 0 <= window_hour <= 23:
        raise OpError("invalid", "give the hour the window opens, from 0 to 23", "window_hour")
    try:
        store.write_settings(ctx.state_dir, {"update_auto": "1" if auto else "0", "update_feed_url": feed_url,
                                             "time_zone": time_zone})
    except SettingsError as err:
        raise OpError("invalid", f"{err.message}", err.field) from None
    reschedule(ctx)
    window = set_schedule(ctx, "update", f"0 {window_hour} * * *")
    return {"auto": auto, "feed_url": feed_url, "time_zone": time_zone, "window": window}


@privileged(timeout=120.0)
def update_window(ctx: Context) -> dict[str, Any]:
    """The scheduler's daily run at the window: check the feed; with automatic updates
    on and a newer version that has not failed here before, install it and reboot."""
    out = check_feed(ctx)
    if not out["ok"] or not out["available"]:
        return {"message": out["message"]}
    if not auto_on(ctx):
        return {"message": f"{out['message']} Automatic updates are off: install it from the Updates page."}
    why = skipped(ctx, out["newest"])
    if why:
        return {"message": f"{out['message']} Not installed by the window: {why}; use Install now to try again."}
    if unit_active("install") or unit_active("rollback"):
        return {"message": "an update is already running"}
    start_unit("install")
    return {"message": f"installing {out['newest']}; the appliance reboots into it"}

