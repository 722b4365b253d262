"""Dashboard Updates area: the running version and its build date, what the feed
offers (version, date, change notes), "Check now", "Install now", the settings
(automatic updates, the window's hour, the owner's time zone, the feed's
address), the history of updates and rollbacks, and "Go back to the previous
version".

Agent operations: update_status (reading never touches the feed), update_check,
update_install, update_rollback, update_configure. Installing and going back run
in root's mailstead-update@.service and end in a reboot.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, flash, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import BooleanField, IntegerField, StringField, SubmitField
from wtforms.validators import InputRequired, NumberRange, ValidationError

from portal.agent.client import AgentError
from portal.update import privileged as update_ops
from portal.web import security
from portal.web.dashboard import Nav, render_dashboard
from portal.web.jobs import show_error

bp = Blueprint("updates", __name__, url_prefix="/admin/updates")
NAV = Nav(68, "Updates", "updates.index")

OUTCOMES = {"installed": "installed", "failed": "failed its health checks", "rolled_back": "rolled back",
            "not_installed": "not installed", "abandoned": "abandoned"}


def strip(value: str | None) -> str:
    return (value or "").strip()


def one_line(limit: int, what: str) -> Any:
    def check(form: FlaskForm, field: Any) -> None:
        value = field.data or ""
        if len(value) > limit:
            raise ValidationError(f"{what} is too long (at most {limit} characters).")
        if any(ord(ch) < 32 or ord(ch) == 127 or ch.isspace() for ch in value):
            raise ValidationError(f"{what} cannot contain spaces or control characters.")
    return check


class SettingsForm(FlaskForm):
    auto = BooleanField("Install new versions by themselves in the update window",
                        description="On by default. A new version that is not healthy is undone by itself.")
    window_hour = IntegerField("The window opens at (hour, 0-23)", validators=[
        InputRequired("Enter an hour from 0 to 23, e.g. 4 for 04:00."),
        NumberRange(0, 23, "Enter an hour from 0 to 23, e.g. 4 for 04:00.")],
        description="The appliance reboots then, for a few minutes, when a new version is installed.")
    time_zone = StringField("Your time zone", filters=[strip], validators=[one_line(64, "The time zone")],
                            description="Such as Europe/Berlin or America/New_York. Empty: the appliance's "
                                        "clock (UTC). Every scheduled job runs in it.")
    feed_url = StringField("Update feed", filters=[strip], validators=[one_line(500, "The feed's address")],
                           description="The http(s) address of the folder scripts/publish writes. Empty: the "
                                       "one this appliance was built with. Only versions signed with the key "
                                       "built into this appliance are installed.")
    save = SubmitField("Save the update settings")


def when(value: Any) -> str:
    if not value:
        return ""
    try:
        t = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def size(n: Any) -> str:
    return f"{int(n) / 1e6:.0f} MB" if isinstance(n, int) and n > 0 else ""


def settings_form(status: dict[str, Any]) -> SettingsForm:
    form = SettingsForm(formdata=None)
    form.auto.data = bool(status.get("auto"))
    cron = ((status.get("window") or {}).get("cron") or "0 4 * * *").split()
    form.window_hour.data = int(cron[1]) if len(cron) == 5 and cron[1].isdigit() else 4
    form.time_zone.data = status.get("time_zone", "")
    feed = status.get("feed_url", "")
    form.feed_url.data = "" if feed == status.get("feed_url_default") else feed
    return form


def page(status_code: int = 200, **extra: Any) -> ResponseReturnValue:
    try:
        status = update_ops.update_status()
        error = None
    except AgentError as err:
        status, error = {}, err.message
    extra.setdefault("settings", settings_form(status) if status else SettingsForm(formdata=None))
    check = status.get("check") or {}
    for entry in status.get("history") or []:
        entry["when"] = when(entry.get("at"))
        entry["word"] = OUTCOMES.get(entry.get("outcome", ""), entry.get("outcome", ""))
    return render_dashboard("dashboard/updates.html", current=NAV.endpoint, status=status, status_error=error,
                            check=check, checked=when(check.get("at")), built=when(status.get("built")),
                            newest_built=when((check.get("notes") or {}).get("built")),
                            slot_size=size((check.get("notes") or {}).get("slot_bytes")),
                            next_window=when((status.get("window") or {}).get("next_run")),
                            action_form=FlaskForm(), **extra), status_code


def failure_status(err: AgentError) -> int:
    return 503 if err.code in ("unavailable", "timeout") else 409


@bp.get("/")
def index() -> ResponseReturnValue:
    return page()


@bp.post("/check")
def check_now() -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, page_error="The form expired; press “Check now” again.")
    try:
        result = update_ops.update_check()
    except AgentError as err:
        return page(failure_status(err), page_error=f"The feed was not read: {err.message}")
    security.rotate_csrf()
    flash(result.get("message", ""), "ok" if result.get("ok") else "error")
    return redirect(url_for("updates.index"), code=303)


@bp.post("/install")
def install() -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, page_error="The form expired; press “Install now” again.")
    try:
        result = update_ops.update_install()
    except AgentError as err:
        return page(failure_status(err), page_error=f"Not installed: {err.message}")
    security.rotate_csrf()
    flash(f"Installing {result.get('started')}: the appliance reboots into it when it is written, and the "
          "portal is away for a few minutes. This page shows the outcome afterwards.", "ok")
    return redirect(url_for("updates.index"), code=303)


@bp.post("/rollback")
def rollback() -> ResponseReturnValue:
    if not FlaskForm().validate_on_submit():
        return page(400, page_error="The form expired; press “Go back” again.")
    try:
        result = update_ops.update_rollback()
    except AgentError as err:
        return page(failure_status(err), page_error=f"Not going back: {err.message}")
    security.rotate_csrf()
    flash(f"Going back to {result.get('started')}: the appliance reboots now.", "ok")
    return redirect(url_for("updates.index"), code=303)


@bp.post("/settings")
def settings() -> ResponseReturnValue:
    form = SettingsForm()
    if not form.validate_on_submit():
        return page(422, settings=form)
    try:
        result = update_ops.update_configure(auto=bool(form.auto.data), feed_url=form.feed_url.data,
                                             time_zone=form.time_zone.data, window_hour=int(form.window_hour.data))
    except AgentError as err:
        message = show_error(form, err, {"update_feed_url": "feed_url"})
        if message is None:
            return page(422, settings=form)
        return page(failure_status(err), settings=form, settings_error=message)
    security.rotate_csrf()
    window = result.get("window") or {}
    flash(f"Update settings saved: automatic updates {'on' if result.get('auto') else 'off'}; the next window "
          f"opens {when(window.get('next_run')) or 'never'}.", "ok")
    return redirect(url_for("updates.index", _anchor="update-settings"), code=303)
