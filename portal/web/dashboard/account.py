"""Dashboard Account area: the administrator's own sign-in.

- Change the password: the current password and a fresh code from the authenticator
  (or an unused recovery code) confirm it; every other signed-in browser is signed out,
  this one stays.
- Move to a new authenticator app: "Start" makes a new key (shown as a QR code, the
  same one on a reload for 15 minutes); a fresh code of the current app (or a recovery
  code) and a code of the new one switch over; every other browser is signed out.

Agent operations: admin_status, admin_password_change, admin_totp_reset_begin and
admin_totp_reset_confirm (portal/admin/privileged.py), which check everything again
and say which field is wrong. Five wrong codes in a row sign every session out.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, flash, redirect, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import Field, PasswordField, StringField
from wtforms.validators import ValidationError

from portal.admin import privileged as admin_ops
from portal.agent.client import AgentError
from portal.web import security
from portal.web.dashboard import Nav, render_dashboard
from portal.web.dashboard.backups import CODE_HELP, code_text
from portal.web.jobs import show_error
from portal.web.steps.admin import MAX_PASSWORD, MIN_PASSWORD, check_new_password, qr_svg, repeats

bp = Blueprint("account", __name__, url_prefix="/admin/account")
NAV = Nav(80, "Account", "account.index")


class PasswordForm(FlaskForm):
    old_password = PasswordField("Current password")
    new_password = PasswordField("New password",
                                 description=f"At least {MIN_PASSWORD} characters; a few random words work well. "
                                             "It is the dashboard's password only: your mailbox keeps its own "
                                             "(change it under Mailboxes).")
    new_password_confirm = PasswordField("New password again", validators=[repeats("new_password", "new password")])
    totp_code = StringField("Code to confirm", validators=[code_text], description=CODE_HELP, id="password_totp_code")

    def validate_old_password(self, field: Field) -> None:
        if not field.data:
            raise ValidationError("Enter the password you sign in with now.")
        if len(field.data) > MAX_PASSWORD:
            raise ValidationError("That password is too long to be yours (at most 1024 characters).")

    def validate_new_password(self, field: Field) -> None:
        check_new_password(field.data or "")



class StartForm(FlaskForm):
    """"Start" of the move to a new authenticator (CSRF only)."""


def new_code_text(form: FlaskForm, field: Field) -> None:
    field.data = "".join((field.data or "").split())
    if not (len(field.data) == 6 and field.data.isascii() and field.data.isdigit()):
        raise ValidationError("Enter the 6-digit code the new authenticator app shows (digits only).")


class TotpForm(FlaskForm):
    new_code = StringField("Code from the new authenticator app", validators=[new_code_text],
                           description="After scanning the QR code, the 6-digit code the new app shows.")
    totp_code = StringField("Code from your current authenticator app", validators=[code_text], id="totp_totp_code",
                            description="A fresh code of the app you sign in with now, or an unused recovery code.")


def status() -> tuple[dict[str, Any], str | None]:
    try:
        return admin_ops.admin_status(), None
    except AgentError as err:
        return {}, err.message


def page(code: int = 200, **extra: Any) -> ResponseReturnValue:
    info, error = status()
    extra.setdefault("password_form", PasswordForm(formdata=None))
    extra.setdefault("start_form", StartForm(formdata=None))
    return render_dashboard("dashboard/account.html", current=NAV.endpoint, admin=info, status_error=error,
                            **extra), code


def signed_out(err: AgentError) -> ResponseReturnValue:
    """Too many wrong codes: the agent ended every session, this one too."""
    session.clear()
    security.rotate_csrf()
    flash(err.message, "error")
    return redirect(url_for("auth.login"), code=303)


def enrolment(form: TotpForm | None = None, code: int = 200, error: str | None = None) -> ResponseReturnValue:
    """The new authenticator's key (QR code) and the form that switches to it."""
    try:
        pending = admin_ops.admin_totp_reset_begin()
    except AgentError as err:
        return page(503 if err.code in ("unavailable", "timeout") else 409, totp_error=err.message)
    return page(code, totp=pending, qr=qr_svg(pending["uri"]), totp_form=form or TotpForm(formdata=None),
                totp_error=error)


@bp.get("/")
def index() -> ResponseReturnValue:
    return page()


@bp.post("/password")
def password() -> ResponseReturnValue:
    form = PasswordForm()
    if not form.validate_on_submit():
        form.totp_code.data = ""
        return page(422, password_form=form)
    try:
        result = admin_ops.admin_password_change(old_password=form.old_password.data,
                                                 new_password=form.new_password.data,
                                                 totp_code=form.totp_code.data,
                                                 session=str(session.get("sid") or ""))
    except AgentError as err:
        if err.code == "signed_out":
            return signed_out(err)
        form.totp_code.data = ""
        message = show_error(form, err)
        return page(422 if message is None else 503 if err.code in ("unavailable", "timeout") else 409,
                    password_form=form, password_error=message)
    security.rotate_csrf()
    ended = result.get("sessions_ended", 0)
    flash("The password is changed." + (f" {ended} other signed-in browser(s) were signed out." if ended else ""),
          "ok")
    return redirect(url_for("account.index"), code=303)


@bp.post("/totp/begin")
def totp_begin() -> ResponseReturnValue:
    if not StartForm().validate_on_submit():
        return page(400, totp_error="The form expired; press “Start” again.")
    return enrolment()


@bp.post("/totp/confirm")
def totp_confirm() -> ResponseReturnValue:
    form = TotpForm()
    if not form.validate_on_submit():
        form.totp_code.data = form.new_code.data = ""
        return enrolment(form, 422)
    try:
        result = admin_ops.admin_totp_reset_confirm(totp_code=form.totp_code.data, new_code=form.new_code.data,
                                                    session=str(session.get("sid") or ""))
    except AgentError as err:
        if err.code == "signed_out":
            return signed_out(err)
        form.totp_code.data = form.new_code.data = ""
        message = show_error(form, err)
        return enrolment(form, 422 if message is None else 409, message)
    security.rotate_csrf()
    ended = result.get("sessions_ended", 0)
    flash("You now sign in with the new authenticator app; the old one no longer works."
          + (f" {ended} other signed-in browser(s) were signed out." if ended else ""), "ok")
    return redirect(url_for("account.index"), code=303)
