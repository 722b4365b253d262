"""Dashboard Health area: the latest result of each health check (status, message,
fix) with a small timeline of its recorded rounds, "Run checks now", and the alert
settings (webhook, DNSBL zones) with a test alert.

Agent operations: health_history (the recorded rounds; reading never runs a check),
health_run, alerts_configure, alerts_test. The timeline is drawn here, server-side,
as an inline SVG (`timeline`, a pure function).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, flash, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import Field, StringField, SubmitField
from wtforms.validators import ValidationError

from portal.web import state, security
from portal.web.jobs import show_error
from portal.agent.client import AgentError
from portal.web.dashboard import Nav, render_dashboard
from portal.checks import privileged as check_ops

bp = Blueprint("health", __name__, url_prefix="/admin/health")
NAV = Nav(62, "Health", "health.index")

ROUNDS = 48  # rounds per check in the timeline: 4 hours at the default 5 minutes
WORDS = {"ok": "OK", "warn": "warning", "fail": "problem"}
CELL, GAP = 6, 2  # SVG units per round and between rounds
HEIGHT = {"ok": 6, "warn": 12, "fail": 18}  # taller is worse: readable without colour too
RUN_TIMEOUT = 90.0  # a round takes well under 5 s; the first one lists apt's updates


def strip(value: str | None) -> str:
    return (value or "").strip()


def plain_text(limit: int, what: str) -> Any:
    def check(form: FlaskForm, field: Field) -> None:
        value = field.data or ""
        if len(value) > limit:
            raise ValidationError(f"{what} is too long (at most {limit} characters).")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValidationError(f"{what} cannot contain control characters (such as tabs or line breaks).")
    return check


class AlertsForm(FlaskForm):
    alert_webhook_url = StringField(
        "Webhook URL (optional)", filters=[strip], validators=[plain_text(500, "The webhook URL")],
        description="Each change of state is also POSTed here as JSON, e.g. https://ntfy.sh/your-topic. "
                    "Leave it empty for mail alerts only.")
    dnsbl_zones = StringField(
        "Blocklists (DNSBL zones)", filters=[strip], validators=[plain_text(2000, "The list of blocklists")],
        description="Zones separated by commas, e.g. zen.spamhaus.org,bl.spamcop.net (at most 10). "
                    "Leave it empty for the defaults.")
    save_alerts = SubmitField("Save the alert settings")


def when(at: float | None) -> str:
    if not at:
        return ""
    return dt.datetime.fromtimestamp(float(at), dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def timeline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The SVG cells and a text summary for one check's rows (newest first, as
    health_history returns them): oldest on the left."""
    rounds = list(reversed(rows))
    cells, changes = [], []
    counts = {s: 0 for s in WORDS}
    top = max(HEIGHT.values())
    previous = None
    for i, row in enumerate(rounds):
        status = row.get("status") if row.get("status") in WORDS else "fail"
        counts[status] += 1
        height = HEIGHT[status]
        cells.append({"x": i * (CELL + GAP), "y": top - height, "height": height, "status": status,
                      "title": f"{when(row.get('at'))}: {WORDS[status]} — {row.get('message', '')}"})
        if previous is not None and status != previous:
            changes.append(f"{when(row.get('at'))}: {WORDS[previous]} → {WORDS[status]}")
        previous = status
    parts = [f"{counts[s]} {WORDS[s]}{'s' if counts[s] != 1 and s != 'ok' else ''}" for s in WORDS if counts[s]]
    summary = (f"The last {len(rounds)} round{'s' if len(rounds) != 1 else ''}, from {when(rounds[0].get('at'))} "
               f"to {when(rounds[-1].get('at'))}: {', '.join(parts)}.") if rounds else "No rounds recorded yet."
    return {"cells": cells, "width": max(1, len(cells) * (CELL + GAP) - GAP), "height": top, "cell": CELL,
            "summary": summary, "changes": changes, "counts": counts}


def history() -> tuple[list[dict[str, Any]], str | None]:
    """Each check with its latest result and timeline, in the checks' display order."""
    try:
        titles = check_ops.health_history(limit=1).get("checks") or {}
        out = []
        for check_id, title in titles.items():
            rows = check_ops.health_history(check=check_id, limit=ROUNDS).get("history") or []
            latest = rows[0] if rows else None
            out.append({"id": check_id, "title": title, "latest": latest,
                        "when": when(latest["at"]) if latest else "", "timeline": timeline(rows)})
    except AgentError as err:
        return [], err.message
    return out, None


def alerts_form() -> AlertsForm:
    settings = state.settings()
    form = AlertsForm(formdata=None)
    form.alert_webhook_url.data = settings.get("alert_webhook_url", "")
    form.dnsbl_zones.data = settings.get("dnsbl_zones", "")
    return form


def page(status: int = 200, **extra: Any) -> ResponseReturnValue:
    checks, error = history()
    extra.setdefault("alerts", alerts_form())
    latest = [c["latest"]["status"] for c in checks if c["latest"]]
    overall = "fail" if "fail" in latest else "warn" if "warn" in latest else "ok" if latest else None
    return render_dashboard("dashboard/health.html", current=NAV.endpoint, checks=checks, history_error=error,
                            overall=overall, not_run=len(checks) - len(latest), words=WORDS, run_form=FlaskForm(), test_form=FlaskForm(),
                            admin_address=state.get_setting("admin_address") or "", **extra), status


def failure_status(err: AgentError) -> int:
    return 503 if err.code in ("unavailable", "timeout") else 409


@bp.get("/")
def index() -> ResponseReturnValue:
    return page()


@bp.post("/run")
def run() -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, page_error="The form expired; press “Run checks now” again.")
    try:
        result = check_ops.health_run(alert=True)
    except AgentError as err:
        return page(failure_status(err), page_error=f"The checks did not run: {err.message}")
    security.rotate_csrf()
    summary = result.get("summary") or {}
    flash(f"Checks run in {result.get('seconds', 0)} s: {summary.get('ok', 0)} OK, {summary.get('warn', 0)} "
          f"warning(s), {summary.get('fail', 0)} problem(s).", "ok")
    return redirect(url_for("health.index"), code=303)


@bp.post("/alerts")
def alerts() -> ResponseReturnValue:
    form = AlertsForm()
    if not form.validate_on_submit():
        return page(422, alerts=form)
    try:
        result = check_ops.alerts_configure(webhook_url=form.alert_webhook_url.data,
                               dnsbl_zones=form.dnsbl_zones.data)
    except AgentError as err:
        message = show_error(form, err)
        if message is None:
            return page(422, alerts=form)
        return page(failure_status(err), alerts=form, alerts_error=message)
    security.rotate_csrf()
    flash("Alert settings saved: " + ("mail and webhook" if result.get("webhook") else "mail only")
          + "; blocklists " + ", ".join(result.get("dnsbl_zones") or []) + ".", "ok")
    return redirect(url_for("health.index", _anchor="alerts"), code=303)


@bp.post("/alerts/test")
def alerts_test() -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, alerts_error="The form expired; press “Send a test alert” again.")
    try:
        result = check_ops.alerts_test()
    except AgentError as err:
        return page(failure_status(err), alerts_error=f"The test alert was not sent: {err.message}")
    security.rotate_csrf()
    failed = any(str(v).startswith(("failed", "not sent")) for v in result.values())
    flash(f"Test alert: mail {result.get('mail', 'unknown')}; webhook {result.get('webhook', 'unknown')}.",
          "error" if failed else "ok")
    return redirect(url_for("health.index", _anchor="alerts"), code=303)
