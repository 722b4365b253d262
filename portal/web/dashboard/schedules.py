"""Dashboard Schedules area: the maintenance jobs the agent's scheduler runs (backup,
verify, certificate renewal, health checks, DNS check, the update window), each with its
schedule (crontab text), next run and last run; a form per job to change the
schedule or go back to the default; "Run now"; the recent runs.

Agent operations: schedule_list, schedule_set (the agent parses the crontab text
and says what is wrong, shown on the field), schedule_runs, schedule_run_now.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from flask import Blueprint, abort, flash, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import Field, StringField, SubmitField
from wtforms.validators import ValidationError

from portal.web import security
from portal.web.jobs import show_error
from portal.agent.client import AgentError
from portal.web.dashboard import Nav, render_dashboard
from portal.agent import scheduler as schedule_ops

bp = Blueprint("schedules", __name__, url_prefix="/admin/schedules")
NAV = Nav(66, "Schedules", "schedules.index")

JOB_RE = re.compile(r"^[a-z][a-z_]{0,39}$")
RECENT = 30
RUN_WAIT = 20.0  # "Run now" waits this long; a longer job goes on in the agent and shows under Recent runs
CRON_HELP = ("A schedule has five fields, as in cron: minute, hour, day of month, month, day of week (0 or 7 = "
             "Sunday; mon-fri works too), in your time zone (set on the Updates page; else the appliance's clock, "
             "UTC). For example 0 3 * * * is 03:00 every "
             "day, */30 * * * * every 30 minutes, 30 4 * * 0 Sundays at 04:30.")
OUTCOME_WORDS = {"ok": "OK", "failed": "failed", "skipped": "skipped"}


def strip(value: str | None) -> str:
    return (value or "").strip()


def cron_text(form: FlaskForm, field: Field) -> None:
    value = field.data or ""
    if form.reset.data:
        return
    if not value:
        raise ValidationError("Enter a schedule, e.g. 0 3 * * * for 03:00 every day (or press "
                              "“Back to the default”).")
    if len(value) > 200:
        raise ValidationError("That is too long for a schedule (at most 200 characters), e.g. 0 3 * * *.")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValidationError("A schedule cannot contain control characters; e.g. 0 3 * * *.")


class ScheduleForm(FlaskForm):
    cron = StringField("Schedule", filters=[strip], validators=[cron_text],
                       description="Minute, hour, day of month, month, day of week, e.g. 0 3 * * * for 03:00 daily.")
    save = SubmitField("Save the schedule")
    reset = SubmitField("Back to the default")


def when(value: str | float | None) -> str:
    """An ISO time (next run) or epoch seconds (a run's start) for people."""
    if value in (None, ""):
        return ""
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        t = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return t.strftime("%Y-%m-%d %H:%M") + (f" ({t.strftime('%z')[:3]}:{t.strftime('%z')[3:]})" if t.tzinfo else "")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def listing() -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    try:
        jobs = schedule_ops.schedule_list().get("jobs") or []
        runs = schedule_ops.schedule_runs(limit=RECENT).get("runs") or []
    except AgentError as err:
        return [], [], err.message
    return jobs, runs, None


def page(status: int = 200, error: str | None = None, **given: ScheduleForm) -> ResponseReturnValue:
    jobs, runs, list_error = listing()
    if list_error is None and set(given) - {j["job"] for j in jobs}:
        abort(404)  # a form for a job the agent does not have
    titles = {j["job"]: j.get("title", j["job"]) for j in jobs}
    for j in jobs:
        form = given.get(j["job"])
        if form is None:
            form = ScheduleForm(prefix=j["job"], formdata=None)
            form.cron.data = j.get("cron") or j.get("default_cron", "")
        j["form"] = form
        j["next"] = when(j.get("next_run"))
        last = j.get("last_run")
        if last:
            last.update(when=when(last.get("started")), took=duration(last.get("seconds")))
    for r in runs:
        r.update(title=titles.get(r["job"], r["job"]), when=when(r.get("started")), took=duration(r.get("seconds")))
    return render_dashboard("dashboard/schedules.html", current=NAV.endpoint, jobs=jobs, runs=runs,
                            list_error=list_error, error=error, words=OUTCOME_WORDS, run_form=FlaskForm(),
                            cron_help=CRON_HELP), status


def known(job: str) -> str:
    if not JOB_RE.match(job):
        abort(404)
    return job


@bp.get("/")
def index() -> ResponseReturnValue:
    return page()


@bp.post("/<job>")
def change(job: str) -> ResponseReturnValue:
    form = ScheduleForm(prefix=known(job))
    if not form.validate_on_submit():
        return page(422, **{job: form})
    cron = "default" if form.reset.data else form.cron.data
    try:
        result = schedule_ops.schedule_set(job=job, cron=cron)
    except AgentError as err:
        if err.field == "job":
            abort(404)
        message = show_error(form, err)
        if message is None:
            return page(422, **{job: form})
        return page(503 if err.code in ("unavailable", "timeout") else 409, error=message, **{job: form})
    security.rotate_csrf()
    flash(f"New schedule for {job}: {result.get('cron')}; next run {when(result.get('next_run')) or 'never'}.", "ok")
    return redirect(url_for("schedules.index", _anchor=f"job-{job}"), code=303)


@bp.post("/<job>/run")
def run_now(job: str) -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, error="The form expired; press “Run now” again.")
    try:
        result = schedule_ops.schedule_run_now(job=known(job))
    except AgentError as err:
        if err.field == "job":
            abort(404)
        if err.code == "timeout":
            security.rotate_csrf()
            flash(f"{job} is still running in the background; its outcome appears under Recent runs when "
                  "it finishes.", "ok")
            return redirect(url_for("schedules.index", _anchor="recent-runs"), code=303)
        return page(503 if err.code == "unavailable" else 409, error=f"{job} did not run: {err.message}")
    security.rotate_csrf()
    outcome = result.get("outcome", "")
    text = f"{job}: {OUTCOME_WORDS.get(outcome, outcome)} after {duration(result.get('seconds'))}"
    flash(text + (f" ({result['message']})." if result.get("message") else "."), "ok" if outcome == "ok" else "error")
    return redirect(url_for("schedules.index", _anchor="recent-runs"), code=303)
