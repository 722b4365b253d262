"""The agent's health operations: health_run (all checks, history, alerts) and health_history.

Imports nothing heavy at agent start: the checks load dnspython, cryptography
and docker only when they run.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from portal.agent.registry import Context, OpError, privileged

_round_lock = threading.Lock()  # one round at a time (the scheduler and `mailstead status` may overlap)


def make_env(ctx: Context) -> Any:
    """The checks' view of the world (portal/checks/env.py env_for)."""
    from portal.checks.env import env_for

    return env_for(ctx)


def health_round(ctx: Context, alert: bool = True, env: Any = None,
                 only: list[str] | None = None) -> dict[str, Any]:
    from portal.checks import history, load_all, run_all, summary

    load_all()
    env = env or make_env(ctx)
    with _round_lock:
        t0 = time.monotonic()
        results = run_all(env, only)
        seconds = time.monotonic() - t0
        changes = history.record(ctx.state_dir, results)
        try:
            settings = env.stack_settings()
        except Exception:  # noqa: BLE001 - no stack yet: alerts say so
            settings = None
        alerts = history.alert(ctx, env.values, settings, changes) if alert else {"mail": "off", "webhook": "off"}
    return {"results": [r.as_dict() for r in results], "summary": summary(results), "changes": changes,
            "alerts": alerts, "seconds": round(seconds, 2)}


@privileged(web=True, timeout=60.0)
def health_run(ctx: Context, alert: bool = True) -> dict[str, Any]:
    """Run every health check now; record the round and alert on changes of state."""
    return health_round(ctx, alert=alert)


@privileged(web=True, timeout=10.0)
def health_history(ctx: Context, check: str = "", limit: int = 100) -> dict[str, Any]:
    """The recorded results (newest first) of one check, or of all checks when `check` is empty."""
    from portal.checks import history, load_all

    checks = load_all()
    if check and check not in checks:
        raise OpError("invalid", f"unknown check '{check[:40]}'; choose one of {', '.join(checks)}", "check")
    if not 1 <= limit <= history.KEEP:
        raise OpError("invalid", f"give a number from 1 to {history.KEEP}", "limit")
    return {"history": history.history(ctx.state_dir, check or None, limit),
            "checks": {cid: title for cid, (title, _f) in checks.items()}}


@privileged(web=True, timeout=10.0)
def alerts_configure(ctx: Context, webhook_url: str = "", dnsbl_zones: str = "") -> dict[str, Any]:
    """Store the alert webhook (empty: none) and the DNSBL zones (empty: the defaults)."""
    from portal.core import store
    from portal.checks.env import DEFAULT_DNSBL_ZONES
    from portal.checks.history import AlertSettingError, check_dnsbl_zones, check_webhook_url

    allow_private = store.read_settings(ctx.state_dir).get("alert_webhook_private", "") == "1"
    try:
        url, zones = check_webhook_url(webhook_url, allow_private), check_dnsbl_zones(dnsbl_zones)
    except AlertSettingError as err:
        raise OpError("invalid", err.message, err.field) from None
    store.write_settings(ctx.state_dir, {"alert_webhook_url": url, "dnsbl_zones": zones})
    return {"webhook": bool(url), "dnsbl_zones": (zones or ",".join(DEFAULT_DNSBL_ZONES)).split(",")}


@privileged(timeout=10.0)
def alerts_private(ctx: Context, allow: bool) -> dict[str, Any]:
    """Allow (or refuse again) alert webhooks to private, loopback, link-local and
    reserved addresses (setting alert_webhook_private; off by default). Root only:
    the web cannot point the agent's requests at the local network."""
    from portal.core import store

    store.write_settings(ctx.state_dir, {"alert_webhook_private": "1" if allow else "0"})
    return {"allow_private": allow}


@privileged(web=True, timeout=30.0)
def alerts_test(ctx: Context) -> dict[str, Any]:
    """Send a test alert to the admin (mail) and the webhook; says what happened to each."""
    from portal.checks import history

    env = make_env(ctx)
    try:
        settings = env.stack_settings()
    except Exception:  # noqa: BLE001 - said in the result
        settings = None
    change = {"id": "test", "old": "ok", "new": "ok", "message": "This is a test alert from Mailstead.", "fix": ""}
    return history.alert(ctx, env.values, settings, [change])
